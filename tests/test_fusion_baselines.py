"""The fusion bench's baselines that need no trained model: the cascade, the static-weight
grid, and CIRR's two readings of "Rmean"."""

import pytest
import torch

from circe.bench.fusion import cascade_scores, fusion_markdown, simplex_grid
from circe.eval.benchmark import cirr_metrics


def ranking(scores: torch.Tensor) -> list[list[int]]:
    return scores.argsort(dim=-1, descending=True).tolist()


def test_the_cascade_reranks_each_members_short_list_in_turn():
    generator = torch.Generator().manual_seed(0)
    first, second = torch.rand(3, 300, generator=generator), torch.rand(3, 300, generator=generator)
    exclude = torch.zeros(3, 300, dtype=torch.bool)
    exclude[:, 7] = True  # the reference: never ranked
    fused = cascade_scores([first, second], exclude)
    for row in range(3):
        short = set((first[row].masked_fill(exclude[row], -1)).topk(100).indices.tolist())
        order = ranking(fused)[row]
        assert set(order[:100]) == short  # member 1's top 100 come first ...
        by_second = sorted(short, key=lambda i: -second[row, i].item())
        assert order[:100] == by_second  # ... in member 2's order
        rest = sorted(set(range(300)) - short - {7}, key=lambda i: -first[row, i].item())
        assert order[100:299] == rest  # then the others, in member 1's order
        assert order[-1] == 7 and fused[row, 7] == -torch.inf
    # With three members the second keeps 50 of the 100 and the third orders them.
    third = torch.rand(3, 300, generator=generator)
    fused = cascade_scores([first, second, third], exclude)
    for row in range(3):
        short = (second[row].masked_fill(exclude[row], -1)).topk(300).indices.tolist()
        hundred = set((first[row].masked_fill(exclude[row], -1)).topk(100).indices.tolist())
        fifty = [i for i in short if i in hundred][:50]
        assert ranking(fused)[row][:50] == sorted(fifty, key=lambda i: -third[row, i].item())
    # The order of the members matters to a cascade.
    assert ranking(cascade_scores([first, second], exclude)) != ranking(
        cascade_scores([second, first], exclude)
    )


def test_the_static_grid_covers_the_simplex():
    grid = simplex_grid(3)
    assert len(grid) == 66 and len(set(grid)) == 66  # C(12, 2)
    assert all(sum(w) == pytest.approx(1) and min(w) >= 0 for w in grid)
    assert (1.0, 0.0, 0.0) in grid and (0.3, 0.3, 0.4) in grid
    assert len(simplex_grid(2, steps=4)) == 5


def test_cirr_rmean_both_ways():
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(20, 40, generator=generator)
    targets = torch.zeros(20, 40, dtype=torch.bool)
    targets[torch.arange(20), torch.arange(20)] = True
    subset = torch.zeros(20, 40, dtype=torch.bool)
    for row in range(20):
        subset[row, [row, (row + 1) % 40, (row + 2) % 40, 39]] = True
    exclude = torch.zeros(20, 40, dtype=torch.bool)
    exclude[:, 39] = True

    class Labels:
        pass

    labels = Labels()
    labels.targets, labels.subset, labels.exclude = targets, subset, exclude
    metrics = cirr_metrics(scores, labels)
    assert metrics["Avg"] == pytest.approx((metrics["R@5"] + metrics["Rsubset@1"]) / 2)
    seven = [metrics[f"R@{k}"] for k in (1, 5, 10, 50)] + [
        metrics[f"Rsubset@{k}"] for k in (1, 2, 3)
    ]
    assert metrics["Mean7"] == pytest.approx(sum(seven) / 7)
    assert metrics["Avg"] != pytest.approx(metrics["Mean7"])

    # The fusion table shows both when the record has them.
    value = {"mean": 50.0, "std": 1.0}
    row = {key: value for key in metrics}
    record = {
        "command": "circe bench fusion",
        "dataset": "cirr",
        "backbone": "default",
        "members": ["combiner", "dwc"],
        "gate_split": "train",
        "seeds": [0],
        "splits": ["val"],
        "machine": {"torch_threads": 1},
        "summary": {
            "metrics": {"val": {"combiner": row, "dwc": row, "dafm": row, "dafm-equal": row}},
            "mean_gate_weights": {"val": {"combiner": 0.5, "dwc": 0.5}},
            "static_weights": {"combiner": 0.4, "dwc": 0.6},
            "best_member": {},
            "cost": {
                name: {"query_ms": 1.0, "weight_bytes": 1, "index_bytes_per_image": 4}
                for name in ("combiner", "dwc", "dafm")
            },
            "train_seconds": {},
        },
    }
    table = fusion_markdown(record)
    assert "val Rmean = (R@5 + Rsubset@1) / 2" in table and "val Rmean = mean of the 7" in table
    assert "| `dwc` | 50.0 ± 1.0 |" in table and "| 0.500 | 0.60 |" in table

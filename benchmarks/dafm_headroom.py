"""How much can per-query fusion gain over DAFM's members, and what does its gate learn from?

For one trained DAFM (a run of `circe bench fusion --runs DIR`: DIR/dafm-.../seed-N), on
the training split, `val` and `test`:

- R@1 of every member, of `dafm-equal` and of DAFM;
- the oracle: the share of queries that at least one member ranks right at 1, the most any
  choice of one member per query could reach (a soft fusion can exceed it only where no
  member alone is right);
- DAFM's mean weight per member;
- fixed weights: the one weighting of the members, on a grid of step 0.05, with the best
  R@1 on `val`, applied to every split (what a query-independent fusion tuned on held-out
  queries reaches).

A gate learns which member to trust from how the members differ on its training queries:
where every member is nearly always right there (they were trained on those pairs), it
learns little that holds on unseen queries.

Writes benchmarks/results/fusion/headroom.{json,md}.

    python benchmarks/dafm_headroom.py --dafm runs/bench-fusion/dafm-combiner+dwc+dqu-cir-gate-train/seed-0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from circe.eval.evaluate import encode_gallery, encode_queries, masks
from circe.methods.checkpoint import load_trained_method
from circe.methods.dafm import DAFM
from circe.train.data import load_split

OUT = Path(__file__).resolve().parent / "results" / "fusion"
SPLITS = ("train", "val", "test")
GRID_STEP = 0.05


def weight_grid(members: int) -> list[tuple[float, ...]]:
    """Every weighting of `members` on the simplex in steps of GRID_STEP."""
    steps = round(1 / GRID_STEP)

    def compositions(total: int, parts: int):
        if parts == 1:
            yield (total,)
            return
        for first in range(total + 1):
            for rest in compositions(total - first, parts - 1):
                yield (first, *rest)

    return [tuple(c / steps for c in combo) for combo in compositions(steps, members)]


def hits_at_1(scores: torch.Tensor, split) -> torch.Tensor:
    """`[Q]` bool: is the best-scored gallery image (excluded ones left out) a target."""
    target, exclude = masks(split, split.queries)
    best = scores.masked_fill(exclude, float("-inf")).argmax(dim=-1)
    return target.gather(1, best[:, None]).squeeze(1)


@torch.no_grad()
def measure(dafm: DAFM, split_name: str, dataset: str, root: str, batch: int) -> tuple:
    """The split's record, and a function from member weights to R@1 on it."""
    split = load_split(dataset, root, split_name)
    queries = torch.cat(
        [encode_queries(m, split.queries, split, batch, 0) for m in dafm.members], -1
    )
    gallery = torch.cat([encode_gallery(m, split, batch, 0) for m in dafm.members], -1)
    scores = {
        name: q @ g.T
        for name, q, g in zip(
            dafm.member_names, dafm.split(queries), dafm.split(gallery), strict=True
        )
    }
    hits = {name: hits_at_1(s, split) for name, s in scores.items()}
    any_member = torch.stack(list(hits.values())).any(dim=0)
    fused_targets = dafm.encode_targets_from_features(gallery)
    dafm_scores = dafm.encode_queries_from_features(queries) @ fused_targets.T
    fused = {
        "dafm-equal": hits_at_1(sum(scores.values()) / len(scores), split),  # every w_m = 1/M
        "dafm": hits_at_1(dafm_scores, split),
    }
    weights = dafm.member_weights(queries).mean(0).tolist()

    def fixed_weights_r1(weighting: tuple[float, ...]) -> float:
        fused_scores = sum(w * s for w, s in zip(weighting, scores.values(), strict=True))
        return 100 * hits_at_1(fused_scores, split).float().mean().item()

    record = {
        "queries": len(split.queries),
        "R@1": {name: 100 * h.float().mean().item() for name, h in {**hits, **fused}.items()},
        "oracle_R@1": 100 * any_member.float().mean().item(),
        "mean_gate_weights": dict(zip(dafm.member_names, weights, strict=True)),
    }
    return record, fixed_weights_r1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dafm", type=Path, required=True, help="a DAFM run directory")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    dafm = load_trained_method(args.dafm / "best")
    dafm.eval()
    config = json.loads((args.dafm / "config.json").read_text())
    measured = {
        name: measure(dafm, name, config["dataset"], config["root"], args.batch_size)
        for name in SPLITS
    }
    on_val = measured["val"][1]
    best = max(weight_grid(len(dafm.members)), key=on_val)
    for split_record, fixed_weights_r1 in measured.values():
        split_record["R@1"]["fixed weights"] = fixed_weights_r1(best)
    record = {
        "dafm": str(args.dafm),
        "members": dafm.member_names,
        "fixed_weights": dict(zip(dafm.member_names, best, strict=True)),
        "splits": {name: split_record for name, (split_record, _) in measured.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "headroom.json").write_text(json.dumps(record, indent=2))
    models = [*dafm.member_names, "dafm-equal", "fixed weights", "dafm"]
    lines = [
        "# DAFM headroom: members, fusions and the per-query oracle",
        "",
        (
            f"Generated by `python benchmarks/dafm_headroom.py --dafm {args.dafm}`. R@1 in percent; "
            "oracle: share of queries some member ranks right at 1; fixed weights: "
            + ", ".join(f"{m} {w:.2f}" for m, w in record["fixed_weights"].items())
            + " (the best on `val`)."
        ),
        "",
        "| split | " + " | ".join(f"`{m}`" for m in models) + " | oracle | gate weights |",
        "|" + "---|" * (len(models) + 3),
    ]
    for name, values in record["splits"].items():
        cells = [f"{values['R@1'][m]:.1f}" for m in models]
        gate = ", ".join(f"{m} {w:.2f}" for m, w in values["mean_gate_weights"].items())
        lines.append(
            f"| {name} ({values['queries']}) | "
            + " | ".join(cells)
            + f" | {values['oracle_R@1']:.1f} | {gate} |"
        )
    (args.out / "headroom.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Each benchmark's metrics on hand-set scores, and CIRR's against an implementation written
from the server's definition."""

from pathlib import Path

import pytest
import torch
from benchmark_fixtures import write_cirr, write_fashion200k, write_shoes

from circe.data.registry import Benchmark, load_benchmark
from circe.data.types import CIRSplit, Gallery, Query
from circe.eval.benchmark import score_benchmark
from circe.eval.submission import cirr_submission


def split_of(
    n_images: int, queries: list[Query], exclude_reference: bool, name: str = "part"
) -> CIRSplit:
    """An in-memory split over images "0".."n-1" (the metrics never open a file)."""
    gallery = Gallery({str(i): Path(f"{i}.png") for i in range(n_images)})
    return CIRSplit(name, queries, gallery, exclude_reference=exclude_reference)


def descending(q: int, n: int) -> torch.Tensor:
    """Scores that rank gallery image i at (0-based) place i for every query."""
    return -torch.arange(n, dtype=torch.float32).expand(q, n).clone()


# ----------------------------------------------------------------------------- CIRR


def test_cirr_metrics_by_hand(tmp_path):
    """Fixture val: 8 images dev-0..dev-7, pairs 10 (dev-0 -> dev-1), 11 (dev-2 -> dev-3),
    12 (dev-4 -> dev-6)."""
    benchmark = load_benchmark("cirr", write_cirr(tmp_path), "val")
    scores = torch.zeros(3, 8)
    scores[0] = torch.tensor([9, 8, 0, 0, 0, 0, 0, 0])  # reference first: removed; target #1
    scores[1] = torch.tensor([0, 0, 0, 7, 0, 8, 0, 9])  # target behind two non-members: #3
    # pair 12: all tied, so gallery order decides: dev-0 dev-1 dev-2 dev-3 dev-5 dev-6 dev-7
    # (dev-4, the reference, removed) puts the target 6th; among its members
    # (dev-6, dev-5, dev-0, dev-1, dev-2) the order is dev-0 dev-1 dev-2 dev-5 dev-6: 5th.
    result = score_benchmark(benchmark, [scores])
    third = 100 / 3
    assert result.metrics == pytest.approx(
        {
            "R@1": third,
            "R@5": 2 * third,
            "R@10": 100.0,
            "R@50": 100.0,
            "Rsubset@1": 2 * third,
            "Rsubset@2": 2 * third,
            "Rsubset@3": 2 * third,
            "Avg": 2 * third,  # (R@5 + Rsubset@1) / 2
            "Mean7": (third + 2 * third + 100 + 100 + 3 * 2 * third) / 7,  # all seven recalls
        }
    )
    assert result.protocol["reference_excluded"] == "yes"


def cirr_reference_metrics(scores: torch.Tensor, split: CIRSplit) -> dict[str, float]:
    """CIRR's metrics from their definition, in plain Python: rank the whole gallery (ties to
    the earlier image), drop the reference, then hit rates of target_hard in the top K, and
    in the top K of what is left after keeping only the img_set members."""
    ids = split.gallery.ids
    hits = {f"R@{k}": 0 for k in (1, 5, 10, 50)} | {f"Rsubset@{k}": 0 for k in (1, 2, 3)}
    for row, query in zip(scores.tolist(), split.queries):
        order = sorted(range(len(ids)), key=lambda j: (-row[j], j))
        ranked = [ids[j] for j in order if ids[j] != query.reference_id]
        subset = [i for i in ranked if i in query.subset_ids]
        target = query.target_ids[0]
        for k in (1, 5, 10, 50):
            hits[f"R@{k}"] += target in ranked[:k]
        for k in (1, 2, 3):
            hits[f"Rsubset@{k}"] += target in subset[:k]
    metrics = {name: 100 * count / len(split.queries) for name, count in hits.items()}
    return metrics | {"Avg": (metrics["R@5"] + metrics["Rsubset@1"]) / 2}


def random_cirr(seed: int, n_images: int = 70, n_queries: int = 60):
    generator = torch.Generator().manual_seed(seed)
    queries = []
    for q in range(n_queries):
        members = torch.randperm(n_images, generator=generator)[:6].tolist()
        reference, target = str(members[0]), str(members[1])
        subset = tuple(str(m) for m in members)
        queries.append(Query(str(1000 + q), reference, ("t",), (target,), subset))
    split = split_of(n_images, queries, exclude_reference=True)
    # Few distinct values: many ties, including ties with the reference and the target.
    scores = torch.randint(0, 5, (n_queries, n_images), generator=generator).float()
    return Benchmark("cirr", "val", [split], "cirr", "cirr"), scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cirr_metrics_match_an_independent_implementation(seed):
    benchmark, scores = random_cirr(seed)
    ours = score_benchmark(benchmark, [scores]).metrics
    reference = cirr_reference_metrics(scores, benchmark.parts[0])
    # Mean7 is ours alone (the other reading of "Rmean"): the mean of the seven recalls.
    assert ours.pop("Mean7") == pytest.approx(
        sum(v for k, v in reference.items() if k != "Avg") / 7
    )
    assert ours == pytest.approx(reference)


def test_cirr_submission_scored_as_the_server_scores_it_gives_our_metrics():
    """The server only sees the submitted lists: a hit is the target in the list's top K."""
    benchmark, scores = random_cirr(3)
    split = benchmark.parts[0]
    files = cirr_submission(split, scores)
    recall = files["cirr_part_recall.json"]
    subset = files["cirr_part_recall_subset.json"]
    served = {}
    for k in (1, 5, 10, 50):
        hits = sum(q.target_ids[0] in recall[q.query_id][:k] for q in split.queries)
        served[f"R@{k}"] = 100 * hits / len(split.queries)
    for k in (1, 2, 3):
        hits = sum(q.target_ids[0] in subset[q.query_id][:k] for q in split.queries)
        served[f"Rsubset@{k}"] = 100 * hits / len(split.queries)
    ours = score_benchmark(benchmark, [scores]).metrics
    assert {k: ours[k] for k in served} == pytest.approx(served)


# ----------------------------------------------------------------------------- FashionIQ


def test_fashioniq_per_category_and_means_by_hand():
    """Three categories over 60 images ranked 0..59; targets at the places below."""

    def part(name, targets, references, exclude):
        queries = [
            Query(f"{name}{n}", str(r), ("t",), (str(t),))
            for n, (t, r) in enumerate(zip(targets, references))
        ]
        return split_of(60, queries, exclude, name)

    def score(exclude):
        parts = [
            part("dress", (10, 20), (0, 30), exclude),  # reference 0 is ahead of target 10
            part("shirt", (12, 55), (40, 41), exclude),
            part("toptee", (1, 2), (50, 51), exclude),
        ]
        benchmark = Benchmark("fashioniq", "val", parts, "fashioniq", None)
        return score_benchmark(benchmark, [descending(2, 60)] * 3)

    masked = score(exclude=True)
    assert masked.per_part == {
        "dress": {"R@10": 50.0, "R@50": 100.0, "Avg": 75.0},  # target 10 -> 9th after masking
        "shirt": {"R@10": 0.0, "R@50": 50.0, "Avg": 25.0},
        "toptee": {"R@10": 100.0, "R@50": 100.0, "Avg": 100.0},
    }
    assert masked.metrics == pytest.approx({"R@10": 50.0, "R@50": 250 / 3, "Avg": 200 / 3})
    unmasked = score(exclude=False)  # CLIP4Cir: the reference keeps its place
    assert unmasked.per_part["dress"]["R@10"] == 0.0
    assert unmasked.metrics["R@10"] == pytest.approx(100 / 3)


# ----------------------------------------------------------------------------- CIRCO


def test_circo_map_divides_by_min_k_and_ground_truths():
    queries = [
        # ground truths at places 0, 2 and 30; the reference (59) is never masked
        Query("0", "59", ("t",), ("0", "2", "30"), tags=("cardinality",)),
        Query("1", "58", ("t",), ("7",), tags=("cardinality", "addition")),
    ]
    benchmark = Benchmark("circo", "val", [split_of(60, queries, False)], "circo", "circo")
    result = score_benchmark(benchmark, [descending(2, 60)])
    first = (1 / 1 + 2 / 3) / 3  # AP@5 = AP@10 = AP@25: precisions at the hits / min(3, K)
    first_50 = (1 / 1 + 2 / 3 + 3 / 31) / 3
    second = 1 / 8  # one ground truth at place 8: 1/8 / min(1, K) from K = 10 on
    assert result.metrics == pytest.approx(
        {
            "mAP@5": 100 * (first + 0) / 2,
            "mAP@10": 100 * (first + second) / 2,
            "mAP@25": 100 * (first + second) / 2,
            "mAP@50": 100 * (first_50 + second) / 2,
            "R@5": 50.0,  # recall counts only the first ground truth, the target_img_id
            "R@10": 100.0,
            "R@25": 100.0,
            "R@50": 100.0,
        }
    )
    assert result.per_tag["addition"]["mAP@10"] == pytest.approx(100 * second)
    assert result.per_tag["cardinality"]["mAP@10"] == pytest.approx(result.metrics["mAP@10"])


# ----------------------------------------------------------------------------- Shoes, F200K


def test_shoes_masks_the_reference(tmp_path):
    """Gallery boots_1, boots_2, boots_3; queries boots_1 -> boots_2, boots_3 -> boots_1."""
    benchmark = load_benchmark("shoes", write_shoes(tmp_path))
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])  # each reference scores best
    result = score_benchmark(benchmark, [scores])
    assert result.metrics == {"R@1": 50.0, "R@10": 100.0, "R@50": 100.0}


def test_fashion200k_counts_a_caption_match_as_a_hit(tmp_path):
    """Query 0: image 1 -> image 2 "blue sleeveless dress", whose caption image 3 shares;
    query 1: image 4 -> image 1."""
    benchmark = load_benchmark("fashion200k", write_fashion200k(tmp_path))
    scores = torch.tensor(
        [
            [0.0, 0.5, 0.9, 0.1, 0.2],  # image 3 first: not the target file, same caption
            [0.5, 0.0, 0.0, 0.9, 0.7],  # the reference first (removed), then image 5
        ]
    )
    result = score_benchmark(benchmark, [scores])
    assert result.metrics == {"R@1": 50.0, "R@10": 100.0, "R@50": 100.0}


def test_hidden_labels_cannot_be_scored(tmp_path):
    benchmark = load_benchmark("cirr", write_cirr(tmp_path), "test1")
    with pytest.raises(ValueError, match="hidden test labels.*--submission"):
        score_benchmark(benchmark, [torch.zeros(3, 56)])

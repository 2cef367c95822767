"""Scoring a benchmark exactly as it defines its metrics.

Each data set names its metric set in the registry (`circe.data.registry`); the sets are:

* ``recall``: R@1/10/50 (the synthetic benchmark, Shoes, Fashion200K, a folder of images).
* ``fashioniq``: R@10 and R@50 and Avg = their mean, per category; the headline numbers are
  the unweighted means over the categories (CLIP4Cir's ``compute_fiq_val_metrics``).
* ``cirr``: R@1/5/10/50 over the split gallery with the reference removed,
  Recall_subset@1/2/3 among the query's ``img_set`` members (reference removed), and
  Avg = (R@5 + Recall_subset@1) / 2.
* ``circo``: mAP@5/10/25/50 over all ground truths (AP@K / min(K, #ground truths)) and
  R@5/10/25/50 of the first ground truth, the ``target_img_id`` (the server's
  ``evaluation.py``).

Scoring takes the score matrices (`circe.eval.evaluate.score_matrix`), so it can be checked
on hand-set scores; all ranking rules, ties included, are those of `circe.eval.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from circe.data.registry import Benchmark
from circe.data.types import CIRSplit
from circe.eval.labels import Labels
from circe.eval.metrics import map_at_k, recall_at_k, recall_subset_at_k

MetricSet = Callable[[torch.Tensor, Labels], dict[str, float]]


def _named(name: str, values: dict[int, float]) -> dict[str, float]:
    return {f"{name}@{k}": v for k, v in values.items()}


def recall_metrics(scores: torch.Tensor, labels: Labels) -> dict[str, float]:
    return _named("R", recall_at_k(scores, labels.targets, (1, 10, 50), labels.exclude))


def fashioniq_metrics(scores: torch.Tensor, labels: Labels) -> dict[str, float]:
    metrics = _named("R", recall_at_k(scores, labels.targets, (10, 50), labels.exclude))
    return metrics | {"Avg": (metrics["R@10"] + metrics["R@50"]) / 2}


def cirr_metrics(scores: torch.Tensor, labels: Labels) -> dict[str, float]:
    metrics = _named("R", recall_at_k(scores, labels.targets, (1, 5, 10, 50), labels.exclude))
    metrics |= _named(
        "Rsubset",
        recall_subset_at_k(scores, labels.targets, labels.subset, (1, 2, 3), labels.exclude),
    )
    # "Avg" is the benchmark's own summary; "Mean7", the mean of all seven recalls, is the
    # other reading of the "Rmean" that some papers (DAFM) report without defining it.
    return metrics | {
        "Avg": (metrics["R@5"] + metrics["Rsubset@1"]) / 2,
        "Mean7": sum(metrics.values()) / len(metrics),
    }


def circo_metrics(scores: torch.Tensor, labels: Labels) -> dict[str, float]:
    ks = (5, 10, 25, 50)
    metrics = _named("mAP", map_at_k(scores, labels.targets, ks, labels.exclude))
    return metrics | _named("R", recall_at_k(scores, labels.first_targets, ks, labels.exclude))


METRIC_SETS: dict[str, MetricSet] = {
    "recall": recall_metrics,
    "fashioniq": fashioniq_metrics,
    "cirr": cirr_metrics,
    "circo": circo_metrics,
}


@dataclass
class BenchmarkResult:
    metrics: dict[str, float]  # the benchmark's numbers, in percent (means over the parts)
    per_part: dict[str, dict[str, float]] = field(default_factory=dict)  # FashionIQ categories
    per_tag: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. CIRCO aspects
    protocol: dict[str, str] = field(default_factory=dict)


def _per_tag(
    measure: MetricSet, split: CIRSplit, scores: torch.Tensor
) -> dict[str, dict[str, float]]:
    results = {}
    for tag in sorted({t for q in split.queries for t in q.tags}):
        rows = [n for n, q in enumerate(split.queries) if tag in q.tags]
        queries = [split.queries[n] for n in rows]
        results[tag] = measure(scores[rows], Labels(split, queries))
    return results


def score_benchmark(benchmark: Benchmark, scores: Sequence[torch.Tensor]) -> BenchmarkResult:
    """The benchmark's metrics from one `[Q, N]` score matrix per part (higher is better)."""
    if not benchmark.labelled:
        raise ValueError(
            f"{benchmark.dataset} {benchmark.split} has queries without targets (hidden test "
            "labels): it cannot be scored locally"
            + ("; write the server's files with --submission DIR" if benchmark.submission else "")
        )
    measure = METRIC_SETS[benchmark.metrics]
    per_part = {}
    for split, part_scores in zip(benchmark.parts, scores, strict=True):
        expected = (len(split.queries), len(split.gallery))
        if tuple(part_scores.shape) != expected:
            raise ValueError(
                f"scores for {split.name} are {list(part_scores.shape)}, not {list(expected)}"
            )
        per_part[split.name] = measure(part_scores, Labels(split))
    first = next(iter(per_part.values()))
    means = {key: sum(p[key] for p in per_part.values()) / len(per_part) for key in first}
    if len(benchmark.parts) > 1:
        return BenchmarkResult(means, per_part, protocol=benchmark.protocol)
    only = benchmark.parts[0]
    return BenchmarkResult(
        means, per_tag=_per_tag(measure, only, scores[0]), protocol=benchmark.protocol
    )

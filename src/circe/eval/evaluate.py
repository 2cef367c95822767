"""Evaluate a method on a split: encode the gallery once, score every query, compute metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from circe.data.batching import image_batches, query_batches
from circe.data.types import CIRSplit, Query
from circe.eval.labels import Labels
from circe.eval.metrics import recall_at_k, top_k
from circe.methods.base import CIRMethod
from circe.progress import Progress, no_progress


@dataclass
class EvalResult:
    metrics: dict[str, float]  # e.g. {"R@1": 12.3, ...} in percent
    per_tag: dict[str, dict[str, float]]  # the same metrics per query tag (edit kind)
    ranked_ids: list[list[str]]  # top results per query, best first
    ranked_scores: list[list[float]]
    protocol: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def encode_gallery(
    method: CIRMethod,
    split: CIRSplit,
    batch_size: int = 128,
    workers: int = 0,
    progress: Progress = no_progress,
) -> torch.Tensor:
    """`[N, D]` target embeddings, row i for `split.gallery.ids[i]`."""
    method.eval()
    ids = split.gallery.ids
    batches = image_batches(split.gallery, ids, method.backbone.preprocess, batch_size, workers)
    total = -(-len(ids) // batch_size)
    device = method.backbone.device
    return torch.cat(
        [method.encode_targets(b.to(device)).cpu() for b in progress(batches, total, "gallery")]
    )


@torch.no_grad()
def encode_queries(
    method: CIRMethod,
    queries: Sequence[Query],
    split: CIRSplit,
    batch_size: int = 128,
    workers: int = 0,
    progress: Progress = no_progress,
) -> torch.Tensor:
    """`[Q, D]` query embeddings in query order."""
    method.eval()
    prepare = method.prepare_query if method.prepares_queries else None
    batches = query_batches(
        queries, split.gallery, method.backbone.preprocess, batch_size, workers, prepare
    )
    total = -(-len(queries) // batch_size)
    device = method.backbone.device
    return torch.cat(
        [
            method.encode_queries(pixels.to(device), texts).cpu()
            for pixels, texts in progress(batches, total, "queries")
        ]
    )


def masks(split: CIRSplit, queries: Sequence[Query]) -> tuple[torch.Tensor, torch.Tensor]:
    """(target mask, reference-exclusion mask), both `[Q, N]` bool."""
    labels = Labels(split, queries)
    return labels.targets, labels.exclude


def score_matrix(
    method: CIRMethod,
    split: CIRSplit,
    batch_size: int = 128,
    workers: int = 0,
    progress: Progress = no_progress,
) -> torch.Tensor:
    """`[Q, N]` cosine similarities of every query to every gallery image of the split."""
    gallery = encode_gallery(method, split, batch_size, workers, progress)
    queries = encode_queries(method, split.queries, split, batch_size, workers, progress)
    return queries @ gallery.T


def evaluate(
    method: CIRMethod,
    split: CIRSplit,
    ks: Sequence[int] = (1, 10, 50),
    batch_size: int = 128,
    workers: int = 0,
    keep_top: int = 10,
    progress: Progress = no_progress,
) -> EvalResult:
    """Recall@K over the split's gallery (reference removed when the protocol says so)."""
    if not split.queries:
        raise ValueError(f"split {split.name!r} has no queries")
    if any(not q.target_ids for q in split.queries):
        raise ValueError(
            f"split {split.name!r} has queries without targets (hidden test labels): "
            "it cannot be scored locally"
        )
    scores = score_matrix(method, split, batch_size, workers, progress)  # [Q, N]
    target, exclude = masks(split, split.queries)

    def named(values: dict[int, float]) -> dict[str, float]:
        return {f"R@{k}": v for k, v in values.items()}

    metrics = named(recall_at_k(scores, target, ks, exclude))
    per_tag: dict[str, dict[str, float]] = {}
    for tag in sorted({t for q in split.queries for t in q.tags}):
        rows = torch.tensor([tag in q.tags for q in split.queries])
        per_tag[tag] = named(recall_at_k(scores[rows], target[rows], ks, exclude[rows]))
    values, indices = top_k(scores, min(keep_top, len(split.gallery)), exclude)
    ids = split.gallery.ids
    return EvalResult(
        metrics=metrics,
        per_tag=per_tag,
        ranked_ids=[[ids[i] for i in row] for row in indices.tolist()],
        ranked_scores=values.tolist(),
        protocol=dict(split.protocol),
    )

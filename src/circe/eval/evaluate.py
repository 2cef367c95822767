"""Evaluate a method on a split: encode the gallery once, score every query, compute metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from circe.data.batching import image_batches, loaded_batches, query_batches, raw_query
from circe.data.types import CIRSplit, Query
from circe.eval.labels import Labels
from circe.eval.metrics import recall_at_k, top_k
from circe.methods.base import CIRMethod, FrozenBackboneMethod
from circe.methods.plan import query_preparation, reuses_gallery_features, takes_raw_inputs
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
    total = -(-len(ids) // batch_size)
    if takes_raw_inputs(method):  # decoded images: the method preprocesses them itself
        images = loaded_batches(ids, split.gallery.open, batch_size, workers)
        return torch.cat(
            [method.encode_target_images(b).cpu() for b in progress(images, total, "gallery")]
        )
    return _encode_gallery_pixels(
        method, split, method.encode_targets, batch_size, workers, progress
    )


def _encode_gallery_pixels(method, split, encode, batch_size, workers, progress) -> torch.Tensor:
    """`encode(pixels)` of every gallery image, batch by batch, rows in gallery order."""
    ids = split.gallery.ids
    batches = image_batches(split.gallery, ids, method.backbone.preprocess, batch_size, workers)
    device = method.backbone.device
    total = -(-len(ids) // batch_size)
    return torch.cat([encode(b.to(device)).cpu() for b in progress(batches, total, "gallery")])


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
    total = -(-len(queries) // batch_size)
    if takes_raw_inputs(method):  # raw queries: the method prepares and preprocesses them
        raw = loaded_batches(
            queries, partial(raw_query, gallery=split.gallery), batch_size, workers
        )
        return torch.cat(
            [method.encode_raw_queries(b).cpu() for b in progress(raw, total, "queries")]
        )
    batches = query_batches(
        queries,
        split.gallery,
        method.backbone.preprocess,
        batch_size,
        workers,
        query_preparation(method),
    )
    device = method.backbone.device
    return torch.cat(
        [
            method.encode_queries(pixels.to(device), texts).cpu()
            for pixels, texts in progress(batches, total, "queries")
        ]
    )


@torch.no_grad()
def frozen_gallery_features(
    method: CIRMethod,
    split: CIRSplit,
    batch_size: int = 128,
    workers: int = 0,
    progress: Progress = no_progress,
) -> torch.Tensor | None:
    """`[N, D]` backbone image features of the split's gallery, computed once per method and
    gallery and then kept on the method (validation every epoch decodes no image again);
    None when the method cannot reuse them, or a query's reference is not in the gallery."""
    if not reuses_gallery_features(method):
        return None
    known = split.gallery.paths
    if any(q.reference_id not in known for q in split.queries):
        return None
    memo: dict[tuple, torch.Tensor] = method.__dict__.setdefault("_gallery_features", {})
    key = (method.backbone.identity.short(), tuple(split.gallery.ids))
    if key not in memo:
        method.eval()
        # The image loader draws a seed from the global RNG; only the first call of a run
        # loads, so without the fork a resumed run's dropout would differ from an
        # uninterrupted one's.
        with torch.random.fork_rng(devices=[]):
            memo[key] = _encode_gallery_pixels(
                method, split, method.backbone_image_features, batch_size, workers, progress
            )
    return memo[key]


@torch.no_grad()
def _scores_from_features(
    method: FrozenBackboneMethod, split: CIRSplit, features: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """`score_matrix` from the gallery's backbone image features: the references' features
    are rows of them, so only the texts go through the backbone."""
    method.eval()
    device = method.backbone.device
    targets = method.encode_targets_from_features(features.to(device)).cpu()
    row = split.gallery.index_of()
    queries = []
    for start in range(0, len(split.queries), batch_size):
        chunk = split.queries[start : start + batch_size]
        references = features[[row[q.reference_id] for q in chunk]].to(device)
        texts = method.query_text_features([q.text for q in chunk])
        queries.append(method.encode_queries_from_features(references, texts).cpu())
    return torch.cat(queries) @ targets.T


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
    features = frozen_gallery_features(method, split, batch_size, workers, progress)
    if features is not None:
        return _scores_from_features(method, split, features, batch_size)
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

"""Retrieval metrics for composed image retrieval, vectorised in torch and exact on ties.

Every function takes a score matrix ``scores[Q, N]`` (higher is better; Q queries, N gallery
items) and boolean masks of the same shape. Which benchmark uses which rule:

* **CIRR** (Liu et al., ICCV 2021): ``Recall@K`` for K in 1, 5, 10, 50 over the whole test
  gallery with the query's reference image removed from the ranking -> :func:`recall_at_k`
  with ``exclude_mask`` marking the reference; ``Recall_subset@K`` for K in 1, 2, 3, ranked
  only among the query's ``img_set`` members, reference removed -> :func:`recall_subset_at_k`.
* **FashionIQ** (Wu et al., CVPR 2021): ``Recall@10`` and ``Recall@50`` per category over the
  category's gallery -> :func:`recall_at_k` with ``ks=(10, 50)``.
* **CIRCO** (Baldrati et al., ICCV 2023): several ground truths per query, ``mAP@K`` for K in
  5, 10, 25, 50 with ``AP@K = 1 / min(K, n_targets) * sum_{i<=K} P@i * rel(i)`` ->
  :func:`map_at_k`.

Ranking rule, shared by all functions: items where ``exclude_mask`` is true are removed from
the ranking entirely (they neither rank nor count as hits); among the remaining items, item
``j`` has 0-based rank ``#{i : s_i > s_j} + #{i < j : s_i == s_j}``, i.e. a stable descending
sort in which ties are broken by gallery order. This makes every metric deterministic, so a
constant score matrix cannot score a perfect recall by accident of sort order.

Nothing here forms a ``Q * N * N`` tensor or sorts whole rows: recall compares the best
target's score against its row, and top-k selection uses ``torch.topk`` plus a stable sort of
the ``k`` winners only. Work is chunked over queries so that each chunk holds about
``2**24`` score entries; every public function takes ``chunk_size`` (queries per chunk) to
override that. NaN scores are rejected; ``+-inf`` are ranked like any other value.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

__all__ = [
    "NO_TARGET",
    "map_at_k",
    "recall_at_k",
    "recall_subset_at_k",
    "target_ranks",
    "top_k",
]

#: Rank given by :func:`target_ranks` to a query with no (non-excluded) target. It is larger
#: than any ``k``, so such queries are never hits.
NO_TARGET: int = torch.iinfo(torch.int64).max

# Score entries per query chunk when ``chunk_size`` is not given.
_CHUNK_ELEMENTS = 2**24


# --------------------------------------------------------------------------- validation


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [queries, gallery], got shape {_shape(scores)}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"scores must be a real floating or integer tensor, got {scores.dtype}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contains NaN; rankings of NaN are undefined")


def _check_mask(name: str, mask: torch.Tensor, scores: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {mask.dtype}")
    if mask.shape != scores.shape:
        raise ValueError(f"scores is {_shape(scores)} but {name} is {_shape(mask)}")
    if mask.device != scores.device:
        raise ValueError(f"scores is on {scores.device} but {name} is on {mask.device}")


def _check_ks(ks: Iterable[int] | int) -> list[int]:
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = (ks,)
    out: list[int] = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every k must be a positive int, got {k!r}")
        if k not in out:
            out.append(k)
    if not out:
        raise ValueError("ks is empty")
    return out


def _check_chunk_size(chunk_size: int | None, n: int) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(n, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _check_has_queries(scores: torch.Tensor) -> None:
    if scores.shape[0] == 0:
        raise ValueError("scores has no queries (shape [0, N]); the metric is undefined")


# --------------------------------------------------------------------------- helpers


def _lowest(dtype: torch.dtype) -> float | int:
    """The smallest value of ``dtype``: a fill that ranks at or below every real score."""
    if dtype.is_floating_point:
        return float("-inf")
    return torch.iinfo(dtype).min


def _chunks(
    q: int, chunk_size: int, *masks: torch.Tensor | None
) -> Iterator[tuple[slice, list[torch.Tensor | None]]]:
    for start in range(0, q, chunk_size):
        sl = slice(start, min(start + chunk_size, q))
        yield sl, [None if m is None else m[sl] for m in masks]


def _valid(
    scores: torch.Tensor, exclude: torch.Tensor | None, subset: torch.Tensor | None
) -> torch.Tensor:
    valid = torch.ones_like(scores, dtype=torch.bool) if exclude is None else ~exclude
    if subset is not None:
        valid = valid & subset
    return valid


def _chunk_best_ranks(s: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Best target rank for one chunk: O(C*N) comparisons against the best target's score."""
    n = s.shape[1]
    tgt = target & valid
    has_target = tgt.any(dim=1)
    # The best-ranked target is the highest-scoring one, ties going to the lowest index.
    best = s.masked_fill(~tgt, _lowest(s.dtype)).amax(dim=1, keepdim=True)  # [C, 1]
    is_best = tgt & (s == best)
    best_idx = is_best.to(torch.uint8).argmax(dim=1, keepdim=True)  # first max -> lowest index
    cols = torch.arange(n, device=s.device).unsqueeze(0)
    ahead = valid & ((s > best) | ((s == best) & (cols < best_idx)))
    ranks = ahead.sum(dim=1)
    return torch.where(has_target, ranks, torch.full_like(ranks, NO_TARGET))


def _chunk_topk(
    s: torch.Tensor, valid: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable top-``k`` of one chunk among ``valid`` items.

    Returns ``values [C, k]``, ``indices [C, k]`` and ``present [C, k]``, with
    ``k = min(k, N)``; row ``r`` has ``min(k, #valid in row r)`` real entries first and padding
    (index -1, lowest value, ``present`` false) after them.
    """
    c, n = s.shape
    k = min(k, n)
    low = _lowest(s.dtype)
    kr = valid.sum(dim=1).clamp(max=k)  # entries to take per row
    if k == 0:
        empty = torch.empty(c, 0, dtype=torch.int64, device=s.device)
        return s.new_empty(c, 0), empty, empty.bool()
    # k_r-th largest valid value per row. The fill sorts at or below every valid value and
    # k_r <= #valid, so topk over the filled row returns exactly that value.
    top_vals = s.masked_fill(~valid, low).topk(k, dim=1).values
    thr = top_vals.gather(1, (kr - 1).clamp(min=0).unsqueeze(1))  # [C, 1]
    above = valid & (s > thr)
    tied = valid & (s == thr)
    need = (kr - above.sum(dim=1)).unsqueeze(1)  # >= 1 whenever kr >= 1
    # Of the items tied with the threshold, the stable rule keeps the first ones by index.
    chosen = (above | (tied & (tied.cumsum(dim=1) <= need))) & (kr > 0).unsqueeze(1)
    # Exactly kr[r] chosen items per row; pack them, in index order, into [C, k].
    rows, cols = chosen.nonzero(as_tuple=True)
    slot = chosen.cumsum(dim=1)[rows, cols] - 1
    idx = torch.full((c, k), -1, dtype=torch.int64, device=s.device)
    idx[rows, slot] = cols
    present = torch.arange(k, device=s.device).unsqueeze(0) < kr.unsqueeze(1)
    vals = s.gather(1, idx.clamp(min=0)).masked_fill(~present, low)
    # Stable descending sort of the k winners: ties stay in index order, and padding (after
    # the real entries, with the lowest value) stays after them.
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order), present


# --------------------------------------------------------------------------- public API


def target_ranks(
    scores: torch.Tensor,
    target_mask: torch.Tensor,
    exclude_mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """0-based rank of each query's best-ranked target under the stable ranking rule.

    Excluded items are dropped from the ranking (an excluded target never counts). Queries
    with no non-excluded target get :data:`NO_TARGET`. Returns an int64 tensor ``[Q]``.
    """
    return _target_ranks(scores, target_mask, exclude_mask, None, chunk_size)


def _target_ranks(
    scores: torch.Tensor,
    target_mask: torch.Tensor,
    exclude_mask: torch.Tensor | None,
    subset_mask: torch.Tensor | None,
    chunk_size: int | None,
) -> torch.Tensor:
    _check_scores(scores)
    _check_mask("target_mask", target_mask, scores)
    if exclude_mask is not None:
        _check_mask("exclude_mask", exclude_mask, scores)
    if subset_mask is not None:
        _check_mask("subset_mask", subset_mask, scores)
    q, n = scores.shape
    step = _check_chunk_size(chunk_size, n)
    out = torch.empty(q, dtype=torch.int64, device=scores.device)
    for sl, (tgt, exc, sub) in _chunks(q, step, target_mask, exclude_mask, subset_mask):
        s = scores[sl]
        out[sl] = _chunk_best_ranks(s, tgt, _valid(s, exc, sub))
    return out


def _recall(ranks: torch.Tensor, ks: list[int]) -> dict[int, float]:
    q = ranks.shape[0]
    return {k: 100.0 * int((ranks < k).sum()) / q for k in ks}


def recall_at_k(
    scores: torch.Tensor,
    target_mask: torch.Tensor,
    ks: Iterable[int] = (1, 5, 10, 50),
    exclude_mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> dict[int, float]:
    """Percent (0-100) of queries whose best target ranks in the top ``k``, for each ``k``.

    CIRR ``Recall@K``: pass the reference image as ``exclude_mask``. FashionIQ: ``ks=(10, 50)``.
    Queries without a (non-excluded) target count as misses.
    """
    ks = _check_ks(ks)
    ranks = _target_ranks(scores, target_mask, exclude_mask, None, chunk_size)
    _check_has_queries(scores)
    return _recall(ranks, ks)


def recall_subset_at_k(
    scores: torch.Tensor,
    target_mask: torch.Tensor,
    subset_mask: torch.Tensor,
    ks: Iterable[int] = (1, 2, 3),
    exclude_mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> dict[int, float]:
    """Like :func:`recall_at_k`, but only items in ``subset_mask`` are ranked.

    CIRR ``Recall_subset@K``: ``subset_mask`` marks the query's ``img_set`` members and
    ``exclude_mask`` its reference image. Targets outside the subset never count.
    """
    ks = _check_ks(ks)
    ranks = _target_ranks(scores, target_mask, exclude_mask, subset_mask, chunk_size)
    _check_has_queries(scores)
    return _recall(ranks, ks)


def map_at_k(
    scores: torch.Tensor,
    target_mask: torch.Tensor,
    ks: Iterable[int] = (5, 10, 25, 50),
    exclude_mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> dict[int, float]:
    """CIRCO's mean average precision at ``k``, in percent, for each ``k``.

    Per query, ``AP@K = 1 / min(K, n_targets) * sum_{i=1..K} P@i * rel(i)`` over the stable
    ranking, where ``n_targets`` counts the query's non-excluded targets; the result is the
    mean over queries. Raises ``ValueError`` if any query has no non-excluded target.
    """
    ks = _check_ks(ks)
    _check_scores(scores)
    _check_mask("target_mask", target_mask, scores)
    if exclude_mask is not None:
        _check_mask("exclude_mask", exclude_mask, scores)
    _check_has_queries(scores)
    q, n = scores.shape
    step = _check_chunk_size(chunk_size, n)
    n_targets = torch.empty(q, dtype=torch.int64, device=scores.device)
    for sl, (tgt, exc) in _chunks(q, step, target_mask, exclude_mask):
        n_targets[sl] = (tgt if exc is None else tgt & ~exc).sum(dim=1)
    missing = int((n_targets == 0).sum())
    if missing:
        raise ValueError(
            f"{missing} of {q} queries have no (non-excluded) target; mAP@K is undefined for them"
        )
    k_max = max(ks)
    # Per-query APs, summed once at the end so the result does not depend on chunking.
    ap = torch.empty(len(ks), q, dtype=torch.float64, device=scores.device)
    for sl, (tgt, exc) in _chunks(q, step, target_mask, exclude_mask):
        s = scores[sl]
        _, idx, present = _chunk_topk(s, _valid(s, exc, None), k_max)
        kk = idx.shape[1]  # min(k_max, N)
        rel = tgt.gather(1, idx.clamp(min=0)) & present
        relf = rel.double()
        positions = torch.arange(1, kk + 1, dtype=torch.float64, device=s.device)
        ap_sum = (relf.cumsum(dim=1) / positions * relf).cumsum(dim=1)  # [C, kk]
        nt = n_targets[sl].double()
        for row, k in enumerate(ks):
            ap[row, sl] = ap_sum[:, min(k, kk) - 1] / nt.clamp(max=k)
    return {k: float(ap[row].sum()) / q * 100.0 for row, k in enumerate(ks)}


def top_k(
    scores: torch.Tensor,
    k: int,
    exclude_mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best items per query under the stable ranking rule, best first.

    Returns ``(values [Q, k'], indices [Q, k'])`` with ``k'`` = ``k`` clipped to the smallest
    number of non-excluded items in any row, so every returned entry is a real, non-excluded
    item. Raises ``ValueError`` if ``k < 1``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    _check_scores(scores)
    if exclude_mask is not None:
        _check_mask("exclude_mask", exclude_mask, scores)
    q, n = scores.shape
    if exclude_mask is None:
        k = min(k, n)
    elif q > 0:
        k = min(k, n - int(exclude_mask.sum(dim=1).max()))
    step = _check_chunk_size(chunk_size, n)
    values = scores.new_empty(q, k)
    indices = torch.empty(q, k, dtype=torch.int64, device=scores.device)
    for sl, (exc,) in _chunks(q, step, exclude_mask):
        s = scores[sl]
        v, i, _ = _chunk_topk(s, _valid(s, exc, None), k)
        values[sl], indices[sl] = v, i
    return values, indices

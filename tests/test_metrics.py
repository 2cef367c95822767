"""Retrieval metrics against literal pure-Python definitions, on random and hand-made data."""

from __future__ import annotations

import random

import pytest
import torch

from circe.eval.metrics import (
    NO_TARGET,
    map_at_k,
    recall_at_k,
    recall_subset_at_k,
    target_ranks,
    top_k,
)

# --------------------------------------------------------------------------- references


def ref_ranking(scores: list, valid: list[bool]) -> list[int]:
    """Gallery indices of one row, best first: Python's stable sort by -score, excluded gone."""
    return sorted((j for j in range(len(scores)) if valid[j]), key=lambda j: -scores[j])


def ref_rows(scores, target, exclude=None, subset=None):
    """Per query: (ranked indices, set of rankable targets)."""
    rows = []
    for r in range(scores.shape[0]):
        s = scores[r].tolist()
        valid = [True] * len(s)
        if exclude is not None:
            valid = [v and not e for v, e in zip(valid, exclude[r].tolist(), strict=True)]
        if subset is not None:
            valid = [v and m for v, m in zip(valid, subset[r].tolist(), strict=True)]
        targets = {j for j, t in enumerate(target[r].tolist()) if t and valid[j]}
        rows.append((ref_ranking(s, valid), targets))
    return rows


def ref_target_ranks(scores, target, exclude=None, subset=None) -> list[int]:
    out = []
    for ranking, targets in ref_rows(scores, target, exclude, subset):
        hits = [pos for pos, j in enumerate(ranking) if j in targets]
        out.append(hits[0] if hits else NO_TARGET)
    return out


def ref_recall(scores, target, ks, exclude=None, subset=None) -> dict[int, float]:
    ranks = ref_target_ranks(scores, target, exclude, subset)
    return {k: 100.0 * sum(r < k for r in ranks) / len(ranks) for k in ks}


def ref_map(scores, target, ks, exclude=None) -> dict[int, float]:
    rows = ref_rows(scores, target, exclude)
    out = {}
    for k in ks:
        aps = []
        for ranking, targets in rows:
            rel = [j in targets for j in ranking[:k]]
            total = sum(sum(rel[:i]) / i for i in range(1, len(rel) + 1) if rel[i - 1])
            aps.append(total / min(k, len(targets)))
        out[k] = 100.0 * sum(aps) / len(aps)
    return out


def ref_top_k(scores, k, exclude=None) -> list[list[int]]:
    target = torch.zeros_like(scores, dtype=torch.bool)
    return [ranking[:k] for ranking, _ in ref_rows(scores, target, exclude)]


# --------------------------------------------------------------------------- random problems


def random_problem(rng: random.Random, gen: torch.Generator):
    q, n = rng.randint(1, 6), rng.randint(1, 25)
    kind = rng.choice(["ties", "ties", "normal", "inf", "int64"])
    if kind == "ties":  # few distinct values -> many ties
        scores = torch.randint(0, rng.randint(1, 4), (q, n), generator=gen).float()
    elif kind == "normal":
        scores = torch.randn(q, n, generator=gen, dtype=torch.float64)
    elif kind == "inf":
        scores = torch.randint(-1, 2, (q, n), generator=gen).float()
        scores[scores == -1] = float("-inf")
        scores[scores == 1] = float("inf")
    else:
        scores = torch.randint(-3, 3, (q, n), generator=gen)
    target = torch.rand(q, n, generator=gen) < rng.choice([0.0, 0.1, 0.3, 0.8])
    exclude = torch.rand(q, n, generator=gen) < rng.choice([0.0, 0.2, 0.5])
    subset = torch.rand(q, n, generator=gen) < rng.choice([0.3, 0.7, 1.0])
    return scores, target, exclude if rng.random() < 0.7 else None, subset


PROBLEMS = 300


@pytest.fixture(scope="module")
def problems():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    return [random_problem(rng, gen) for _ in range(PROBLEMS)]


KS = (1, 2, 3, 5, 10, 50)


def test_target_ranks_random(problems):
    for scores, target, exclude, _ in problems:
        got = target_ranks(scores, target, exclude)
        assert got.dtype == torch.int64
        assert got.tolist() == ref_target_ranks(scores, target, exclude)


def test_recall_random(problems):
    for scores, target, exclude, _ in problems:
        assert recall_at_k(scores, target, KS, exclude) == ref_recall(scores, target, KS, exclude)


def test_recall_subset_random(problems):
    for scores, target, exclude, subset in problems:
        got = recall_subset_at_k(scores, target, subset, KS, exclude)
        assert got == ref_recall(scores, target, KS, exclude, subset)


def with_rankable_targets(target, exclude):
    """``target`` plus one non-excluded target in each row lacking one, or None if impossible."""
    target = target.clone()
    for r in range(target.shape[0]):
        free = [j for j in range(target.shape[1]) if exclude is None or not exclude[r, j]]
        if not free:
            return None
        if not any(target[r, j] for j in free):
            target[r, free[r % len(free)]] = True
    return target


def test_map_random(problems):
    checked = 0
    for scores, target, exclude, _ in problems:
        target = with_rankable_targets(target, exclude)
        if target is None:
            continue
        got = map_at_k(scores, target, KS, exclude)
        want = ref_map(scores, target, KS, exclude)
        assert got.keys() == want.keys()
        for k in KS:
            assert got[k] == pytest.approx(want[k], abs=1e-9), k
        checked += 1
    assert checked > PROBLEMS // 2


def test_top_k_random(problems):
    for scores, _, exclude, _ in problems:
        n = scores.shape[1]
        n_valid = n if exclude is None else n - int(exclude.sum(dim=1).max())
        for k in (1, 3, n, n + 7):
            values, indices = top_k(scores, k, exclude)
            kk = min(k, n_valid)
            assert indices.shape == values.shape == (scores.shape[0], kk)
            want = [row[:kk] for row in ref_top_k(scores, k, exclude)]
            assert indices.tolist() == want
            assert torch.equal(values, scores.gather(1, indices))


def test_chunking_gives_identical_output(problems):
    for scores, target, exclude, subset in problems[:60]:
        for chunk in (1, 2):
            assert torch.equal(
                target_ranks(scores, target, exclude, chunk_size=chunk),
                target_ranks(scores, target, exclude),
            )
            assert recall_subset_at_k(
                scores, target, subset, KS, exclude, chunk_size=chunk
            ) == recall_subset_at_k(scores, target, subset, KS, exclude)
            v1, i1 = top_k(scores, 4, exclude, chunk_size=chunk)
            v2, i2 = top_k(scores, 4, exclude)
            assert torch.equal(i1, i2) and torch.equal(v1, v2)
            t = with_rankable_targets(target, exclude)
            if t is not None:
                assert map_at_k(scores, t, KS, exclude, chunk_size=chunk) == map_at_k(
                    scores, t, KS, exclude
                )


def test_larger_problem_matches_stable_sort():
    """A wider gallery with heavy ties, default and tiny chunks, against torch's stable sort."""
    gen = torch.Generator().manual_seed(1)
    q, n = 40, 3000
    scores = torch.randint(0, 50, (q, n), generator=gen).float()
    target = torch.rand(q, n, generator=gen) < 0.002
    target[torch.arange(q), torch.randint(0, n, (q,), generator=gen)] = True
    exclude = torch.zeros(q, n, dtype=torch.bool)
    exclude[torch.arange(q), torch.randint(0, n, (q,), generator=gen)] = True
    filled = scores.masked_fill(exclude, float("-inf"))
    order = torch.sort(filled, dim=1, descending=True, stable=True).indices[:, : n - 1]
    hit = target.gather(1, order)
    want_ranks = torch.where(hit.any(dim=1), hit.int().argmax(dim=1), NO_TARGET)
    for chunk in (None, 7):
        assert torch.equal(target_ranks(scores, target, exclude, chunk_size=chunk), want_ranks)
        _, idx = top_k(scores, 100, exclude, chunk_size=chunk)
        assert torch.equal(idx, order[:, :100])


# --------------------------------------------------------------------------- hand-made cases


def test_hand_computed_single_query():
    # Stable order: 0 (.9), 2 (.9), 1 (.5), 4 (.5), 3 (.1); targets 2 and 4 -> rel 0,1,0,1,0.
    scores = torch.tensor([[0.9, 0.5, 0.9, 0.1, 0.5]])
    target = torch.tensor([[False, False, True, False, True]])
    assert target_ranks(scores, target).tolist() == [1]
    assert recall_at_k(scores, target, (1, 2)) == {1: 0.0, 2: 100.0}
    # AP@1 = 0; AP@2 = P@2/2 = 1/4; AP@4 = (P@2 + P@4)/2 = (1/2 + 1/2)/2 = 1/2.
    assert map_at_k(scores, target, (1, 2, 4, 5)) == {1: 0.0, 2: 25.0, 4: 50.0, 5: 50.0}
    assert top_k(scores, 3)[1].tolist() == [[0, 2, 1]]

    # Excluding item 0 (say, the reference image): order 2, 1, 4, 3; rel 1,0,1,0.
    exclude = torch.tensor([[True, False, False, False, False]])
    assert target_ranks(scores, target, exclude).tolist() == [0]
    assert recall_at_k(scores, target, (1,), exclude) == {1: 100.0}
    # AP@4 = (P@1 + P@3)/2 = (1 + 2/3)/2 = 5/6.
    got = map_at_k(scores, target, (1, 4), exclude)
    assert got[1] == 100.0 and got[4] == pytest.approx(500 / 6)
    assert top_k(scores, 10, exclude)[1].tolist() == [[2, 1, 4, 3]]

    # Subset {1, 3, 4}: order 1, 4, 3; the target 2 is outside the subset.
    subset = torch.tensor([[False, True, False, True, True]])
    assert recall_subset_at_k(scores, target, subset, (1, 2)) == {1: 0.0, 2: 100.0}


def test_constant_scores_rank_by_gallery_order():
    scores = torch.zeros(3, 6)
    target = torch.zeros(3, 6, dtype=torch.bool)
    target[0, 0] = target[1, 5] = target[2, 3] = True
    assert target_ranks(scores, target).tolist() == [0, 5, 3]
    exclude = torch.zeros(3, 6, dtype=torch.bool)
    exclude[:, 0] = True
    assert target_ranks(scores, target, exclude).tolist() == [NO_TARGET, 4, 2]
    assert recall_at_k(scores, target, (1, 100), exclude) == {1: 0.0, 100: 200 / 3}


def test_map_min_k_targets_denominator():
    # 3 targets ranked first: AP@2 uses min(2, 3) = 2 -> 100; AP@5 uses 3 -> 100.
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    target = torch.tensor([[True, True, True, False, False]])
    assert map_at_k(scores, target, (2, 5)) == {2: 100.0, 5: 100.0}


# --------------------------------------------------------------------------- errors


def test_errors():
    scores = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"scores is \[3, 5\] but target_mask is \[3, 4\]"):
        recall_at_k(scores, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"exclude_mask is \[2, 5\]"):
        target_ranks(scores, torch.zeros(3, 5, dtype=torch.bool), torch.zeros(2, 5).bool())
    with pytest.raises(ValueError, match="target_mask must be a bool tensor"):
        recall_at_k(scores, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="2-D"):
        target_ranks(torch.zeros(5), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.full((3, 5), float("nan")), torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive int"):
        recall_at_k(scores, torch.ones(3, 5, dtype=torch.bool), ks=(0, 1))
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_k(scores, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        target_ranks(scores, torch.ones(3, 5, dtype=torch.bool), chunk_size=0)
    target = torch.zeros(3, 5, dtype=torch.bool)
    target[0, 1] = True
    with pytest.raises(ValueError, match="2 of 3 queries have no"):
        map_at_k(scores, target)
    exclude = target.clone()
    with pytest.raises(ValueError, match="3 of 3 queries have no"):
        map_at_k(scores, target, exclude_mask=exclude)
    with pytest.raises(ValueError, match="no queries"):
        recall_at_k(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool))

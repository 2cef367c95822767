"""What a method trains from: pixel batches, backbone features and token sequences, and a
split's training triplets indexed into them.

These are the method layer's own types: `FrozenBackboneMethod` reads `TokenFeatures`, a
method that makes its own training inputs (DAFM) returns `FeaturePairs`, and the trainer
(`circe.train`) builds the rest from the same classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from circe.data.types import CIRSplit, RawQuery


@dataclass
class Batch:
    """A training batch: reference pixels, modification texts, target pixels."""

    reference_pixels: torch.Tensor  # [B, 3, H, W]
    texts: list[str]
    target_pixels: torch.Tensor  # [B, 3, H, W]


@dataclass
class TokenFeatures:
    """A frozen tower's outputs for a method that fuses token sequences (its `inputs.query` is "tokens")."""

    pooled: torch.Tensor  # [B, D], the pooled, projected embedding (not normalised)
    tokens: torch.Tensor  # [B, L, W], the tower's last hidden states
    mask: torch.Tensor  # [B, L] bool, True on real tokens (all True for image patches)

    def __len__(self) -> int:
        return len(self.pooled)

    def to(self, device: torch.device | str) -> TokenFeatures:
        """On `device` (the same call as `Tensor.to`, so batches move either kind alike)."""
        return TokenFeatures(self.pooled.to(device), self.tokens.to(device), self.mask.to(device))


class TokenRows(Protocol):
    """Token sequences indexed by a tensor of rows (the feature cache's memory-mapped
    `TokenStore`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: torch.Tensor) -> TokenFeatures: ...


@dataclass
class Pairs:
    """A split's training triplets as rows into its unique images and texts.

    Pair p is (image `images[reference[p]]`, text `texts[text[p]]`, image `images[target[p]]`);
    a query with several targets trains on its first.
    """

    split: CIRSplit
    images: list[str]  # unique image ids
    texts: list[str]  # unique modification texts
    reference: torch.Tensor  # [P] int64
    text: torch.Tensor  # [P] int64
    target: torch.Tensor  # [P] int64
    query_ids: list[str] = field(default_factory=list)  # [P], the query of each pair

    @classmethod
    def from_split(cls, split: CIRSplit) -> Pairs:
        usable = [q for q in split.queries if q.target_ids]
        if not usable:
            raise ValueError(f"split {split.name!r} has no queries with targets to train on")
        image_row: dict[str, int] = {}
        text_row: dict[str, int] = {}
        rows = [
            (
                image_row.setdefault(q.reference_id, len(image_row)),
                text_row.setdefault(q.text, len(text_row)),
                image_row.setdefault(q.target_ids[0], len(image_row)),
            )
            for q in usable
        ]
        reference, text, target = torch.tensor(rows, dtype=torch.int64).T
        query_ids = [q.query_id for q in usable]
        return cls(split, list(image_row), list(text_row), reference, text, target, query_ids)

    def __len__(self) -> int:
        return len(self.reference)

    def with_text_noise(self, fraction: float, seed: int) -> Pairs:
        """A copy in which `fraction` of the pairs (chosen with `seed`) carry the text of
        another pair instead of their own: the label noise of web-sourced modification texts,
        made to measure how a method copes with it. References and targets are unchanged."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"text noise must be a fraction in [0, 1], got {fraction}")
        generator = torch.Generator().manual_seed(seed)
        count = round(fraction * len(self))
        noisy = torch.randperm(len(self), generator=generator)[:count]
        # Each chosen pair takes the text of a random other pair (never its own index).
        offsets = torch.randint(1, max(2, len(self)), (count,), generator=generator)
        text = self.text.clone()
        text[noisy] = self.text[(noisy + offsets) % len(self)]
        return replace(self, text=text)

    def raw_query(self, p: int) -> RawQuery:
        """Pair p's query before any encoder (for a method's `prepare_query`)."""
        gallery = self.split.gallery
        reference_id = self.images[self.reference[p]]
        return RawQuery(
            image=gallery.open(reference_id),
            text=self.texts[self.text[p]],
            reference_id=reference_id,
            query_id=self.query_ids[p] if self.query_ids else None,
            caption=gallery.captions.get(reference_id),
        )


@dataclass
class FeatureBatch:
    """Cached frozen-backbone features of a batch of triplets.

    `text_features` is None when the method trains its text tower: it then encodes `texts`.
    For a method that takes tokens the query side is `TokenFeatures` (float32, read from the
    memory-mapped token cache for this batch only).
    """

    reference_features: torch.Tensor | TokenFeatures  # [b, D]
    text_features: torch.Tensor | TokenFeatures | None  # [b, D]
    target_features: torch.Tensor  # [b, D]
    texts: list[str] | None = None


@dataclass
class QueryFeatures:
    """The query side of the pairs as the method sees it, when that is not the pooled
    features of `Pairs.images` and `Pairs.texts`: after a method's raw-data stage
    (`prepare_query`; one row of features per pair), or the token sequences of a method that
    takes tokens (one row per reference image, rows `reference`)."""

    reference_features: torch.Tensor | TokenRows  # [R, D] (or R token sequences)
    texts: list[str]  # unique (prepared) texts
    text: torch.Tensor  # [P] int64, row into `texts`
    reference: torch.Tensor | None = None  # [P] int64, row into reference_features; None: p


class FeaturePairs:
    """Batches of triplets from cached features: an index, no image decoding.

    With `queries` (a method that prepares its queries, or fuses tokens) the reference
    features and texts are the method's own; with `text_features=None` (a method that trains
    its text tower) the batches carry the texts instead of their features.
    """

    def __init__(
        self,
        pairs: Pairs,
        image_features: torch.Tensor,
        text_features: torch.Tensor | TokenRows | None,
        queries: QueryFeatures | None = None,
    ):
        self.pairs = pairs
        self.image_features = image_features  # [I, D], row i for pairs.images[i]
        self.text_features = text_features  # [T, D] (or T token sequences), row t: texts[t]
        self.queries = queries
        self.texts = queries.texts if queries else pairs.texts
        self.text_index = queries.text if queries else pairs.text  # [P]

    def batches(self, index_lists: list[list[int]], workers: int = 0) -> Iterator[FeatureBatch]:
        for indices in index_lists:
            rows = torch.tensor(indices)
            if self.queries is not None:
                index = self.queries.reference
                references = self.queries.reference_features[rows if index is None else index[rows]]
            else:
                references = self.image_features[self.pairs.reference[rows]]
            text_rows = self.text_index[rows]
            yield FeatureBatch(
                references,
                None if self.text_features is None else self.text_features[text_rows],
                self.image_features[self.pairs.target[rows]],
                [self.texts[t] for t in text_rows.tolist()],
            )

"""A split's ground truth as boolean masks over its gallery, the form the metrics take."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import cached_property

import torch

from circe.data.types import CIRSplit, Query


class Labels:
    """`[Q, N]` bool masks for `queries` of `split`, row q for query q, column n for gallery
    image n; each is built the first time it is used (they are Q * N bytes each)."""

    def __init__(self, split: CIRSplit, queries: Sequence[Query] | None = None):
        self.split = split
        self.queries = list(split.queries if queries is None else queries)
        self._index = split.gallery.index_of()

    def _mask(self, ids_of: Callable[[Query], Iterable[str]]) -> torch.Tensor:
        rows, cols = [], []
        for row, query in enumerate(self.queries):
            for image_id in ids_of(query):
                rows.append(row)
                cols.append(self._index[image_id])
        mask = torch.zeros(len(self.queries), len(self._index), dtype=torch.bool)
        mask[rows, cols] = True
        return mask

    @cached_property
    def targets(self) -> torch.Tensor:
        return self._mask(lambda q: q.target_ids)

    @cached_property
    def first_targets(self) -> torch.Tensor:
        """Only each query's first target (CIRCO's Recall@K counts `target_img_id` alone)."""
        return self._mask(lambda q: q.target_ids[:1])

    @cached_property
    def subset(self) -> torch.Tensor:
        """CIRR's `img_set` members."""
        return self._mask(lambda q: q.subset_ids)

    @cached_property
    def exclude(self) -> torch.Tensor:
        """The reference image, where the split removes it from its own ranking."""
        keep = self.split.exclude_reference
        return self._mask(lambda q: (q.reference_id,) if keep else ())

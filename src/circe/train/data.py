"""Training data: data sets by name, training triplets, and a resumable batch order.

Data sets come by name from the one registry, `circe.data.registry` (re-exported here as
`DATASETS` and `load_split`); everything else (pairs, order, pixels or cached features) works
on `CIRSplit`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from circe.data.registry import DATASETS, load_split  # noqa: F401  (re-exported)
from circe.data.types import CIRSplit, RawQuery
from circe.methods.base import Batch, TokenFeatures

if TYPE_CHECKING:
    from circe.train.cache import TokenStore

Prepare = Callable[[RawQuery], tuple[Image.Image, str]]


def query_subset(split: CIRSplit, fraction: float, seed: int) -> CIRSplit:
    """`split` with `fraction` of its queries (at least one), drawn with `seed`, in order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return split
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(fraction * len(split.queries)))
    keep = sorted(torch.randperm(len(split.queries), generator=generator)[:count].tolist())
    return replace(split, queries=[split.queries[i] for i in keep])


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
    For a method that `uses_tokens` the query side is `TokenFeatures` (float32, read from the
    memory-mapped token cache for this batch only).
    """

    reference_features: torch.Tensor | TokenFeatures  # [b, D]
    text_features: torch.Tensor | TokenFeatures | None  # [b, D]
    target_features: torch.Tensor  # [b, D]
    texts: list[str] | None = None


def to_device(batch: Batch | FeatureBatch, device: torch.device) -> Batch | FeatureBatch:
    if isinstance(batch, FeatureBatch):
        text = batch.text_features
        return FeatureBatch(
            batch.reference_features.to(device),
            None if text is None else text.to(device),
            batch.target_features.to(device),
            batch.texts,
        )
    return Batch(batch.reference_pixels.to(device), batch.texts, batch.target_pixels.to(device))


@dataclass
class QueryFeatures:
    """The query side of the pairs as the method sees it, when that is not the pooled
    features of `Pairs.images` and `Pairs.texts`: after a method's raw-data stage
    (`prepare_query`; one row of features per pair), or the token sequences of a method that
    `uses_tokens` (one row per reference image, rows `reference`)."""

    reference_features: torch.Tensor | TokenStore  # [R, D] (or R token sequences)
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
        text_features: torch.Tensor | TokenStore | None,
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


class _PixelTriplets(Dataset):
    def __init__(
        self,
        pairs: Pairs,
        preprocess: Callable[[Image.Image], torch.Tensor],
        prepare: Prepare | None = None,
    ):
        self.pairs, self.preprocess, self.prepare = pairs, preprocess, prepare

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, p: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        pairs, gallery = self.pairs, self.pairs.split.gallery
        if self.prepare is not None:  # the method's raw-data stage (e.g. DQU-CIR)
            image, text = self.prepare(pairs.raw_query(p))
        else:
            image, text = gallery.open(pairs.images[pairs.reference[p]]), pairs.texts[pairs.text[p]]
        reference = self.preprocess(image)  # [3, H, W]
        target = self.preprocess(gallery.open(pairs.images[pairs.target[p]]))
        return reference, text, target


class PreparedPairQueries(Dataset):
    """Pair p -> (pixels of its prepared reference image `[3, H, W]`, its prepared text)."""

    def __init__(
        self, pairs: Pairs, preprocess: Callable[[Image.Image], torch.Tensor], prepare: Prepare
    ):
        self.pairs, self.preprocess, self.prepare = pairs, preprocess, prepare

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, p: int) -> tuple[torch.Tensor, str]:
        image, text = self.prepare(self.pairs.raw_query(p))
        return self.preprocess(image), text


def _collate(items: list[tuple[torch.Tensor, str, torch.Tensor]]) -> Batch:
    references, texts, targets = zip(*items, strict=True)
    return Batch(torch.stack(references), list(texts), torch.stack(targets))


class PixelPairs:
    """Batches of triplets decoded from the image files (backbones that are trained)."""

    def __init__(
        self,
        pairs: Pairs,
        preprocess: Callable[[Image.Image], torch.Tensor],
        prepare: Prepare | None = None,
    ):
        self.dataset = _PixelTriplets(pairs, preprocess, prepare)

    def batches(self, index_lists: list[list[int]], workers: int = 0) -> Iterator[Batch]:
        loader = DataLoader(
            self.dataset,
            batch_sampler=index_lists,
            num_workers=workers,
            collate_fn=_collate,
            # Its own generator: the loader's worker seed must not draw from the global RNG
            # (the dropout stream), or a resumed run would see other masks.
            generator=torch.Generator().manual_seed(0),
        )
        yield from loader


def epoch_plan(
    num_pairs: int,
    seed: int,
    epoch: int,
    batch_size: int,
    accum_steps: int,
    world_size: int = 1,
    rank: int = 0,
) -> list[list[list[int]]]:
    """This process's pair indices: plan[step][micro_step] -> a list of pair indices.

    The order is a pure function of (seed, epoch), so a resumed run skips the steps it has
    done and sees exactly the batches an uninterrupted run would. A global batch of
    `batch_size` pairs is split into `accum_steps` micro-batches, and each micro-batch into
    `world_size` equal shards, one per process: the union over processes is the same for any
    number of processes. The last incomplete global batch is dropped (contrastive batches
    need a fixed size, and the shards must be equal for gathering).
    """
    micro = batch_size // accum_steps
    if micro % world_size:
        raise ValueError(
            f"a micro-batch of {micro} (batch_size / grad_accum_steps) does not split evenly "
            f"over {world_size} processes"
        )
    steps = num_pairs // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {num_pairs} training pairs")
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_pairs, generator=generator).tolist()
    shard = micro // world_size
    return [
        [
            order[start + rank * shard : start + (rank + 1) * shard]
            for start in range(step * batch_size, (step + 1) * batch_size, micro)
        ]
        for step in range(steps)
    ]

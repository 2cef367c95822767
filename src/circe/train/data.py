"""Training data: data sets by name, training triplets, and a resumable batch order.

Data sets come by name from the one registry, `circe.data.registry` (re-exported here as
`DATASETS` and `load_split`); everything else (pairs, order, pixels or cached features) works
on `CIRSplit`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from circe.data.registry import DATASETS, load_split  # noqa: F401  (re-exported)
from circe.data.types import CIRSplit, RawQuery
from circe.methods.inputs import Batch, FeatureBatch, Pairs

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

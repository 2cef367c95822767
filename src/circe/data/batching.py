"""Turning ids into batches of preprocessed pixels, with a DataLoader for parallel decoding."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from circe.data.types import Gallery, Query


class GalleryImages(Dataset):
    """Gallery images in a given id order, preprocessed for one backbone."""

    def __init__(
        self,
        gallery: Gallery,
        ids: Sequence[str],
        preprocess: Callable[[Image.Image], torch.Tensor],
    ):
        self.gallery, self.ids, self.preprocess = gallery, list(ids), preprocess

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(self.gallery.open(self.ids[index]))


def image_batches(
    gallery: Gallery,
    ids: Sequence[str],
    preprocess: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 128,
    workers: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield `[b, 3, H, W]` batches of the images `ids`, in order."""
    loader = DataLoader(
        GalleryImages(gallery, ids, preprocess), batch_size=batch_size, num_workers=workers
    )
    yield from loader


def query_batches(
    queries: Sequence[Query],
    gallery: Gallery,
    preprocess: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 128,
    workers: int = 0,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Yield (reference pixels `[b, 3, H, W]`, modification texts) in query order."""
    references = [q.reference_id for q in queries]
    texts = [q.text for q in queries]
    for start, pixels in zip(
        range(0, len(queries), batch_size),
        image_batches(gallery, references, preprocess, batch_size, workers),
        strict=True,
    ):
        yield pixels, texts[start : start + batch_size]

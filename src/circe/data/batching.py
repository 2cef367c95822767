"""Turning ids into batches of preprocessed pixels, with a DataLoader for parallel decoding."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from circe.data.types import Gallery, Query, RawQuery


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


class _Loaded(Dataset):
    """`load(key)` per key, unprocessed: decoded images or raw queries, for a method that
    preprocesses its inputs itself (a method that takes raw inputs, `MethodInputs`)."""

    def __init__(self, keys: Sequence, load: Callable):
        self.keys, self.load = list(keys), load

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        return self.load(self.keys[index])


def loaded_batches(
    keys: Sequence, load: Callable, batch_size: int = 128, workers: int = 0
) -> Iterator[list]:
    """Yield lists of `load(key)` in key order, e.g. `load=gallery.open` for decoded images;
    the loading runs in `workers` processes."""
    loader = DataLoader(
        _Loaded(keys, load), batch_size=batch_size, num_workers=workers, collate_fn=list
    )
    yield from loader


Prepare = Callable[[RawQuery], tuple[Image.Image, str]]


def raw_query(query: Query, gallery: Gallery) -> RawQuery:
    """The raw form of a data set query (reference image loaded, caption if the data set has
    one), for a method's `prepare_query`."""
    return RawQuery(
        image=gallery.open(query.reference_id),
        text=query.text,
        reference_id=query.reference_id,
        query_id=query.query_id,
        caption=gallery.captions.get(query.reference_id),
    )


class PreparedQueries(Dataset):
    """Queries through a method's raw-data stage: (pixels of the prepared image, its text)."""

    def __init__(
        self,
        queries: Sequence[Query],
        gallery: Gallery,
        preprocess: Callable[[Image.Image], torch.Tensor],
        prepare: Prepare,
    ):
        self.queries, self.gallery = list(queries), gallery
        self.preprocess, self.prepare = preprocess, prepare

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, text = self.prepare(raw_query(self.queries[index], self.gallery))
        return self.preprocess(image), text  # [3, H, W], text


def _collate_queries(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    pixels, texts = zip(*items, strict=True)
    return torch.stack(pixels), list(texts)


def query_batches(
    queries: Sequence[Query],
    gallery: Gallery,
    preprocess: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 128,
    workers: int = 0,
    prepare: Prepare | None = None,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Yield (reference pixels `[b, 3, H, W]`, modification texts) in query order.

    With `prepare` (a method's `prepare_query`), each raw query goes through it first: the
    pixels are those of the image it returns and the texts its texts.
    """
    if prepare is not None:
        loader = DataLoader(
            PreparedQueries(queries, gallery, preprocess, prepare),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate_queries,
        )
        yield from loader
        return
    references = [q.reference_id for q in queries]
    texts = [q.text for q in queries]
    for start, pixels in zip(
        range(0, len(queries), batch_size),
        image_batches(gallery, references, preprocess, batch_size, workers),
        strict=True,
    ):
        yield pixels, texts[start : start + batch_size]

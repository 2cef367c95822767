"""The one shape every benchmark is turned into: queries and a gallery."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from circe.data.errors import DatasetFormatError, shown
from circe.data.images import load_rgb


@dataclass(frozen=True)
class Query:
    """One composed query: a reference image and how the target differs from it."""

    query_id: str
    reference_id: str
    texts: tuple[str, ...]  # one or more modification texts (FashionIQ has two)
    target_ids: tuple[str, ...] = ()  # empty when the split's labels are hidden (test sets)
    subset_ids: tuple[str, ...] = ()  # CIRR's img_set members
    tags: tuple[str, ...] = ()  # e.g. the synthetic edit kind ("recolour", "move")

    def __post_init__(self) -> None:
        # A loader that let a number through (`"text": 3`) would otherwise fail far from its
        # file, in whatever first joins the texts.
        wrong = next((text for text in self.texts if not isinstance(text, str)), None)
        if wrong is not None:
            raise DatasetFormatError(
                f"query {shown(self.query_id)}: its text is {shown(wrong)}, a "
                f"{type(wrong).__name__}; a modification text must be a string"
            )

    @property
    def text(self) -> str:
        """The modification texts joined into one string (" and " between captions)."""
        return " and ".join(t.strip() for t in self.texts)


@dataclass(frozen=True)
class RawQuery:
    """A query before any encoder sees it: what `CIRMethod.prepare_query` works on.

    The data pipeline (evaluation's query batches, pixel training batches, the feature
    cache) builds one per query from the data set: the reference image as loaded, the
    modification text, and what the data set knows about them.
    """

    image: Image.Image  # the reference image, RGB, before preprocessing
    text: str  # the modification text
    reference_id: str | None = None
    query_id: str | None = None
    caption: str | None = None  # the data set's caption of the reference image, if it has one


@dataclass
class Gallery:
    """Image ids -> paths, in a fixed order (row i of an embedding matrix is ids[i])."""

    paths: dict[str, Path]
    captions: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return list(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def index_of(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self.paths)}

    def open(self, image_id: str) -> Image.Image:
        """Load an image as RGB, naming the file when it is missing or not an image."""
        try:
            path = self.paths[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in the gallery") from None
        return load_rgb(path)


@dataclass
class CIRSplit:
    """One split of a benchmark: its queries, the gallery they are ranked against, and how."""

    name: str
    queries: list[Query]
    gallery: Gallery
    # Remove each query's reference image from its own ranking (CIRR, FashionIQ convention).
    exclude_reference: bool = True
    protocol: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Every id a query names must be in the gallery; say which query breaks it."""
        known = self.gallery.paths
        for query in self.queries:
            for image_id in (query.reference_id, *query.target_ids, *query.subset_ids):
                if image_id not in known:
                    raise DatasetFormatError(
                        f"split {self.name!r}: query {query.query_id!r} names image "
                        f"{image_id!r}, which is not in the gallery"
                    )

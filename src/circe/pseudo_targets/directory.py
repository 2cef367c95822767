"""Pseudo-targets made elsewhere (another editing model, another machine): a directory with
one image per query, named after the query id (`<query id>.png`, `.jpg`, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from circe.data.images import load_rgb
from circe.data.types import Gallery, Query
from circe.pseudo_targets.generate import Edited, PseudoTargetGenerator

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DirectoryImport(PseudoTargetGenerator):
    """Reads each query's pseudo-target from `source` (checked to be a readable image)."""

    name = "directory"
    options = ("source",)
    batch_size = 16

    def __init__(self, source: Path):
        if not source.is_dir():
            raise FileNotFoundError(f"pseudo-target source directory not found: {source}")
        self.source = source.resolve()
        self.files = {p.stem: p for p in self.source.iterdir() if p.suffix.lower() in SUFFIXES}

    @classmethod
    def create(cls, dataset: str, root: Path, source: Path | None = None) -> DirectoryImport:
        if source is None:
            raise ValueError(
                "the directory generator needs --source DIR: the images, one per query, "
                "named <query id>.png (or .jpg, .jpeg, .webp, .bmp)"
            )
        return cls(Path(source))

    def settings(self) -> dict[str, Any]:
        return {"source": str(self.source)}

    def edit(self, queries: Sequence[Query], gallery: Gallery) -> list[Edited]:
        edited = []
        for query in queries:
            path = self.files.get(query.query_id)
            if path is None:
                raise FileNotFoundError(
                    f"{self.source} has no image for query {query.query_id!r} (expected "
                    f"{query.query_id}.png or another of {', '.join(SUFFIXES)})"
                )
            edited.append(Edited(load_rgb(path), {"source": path.name}))
        return edited

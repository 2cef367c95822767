"""Composed queries against an index space: one object that the CLI and the server share.

`IndexSearcher` opens a committed space, loads the method that built it (or checks that a
given method is that method), and answers (reference image, modification text, k) with
ranked gallery images. The reference is an uploaded image, a file on disk, or an image of
the gallery itself, named by id or by its path in the gallery; a gallery reference is left
out of its own results, as the CIR benchmarks do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from circe.data.images import load_rgb
from circe.data.types import RawQuery
from circe.index.engine import FaissEngine, SearchEngine
from circe.index.files import ImageFile
from circe.index.identity import MethodSource, identity_of
from circe.index.pgvector import KINDS as PGVECTOR_KINDS
from circe.index.pgvector import PgVectorEngine
from circe.index.store import IndexSpace, open_space
from circe.methods.base import CIRMethod

MAX_K = 1000
MAX_TEXT_CHARS = 1000


class QueryError(ValueError):
    """A query a user got wrong: empty or too long text, k out of range, unknown image."""


class UnknownImageError(QueryError, KeyError):
    """A reference names no gallery image and no image file."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Hit:
    rank: int  # 1 = best
    id: str
    path: str  # relative to the gallery root
    score: float  # cosine similarity of the composed query and the image


@dataclass(frozen=True)
class Reference:
    """A resolved reference image: its pixels-to-be and, for a gallery image, its id."""

    image: Image.Image
    id: str | None = None
    path: str | None = None


def check_query(text: str, k: int) -> str:
    """The modification text, stripped; raises `QueryError` for what cannot be searched."""
    text = (text or "").strip()
    if not text:
        raise QueryError("the modification text is empty: say how the target differs")
    if len(text) > MAX_TEXT_CHARS:
        raise QueryError(
            f"the modification text has {len(text)} characters; at most {MAX_TEXT_CHARS}"
        )
    if not 1 <= k <= MAX_K:
        raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
    return text


def _jsonable(value: Any) -> Any:
    """Tensors and arrays (of any shape) as nested lists, recursively through containers."""
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class IndexSearcher:
    """Search one space of an index with its own method (loaded once)."""

    def __init__(
        self,
        index_dir: Path,
        space: str | None = None,
        method: CIRMethod | None = None,
        source: MethodSource | None = None,
        pgvector: str | None = None,
    ):
        """`method`/`source`: a method the caller loaded; it must be the one the space was
        built with. Without it, the space's own method is loaded from its record.
        `pgvector`: the PostgreSQL connection string of a space indexed with --pgvector
        (default $CIRCE_PGVECTOR_DSN; unused for an in-process FAISS space)."""
        self.index_dir = Path(index_dir)
        self.space: IndexSpace = open_space(self.index_dir, space, mmap=True)
        recorded = self.space.identity
        where = f"space {self.space.name!r} of index {self.index_dir}"
        if method is None:
            source = recorded.source
            method = source.load()
        recorded.check_same(identity_of(method, source or MethodSource()), where)
        self.method = method.eval()
        self.engine: SearchEngine
        if self.space.engine.get("kind") in PGVECTOR_KINDS:  # vectors searched on a server
            self.engine = PgVectorEngine.load(self.space.engine, len(self.space), pgvector)
        else:
            self.engine = FaissEngine.load(self.space.directory, self.space.embeddings)

    @property
    def root(self) -> Path:
        return self.space.root

    def __len__(self) -> int:
        return len(self.space)

    def image_file(self, image_id: str) -> ImageFile:
        """The gallery file of `image_id`; `UnknownImageError` when there is none."""
        row = self.space.rows.get(image_id)
        if row is None:
            raise UnknownImageError(f"no image with id {image_id!r} in the index")
        return self.space.files[row]

    def resolve_reference(self, reference: str) -> Reference:
        """A gallery id, a path relative to the gallery root, or an image file on disk."""
        row = self.space.rows.get(reference)
        if row is None:
            row = self.space.rows_by_path.get(self._gallery_path(reference))
        if row is not None:
            file = self.space.files[row]
            return Reference(load_rgb(self.root / file.path), file.id, file.path)
        if Path(reference).is_file():
            return Reference(load_rgb(Path(reference)))
        raise UnknownImageError(
            f"{reference!r} is neither an image id or path of the gallery ({self.root}) "
            "nor an image file"
        )

    def _gallery_path(self, reference: str) -> str | None:
        """`reference` as a path relative to the gallery root: a file on disk inside the
        gallery, or a path that only makes sense relative to it (None: a file outside)."""
        path = Path(reference)
        if not path.exists():
            return path.as_posix()
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return None

    def _raw(self, reference: Reference, text: str) -> RawQuery:
        """The query before the method's raw-data stage and preprocessing (its own)."""
        return RawQuery(image=reference.image, text=text, reference_id=reference.id)

    def search(self, reference: Reference, text: str, k: int = 10) -> list[Hit]:
        """The k best gallery images for the reference changed as `text` says."""
        return self.search_batch([(reference, text, k)])[0]

    @torch.no_grad()
    def search_batch(self, queries: Sequence[tuple[Reference, str, int]]) -> list[list[Hit]]:
        """`search` for several (reference, text, k) queries at once: one forward pass of the
        method and one engine call for all of them (what the server's batcher sends)."""
        if not queries:
            return []
        texts = [check_query(text, k) for _, text, k in queries]
        pairs = zip(queries, texts, strict=True)
        raw = [self._raw(reference, text) for (reference, _, _), text in pairs]
        vectors = self.method.encode_raw_queries(raw).float().cpu().numpy()  # [B, D]
        # One more than asked where the reference is a gallery image: it is left out.
        wanted = max(k + (reference.id is not None) for reference, _, k in queries)
        scores, rows = self.engine.search(vectors, wanted)  # [B, k'] each
        return [
            self._hits(reference, k, query_scores, query_rows)
            for (reference, _, k), query_scores, query_rows in zip(
                queries, scores, rows, strict=True
            )
        ]

    def _hits(self, reference: Reference, k: int, scores: np.ndarray, rows: np.ndarray):
        hits: list[Hit] = []
        for score, row in zip(scores.tolist(), rows.tolist(), strict=True):
            if row < 0 or self.space.files[row].id == reference.id:
                continue
            file = self.space.files[row]
            hits.append(Hit(len(hits) + 1, file.id, file.path, float(score)))
            if len(hits) == k:
                break
        return hits

    @torch.no_grad()
    def explain(self, reference: Reference, text: str) -> dict[str, Any]:
        """The method's account of this query (`CIRMethod.explain`), as plain JSON values."""
        return _jsonable(self.method.explain_raw([self._raw(reference, check_query(text, 1))]))

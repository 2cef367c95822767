"""Index a folder of images with a CIR method and search it (`circe index`, `circe search`).

`build_index` embeds a folder into one embedding space of an index directory (incremental,
resumable, atomic; `circe.index.store` describes the layout), and `IndexSearcher` answers
composed queries against it through a search engine chosen by size (`circe.index.engine`).

The names below load on first use, so that `circe --help` (which imports the command
module `circe.cli.index`) does not pay for FAISS and torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "IndexReport": "circe.index.build",
    "build_index": "circe.index.build",
    "EngineChoice": "circe.index.engine",
    "EngineOptions": "circe.index.engine",
    "SearchEngine": "circe.index.engine",
    "build_engine": "circe.index.engine",
    "Failure": "circe.index.files",
    "ImageFile": "circe.index.files",
    "image_id": "circe.index.files",
    "scan_gallery": "circe.index.files",
    "PgVectorEngine": "circe.index.pgvector",
    "PgVectorError": "circe.index.pgvector",
    "build_pgvector_engine": "circe.index.pgvector",
    "IdentityMismatchError": "circe.index.identity",
    "MethodIdentity": "circe.index.identity",
    "MethodSource": "circe.index.identity",
    "Hit": "circe.index.search",
    "IndexSearcher": "circe.index.search",
    "QueryError": "circe.index.search",
    "Reference": "circe.index.search",
    "UnknownImageError": "circe.index.search",
    "IndexSpace": "circe.index.store",
    "IndexStoreError": "circe.index.store",
    "open_space": "circe.index.store",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)

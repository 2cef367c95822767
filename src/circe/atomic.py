"""Atomic files: write beside the destination, then rename over it.

A reader, or a crash at any moment, sees the old file or the new one, never half of one.
Used by every layer (checkpoints, the feature cache, indexes, captions, pseudo-targets,
the backbone's pretraining), so it imports nothing of circe.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's, on POSIX) contents to disk before a rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends, rename it over
    `path`. If the block fails the temporary file is removed and `path` is left as it was.
    `durable`: flush the file and then its directory to disk around the rename (for what a
    power cut must not lose: index shards and manifests)."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        yield temporary
        if durable:
            fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    """`path.write_text(text)`, all or nothing (see `replacing`)."""
    with replacing(path, durable) as temporary:
        temporary.write_text(text)

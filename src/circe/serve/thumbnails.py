"""Small JPEG previews of gallery images for the result grid, made on demand and cached."""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

from circe.data.images import load_rgb

MIN_SIZE, MAX_SIZE = 16, 512


@lru_cache(maxsize=4096)
def _thumbnail(path: Path, mtime_ns: int, size: int) -> bytes:
    # `mtime_ns` is part of the key only: a changed file gets a new thumbnail.
    image = load_rgb(path)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def thumbnail(path: Path, size: int) -> bytes:
    """JPEG bytes of `path` scaled to fit a `size` x `size` box (aspect kept)."""
    return _thumbnail(path, path.stat().st_mtime_ns, size)

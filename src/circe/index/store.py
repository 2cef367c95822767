"""The index directory on disk: one gallery, one or more embedding spaces, atomic commits.

    INDEX_DIR/
      index.json                 manifest: format, gallery root, space -> committed generation
      .lock                      held by the one process that writes the index
      SPACE/                     one embedding space (a method's vectors of every image)
        gen-<n>-<token>/         a committed generation, never modified once committed
          identity.json          the method that made the vectors (`circe.index.identity`)
          rows.jsonl             row i: {"id", "path", "size", "mtime_ns"}
          embeddings.npy         [N, D] unit vectors, float32 or float16
          engine.json            the search structure, its parameters and why (+ engine.faiss)
        pending/                 shards of an unfinished run, for resuming it (`PendingRun`)
        report.json              what the last finished run did, unreadable files included

A gallery holds several spaces when several methods index it; ids are shared by every
space (an id is a hash of the image's relative path). A fusion of methods is one space of its
own: DAFM's vectors are its members' vectors side by side, and its query embedding weighs
them per query, so one inner-product search ranks by the fused similarity.

A run writes a new generation beside the old one and then replaces `index.json` with
`os.replace`, so a reader, or a crash at any moment, sees either the old index or the new
one, whole. Generations no manifest names are removed afterwards.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from circe.atomic import fsync_path, write_text_atomic
from circe.index.files import ImageFile
from circe.index.identity import MethodIdentity

FORMAT_VERSION = 1
MANIFEST = "index.json"
_SPACE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class IndexStoreError(ValueError):
    """An index directory is missing, of another format, or lacks the space asked for."""


def check_space_name(name: str) -> str:
    """Space names are directory names: letters, digits, '.', '_', '-'."""
    if not _SPACE_NAME.match(name):
        raise IndexStoreError(
            f"invalid space name {name!r}: use letters, digits, '.', '_' and '-' "
            "(at most 64 characters, not starting with a dot)"
        )
    return name


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """Write JSON beside `path`, flush it to disk, then rename it over `path`."""
    write_text_atomic(path, json.dumps(record, indent=2), durable=True)


def read_manifest(index_dir: Path) -> dict[str, Any] | None:
    """The manifest of `index_dir`, or None where no index was ever committed there."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        return None
    with _damaged(path):
        manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise IndexStoreError(
            f"{path} is an index of another format "
            f"({manifest.get('format') if isinstance(manifest, dict) else manifest!r}); "
            f"this circe reads format {FORMAT_VERSION}: rebuild it with `circe index`"
        )
    return manifest


@contextmanager
def _damaged(path: Path) -> Iterator[None]:
    """Reading `path` of a committed index: a missing, truncated or malformed file is one
    error that names it (committed files are written whole, so this is damage from outside:
    a disk error, a copy cut short, an edit)."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, EOFError) as error:
        raise IndexStoreError(
            f"{path} is damaged ({type(error).__name__}: {error}): rebuild the index (delete "
            "the space directory, or the whole index, and run `circe index` again)"
        ) from None


@contextmanager
def index_lock(index_dir: Path) -> Iterator[None]:
    """Hold the index's write lock: two runs writing one index would lose each other's work."""
    index_dir.mkdir(parents=True, exist_ok=True)
    with (index_dir / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexStoreError(
                f"another `circe index` is writing {index_dir}; wait for it to finish"
            ) from None
        try:
            _remove_leftovers(index_dir)  # the lock is ours: no other run is writing these
            yield
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise IndexStoreError(
                    f"no space left on the device while writing {error.filename or index_dir}: "
                    "free some space and run the same command again (the last committed "
                    "index is unchanged, and the images embedded so far are kept)"
                ) from None
            raise
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(index_dir: Path) -> None:
    """What a killed run left half-written: temporary files and generations (`.tmp-*`) of
    the index, its spaces and their pending shards. Whole files are never named so."""
    for entry in [
        *index_dir.glob(".tmp-*"),
        *index_dir.glob("*/.tmp-*"),
        *index_dir.glob("*/pending/.tmp-*"),
    ]:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@dataclass
class IndexSpace:
    """One committed embedding space: row i of `embeddings` is the image `files[i]`."""

    name: str
    root: Path  # the gallery folder the paths are relative to
    directory: Path  # the generation directory
    identity: MethodIdentity
    files: list[ImageFile]
    embeddings: np.ndarray  # [N, D]
    engine: dict[str, Any] = field(default_factory=dict)  # engine.json

    def __len__(self) -> int:
        return len(self.files)

    @cached_property
    def rows(self) -> dict[str, int]:
        """Image id -> row."""
        return {file.id: row for row, file in enumerate(self.files)}

    @cached_property
    def rows_by_path(self) -> dict[str, int]:
        """Relative path -> row."""
        return {file.path: row for row, file in enumerate(self.files)}

    def vectors_by_path(self) -> dict[str, tuple[ImageFile, np.ndarray]]:
        """Relative path -> (the file as it was embedded, its vector `[D]`)."""
        return {file.path: (file, self.embeddings[row]) for row, file in enumerate(self.files)}


def space_names(index_dir: Path) -> list[str]:
    manifest = read_manifest(index_dir)
    return sorted(manifest["spaces"]) if manifest else []


def open_space(index_dir: Path, space: str | None = None, mmap: bool = False) -> IndexSpace:
    """Load a committed space; `space=None` picks the index's only space."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    if manifest is None:
        raise IndexStoreError(
            f"no index at {index_dir} (no {MANIFEST}): build one with "
            f"`circe index IMAGE_FOLDER --method METHOD --out {index_dir}`"
        )
    spaces = manifest["spaces"]
    if space is None:
        if len(spaces) != 1:
            raise IndexStoreError(
                f"{index_dir} holds several embedding spaces ({', '.join(sorted(spaces))}): "
                "name one with --space"
            )
        space = next(iter(spaces))
    if space not in spaces:
        raise IndexStoreError(
            f"{index_dir} has no space {space!r}; it has: {', '.join(sorted(spaces)) or 'none'}"
        )
    directory = index_dir / spaces[space]["generation"]
    with _damaged(directory / "identity.json"):
        identity = MethodIdentity.from_json(json.loads((directory / "identity.json").read_text()))
    with _damaged(directory / "rows.jsonl"), (directory / "rows.jsonl").open() as lines:
        rows = [json.loads(line) for line in lines]
        files = [ImageFile(row["path"], row["size"], row["mtime_ns"]) for row in rows]
    with _damaged(directory / "embeddings.npy"):
        embeddings = np.load(directory / "embeddings.npy", mmap_mode="r" if mmap else None)
    if len(embeddings) != len(files):
        raise IndexStoreError(
            f"{directory / 'embeddings.npy'} holds {len(embeddings)} vectors for {len(files)} "
            "images: the index is damaged; rebuild it (delete the space directory and run "
            "`circe index` again)"
        )
    with _damaged(directory / "engine.json"):
        engine = json.loads((directory / "engine.json").read_text())
    return IndexSpace(space, Path(manifest["root"]), directory, identity, files, embeddings, engine)


def commit_space(
    index_dir: Path,
    root: Path,
    space: str,
    identity: MethodIdentity,
    files: list[ImageFile],
    embeddings: np.ndarray,
    write_engine: Callable[[Path], dict[str, Any]],
) -> Path:
    """Write a new generation of `space` and make it the committed one, atomically.

    `write_engine(directory)` saves the search structure into the generation directory and
    returns what the manifest should say about it. The caller holds `index_lock`.
    """
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir) or {
        "format": FORMAT_VERSION,
        "root": str(Path(root).resolve()),
        "spaces": {},
    }
    space_dir = index_dir / space
    space_dir.mkdir(parents=True, exist_ok=True)
    previous = manifest["spaces"].get(space, {}).get("number", 0)
    name = f"gen-{previous + 1:06d}-{uuid.uuid4().hex[:8]}"
    staging = space_dir / f".tmp-{name}"
    staging.mkdir()
    try:
        (staging / "identity.json").write_text(json.dumps(identity.to_json(), indent=2))
        with (staging / "rows.jsonl").open("w") as out:
            for file in files:
                row = {"id": file.id, "path": file.path, "size": file.size}
                out.write(json.dumps({**row, "mtime_ns": file.mtime_ns}) + "\n")
        np.save(staging / "embeddings.npy", embeddings)
        engine = write_engine(staging)
        (staging / "engine.json").write_text(json.dumps(engine, indent=2))
        for path in staging.iterdir():
            fsync_path(path)
        fsync_path(staging)
        os.rename(staging, space_dir / name)
        fsync_path(space_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest["spaces"][space] = {
        "generation": f"{space}/{name}",
        "number": previous + 1,
        "images": len(files),
        "dim": int(embeddings.shape[1]) if embeddings.ndim == 2 else 0,
        "method": identity.describe(),
        "engine": engine.get("kind"),
    }
    write_json_atomic(index_dir / MANIFEST, manifest)
    for stale in [*space_dir.glob("gen-*"), *space_dir.glob(".tmp-gen-*")]:
        if stale.name != name:
            shutil.rmtree(stale, ignore_errors=True)
    return space_dir / name

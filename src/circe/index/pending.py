"""The embeddings of an unfinished index run, kept in shards so that the next run resumes.

Embedding a large folder takes hours; an interrupted run (Ctrl-C, a crash, a killed job)
must not start over. While a run embeds, every `shard_size` images it writes one shard
`SPACE/pending/shard-<n>.npz` (paths, sizes, mtimes, vectors), by writing a temporary file
and renaming it, so a shard on disk is always whole. The next run with the same method
reuses every shard entry whose file is unchanged, embeds the rest, commits, and only then
removes the shards. Shards made by another method are discarded: their vectors are of
another space.
"""

from __future__ import annotations

import json
import shutil
import uuid
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from circe.atomic import replacing
from circe.index.files import ImageFile
from circe.index.identity import MethodIdentity
from circe.index.store import write_json_atomic


class PendingRun:
    """The shards of one space's unfinished run."""

    def __init__(self, space_dir: Path, identity: MethodIdentity):
        self.directory = Path(space_dir) / "pending"
        self.identity = identity
        stamp = self.directory / "identity.json"
        if self.directory.exists() and not self._made_by(identity, stamp):
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            write_json_atomic(stamp, identity.to_json())

    @staticmethod
    def _made_by(identity: MethodIdentity, stamp: Path) -> bool:
        """Whether the shards beside `stamp` hold vectors of `identity`'s space."""
        try:
            previous = MethodIdentity.from_json(json.loads(stamp.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return not previous.differences(identity)

    def _shards(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*.npz"))

    def load(self) -> dict[str, tuple[ImageFile, np.ndarray]]:
        """Relative path -> (the file as it was embedded, its vector `[D]`).

        A shard that cannot be read (a disk error) is dropped: its images are embedded again.
        """
        done: dict[str, tuple[ImageFile, np.ndarray]] = {}
        for shard in self._shards():
            try:
                with np.load(shard, allow_pickle=False) as data:
                    paths, sizes = data["paths"], data["sizes"]
                    mtimes, vectors = data["mtimes"], data["vectors"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                shard.unlink()
                continue
            for path, size, mtime, vector in zip(paths, sizes, mtimes, vectors, strict=True):
                done[str(path)] = (ImageFile(str(path), int(size), int(mtime)), vector)
        return done

    def write(self, files: list[ImageFile], vectors: np.ndarray) -> None:
        """Add one shard: `files[i]` was embedded as `vectors[i]` (`[n, D]`)."""
        if not files:
            return
        number = len(self._shards()) + 1
        final = self.directory / f"shard-{number:06d}-{uuid.uuid4().hex[:6]}.npz"
        with replacing(final, durable=True) as temporary, temporary.open("wb") as out:
            np.savez(
                out,
                paths=np.array([f.path for f in files]),
                sizes=np.array([f.size for f in files], dtype=np.int64),
                mtimes=np.array([f.mtime_ns for f in files], dtype=np.int64),
                vectors=vectors,
            )

    def clear(self) -> None:
        """The run is committed: its shards are no longer needed."""
        shutil.rmtree(self.directory, ignore_errors=True)


class ShardWriter:
    """Vectors as they are embedded, written to `pending` every `shard_size` of them by a
    thread of their own, so that the encoder never waits for the disk. A write that failed
    (a full disk) is raised at the next `add`; `close` writes the rest and waits for every
    write, also when the run stops on an error, so that nothing embedded is lost."""

    def __init__(self, pending: PendingRun, shard_size: int):
        self.pending, self.shard_size = pending, shard_size
        self.files: list[ImageFile] = []
        self.vectors: list[np.ndarray] = []
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="circe-shards")
        self.writes: list[Future] = []

    def add(self, file: ImageFile, vector: np.ndarray) -> None:
        for write in [w for w in self.writes if w.done()]:
            self.writes.remove(write)
            write.result()
        self.files.append(file)
        self.vectors.append(vector)
        if len(self.files) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if self.files:
            shard = np.stack(self.vectors)  # [n, D]
            self.writes.append(self.thread.submit(self.pending.write, self.files, shard))
            self.files, self.vectors = [], []

    def close(self) -> None:
        try:
            self._flush()
        finally:
            self.thread.shutdown(wait=True)
        for write in self.writes:
            write.result()

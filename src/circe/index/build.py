"""`circe index`: embed every image of a folder into an index space, incrementally.

A run compares the folder with the committed space (by relative path, size and mtime):
unchanged images keep their vectors, new and changed ones are embedded, deleted ones are
dropped. Embedding is reader -> encoder -> writer, overlapped: threads (or worker
processes) decode and preprocess the next batches (`circe.index.reader`) while the method's
`encode_targets` embeds one, and a writer thread puts finished vectors in pending shards
(`circe.index.pending`) so that an interrupted run resumes where it stopped. An image that does not decode is skipped and listed in the
report; it never stops the run. The new generation is committed atomically at the end.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circe.backbones import backbone_weights_sha256, file_sha256
from circe.index.engine import EngineOptions, build_engine
from circe.index.files import Failure, ImageFile, scan_gallery
from circe.index.identity import MethodIdentity, MethodSource, identity_of
from circe.index.pending import PendingRun, ShardWriter
from circe.index.pgvector import KINDS as PGVECTOR_KINDS
from circe.index.pgvector import build_pgvector_engine, prune_tables
from circe.index.ray_embed import RayOptions, embed_with_ray
from circe.index.reader import AUTO, check_batch_size, read_batches
from circe.index.store import (
    IndexSpace,
    IndexStoreError,
    check_space_name,
    commit_space,
    index_lock,
    open_space,
    read_manifest,
    write_json_atomic,
)
from circe.methods.base import CIRMethod
from circe.methods.checkpoint import checkpoint_dir, read_checkpoint_info
from circe.methods.plan import takes_raw_inputs
from circe.progress import Progress, no_progress

DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class IndexReport:
    """What one run did; written to `SPACE/report.json` and printed by `circe index`."""

    index: str
    space: str
    images: int = 0  # in the committed space after the run
    unchanged: int = 0  # vectors kept from the previous generation
    resumed: int = 0  # vectors taken from an interrupted run's shards
    embedded: int = 0  # images embedded by this run
    added: int = 0  # of the images indexed now, those the previous generation lacked
    changed: int = 0  # ... and those whose file changed since it
    removed: int = 0  # images of the previous generation no longer on disk
    failed: list[Failure] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _committed(
    index_dir: Path, space: str, identity: MethodIdentity, root: Path
) -> IndexSpace | None:
    """The committed space, after checking it indexes the same folder with the same method
    (None when the space does not exist yet)."""
    manifest = read_manifest(index_dir)
    if manifest is None:
        return None
    if Path(manifest["root"]) != root.resolve():
        raise IndexStoreError(
            f"{index_dir} indexes {manifest['root']}, not {root.resolve()}: give the index of "
            "this folder another --out"
        )
    if space not in manifest["spaces"]:
        return None
    committed = open_space(index_dir, space)
    if committed.identity.differences(identity):
        raise IndexStoreError(
            f"space {space!r} of {index_dir} holds vectors of {committed.identity.describe()}, "
            f"not of {identity.describe()}: choose another --space for this method (one "
            "gallery can hold several), or delete the space directory to rebuild it"
        )
    return committed


def _embed(
    method: CIRMethod,
    root: Path,
    files: list[ImageFile],
    shards: ShardWriter,
    batch_size: int,
    workers: int,
    threads: int,
    progress: Progress,
) -> tuple[dict[str, np.ndarray], list[Failure]]:
    """Embed `files` in this process; every vector goes to `shards` as it is made.

    The reader decodes the next batches while the encoder works (`circe.index.reader`), and
    shards are written by a thread of their own, so that the encoder never waits for
    either."""
    raw = takes_raw_inputs(method)  # decoded images: the method preprocesses them itself
    device = method.backbone.device
    batches = read_batches(
        root,
        files,
        None if raw else method.backbone.preprocess,
        batch_size,
        workers=workers,
        threads=threads,
        pin_memory=device.type == "cuda",
    )
    vectors: dict[str, np.ndarray] = {}
    failures: list[Failure] = []
    for batch in progress(batches, -(-len(files) // batch_size), "embedding"):
        failures += [Failure(files[p].path, error) for p, error in batch.failed]
        if not batch.positions:
            continue
        with torch.no_grad():
            if raw:
                embedded = method.encode_target_images(batch.inputs)
            else:
                pixels = batch.inputs.to(device, non_blocking=True)
                embedded = method.encode_targets(pixels)
        embedded = embedded.float().cpu().numpy()  # [b, D]
        for position, vector in zip(batch.positions, embedded, strict=True):
            vectors[files[position].path] = vector
            shards.add(files[position], vector)
    return vectors, failures


def unchanged_report(
    root: Path,
    index_dir: Path,
    source: MethodSource,
    space: str | None = None,
    dtype: str = "float32",
    pgvector: str | None = None,
) -> IndexReport | None:
    """The report of a run that has nothing to do, decided from files alone, before the
    method is loaded (loading a real model takes seconds to minutes); None when a run must
    load it: the space is new or another method's, its weights files changed, an earlier
    run is pending, or any image was added, changed, removed or never indexed.

    The method's files are compared by their sha256 (cached per path, size and mtime) with
    the ones the space recorded; a source whose weights cannot be told from one file (a
    transformers directory) always loads."""
    started = time.time()
    root, index_dir = Path(root), Path(index_dir)
    if not root.is_dir():  # said before a model is loaded for nothing
        raise FileNotFoundError(f"image folder not found: {root}")
    manifest = read_manifest(index_dir)
    name = space or _method_name(source)
    if manifest is None or name is None or Path(manifest["root"]) != root.resolve():
        return None
    if name not in manifest["spaces"] or (index_dir / name / "pending").exists():
        return None
    committed = open_space(index_dir, name, mmap=True)
    recorded = committed.identity
    if recorded.source != _normalised(source) or _hashes(source) != (
        recorded.backbone_sha256,
        recorded.checkpoint_sha256,
    ):
        return None
    on_server = committed.engine.get("kind") in PGVECTOR_KINDS
    if committed.embeddings.dtype != DTYPES.get(dtype) or on_server != (pgvector is not None):
        return None
    files, failed = scan_gallery(root)
    before = committed.vectors_by_path()
    if failed or len(files) != len(before):
        return None
    for file in files:
        kept = before.get(file.path)
        if kept is None or not kept[0].same_file(file.size, file.mtime_ns):
            return None
    report = IndexReport(
        index=str(index_dir),
        space=name,
        images=len(files),
        unchanged=len(files),
        engine={k: committed.engine[k] for k in ("kind", "reason")},
        seconds=round(time.time() - started, 2),
    )
    with index_lock(index_dir):  # the report of the last run, as a full run writes it
        write_json_atomic(index_dir / name / "report.json", report.to_json())
    return report


def _method_name(source: MethodSource) -> str | None:
    if source.checkpoint is None:
        return source.method
    config = checkpoint_dir(source.checkpoint) / "config.json"
    return read_checkpoint_info(config).get("method") if config.is_file() else None


def _normalised(source: MethodSource) -> MethodSource:
    """`source` as `identity_of` records it (absolute paths)."""
    if source.checkpoint is not None:
        return MethodSource(checkpoint=str(Path(source.checkpoint).resolve()))
    weights = None if source.weights is None else str(Path(source.weights).resolve())
    return MethodSource(method=source.method, backbone=source.backbone, weights=weights)


def _hashes(source: MethodSource) -> tuple[str | None, str | None]:
    """(backbone weights sha256, checkpoint sha256) of a source's files, as an identity
    records them; (None, None) where they cannot be read off one file."""
    if source.checkpoint is not None:
        checkpoint = checkpoint_dir(source.checkpoint)
        weights, config = checkpoint / "model.safetensors", checkpoint / "config.json"
        if not (weights.is_file() and config.is_file()):
            return None, None
        backbone = read_checkpoint_info(config)["backbone"]["weights_sha256"]
        return backbone, file_sha256(weights)
    return backbone_weights_sha256(source.backbone, source.weights), None


def build_index(
    root: Path,
    index_dir: Path,
    method: CIRMethod,
    source: MethodSource,
    space: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    threads: int = AUTO,
    dtype: str = "float32",
    shard_size: int = 1024,
    engine_options: EngineOptions | None = None,
    progress: Progress = no_progress,
    pgvector: str | None = None,
    ray: RayOptions | None = None,
) -> IndexReport:
    """Bring the space `space` (default: the method's name) of `index_dir` up to date with
    the images under `root`; returns what was done. `pgvector`: a PostgreSQL connection
    string; the space's vectors are then searched on that server (`circe.index.pgvector`)
    instead of in-process with FAISS. `workers` > 0 decodes images in that many processes,
    else in `threads` threads (AUTO: the cores the encoder leaves free; 0: in turn with
    encoding). `ray`: embed on a Ray cluster instead (`circe.index.ray_embed`; `batch_size`,
    `workers` and `threads` are then the actors' business)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    check_batch_size(batch_size)
    started = time.time()
    root, index_dir = Path(root), Path(index_dir)
    if not root.is_dir():  # before the index directory is made inside it
        raise FileNotFoundError(f"image folder not found: {root}")
    method.eval()
    identity = identity_of(method, source)
    space = check_space_name(space or identity.method)
    report = IndexReport(index=str(index_dir), space=space)
    with index_lock(index_dir):
        files, report.failed = scan_gallery(root)
        committed = _committed(index_dir, space, identity, root)
        previous = {} if committed is None else committed.vectors_by_path()
        pending = PendingRun(index_dir / space, identity)
        resumable = pending.load()
        vectors: dict[str, np.ndarray] = {}
        todo, resumed = [], set()
        for file in files:
            kept = previous.get(file.path)
            halfway = resumable.get(file.path)
            if kept is not None and kept[0].same_file(file.size, file.mtime_ns):
                vectors[file.path] = kept[1]
            elif halfway is not None and halfway[0].same_file(file.size, file.mtime_ns):
                vectors[file.path] = halfway[1]
                resumed.add(file.path)
            else:
                todo.append(file)
        # Every vector is in a pending shard before the run goes on or stops, however it
        # stops: the next run resumes from them.
        shards = ShardWriter(pending, shard_size)
        try:
            if ray is None:
                embedded, failures = _embed(
                    method, root, todo, shards, batch_size, workers, threads, progress
                )
            else:
                embedded, failures = embed_with_ray(identity, root, todo, shards, ray, progress)
        finally:
            shards.close()
        vectors.update(embedded)
        indexed = [f for f in files if f.path in vectors]
        fresh = resumed | set(embedded)
        report.failed += failures
        report.images, report.embedded, report.resumed = len(indexed), len(embedded), len(resumed)
        report.unchanged = len(indexed) - len(fresh)
        report.changed = len(fresh & set(previous))
        report.added = len(fresh) - report.changed
        report.removed = len(set(previous) - {f.path for f in indexed})
        if not indexed:
            raise IndexStoreError(
                f"no image under {root} could be indexed "
                f"({len(report.failed)} unreadable): nothing to search"
            )
        was_pgvector = committed is not None and committed.engine.get("kind") in PGVECTOR_KINDS
        if (
            committed is None
            or fresh
            or report.removed
            or committed.embeddings.dtype != dtype
            or was_pgvector != (pgvector is not None)  # moving to or from the server
        ):
            matrix = np.stack([vectors[f.path] for f in indexed]).astype(DTYPES[dtype])  # [N, D]
            if pgvector is None:
                engine = build_engine(matrix, engine_options)
            else:
                engine = build_pgvector_engine(matrix, space, pgvector, engine_options)
            commit_space(index_dir, root, space, identity, indexed, matrix, engine.save)
            if pgvector is not None:  # the new generation is committed: older tables can go
                prune_tables(space, keep=engine.table, dsn=pgvector)
            report.engine = {"kind": engine.choice.kind, "reason": engine.choice.reason}
        else:  # nothing changed: the committed generation stays as it is
            report.engine = {k: committed.engine[k] for k in ("kind", "reason")}
        pending.clear()
        report.seconds = round(time.time() - started, 2)
        write_json_atomic(index_dir / space / "report.json", report.to_json())
    return report

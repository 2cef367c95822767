"""Decoded image batches for an index build, made ahead of the encoder.

Decoding and preprocessing a batch takes about a third of the time the encoder spends on it
(`benchmarks/results/index_throughput.md`); done in turn with encoding, it is a third added
to every batch. Here the next batches are decoded while the encoder works on the current
one, either by threads (`threads`; Pillow and torch release the GIL while they decode,
resize and convert) or by worker processes (`workers`, a DataLoader), so that a build runs
at the speed of the encoder. Which is faster depends on the machine; the benchmark measures
both. Batches come out in file order whichever way they were made, so a build's shards and
its report do not depend on the reader.

An image that does not decode is reported with its error in its batch; it never stops the
reader.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from circe.data.images import load_rgb
from circe.index.files import ImageFile

AUTO = -1  # `threads`: as many as the cores the encoder leaves free


@dataclass
class ReadBatch:
    """One batch of files, in order: `positions` (into the file list) of those that decoded,
    their `inputs` (a `[b, 3, H, W]` tensor when preprocessed, else decoded images), and
    `failed`: (position, error) of those that did not."""

    positions: list[int]
    inputs: torch.Tensor | list[Any]
    failed: list[tuple[int, str]]

    def pin_memory(self) -> ReadBatch:
        """Page-locked inputs, so that the copy to a GPU overlaps the next batch's work (the
        DataLoader calls this in its pinning thread)."""
        if isinstance(self.inputs, torch.Tensor):
            self.inputs = self.inputs.pin_memory()
        return self


class _Images(Dataset):
    """Decoded, preprocessed images (decoded only without `preprocess`); a file that does not
    decode yields its error instead."""

    def __init__(self, root: Path, files: list[ImageFile], preprocess=None):
        self.root, self.files, self.preprocess = root, files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> tuple[int, Any, str | None]:
        return position, *decode(self.root / self.files[position].path, self.preprocess)


def decode(path: Path, preprocess: Callable | None = None) -> tuple[Any, str | None]:
    """(the image at `path`, preprocessed when `preprocess` is given, None), or (None, the
    error) for a file that does not decode."""
    try:
        image = load_rgb(path)
        return (image if preprocess is None else preprocess(image)), None
    # User files can fail to decode in any way Pillow knows (truncated data, decompression
    # bombs, unsupported modes): each is reported, none may stop the run.
    except Exception as error:  # noqa: BLE001
        return None, f"{type(error).__name__}: {error}"


def _collate(items: list[tuple[int, Any, str | None]]) -> ReadBatch:
    good = [(position, inputs) for position, inputs, _ in items if inputs is not None]
    failed = [(position, error) for position, _, error in items if error is not None]
    inputs: torch.Tensor | list[Any] = [inputs for _, inputs in good]
    if inputs and isinstance(inputs[0], torch.Tensor):
        inputs = torch.stack(inputs)  # stacked here, off the encoder's thread
    return ReadBatch([position for position, _ in good], inputs, failed)


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """Decoding threads when none are asked for: the cores torch's encoder does not use (at
    least one, at most 8: past that, one encoder is rarely fed faster)."""
    return max(1, min(8, available_cores() - torch.get_num_threads()))


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size below 1 (ValueError naming the flag), before any work is done:
    `read_batches` is a generator, so its own check would only run at the first batch."""
    if batch_size < 1:
        raise ValueError(f"the batch size (--batch-size) must be at least 1, not {batch_size}")


def read_batches(
    root: Path,
    files: list[ImageFile],
    preprocess: Callable | None,
    batch_size: int,
    workers: int = 0,
    threads: int = AUTO,
    pin_memory: bool = False,
) -> Iterator[ReadBatch]:
    """The files' batches, in order. `workers` > 0: decoded in that many processes;
    otherwise in `threads` threads (AUTO: `default_threads()`; 0: on the calling thread,
    one batch at a time). `pin_memory`: pin preprocessed batches (for a CUDA encoder)."""
    check_batch_size(batch_size)
    dataset = _Images(root, files, preprocess)
    starts = range(0, len(files), batch_size)

    def batch_at(start: int) -> ReadBatch:
        batch = _collate([dataset[i] for i in range(start, min(start + batch_size, len(files)))])
        return batch.pin_memory() if pin_memory else batch

    if workers > 0:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=pin_memory,
        )
        yield from loader
        return
    threads = default_threads() if threads == AUTO else threads
    if threads == 0:
        yield from map(batch_at, starts)
        return
    # Each thread makes whole batches; `threads + 1` are in flight, so one is always ready
    # when the encoder asks and none piles up in memory.
    pool = ThreadPoolExecutor(threads, thread_name_prefix="circe-decode")
    in_flight: deque[Future[ReadBatch]] = deque()
    upcoming = iter(starts)
    try:
        for start in upcoming:
            in_flight.append(pool.submit(batch_at, start))
            if len(in_flight) > threads:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:  # also when the consumer stops early (an error, Ctrl-C): drop what is queued
        pool.shutdown(wait=True, cancel_futures=True)

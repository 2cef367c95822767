"""Concurrent searches answered in batches: one forward pass for queries that arrive together.

FastAPI runs each `/search` request in a thread of its pool. Without batching every thread
runs its own one-query forward pass, and on a CPU those passes fight for the same cores,
each paying the per-call overhead of a small batch. With a `QueryBatcher`, a request thread
only decodes its upload, hands (reference, text, k) over and waits; one worker thread takes
the first waiting query, gathers whatever else arrives within `window_ms` (at most
`max_batch` queries), and answers all of them with one `IndexSearcher.search_batch` call:
one forward pass of the method over the batch and one engine call. Under load, queries pile
up while a batch is being encoded, so the next batch is larger by itself; a lone request
waits at most `window_ms` for company.

A query is validated before it joins a batch, so a bad one is its own caller's 4xx. If a
batch fails all the same, its queries are retried one by one, so that a query the method
cannot encode fails alone instead of taking its neighbours with it.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from circe.index.search import Hit, IndexSearcher, Reference, check_query


@dataclass(frozen=True)
class BatchOptions:
    max_batch: int = 32  # queries in one forward pass; 1 turns batching off
    window_ms: float = 2.0  # how long the first query of a batch waits for others

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (1: no batching), got {self.max_batch}")
        if not 0 <= self.window_ms <= 1000:
            raise ValueError(f"window_ms must be between 0 and 1000, got {self.window_ms}")


@dataclass
class _Waiting:
    reference: Reference
    text: str
    k: int
    answer: Future = field(default_factory=Future)


class QueryBatcher:
    """Answers `search` calls from many threads with batched `search_batch` calls."""

    def __init__(self, searcher: IndexSearcher, options: BatchOptions | None = None):
        self.searcher = searcher
        self.options = options or BatchOptions()
        self._queue: queue.SimpleQueue[_Waiting | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.batches = self.queries = self.largest = 0

    def search(self, reference: Reference, text: str, k: int) -> list[Hit]:
        """`IndexSearcher.search`, batched with concurrent calls (blocks until answered)."""
        check_query(text, k)  # raises QueryError here, in the caller's thread
        if self.options.max_batch == 1:  # no batching: every request runs its own pass
            self._count(1)
            return self.searcher.search(reference, text, k)
        waiting = _Waiting(reference, text, k)
        self._start()
        self._queue.put(waiting)
        return waiting.answer.result()

    def stats(self) -> dict:
        with self._lock:
            mean = self.queries / self.batches if self.batches else 0.0
            return {
                "max_batch": self.options.max_batch,
                "window_ms": self.options.window_ms,
                "batches": self.batches,
                "queries": self.queries,
                "mean_batch": round(mean, 2),
                "largest_batch": self.largest,
            }

    def close(self) -> None:
        """Answer what is queued, then stop the worker (a later `search` starts a new one)."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            self._queue.put(None)
            worker.join(timeout=30)

    def _start(self) -> None:
        # Started on first use rather than with the app: a test client that never runs the
        # app's startup still gets a worker, and an app that is never queried has none.
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._run, name="circe-query-batcher", daemon=True
                )
                self._worker.start()

    def _count(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.queries += size
            self.largest = max(self.largest, size)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._gather(first)
            self._count(len(batch))
            self._answer(batch)
            if stopping:
                return

    def _gather(self, first: _Waiting) -> tuple[list[_Waiting], bool]:
        """`first` and what else arrives within the window -> (batch, whether to stop)."""
        batch = [first]
        deadline = time.monotonic() + self.options.window_ms / 1000
        while len(batch) < self.options.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is None:  # `close`: answer this batch, then stop
                return batch, True
            batch.append(item)
        return batch, False

    def _answer(self, batch: list[_Waiting]) -> None:
        try:
            results = self.searcher.search_batch([(w.reference, w.text, w.k) for w in batch])
        # Whatever went wrong goes back to the request that waits for it (the app turns it
        # into that request's response); the worker itself must live on for the next batch.
        except Exception as error:  # noqa: BLE001
            if len(batch) == 1:
                batch[0].answer.set_exception(error)
            else:  # find the query that broke the batch: each alone
                for waiting in batch:
                    self._answer([waiting])
            return
        for waiting, hits in zip(batch, results, strict=True):
            waiting.answer.set_result(hits)

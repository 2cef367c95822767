"""Top-k inner-product search over an index space, and the choice of how, with its reason.

The embedded engine is FAISS, in-process. The FAISS index is picked from the number of
vectors and how well an approximate index does on them, and the choice is explained in
words (stored in the space's `engine.json`, printed by `circe index`), as autofaiss does:

- below `exact_below` vectors: `IndexFlatIP`, an exact scan. A scan of this size takes
  milliseconds, so an approximate index would only lose recall.
- above it: an approximate index, IVF-flat by default. IVF builds in one k-means pass,
  keeps no graph beside the vectors, and scans only `nprobe` of its cells per query; in
  `benchmarks/index_recall.py` it beat HNSW on clustered vectors in recall, latency and
  build time. HNSW (`approximate="hnsw"`) is the alternative: a graph searched in roughly
  logarithmic time, at 2·M·4 bytes of links per vector and a slower build.
- if no setting of the approximate index reaches `target_recall`, the vectors have too
  little neighbourhood structure for it (uniformly spread vectors are the extreme case)
  and exact search is kept.

The approximate index's search breadth (IVF's nprobe, HNSW's efSearch) is tuned at build
time: the smallest setting whose recall@10 against the exact answer, measured on sample
queries, reaches `target_recall`. Sample queries are normalised sums of two random gallery
vectors: they lie between images, as composed queries do, which is harder for an
approximate index than a gallery vector (that trivially finds itself).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

_FAISS_FILE = "engine.faiss"
_EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024)
_NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


APPROXIMATE = ("ivf", "hnsw")


@dataclass(frozen=True)
class EngineOptions:
    """When to go approximate, with what, and how well the approximate index must do."""

    exact_below: int = 100_000
    approximate: str = "ivf"  # the index above `exact_below`: "ivf" or "hnsw"
    target_recall: float = 0.95  # recall@10 vs exact, on sample queries
    exact_if_missed: bool = True  # keep exact search when no setting reaches the target
    hnsw_m: int = 32  # graph degree: more links, better recall, more memory
    ef_construction: int = 80
    tune_queries: int = 256
    seed: int = 0


@dataclass(frozen=True)
class EngineChoice:
    """The index type, its parameters, the measured recall, and why (for people)."""

    kind: str  # "flat" | "hnsw" | "ivf"
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    recall_at_10: float = 1.0  # measured against exact search; 1.0 for "flat"


def _float32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """`[B, k]` rows of the k largest inner products per query (any order within k), in
    query chunks of about 64 M scores, so that millions of vectors fit in memory."""
    k = min(k, len(vectors))
    chunk = max(1, 2**26 // max(1, len(vectors)))
    parts = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ vectors.T  # [b, N]
        parts.append(np.argpartition(-scores, k - 1, axis=1)[:, :k])
    return np.concatenate(parts)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each true top-k row that `found` also returned."""
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.sum(hits) / truth.size)


def sample_queries(vectors: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`[count, D]` unit vectors halfway between random pairs of gallery vectors."""
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, len(vectors), size=(count, 2))
    mixed = _float32(vectors[pairs[:, 0]]) + _float32(vectors[pairs[:, 1]])
    return mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)


class SearchEngine(ABC):
    """k-nearest neighbours by inner product (cosine, for unit vectors) over N vectors.

    One interface for every backend: the in-process FAISS engine here, and any vector
    database behind the same two methods (`circe.index.pgvector`: PostgreSQL + pgvector).
    """

    choice: EngineChoice

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`[B, D]` unit queries -> (scores `[B, k']`, rows `[B, k']`), best first,
        k' = min(k, N); a row of -1 marks a slot the engine could not fill."""


class FaissEngine(SearchEngine):
    def __init__(self, index: faiss.Index, choice: EngineChoice):
        self.index, self.choice = index, choice
        self._apply(choice.params)

    def _apply(self, params: dict[str, Any]) -> None:
        if "ef_search" in params:
            self.index.hnsw.efSearch = params["ef_search"]
        if "nprobe" in params:
            self.index.nprobe = params["nprobe"]

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        if k <= 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        return self.index.search(_float32(queries), k)

    def save(self, directory: Path) -> dict[str, Any]:
        """Write the index into `directory` (an exact index is rebuilt from the vectors
        instead); returns the record for `engine.json`."""
        if self.choice.kind != "flat":
            faiss.write_index(self.index, str(Path(directory) / _FAISS_FILE))
        return asdict(self.choice)

    @classmethod
    def load(cls, directory: Path, vectors: np.ndarray) -> FaissEngine:
        """The engine a generation directory holds (`vectors` are its embeddings)."""
        choice = EngineChoice(**json.loads((Path(directory) / "engine.json").read_text()))
        if choice.kind == "flat":
            return cls(_flat(vectors), choice)
        return cls(faiss.read_index(str(Path(directory) / _FAISS_FILE)), choice)


def _flat(vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(_float32(vectors))
    return index


def _tune(engine: FaissEngine, vectors: np.ndarray, options: EngineOptions, name: str, ladder):
    """The smallest `name` setting of `ladder` reaching the target recall@10, and its recall
    (or the largest setting and its recall, when none reaches it)."""
    queries = sample_queries(vectors, options.tune_queries, options.seed)
    truth = exact_top_k(queries, _float32(vectors), 10)
    recall = 0.0
    for value in ladder:
        engine._apply({name: value})
        recall = recall_at_k(engine.search(queries, 10)[1], truth)
        if recall >= options.target_recall:
            break
    return value, recall


def _ivf(data: np.ndarray, options: EngineOptions):
    """IVF-flat over about 4·sqrt(N) k-means cells -> (index, params, words, knob, ladder)."""
    count, dim = data.shape
    nlist = int(np.clip(4 * np.sqrt(count), 16, 65536))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(options.seed)
    index.train(data[rng.choice(count, size=min(count, 64 * nlist), replace=False)])
    index.add(data)
    words = f"IVF-flat ({nlist} k-means cells, about 4·sqrt(N), nprobe of them scanned)"
    return index, {"nlist": nlist}, words, "nprobe", [p for p in _NPROBE if p <= nlist]


def _hnsw(data: np.ndarray, options: EngineOptions):
    """An HNSW graph -> (index, params, words, knob, ladder)."""
    count, dim = data.shape
    index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = options.ef_construction
    index.add(data)
    links_mb = count * options.hnsw_m * 2 * 4 / 2**20
    words = (
        f"HNSW (M={options.hnsw_m}, efConstruction={options.ef_construction}, "
        f"~{links_mb:.0f} MB of graph links)"
    )
    params = {"m": options.hnsw_m, "ef_construction": options.ef_construction}
    return index, params, words, "ef_search", _EF_SEARCH


def build_engine(vectors: np.ndarray, options: EngineOptions | None = None) -> FaissEngine:
    """The search engine for `vectors` (`[N, D]` unit vectors), chosen and tuned."""
    options = options or EngineOptions()
    if options.approximate not in APPROXIMATE:
        raise ValueError(
            f"unknown approximate index {options.approximate!r}; choose one of: "
            f"{', '.join(APPROXIMATE)}"
        )
    count, dim = vectors.shape
    scan_mb = count * dim * 4 / 2**20
    size = f"{count:,} vectors {'<' if count < options.exact_below else '>='} exact_below="
    size += f"{options.exact_below:,}"
    if count < options.exact_below:
        reason = (
            f"{size}: an exact scan reads {scan_mb:.1f} MB per query, milliseconds on one "
            "core, so exact inner product (IndexFlatIP) is used; an approximate index would "
            "only lose recall"
        )
        return FaissEngine(_flat(vectors), EngineChoice("flat", {}, reason, 1.0))
    build = {"ivf": _ivf, "hnsw": _hnsw}[options.approximate]
    index, params, words, knob, ladder = build(_float32(vectors), options)
    engine = FaissEngine(index, EngineChoice(options.approximate, params))
    value, recall = _tune(engine, vectors, options, knob, ladder)
    measured = (
        f"recall@10 {recall:.3f} against exact search on {options.tune_queries} sample queries"
    )
    if recall < options.target_recall and options.exact_if_missed:
        reason = (
            f"{size}, but {words} reached only {measured} at its broadest setting tried "
            f"({knob}={value}), below the target {options.target_recall}: these vectors have "
            "too little neighbourhood structure for it, so exact search (IndexFlatIP) is kept"
        )
        return FaissEngine(_flat(vectors), EngineChoice("flat", {}, reason, 1.0))
    if recall >= options.target_recall:
        verdict = f"the smallest setting tried that reaches the target {options.target_recall}"
    else:
        verdict = f"the broadest setting tried; the target {options.target_recall} was not met"
    reason = (
        f"{size}: an exact scan reads {scan_mb:.0f} MB per query, so {words} is used; "
        f"{knob}={value} ({measured}) is {verdict}"
    )
    choice = EngineChoice(options.approximate, {**params, knob: value}, reason, recall)
    return FaissEngine(index, choice)

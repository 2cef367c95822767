"""Files for the test servers of the benchmarks whose test labels are hidden.

* **CIRR** (the CIRR repository's ``Test-split_server.md`` and
  ``demo_files``): two JSON objects, uploaded separately. Each holds ``"version": "rc2"``, a
  ``"metric"`` and one entry per pair, keyed by ``str(pairid)``. ``metric: recall`` lists the
  top 50 image names of the whole split gallery with the reference removed;
  ``metric: recall_subset`` the top 3 of the query's ``img_set`` members, reference removed.
* **CIRCO** (circo.micc.unifi.it; the CIRCO README): one JSON object mapping every query id
  ("0" .. "799") to exactly 50 distinct COCO image ids (integers), best first. The server
  rejects a missing query or a repeated id.

The rankings follow `circe.eval.metrics.top_k` (ties go to the earlier gallery image), so the
files rank exactly as the local metrics do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from circe.data.registry import Benchmark
from circe.data.types import CIRSplit
from circe.eval.labels import Labels
from circe.eval.metrics import top_k

CIRR_VERSION = "rc2"
CIRR_GLOBAL_K = 50
CIRR_SUBSET_K = 3
CIRCO_K = 50


def _ranked(
    split: CIRSplit, scores: torch.Tensor, k: int, exclude: torch.Tensor, what: str
) -> list[list[str]]:
    """Each query's `k` best gallery ids among those not excluded; an error if a query has
    fewer than `k` candidates (a server would reject its shorter list)."""
    candidates = (~exclude).sum(dim=1)  # [Q]
    if len(candidates) and int(candidates.min()) < k:
        short = int(candidates.argmin())
        raise ValueError(
            f"{what} lists {k} images per query, but query {split.queries[short].query_id!r} "
            f"has only {int(candidates[short])} candidates"
        )
    _, indices = top_k(scores, k, exclude)
    ids = split.gallery.ids
    return [[ids[i] for i in row] for row in indices.tolist()]


def cirr_submission(split: CIRSplit, scores: torch.Tensor) -> dict[str, dict]:
    """{file name: content} of the two CIRR server files."""
    labels = Labels(split)
    reference = labels.exclude
    recall = _ranked(split, scores, CIRR_GLOBAL_K, reference, "CIRR's recall file")
    subset = _ranked(
        split, scores, CIRR_SUBSET_K, ~labels.subset | reference, "CIRR's recall_subset file"
    )
    files = {}
    for metric, ranked in (("recall", recall), ("recall_subset", subset)):
        content: dict = {"version": CIRR_VERSION, "metric": metric}
        content |= {q.query_id: ids for q, ids in zip(split.queries, ranked, strict=True)}
        files[f"cirr_{split.name}_{metric}.json"] = content
    return files


def circo_submission(split: CIRSplit, scores: torch.Tensor) -> dict[str, dict]:
    """{file name: content} of the CIRCO server file."""
    expected = {str(n) for n in range(len(split.queries))}
    if {q.query_id for q in split.queries} != expected:
        raise ValueError(f"CIRCO query ids must be 0..{len(split.queries) - 1}, each once")
    ranked = _ranked(split, scores, CIRCO_K, Labels(split).exclude, "CIRCO's submission")
    content = {
        q.query_id: [int(i) for i in ids] for q, ids in zip(split.queries, ranked, strict=True)
    }
    return {f"circo_{split.name}.json": content}


# Where the files go, as each benchmark's project page names it (CIRR's moved off
# cirr.cecs.anu.edu.au; its project page names these two).
SERVERS = {
    "cirr": "https://cirr.zheyuanliu.me/evaluate.html (backup: https://cirr.junjie.au/)",
    "circo": "https://circo.micc.unifi.it/",
}

WRITERS: dict[str, Callable[[CIRSplit, torch.Tensor], dict[str, dict]]] = {
    "cirr": cirr_submission,
    "circo": circo_submission,
}


def write_submission(
    benchmark: Benchmark, scores: Sequence[torch.Tensor], out_dir: Path
) -> list[Path]:
    """Write the benchmark's server files for one method's scores; returns their paths."""
    if benchmark.submission is None:
        raise ValueError(f"{benchmark.dataset} has no test server submission format")
    (split,) = benchmark.parts
    (split_scores,) = scores
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in WRITERS[benchmark.submission](split, split_scores).items():
        path = out_dir / name
        path.write_text(json.dumps(content))
        written.append(path)
    return written

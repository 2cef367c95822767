"""The user's own images: a folder as the gallery, a CSV or JSONL file of queries.

Layout under the root::

    <any folders>/<name>.{png,jpg,jpeg,webp,bmp,gif,tif,tiff}   the gallery, found recursively
    <split>.csv or <split>.jsonl                                 the queries (split "queries"
                                                                 by default)

An image's id is its path relative to the root, with ``/`` separators ("shoes/red.jpg").
Each query has ``reference`` (an image id), ``text`` (the modification), optionally
``target`` (an image id; in JSONL also a list of ids, any of which counts as a hit), ``id``
and ``kind`` (a non-empty tag such as the edit kind, "colour" or "shape": ``circe eval
--by-kind`` then reports the metrics per kind, as on the synthetic benchmark; a query without
one counts only in the overall numbers). A CSV file has a header row naming its columns.
Either every query has a target (then the split can be scored: R@1/10/50) or none has.
Protocol parameter: ``mask_reference`` (default yes, the CIRR rule).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from circe.data import protocol as params
from circe.data.loading import (
    ListOf,
    Problems,
    build_split,
    fields,
    known_queries,
    scan_images,
)
from circe.data.types import CIRSplit, Gallery, Query

FORMATS = (".csv", ".jsonl")


def _queries_file(root: Path, split: str, problems: Problems) -> Path | None:
    found = [root / f"{split}{suffix}" for suffix in FORMATS]
    found = [path for path in found if path.is_file()]
    if len(found) != 1:
        what = " and ".join(map(str, found)) if found else "neither"
        problems.report(f"{root}: expected one of {split}.csv, {split}.jsonl; found {what}")
        return None
    return found[0]


def _records(path: Path, problems: Problems) -> Iterator[tuple[str, Any]]:
    """(where, record) for each query of a CSV or JSONL file; unreadable lines reported."""
    with path.open(encoding="utf-8", newline="") as handle:
        if path.suffix == ".csv":
            reader = csv.DictReader(handle)
            for row in reader:
                # Empty cells are absent fields; cells beyond the header are ignored.
                yield f"{path}: line {reader.line_num}", {k: v for k, v in row.items() if k and v}
            return
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}: line {n}", json.loads(line)
            except json.JSONDecodeError as error:
                problems.report(f"{path}: line {n} is not JSON ({error})")


def load_folder(
    root: Path,
    split: str = "queries",
    *,
    mask_reference: bool = True,
    problems: Problems | None = None,
) -> CIRSplit:
    """The images under `root` and the queries of `root/<split>.csv|jsonl`."""
    root = Path(root)
    problems = problems or Problems()
    if not root.is_dir():
        problems.report(f"missing folder {root}")
        return build_split(split, [], Gallery({}), mask_reference, {"dataset": "folder"})
    paths = {path.relative_to(root).as_posix(): path for path in scan_images(root, recursive=True)}
    path = _queries_file(root, split, problems)
    queries = []
    for n, (where, record) in enumerate(_records(path, problems) if path else []):
        values = fields(
            record,
            where,
            problems,
            {"reference": str, "text": str},
            optional={"target": (str, ListOf(str)), "id": (str, int), "kind": str},
        )
        if values is None:
            continue
        kind = values.get("kind")
        if kind is not None and not kind.strip():
            # A blank tag would be a kind of its own in the per-kind table, named by nothing.
            problems.report(f"{where} has an empty 'kind'; give a name or leave it out")
            continue
        target = values.get("target", [])
        queries.append(
            Query(
                query_id=str(values.get("id", n)),
                reference_id=values["reference"],
                texts=(values["text"],),
                target_ids=(target,) if isinstance(target, str) else tuple(target),
                tags=() if kind is None else (kind.strip(),),
            )
        )
    if len({bool(q.target_ids) for q in queries}) > 1:
        problems.report(f"{path}: some queries have a target and some not; give all or none")
    return build_split(
        split,
        known_queries(queries, paths, path or root, problems),
        Gallery(paths),
        exclude_reference=mask_reference,
        protocol={
            "dataset": "folder",
            "split": split,
            "gallery": f"every image under {root}",
            **params.record(mask_reference=mask_reference),
            "metrics": "R@1,10,50",
        },
    )

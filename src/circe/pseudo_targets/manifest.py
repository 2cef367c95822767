"""The pseudo-target directory: images, a manifest, and the training split built from them.

Layout of a directory written by `circe pseudo-targets`:

    pseudo-targets.json   what made it: data set, split, generator and its settings
    manifest.jsonl        one record per finished image: query id, image path (relative),
                          generator, and what the generator says about that image
    images/<query>.png

A record is appended (and flushed to disk) only after its image is in place, so after an
interruption every record names a whole image; a run over the same directory skips the
queries it already holds (`ManifestWriter.done`) and only makes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from circe.atomic import replacing, write_text_atomic
from circe.data.types import CIRSplit, Gallery

FORMAT_VERSION = 1
HEADER = "pseudo-targets.json"
MANIFEST = "manifest.jsonl"
IMAGES = "images"
# Gallery ids of pseudo-target images in a training split: never those of a real image.
ID_PREFIX = "pseudo-target:"


def image_name(query_id: str) -> str:
    """A file name for a query's image: the id itself where it is a safe file name, else the
    id made safe plus a short hash (two ids never share a file)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", query_id)
    if safe != query_id or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha256(query_id.encode()).hexdigest()[:10]}"
    return f"{safe}.png"


def _read_manifest(path: Path) -> tuple[dict[str, dict[str, Any]], bool]:
    """(query id -> record, whether every line was whole). Only the last line can be cut
    short (by a crash during its append): it is left out; any other bad line is an error."""
    records: dict[str, dict[str, Any]] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not a JSON record") from None
            return records, False
        records[record["query_id"]] = record
    return records, True


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class ManifestWriter:
    """Appends finished images to a pseudo-target directory, resuming what is there."""

    def __init__(self, out: Path, header: dict[str, Any]):
        self.out = Path(out)
        self.header = {"format": FORMAT_VERSION, **header}
        (self.out / IMAGES).mkdir(parents=True, exist_ok=True)
        header_path = self.out / HEADER
        if header_path.exists():
            existing = json.loads(header_path.read_text())
            changed = _differences(existing, self.header)
            if changed:
                raise FileExistsError(
                    f"{self.out} holds pseudo-targets made otherwise ({'; '.join(changed)}); "
                    "choose another --out, or delete it to start over"
                )
        else:
            header_path.write_text(json.dumps(self.header, indent=2) + "\n")
        self.records = self._surviving_records()

    def _surviving_records(self) -> dict[str, dict[str, Any]]:
        """The records of images that are on disk. An interrupted append leaves a partial
        last line, and a removed image leaves a dangling record: both are dropped (and
        their queries made again), and the manifest is rewritten without them."""
        path = self.out / MANIFEST
        if not path.exists():
            return {}
        records, whole = _read_manifest(path)
        kept = {q: r for q, r in records.items() if (self.out / r["image"]).is_file()}
        if not whole or len(kept) < len(records):
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept.values()))
        return kept

    @property
    def done(self) -> set[str]:
        return set(self.records)

    def add(self, query_id: str, image: Image.Image, details: dict[str, Any]) -> None:
        """Write one image (atomically), then its record."""
        relative = f"{IMAGES}/{image_name(query_id)}"
        with replacing(self.out / relative) as staging:
            image.save(staging, format="PNG")
        record = {
            "query_id": query_id,
            "image": relative,
            "generator": self.header["generator"],
            **details,
        }
        with (self.out / MANIFEST).open("a") as manifest:
            manifest.write(json.dumps(record) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
        self.records[query_id] = record


@dataclass(frozen=True)
class PseudoTargets:
    """A finished (or partial) pseudo-target directory, read back."""

    directory: Path
    header: dict[str, Any]
    records: dict[str, dict[str, Any]]  # query id -> manifest record

    @classmethod
    def load(cls, directory: str | Path) -> PseudoTargets:
        directory = Path(directory)
        header_path, manifest = directory / HEADER, directory / MANIFEST
        if not header_path.is_file() or not manifest.is_file():
            raise FileNotFoundError(
                f"no pseudo-targets at {directory} (expected {HEADER} and {MANIFEST}); make "
                "them with `circe pseudo-targets --dataset D --generator G --out DIR`"
            )
        header = json.loads(header_path.read_text())
        if header.get("format") != FORMAT_VERSION:
            raise ValueError(f"{header_path} is of another format ({header.get('format')})")
        records, _ = _read_manifest(manifest)  # a cut last line: that query is redone
        return cls(directory.resolve(), header, records)

    def path(self, query_id: str) -> Path:
        return self.directory / self.records[query_id]["image"]


def with_pseudo_targets(split: CIRSplit, directory: str | Path) -> CIRSplit:
    """`split` with each query's target replaced by its pseudo-target image (added to the
    gallery as `pseudo-target:<query id>`). Every query with a target must have one."""
    pseudo = PseudoTargets.load(directory)
    made_for = pseudo.header.get("split")
    if made_for != split.name:
        raise ValueError(
            f"the pseudo-targets at {directory} were made for split {made_for!r}, not "
            f"{split.name!r}"
        )
    preset = pseudo.header.get("protocol")
    if preset != split.protocol.get("preset"):
        raise ValueError(
            f"the pseudo-targets at {directory} were made from the texts of protocol preset "
            f"{preset!r}, not {split.protocol.get('preset')!r}: make them under the training "
            "protocol (circe pseudo-targets --protocol)"
        )
    wanted = [q for q in split.queries if q.target_ids]
    missing = [q.query_id for q in wanted if q.query_id not in pseudo.records]
    if missing:
        raise ValueError(
            f"the pseudo-targets at {directory} cover {len(wanted) - len(missing)} of the "
            f"{len(wanted)} queries of split {split.name!r} (missing e.g. {missing[0]!r}); run "
            "the same `circe pseudo-targets` command again to finish them (it resumes)"
        )
    paths = dict(split.gallery.paths)
    queries = []
    for query in split.queries:
        if query.target_ids:
            pseudo_id = ID_PREFIX + query.query_id
            paths[pseudo_id] = pseudo.path(query.query_id)
            query = replace(query, target_ids=(pseudo_id,))
        queries.append(query)
    return CIRSplit(
        split.name,
        queries,
        Gallery(paths, split.gallery.captions),
        split.exclude_reference,
        {**split.protocol, "pseudo_targets": str(pseudo.directory)},
    )

"""What every benchmark loader shares: validated reading, image lookup, assembling the split.

A loader reads a data set's own published files and validates them as it reads. Whatever is
wrong goes to a `Problems`: by default the first problem raises `DatasetFormatError` naming
the file, the record and what is wrong, because an evaluation that went on with silently
fewer images or queries would publish numbers nobody can compare (a gallery that lost its
missing images scores a higher recall). `circe check-dataset` collects every problem
instead: the loader skips what is broken and goes on, so one run lists them all.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circe.data.errors import shown
from circe.data.images import image_suffixes
from circe.data.types import CIRSplit, DatasetFormatError, Gallery, Query

# How deep a folder walk goes below where it starts: far past any real library (a few dozen
# levels), and near where a path of one-letter folders reaches Linux's PATH_MAX of 4096.
MAX_DEPTH = 2000


class Problems:
    """Where a loader reports what is wrong: raise at the first (default), or collect all."""

    def __init__(self, collect: bool = False) -> None:
        self.collect = collect
        self.found: list[str] = []

    def report(self, message: str) -> None:
        if not self.collect:
            raise DatasetFormatError(message)
        self.found.append(message)


@dataclass(frozen=True)
class ListOf:
    """A record field that must be a JSON list of `item`s (of exactly `length`, if given)."""

    item: type
    length: int | None = None


# A field's expected type: a type, a list of one, or a tuple of those (any of them).
Kind = type | ListOf | tuple


def _is(value: Any, kind: Kind) -> bool:
    if isinstance(kind, tuple):
        return any(_is(value, k) for k in kind)
    if isinstance(kind, ListOf):
        return (
            isinstance(value, list)
            and (kind.length is None or len(value) == kind.length)
            and all(_is(v, kind.item) for v in value)
        )
    if kind is int:  # JSON true/false are not ids
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind: Kind) -> str:
    names = {str: "string", int: "integer", dict: "JSON object", list: "JSON list"}
    if isinstance(kind, tuple):
        return " or ".join(_describe(k) for k in kind)
    if isinstance(kind, ListOf):
        count = "" if kind.length is None else f"{kind.length} "
        return f"a list of {count}{names[kind.item]}s"
    return f"a {names[kind]}"


def fields(
    record: Any,
    where: str,
    problems: Problems,
    required: Mapping[str, Kind],
    optional: Mapping[str, Kind] | None = None,
) -> dict[str, Any] | None:
    """The record's fields, type-checked: all of `required`, those of `optional` present.

    Everything wrong with the record is reported as one problem naming `where` (the file and
    the record); the result is then None and the caller skips the record.
    """
    if not isinstance(record, dict):
        problems.report(f"{where} is a {type(record).__name__}, expected a JSON object")
        return None
    wrong = []
    for key, kind in {**required, **(optional or {})}.items():
        if key not in record:
            if key in required:
                wrong.append(f"lacks key {key!r}")
        elif not _is(record[key], kind):
            wrong.append(f"has {key!r} = {shown(record[key])}, expected {_describe(kind)}")
    if wrong:
        problems.report(f"{where} " + "; ".join(wrong))
        return None
    return {key: record[key] for key in (*required, *(optional or {})) if key in record}


def read_json(path: Path, kind: type, problems: Problems, hint: str = "") -> Any | None:
    """A JSON file whose top level is `kind` (list or dict); None after reporting a problem."""
    if not path.is_file():
        problems.report(f"missing file {path}" + (f" ({hint})" if hint else ""))
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problems.report(f"{path}: not valid JSON ({error})")
        return None
    if not isinstance(data, kind):
        problems.report(
            f"{path}: expected {_describe(kind)} at the top level, found a {type(data).__name__}"
        )
        return None
    return data


def read_lines(path: Path, problems: Problems, hint: str = "") -> list[str] | None:
    """The non-blank lines of a text file, stripped; None after reporting a problem."""
    if not path.is_file():
        problems.report(f"missing file {path}" + (f" ({hint})" if hint else ""))
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        problems.report(f"{path}: not UTF-8 text ({error})")
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


def string_list(values: Any, where: Path, problems: Problems) -> list[str]:
    """A JSON list of strings (an image split file); [] after reporting a problem."""
    if values is None:
        return []
    if not _is(values, ListOf(str)):
        problems.report(f"{where}: expected a list of strings (image names)")
        return []
    return values


def _raise(error: OSError) -> None:
    raise error


class FolderTooDeep(OSError):
    """A folder `MAX_DEPTH` levels below the walk's start: the folders in it are not walked."""

    def __init__(self, folder: Path) -> None:
        message = f"{MAX_DEPTH} folders deep: the folders in it are not searched"
        super().__init__(errno.ELOOP, message, str(folder))


def image_paths(
    directory: Path, recursive: bool = False, on_error: Callable[[OSError], None] = _raise
) -> Iterator[Path]:
    """The image files in `directory` (and below it with `recursive`), recognised by suffix
    (`circe.data.images.image_suffixes`), case-insensitively; whether they decode is found
    out when they are read. Hidden entries (a leading dot, e.g. an index folder inside a
    gallery) are skipped, and so are symbolic links to directories (they can loop). Every
    folder scan (data sets, `circe index`) uses this one walk. A folder that cannot be
    listed, or whose folders lie deeper than `MAX_DEPTH`, goes to `on_error` (default:
    raise; a data set never loses images silently).

    The walk keeps its own stack: a recursive one (os.walk before Python 3.12) fails with
    RecursionError about 1,000 folders down. A folder already walked is not walked again,
    so that a loop made without symbolic links (a bind mount of a folder inside itself)
    ends too."""
    suffixes = image_suffixes()
    walked: set[tuple[int, int]] = set()  # (device, inode) of each folder listed
    to_walk = [(Path(directory), 0)]
    while to_walk:
        folder, depth = to_walk.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in walked:
                continue
            walked.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            on_error(error)
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_folder(entry):  # a link to a directory too: neither an image nor walked
                if recursive and not entry.is_symlink():
                    subfolders.append(folder / entry.name)
            elif os.path.splitext(entry.name)[1].lower() in suffixes:
                yield folder / entry.name
        if subfolders and depth == MAX_DEPTH:
            on_error(FolderTooDeep(folder))
            continue
        # Reversed onto the stack, so that they are walked in name order.
        to_walk += [(subfolder, depth + 1) for subfolder in reversed(subfolders)]


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link whose target cannot be looked at: taken by its name, and
        return False  # reported when it is read if that says image


def scan_images(
    directory: Path, recursive: bool = False, on_error: Callable[[OSError], None] = _raise
) -> list[Path]:
    """`image_paths` of an existing directory, sorted."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"image folder not found: {directory}")
    return sorted(image_paths(directory, recursive, on_error))


def existing_images(paths: Mapping[str, Path], source: Path, problems: Problems) -> dict[str, Path]:
    """The images whose file exists; each missing one is a problem naming `source`, the file
    that lists it. A gallery never shrinks silently."""
    kept: dict[str, Path] = {}
    for image_id, path in paths.items():
        if path.is_file():
            kept[image_id] = path
        else:
            problems.report(f"{source}: image {image_id!r} has no file {path}")
    return kept


def known_queries(
    queries: Iterable[Query], gallery: Mapping[str, Path], source: Path, problems: Problems
) -> list[Query]:
    """The queries whose every image (reference, targets, subset) is in the gallery; each
    other one is a problem naming `source`, the file that holds it."""
    kept = []
    for query in queries:
        unknown = [
            image_id
            for image_id in (query.reference_id, *query.target_ids, *query.subset_ids)
            if image_id not in gallery
        ]
        if unknown:
            problems.report(
                f"{source}: query {query.query_id!r} names image {unknown[0]!r}, "
                "which is not in the gallery"
            )
        else:
            kept.append(query)
    return kept


def build_split(
    name: str,
    queries: list[Query],
    gallery: Gallery,
    exclude_reference: bool,
    protocol: dict[str, str],
) -> CIRSplit:
    """The split, its `protocol` completed with the reference rule and the counts, so that a
    results file says how large the gallery really was: the first thing to compare when two
    papers' numbers disagree."""
    protocol = {
        **protocol,
        "reference_excluded": "yes" if exclude_reference else "no",
        "queries": str(len(queries)),
        "gallery_images": str(len(gallery)),
    }
    return CIRSplit(name, queries, gallery, exclude_reference=exclude_reference, protocol=protocol)

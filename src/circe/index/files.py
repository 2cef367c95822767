"""Finding the images of a folder, and what tells a changed file from an unchanged one."""

from __future__ import annotations

import errno
import hashlib
from dataclasses import dataclass
from pathlib import Path

from circe.data.loading import FolderTooDeep, scan_images


@dataclass(frozen=True, order=True)
class ImageFile:
    """One image file of a gallery, as the index sees it.

    `path` is relative to the gallery root with `/` separators, so an index stays valid when
    the folder is moved; `size` and `mtime_ns` are how a re-index notices a changed file
    without reading it.
    """

    path: str
    size: int
    mtime_ns: int

    @property
    def id(self) -> str:
        return image_id(self.path)

    def same_file(self, size: int, mtime_ns: int) -> bool:
        return (self.size, self.mtime_ns) == (size, mtime_ns)


def image_id(relative_path: str) -> str:
    """A short, stable, URL-safe id for a gallery image: a hash of its relative path.

    The id survives re-indexing (a changed file keeps its id, its embedding is replaced), and
    every embedding space built over the same folder names an image by the same id.
    """
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Failure:
    """An image that could not be indexed, and why (for the report)."""

    path: str
    error: str


LINK_LOOP = "a loop of symbolic links (it leads back to itself): fix or remove the link"


def resolved(path: Path) -> Path | None:
    """`path` with every link followed; None when the links loop (on which `Path.resolve`
    raises RuntimeError up to Python 3.12, and newer versions OSError or nothing: then the
    `stat` that follows fails with ELOOP)."""
    try:
        return path.resolve()
    except RuntimeError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            return None
        raise


def scan_gallery(root: Path) -> tuple[list[ImageFile], list[Failure]]:
    """Every image file under `root`, recursively (`circe.data.loading.image_paths`: hidden
    entries and links to directories skipped), sorted by path; and, for the report, the
    image-named entries that cannot even be stat'ed (a broken link, a loop of links) and
    the folders that cannot be listed or lie too deep to be walked."""
    root = Path(root)
    inside = root.resolve()
    found, failed = [], []

    def unlistable(error: OSError) -> None:  # its images are reported, not silently dropped
        where = Path(error.filename or root).relative_to(root).as_posix()
        if isinstance(error, FolderTooDeep):
            failed.append(Failure(where, str(error.strerror)))
        else:
            failed.append(Failure(where, f"cannot list this folder: {error.strerror or error}"))

    for full in scan_images(root, recursive=True, on_error=unlistable):
        relative = full.relative_to(root).as_posix()
        try:
            relative.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are no UTF-8: ids, JSON and URLs need text
            shown = relative.encode("utf-8", "backslashreplace").decode()
            failed.append(Failure(shown, "the file name is not valid UTF-8: rename the file"))
            continue
        real = resolved(full)
        if real is None:
            failed.append(Failure(relative, LINK_LOOP))
            continue
        if not real.is_relative_to(inside):  # served later: it must stay in here
            failed.append(Failure(relative, "a link to a file outside the indexed folder"))
            continue
        try:
            stat = full.stat()
        except OSError as error:
            looped = error.errno == errno.ELOOP
            failed.append(
                Failure(
                    relative, LINK_LOOP if looped else f"cannot stat: {error.strerror or error}"
                )
            )
            continue
        found.append(ImageFile(relative, stat.st_size, stat.st_mtime_ns))
    return sorted(found), sorted(failed, key=lambda f: f.path)

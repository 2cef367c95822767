"""One guard for every image circe reads: gallery and data-set files, uploads, references.

An image file is untrusted input wherever it comes from: it may be no image at all, a
truncated one, a FIFO or device that never ends, or a small file that decodes to billions
of pixels (a decompression bomb). The size in bytes, the size in pixels and the shape are
checked before anything is decoded in full. The shape matters because CLIP-style
preprocessing scales the *shorter* side to the model's input size: a 100,000 x 1 image
(few pixels, within the pixel limit) would first be scaled to 6,400,000 x 64, gigabytes.
EXIF orientation is applied, so a photo taken on its side is embedded and shown upright.

Which files are images is Pillow's answer on this machine (`image_suffixes`): every format
it decodes here, plugins included. A suffix of a format that needs a plugin not installed
(HEIC without pillow-heif) still counts, so that such a file is rejected with the package
to install instead of being passed over unseen.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import EpsImagePlugin, Image, ImageFile, ImageOps

from circe.data.errors import DatasetFormatError


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 64 * 2**20
    max_pixels: int = 40_000_000  # e.g. 8000 x 5000
    max_aspect: float = 25.0  # longer side / shorter side; wide panoramas are about 10


class ImageRejected(DatasetFormatError):
    """An image that cannot be used, and why; `status` is the HTTP status that fits it (400
    not an image, 413 too large, 415 a format this machine cannot decode, 422 too
    elongated)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Plugin:
    """A Pillow plugin for formats Pillow does not read by itself."""

    suffixes: tuple[str, ...]
    package: str  # what `pip install` takes
    module: str
    register: str | None  # the function that registers it; None: importing it does


# Photo formats a library may hold that Pillow reads only through a plugin (AVIF: a Pillow
# built with libavif reads it itself, one built without needs the plugin).
_PLUGINS = (
    _Plugin((".heic", ".heif", ".hif"), "pillow-heif", "pillow_heif", "register_heif_opener"),
    _Plugin((".avif", ".avifs"), "pillow-avif-plugin", "pillow_avif", None),
    _Plugin((".jxl",), "pillow-jxl-plugin", "pillow_jxl", None),
)
# What Pillow opens with a plugin of another name: multi-picture JPEGs (3D cameras).
_OPENED_BY_ANOTHER = {"MPO"}


@functools.cache
def _register_plugins() -> None:
    """Register every installed plugin of `_PLUGINS` with Pillow (once per process: a
    decoding worker process registers them again on its first image)."""
    for plugin in _PLUGINS:
        try:
            module = importlib.import_module(plugin.module)
        except ImportError:
            continue
        if plugin.register is not None:
            getattr(module, plugin.register)()


def _decodes_here(format_name: str) -> bool:
    """Whether this Pillow turns files of `format_name` into pixels: not a format it only
    writes (PDF), identifies without decoding (MPEG's header; a stub such as HDF5 without
    its handler), or hands to a missing program (EPS without Ghostscript)."""
    if format_name in _OPENED_BY_ANOTHER:
        return True
    opener = Image.OPEN.get(format_name, (None,))[0]
    if opener is None or format_name == "MPEG":
        return False
    if inspect.isclass(opener) and issubclass(opener, ImageFile.StubImageFile):
        return False
    return format_name != "EPS" or EpsImagePlugin.has_ghostscript()


@functools.cache
def readable_suffixes() -> frozenset[str]:
    """Suffixes (lower-case, with the dot) of the formats Pillow decodes on this machine."""
    _register_plugins()
    formats = Image.registered_extensions()  # imports every Pillow plugin once
    return frozenset(suffix for suffix, name in formats.items() if _decodes_here(name))


@functools.cache
def image_suffixes() -> frozenset[str]:
    """The suffixes a folder scan takes for images: `readable_suffixes`, and those of
    formats a missing plugin would read (their files are then reported, not passed over)."""
    return readable_suffixes() | {s for plugin in _PLUGINS for s in plugin.suffixes}


def missing_plugin(path: Path) -> str | None:
    """The package to install for Pillow to read `path`'s format; None when it reads it."""
    suffix = path.suffix.lower()
    if suffix in readable_suffixes():
        return None
    return next((p.package for p in _PLUGINS if suffix in p.suffixes), None)


def read_image(source: Path | bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The image of a file or of bytes, as upright RGB (the first frame of an animation),
    or `ImageRejected` saying what is wrong (a missing file is `FileNotFoundError`)."""
    _register_plugins()
    name = "the image" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        size, opened = len(source), io.BytesIO(source)
    else:
        try:
            info = os.stat(source)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {source}") from None
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise ImageRejected(400, f"{name} is not a regular file")
        package = missing_plugin(Path(source))
        if package is not None:
            raise ImageRejected(
                415,
                f"{name}: this Pillow has no decoder for {Path(source).suffix} images; "
                f"install {package} to read them",
            )
        size, opened = info.st_size, source
    if size == 0:
        raise ImageRejected(400, f"{name} is empty")
    if size > limits.max_bytes:
        raise ImageRejected(413, f"{name} is larger than {limits.max_bytes // 2**20} MiB")
    try:
        # Pillow warns of large images on open; the limits below decide instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(opened)
        with image:
            _check_shape(name, image.size, limits)
            image.seek(0)
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
    except Image.DecompressionBombError:
        raise ImageRejected(413, f"{name} has too many pixels (decompression bomb)") from None
    except ImageRejected:
        raise
    except OSError as error:  # the file went away or cannot be read mid-decode
        if isinstance(error, FileNotFoundError):
            raise FileNotFoundError(f"image file not found: {source}") from None
        raise ImageRejected(400, f"cannot read image {name}: {error}") from None
    # Malformed bytes make Pillow's decoders fail in many ways (SyntaxError, struct.error,
    # ValueError, ...): all of them mean "not a usable image".
    except Exception as error:  # noqa: BLE001
        raise ImageRejected(400, f"{name} is not a readable image ({error})") from None


def _check_shape(name: str, size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width * height > limits.max_pixels:
        raise ImageRejected(
            413, f"{name} is {width}x{height} pixels; at most {limits.max_pixels:,} are accepted"
        )
    if max(width, height) > limits.max_aspect * min(width, height):
        raise ImageRejected(
            422,
            f"{name} is {width}x{height} pixels; one side may be at most "
            f"{limits.max_aspect:g} times the other: crop it",
        )


def load_rgb(path: Path) -> Image.Image:
    """A gallery or data-set image file through the guard, with the default limits."""
    return read_image(Path(path))

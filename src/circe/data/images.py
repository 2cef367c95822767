"""One guard for every image circe reads: gallery and data-set files, uploads, references.

An image file is untrusted input wherever it comes from: it may be no image at all, a
truncated one, a FIFO or device that never ends, or a small file that decodes to billions
of pixels (a decompression bomb). The size in bytes, the size in pixels and the shape are
checked before anything is decoded in full. The shape matters because CLIP-style
preprocessing scales the *shorter* side to the model's input size: a 100,000 x 1 image
(few pixels, within the pixel limit) would first be scaled to 6,400,000 x 64, gigabytes.
EXIF orientation is applied, so a photo taken on its side is embedded and shown upright.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from circe.data.errors import DatasetFormatError


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 64 * 2**20
    max_pixels: int = 40_000_000  # e.g. 8000 x 5000
    max_aspect: float = 25.0  # longer side / shorter side; wide panoramas are about 10


class ImageRejected(DatasetFormatError):
    """An image that cannot be used, and why; `status` is the HTTP status that fits it (400
    not an image, 413 too large, 422 too elongated)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_image(source: Path | bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """The image of a file or of bytes, as upright RGB (the first frame of an animation),
    or `ImageRejected` saying what is wrong (a missing file is `FileNotFoundError`)."""
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

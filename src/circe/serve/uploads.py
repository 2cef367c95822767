"""Turning uploaded bytes into an image, or into a 4xx that says what was wrong with them.

An upload is untrusted: it may be no image at all, a truncated one, or a small file that
decodes to billions of pixels (a decompression bomb). The size in bytes and the size in
pixels are checked before anything is decoded in full, and so is the shape: CLIP-style
preprocessing scales the *shorter* side to the model's input size, so a 40,000 x 1 image
(few pixels, allowed by the pixel limit) would be scaled to 2,560,000 x 64 first.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000  # e.g. 8000 x 5000
    max_aspect: float = 25.0  # longer side / shorter side; wide panoramas are about 10


class UploadError(ValueError):
    """An upload that cannot be used; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, limits: UploadLimits) -> Image.Image:
    """The uploaded image as RGB (first frame of an animation)."""
    if not data:
        raise UploadError(400, "the uploaded image file is empty")
    if len(data) > limits.max_bytes:
        raise UploadError(413, f"the uploaded file is larger than {limits.max_bytes // 2**20} MiB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise UploadError(
                    413,
                    f"the image is {width}x{height} pixels; at most {limits.max_pixels:,} "
                    "pixels are accepted",
                )
            if max(width, height) > limits.max_aspect * min(width, height):
                raise UploadError(
                    422,
                    f"the image is {width}x{height} pixels; one side may be at most "
                    f"{limits.max_aspect:g} times the other: crop it",
                )
            image.seek(0)
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise UploadError(413, "the image has too many pixels (decompression bomb)") from None
    except UploadError:
        raise
    # Malformed bytes make Pillow's decoders fail in many ways (OSError, SyntaxError,
    # struct.error, ...): all of them mean "not a usable image", a client error.
    except Exception as error:  # noqa: BLE001
        raise UploadError(400, f"the upload is not a readable image ({error})") from None

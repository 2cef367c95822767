"""Turning uploaded bytes into an image, or into a 4xx that says what was wrong with them.

Uploads go through the guard every image goes through (`circe.data.images.read_image`:
size in bytes and pixels, shape, bombs, format), with a smaller byte limit: an upload is
held in memory while it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from circe.data.images import ImageLimits, ImageRejected, read_image


@dataclass(frozen=True)
class UploadLimits(ImageLimits):
    max_bytes: int = 20 * 2**20


class UploadError(ValueError):
    """An upload that cannot be used; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, limits: UploadLimits) -> Image.Image:
    """The uploaded image as upright RGB (first frame of an animation)."""
    try:
        return read_image(data, limits)
    except ImageRejected as error:
        raise UploadError(error.status, f"the upload: {error}") from None

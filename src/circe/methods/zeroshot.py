"""Zero-shot baselines: the query is the reference image, the text, or their sum.

These need no training; they are the floor every trained CIR method is measured against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from circe.methods.base import CIRMethod, register_method


@register_method("image-only")
class ImageOnly(CIRMethod):
    """Query = the reference image's embedding; the text is ignored."""

    trainable = False

    def encode_queries(self, reference_pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.encode_targets(reference_pixels)


@register_method("text-only")
class TextOnly(CIRMethod):
    """Query = the modification text's embedding; the reference image is ignored."""

    trainable = False

    def encode_queries(self, reference_pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.encode_texts(texts), dim=-1)


@register_method("sum")
class FeatureSum(CIRMethod):
    """Query = normalise(normalise(image) + normalise(text))."""

    trainable = False

    def encode_queries(self, reference_pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        image = F.normalize(self.backbone.encode_image(reference_pixels), dim=-1)
        text = F.normalize(self.encode_texts(texts), dim=-1)
        return F.normalize(image + text, dim=-1)

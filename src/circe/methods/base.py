"""The method contract: two encoders into one space, and a training loss."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from circe.backbones.base import Backbone


@dataclass
class Batch:
    """A training batch: reference pixels, modification texts, target pixels."""

    reference_pixels: torch.Tensor  # [B, 3, H, W]
    texts: list[str]
    target_pixels: torch.Tensor  # [B, 3, H, W]


class CIRMethod(nn.Module, ABC):
    """A composed image retrieval model.

    `encode_targets` maps gallery images and `encode_queries` maps (reference image, text)
    pairs into one embedding space of unit vectors; retrieval is cosine top-k between them.
    """

    name: ClassVar[str]
    trainable: ClassVar[bool] = True

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def encode_targets(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[N, 3, H, W]` -> `[N, D]` unit vectors. Default: the backbone's image embedding."""
        return F.normalize(self.backbone.encode_image(pixels), dim=-1)

    @abstractmethod
    def encode_queries(self, reference_pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """`[B, 3, H, W]` + B texts -> `[B, D]` unit vectors."""

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """B texts -> `[B, D]` backbone text embeddings (not normalised)."""
        token_ids = self.backbone.tokenize(texts).to(self.backbone.device)
        return self.backbone.encode_text(token_ids)

    def loss(self, batch: Batch, temperature: float = 0.07) -> dict[str, torch.Tensor]:
        """Batch contrastive loss: each query against every target in the batch."""
        queries = self.encode_queries(batch.reference_pixels, batch.texts)
        targets = self.encode_targets(batch.target_pixels)
        logits = queries @ targets.T / temperature  # [B, B]
        labels = torch.arange(len(logits), device=logits.device)
        return {"loss": F.cross_entropy(logits, labels)}


_REGISTRY: dict[str, type[CIRMethod]] = {}


def register_method(name: str) -> Callable[[type[CIRMethod]], type[CIRMethod]]:
    """Class decorator: make a method creatable by name (`create_method`)."""

    def add(cls: type[CIRMethod]) -> type[CIRMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method name {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def create_method(name: str, backbone: Backbone, **config) -> CIRMethod:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; choose one of: {', '.join(list_methods())}"
        ) from None
    return cls(backbone, **config)

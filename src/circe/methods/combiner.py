"""Combiner (CLIP4Cir: Baldrati, Bertini, Uricchio, Del Bimbo; CVPRW 2022, ACM TOMM 2023).

Stage 2 of CLIP4Cir: the CLIP encoders are frozen and a small network, the Combiner, fuses
the reference image feature v and the text feature t into the query:

    t' = Dropout(ReLU(W_t t)),  v' = Dropout(ReLU(W_v v))         (text / image projection)
    c  = [t' ‖ v']                                                 (concatenation)
    h  = Dropout(ReLU(W_c c))                                      (combiner layer)
    λ  = σ(MLP(c))                                                 (dynamic scalar)
    q  = normalize(W_o h + λ·t + (1 - λ)·v)                        (output + convex mix)

The convex mix of the raw features is a residual path: at initialisation the query is
already a feature sum, and W_o h learns the correction. Targets are the normalised image
features of the same frozen encoder. Stage 1 of the paper (fine-tuning CLIP on the feature
sum) is a different method; this one keeps the backbone frozen, so its features are cached.

`combiner-ft` (`finetune_text`) fine-tunes the backbone's text tower with the Combiner, as
dwc, dqu-cir and tmcir do by default, while the image tower stays frozen (image features
are still cached). It is the fair baseline for those methods: at the same training budget
it shows how much of their gain over `combiner` is simply "the text tower was trained".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from circe.backbones.base import Backbone
from circe.methods.base import (
    FrozenBackboneMethod,
    OptionalTextTuning,
    register_method,
    register_variant,
)


@dataclass(frozen=True)
class CombinerConfig:
    # d -> expansion·d for t' and v' (the paper: 4, so c is 8d wide).
    expansion: int = 4
    # Every dropout of the Combiner (the paper: 0.5).
    dropout: float = 0.5
    # Fine-tune the backbone's text tower with the Combiner (the image tower stays frozen, so
    # image features are still cached): the `combiner-ft` baseline.
    finetune_text: bool = False


def _projection(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Dropout(ReLU(W x)): the shape of every hidden layer of the Combiner."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))


@register_method("combiner")
class Combiner(OptionalTextTuning, FrozenBackboneMethod):
    """Frozen backbone + the Combiner fusion network (about 2.3M parameters at d = 128)."""

    def __init__(self, backbone: Backbone, **config):
        self.config = CombinerConfig(**config)
        super().__init__(backbone)
        d = backbone.embed_dim
        wide = self.config.expansion * d  # width of t' and v'
        p = self.config.dropout
        self.text_projection = _projection(d, wide, p)  # W_t: t -> t'   [B, d] -> [B, 4d]
        self.image_projection = _projection(d, wide, p)  # W_v: v -> v'  [B, d] -> [B, 4d]
        self.combiner_layer = _projection(2 * wide, 2 * wide, p)  # W_c: c -> h  [B, 8d]
        self.output_layer = nn.Linear(2 * wide, d)  # W_o: h -> [B, d]
        # λ = σ(MLP(c)): 8d -> 8d -> 1, ReLU + dropout inside.
        self.dynamic_scalar = nn.Sequential(
            _projection(2 * wide, 2 * wide, p), nn.Linear(2 * wide, 1), nn.Sigmoid()
        )

    def encode_queries_from_features(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        v, t = image_features, text_features  # [B, d] each, unnormalised as in the paper
        c = torch.cat([self.text_projection(t), self.image_projection(v)], dim=-1)  # [B, 8d]
        h = self.combiner_layer(c)  # [B, 8d]
        lam = self.dynamic_scalar(c)  # [B, 1]
        return F.normalize(self.output_layer(h) + lam * t + (1 - lam) * v, dim=-1)  # [B, d]


register_variant(
    "combiner-ft",
    Combiner,
    "CLIP4Cir's Combiner with the text encoder fine-tuned at the same budget as dwc, dqu-cir "
    "and tmcir: the fair baseline, so that a method's gain is not simply 'the text tower was "
    "trained'.",
    finetune_text=True,
)

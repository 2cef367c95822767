"""The module the trainer optimises: a method, its temperature, and where training stands."""

from __future__ import annotations

import math

import torch
from torch import nn

from circe.methods.base import CIRMethod, TrainingState
from circe.methods.inputs import Batch, FeatureBatch
from circe.methods.losses import gather_batch

# Lower bound on a learned temperature (CLIP caps its logit scale at 100 for the same reason:
# a vanishing temperature makes the softmax one-hot and the loss unstable).
MIN_TEMPERATURE = 0.01


class ContrastiveObjective(nn.Module):
    """method + temperature -> loss. The module the trainer optimises (and DDP wraps).

    Inputs are pixels (`Batch`) or cached backbone features (`FeatureBatch`, frozen-backbone
    methods only); both go through the method's own encoders, so the loss is the same.
    """

    def __init__(
        self,
        method: CIRMethod,
        temperature: float,
        learn_temperature: bool,
        learned_as: str = "log-temperature",
    ):
        super().__init__()
        self.method = method
        self.l2sp_weight = 0.0  # `pull_towards_start` sets it
        # The logits are cos / τ = cos × s. One of the two is stored: log τ (CLIP's way, and
        # the only one for a fixed τ) or the scale s itself (DQU-CIR's code learns s from 10).
        self.learned_as = learned_as if learn_temperature else "log-temperature"
        if self.learned_as == "scale":
            self.logit_scale = nn.Parameter(torch.tensor(1.0 / temperature))
            return
        log_temperature = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)
        # Set by the trainer before every optimizer step (losses that change over a run).
        self.state = TrainingState()

    def pull_towards_start(self, weight: float) -> None:
        """L2-SP: add (weight / 2) * ||θ - θ₀||² over the backbone parameters that train,
        θ₀ their values now (the pretrained weights, before any step). Not saved with the
        weights: a resumed run rebuilds the method from the same backbone first."""
        self.l2sp_weight = weight
        anchors = torch.nn.Module()
        self._anchored = []
        for n, (name, parameter) in enumerate(self.method.backbone.named_parameters()):
            if parameter.requires_grad:
                anchors.register_buffer(f"p{n}", parameter.detach().clone(), persistent=False)
                self._anchored.append((parameter, f"p{n}"))
        if not self._anchored:
            raise ValueError(
                "l2sp_weight: this method trains no backbone weights, so there is nothing to "
                "pull towards the pretrained ones"
            )
        self.anchors = anchors

    def start_penalty(self) -> torch.Tensor:
        total = sum(
            (parameter - getattr(self.anchors, name)).pow(2).sum()
            for parameter, name in self._anchored
        )
        return 0.5 * self.l2sp_weight * total

    @property
    def temperature(self) -> torch.Tensor:
        if self.learned_as == "scale":
            # The same bound on the scale (≤ 100), and a positive one from below.
            return 1.0 / self.logit_scale.clamp(min=1e-3, max=1.0 / MIN_TEMPERATURE)
        return self.log_temperature.exp().clamp(min=MIN_TEMPERATURE)

    def forward(self, batch: Batch | FeatureBatch) -> torch.Tensor:
        if isinstance(batch, FeatureBatch):
            text_features = batch.text_features
            if text_features is None:  # the method trains its text tower: encode, with grads
                text_features = self.method.query_text_features(batch.texts)  # [b, D]
            queries = self.method.encode_training_queries_from_features(
                batch.reference_features, text_features
            )  # [b, D] (or [b, K, D])
            targets = self.method.encode_targets_from_features(batch.target_features)  # [b, D]
        else:
            queries = self.method.encode_training_queries(batch.reference_pixels, batch.texts)
            targets = self.method.encode_targets(batch.target_pixels)
        # [B, D] each, B = b * processes: every query sees the targets of the global batch.
        queries, targets = gather_batch(queries).float(), gather_batch(targets).float()
        # The loss in float32 even under mixed precision: logits at scale up to 100 and
        # similarity thresholds near 1 (DWC's same-target test) are lost in bf16's three
        # digits (DWC's loss was NaN). Nothing changes in a float32 run.
        with torch.autocast(queries.device.type, enabled=False):
            loss = self.method.embedding_loss(queries, targets, self.temperature, self.state)
            if self.l2sp_weight:
                loss = loss + self.start_penalty()
            return loss

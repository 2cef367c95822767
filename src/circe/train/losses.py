"""The training objective: batch contrastive loss of queries against in-batch targets."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from circe.methods.base import Batch, CIRMethod, contrastive_loss
from circe.train.data import FeatureBatch

# Lower bound on a learned temperature (CLIP caps its logit scale at 100 for the same reason:
# a vanishing temperature makes the softmax one-hot and the loss unstable).
MIN_TEMPERATURE = 0.01


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradients over processes.

    Every process computes the same loss over the gathered batch; summing the gradient of
    that loss w.r.t. this process's rows (all_reduce) and then letting DDP average the
    parameter gradients gives exactly the gradient of one process holding the whole batch.
    all_reduce exists on every backend (gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:  # [b, D] -> [world * b, D]
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.rows = rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_batch(rows: torch.Tensor) -> torch.Tensor:
    """Rows of every process, in rank order (the global batch); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    return _GatherWithGrad.apply(rows)


class ContrastiveObjective(nn.Module):
    """method + temperature -> loss. The module the trainer optimises (and DDP wraps).

    Inputs are pixels (`Batch`) or cached backbone features (`FeatureBatch`, frozen-backbone
    methods only); both go through the method's own encoders, so the loss is the same.
    """

    def __init__(self, method: CIRMethod, temperature: float, learn_temperature: bool):
        super().__init__()
        self.method = method
        log_temperature = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=MIN_TEMPERATURE)

    def forward(self, batch: Batch | FeatureBatch) -> torch.Tensor:
        if isinstance(batch, FeatureBatch):
            text_features = batch.text_features
            if text_features is None:  # the method trains its text tower: encode, with grads
                text_features = self.method.query_text_features(batch.texts)  # [b, D]
            queries = self.method.encode_queries_from_features(
                batch.reference_features, text_features
            )  # [b, D]
            targets = self.method.encode_targets_from_features(batch.target_features)  # [b, D]
        else:
            queries = self.method.encode_queries(batch.reference_pixels, batch.texts)
            targets = self.method.encode_targets(batch.target_pixels)
        # [B, D] each, B = b * processes: every query sees the targets of the global batch.
        return contrastive_loss(gather_batch(queries), gather_batch(targets), self.temperature)

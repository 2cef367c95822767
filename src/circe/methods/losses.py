"""Losses shared by methods and the trainer: the cross-process batch gather, and the soft
contrastive labels and mutual learning of DWC (any method may use them).

Pure tensor functions: nothing here imports the methods, so a method module can import it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


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


# ------------------------------------------------------------------- losses methods may share


def same_rows(embeddings: torch.Tensor, tolerance: float = 1e-4) -> torch.Tensor:
    """`[B, B]` bool: rows that are the same vector (the same target image twice in a batch,
    e.g. two queries with one target), which a one-hot label would wrongly call negatives."""
    unit = F.normalize(embeddings, dim=-1)
    return unit @ unit.T > 1 - tolerance


def soft_similarity_labels(
    targets: torch.Tensor, soft_weight: float, temperature: float | torch.Tensor
) -> torch.Tensor:
    """DWC's soft-similarity labels `[B, B]` (rows sum to one) for targets `[B, D]`.

    (1 - w) of each row is the hard label, spread evenly over the batch's copies of the
    row's own target; w is a softmax of the targets' similarities to each other, so a
    target that looks like the true one is not punished as a full negative. Noisy texts
    then pull the query towards a neighbourhood of the target instead of one point.
    """
    hard = same_rows(targets).float()
    hard = hard / hard.sum(dim=1, keepdim=True)
    unit = F.normalize(targets.detach(), dim=-1)
    soft = torch.softmax(unit @ unit.T / temperature, dim=1)
    return soft_weight * soft + (1 - soft_weight) * hard


def soft_label_contrastive_loss(
    queries: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, temperature
) -> torch.Tensor:
    """Cross-entropy of the query-to-target softmax `[B, B]` against label rows `[B, B]`
    (one-hot labels give `contrastive_loss`)."""
    logits = queries @ targets.T / temperature
    return -(labels * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def mutual_learning_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) of two query-to-target softmaxes `[B, B]`; the teacher is not
    trained by it (deep mutual learning: two models of the same queries teach each other)."""
    teacher = torch.softmax(teacher_logits.detach(), dim=1)
    return F.kl_div(F.log_softmax(student_logits, dim=1), teacher, reduction="batchmean")

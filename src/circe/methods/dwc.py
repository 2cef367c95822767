"""DWC: Dynamic Weighted Combiner (Huang, Zhang, Fu, Song; AAAI 2024).

Two problems: image and text contribute unequally to a query but are usually added with
equal weight, and web-sourced modification texts are noisy. DWC's three parts, here on a
CLIP backbone (v: reference image feature, t: text feature, g: target image feature):

Editable Modality De-equalizer (EMD), the main stream, in the backbone's space:
    image editor   v̂ = a_v ⊙ v + Δ_v,   a_v = σ(MLP([v ‖ t])),  Δ_v = MLP([v ‖ t])
    text editor    t̂ = a_t ⊙ t + Δ_t    (the same shape, its own weights)
    combiner       (w_v, w_t) = softmax(MLP([v̂ ‖ t̂])),  q₁ = norm(w_v·v̂ + w_t·t̂)
Each editor rewrites its modality in the light of the other (a gate that keeps or drops
dimensions, and an additive edit); the combiner's two weights sum to one and differ per
query (`explain` reports them). Targets: g₁ = norm(g).

CLIP-based mutual enhancement module, a second stream that adapts both CLIP spaces:
    q₂ = norm(norm(A_v(v)) + norm(A_t(t))),  g₂ = norm(A_v(g)),  A(x) = x + MLP(x)
The adapters start as the identity (q₂ is then the zero-shot feature sum) and learn to
bring the text space towards the image space.

Dynamic soft-similarity label generator (SSG): the contrastive targets of each stream are
not one-hot but `soft_similarity_labels`: part of every row is spread over the batch's
targets by their similarity to the true one, so near-duplicate targets and noisy texts are
not punished as hard negatives. The soft share is annealed towards one-hot over training
(`soft_label_anneal`), and in the second stream the similarities come from the learned g₂,
so the labels change as training goes on (the "dynamic" of the name).

Training alternates (the authors' code updates its two streams in turn): on even steps only
the EMD stream learns, on odd steps only the mutual enhancement module. Each stream's loss,
the mixed-modality contrastive loss, is its SSG contrastive loss plus the KL divergence of
its query-to-target distribution from the other (frozen) stream's (`mutual_learning_loss`),
so the streams teach each other. Retrieval uses both: the query and target embeddings are
[q₁ ‖ q₂]/√2 and [g₁ ‖ g₂]/√2, whose dot product is the mean of the two streams' cosines.

Encoders: the authors' EMD stream trains its own text encoder (an LSTM) and image CNN
end to end, while the CLIP stream's CLIP stays frozen. Here both streams share one backbone;
by default its text tower is fine-tuned by both losses (`finetune_text`) and its image
tower stays frozen, so image features are cached and training runs on a CPU in minutes.
`dwc-frozen-text` freezes the text tower too, which makes DWC a pure fusion module like
the Combiner (the ablation shows how much of the gain is the fine-tuned text).

Reading of the paper's open points (from the authors' public code, ours written anew):
the editors are gated MLPs on pooled features (the code's global variant; its local
variant attends over CNN feature maps), the weights come from a sigmoid/softmax head so
they sum to one, and the soft labels mix target-target similarities (weight 0.2) with the
hard labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from circe.backbones.base import Backbone
from circe.methods.base import (
    FrozenBackboneMethod,
    OptionalTextTuning,
    TrainingState,
    register_method,
    register_variant,
)
from circe.methods.losses import (
    mutual_learning_loss,
    soft_label_contrastive_loss,
    soft_similarity_labels,
)


@dataclass(frozen=True)
class DWCConfig:
    expansion: int = 4  # hidden width of every MLP, in multiples of d
    dropout: float = 0.5
    editors: bool = True  # False: v̂ = v, t̂ = t (ablation "without the editors")
    weighting: str = "adaptive"  # adaptive | equal (ablation: w_v = w_t = 1/2)
    # SSG: share of each label row given to target-target similarities (0: one-hot labels).
    soft_label_weight: float = 0.2
    soft_label_temperature: float = 0.05
    # The soft share falls linearly to (1 - anneal) of its value by the end of training.
    soft_label_anneal: float = 0.5
    mutual: bool = True  # the CLIP mutual enhancement stream and the alternating schedule
    mutual_weight: float = 1.0  # weight of the KL term in each stream's loss
    # Fine-tune the backbone's text tower with both streams' losses (the image tower stays
    # frozen, so image features are still cached).
    finetune_text: bool = True

    def __post_init__(self) -> None:
        if self.weighting not in ("adaptive", "equal"):
            raise ValueError(f"weighting must be 'adaptive' or 'equal', not {self.weighting!r}")
        if not 0 <= self.soft_label_weight < 1:
            raise ValueError("soft_label_weight must be in [0, 1)")


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


class ModalityEditor(nn.Module):
    """One EMD editor: x̂ = σ(gate([x ‖ other])) ⊙ x + edit([x ‖ other])."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.gate = _mlp(2 * dim, hidden, dim, dropout)
        self.edit = _mlp(2 * dim, hidden, dim, dropout)
        # Start as (nearly) the identity: gate σ(3) ≈ 0.95 everywhere, no edit.
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.constant_(self.gate[-1].bias, 3.0)
        nn.init.zeros_(self.edit[-1].weight)
        nn.init.zeros_(self.edit[-1].bias)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        both = torch.cat([x, other], dim=-1)  # [B, 2d]
        return torch.sigmoid(self.gate(both)) * x + self.edit(both)  # [B, d]


class Adapter(nn.Module):
    """A(x) = x + MLP(x), starting as the identity (the mutual enhancement module's towers)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.residual = _mlp(dim, hidden, dim, dropout)
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


@register_method("dwc")
class DWC(OptionalTextTuning, FrozenBackboneMethod):
    """EMD stream + CLIP mutual enhancement stream, SSG labels, on a (mostly) frozen backbone."""

    def __init__(self, backbone: Backbone, **config):
        self.config = c = DWCConfig(**config)
        super().__init__(backbone)
        d = backbone.embed_dim
        hidden = c.expansion * d
        # -- Editable Modality De-equalizer
        self.image_editor = ModalityEditor(d, hidden, c.dropout)
        self.text_editor = ModalityEditor(d, hidden, c.dropout)
        self.weight_head = _mlp(2 * d, hidden, 2, c.dropout)  # adaptive weighted combiner
        # -- CLIP-based mutual enhancement module
        if c.mutual:
            self.image_adapter = Adapter(d, hidden, c.dropout)
            self.text_adapter = Adapter(d, hidden, c.dropout)

    # -- the EMD stream ---------------------------------------------------------------------

    def edited(self, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v̂, t̂): each modality edited in the light of the other (or as given)."""
        if not self.config.editors:
            return v, t
        return self.image_editor(v, t), self.text_editor(t, v)

    def modality_weights(self, v_hat: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
        """`[B, 2]` (w_v, w_t), each row summing to one."""
        if self.config.weighting == "equal":
            return v_hat.new_full((len(v_hat), 2), 0.5)
        return torch.softmax(self.weight_head(torch.cat([v_hat, t_hat], dim=-1)), dim=-1)

    def emd_query(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v, t = F.normalize(v, dim=-1), F.normalize(t, dim=-1)
        v_hat, t_hat = self.edited(v, t)
        w = self.modality_weights(v_hat, t_hat)  # [B, 2]
        return F.normalize(w[:, :1] * v_hat + w[:, 1:] * t_hat, dim=-1)

    # -- the mutual enhancement stream ------------------------------------------------------

    def enhanced_query(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.image_adapter(v), dim=-1)
        text = F.normalize(self.text_adapter(t), dim=-1)
        return F.normalize(image + text, dim=-1)

    # -- the contract -----------------------------------------------------------------------

    def _joined(self, first: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        """[x₁ ‖ x₂]/√2 (unit length when both are), or x₁ without the second stream."""
        if second is None:
            return first
        return torch.cat([first, second], dim=-1) / math.sqrt(2)

    def _split(self, joined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.config.mutual:
            return joined, None
        first, second = joined.chunk(2, dim=-1)
        return first * math.sqrt(2), second * math.sqrt(2)

    def encode_queries_from_features(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        v, t = image_features, text_features  # [B, d] each
        second = self.enhanced_query(v, t) if self.config.mutual else None
        return self._joined(self.emd_query(v, t), second)  # [B, 2d] (or [B, d])

    def encode_targets_from_features(self, image_features: torch.Tensor) -> torch.Tensor:
        g = image_features  # [N, d]
        second = F.normalize(self.image_adapter(g), dim=-1) if self.config.mutual else None
        return self._joined(F.normalize(g, dim=-1), second)

    def soft_label_weight(self, state: TrainingState) -> float:
        c = self.config
        return c.soft_label_weight * (1 - c.soft_label_anneal * state.progress)

    def stream_loss(self, queries, targets, temperature, state, teacher_logits=None):
        """One stream's mixed-modality contrastive loss: SSG contrastive (+ mutual KL)."""
        labels = soft_similarity_labels(
            targets, self.soft_label_weight(state), self.config.soft_label_temperature
        )
        loss = soft_label_contrastive_loss(queries, targets, labels, temperature)
        if teacher_logits is not None:
            logits = queries @ targets.T / temperature
            loss = loss + self.config.mutual_weight * mutual_learning_loss(logits, teacher_logits)
        return loss

    def stream_parameters(self, stream: str) -> list[nn.Parameter]:
        """The fusion parameters of the "emd" or the "enhancement" stream."""
        modules = {
            "emd": (self.image_editor, self.text_editor, self.weight_head),
            "enhancement": (self.image_adapter, self.text_adapter) if self.config.mutual else (),
        }[stream]
        return [p for module in modules for p in module.parameters()]

    def learning_stream(self, state: TrainingState) -> str:
        return "emd" if state.step % 2 == 0 or not self.config.mutual else "enhancement"

    def resting_parameters(self, state: TrainingState) -> list[nn.Parameter]:
        """The stream that does not learn at this step (the text tower learns at every one)."""
        learning = self.learning_stream(state)
        return self.stream_parameters("enhancement" if learning == "emd" else "emd")

    def embedding_loss(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        temperature: float | torch.Tensor,
        state: TrainingState,
    ) -> torch.Tensor:
        """EMD and enhancement streams in turn (even / odd steps), each taught by the other."""
        q1, q2 = self._split(queries)
        g1, g2 = self._split(targets)
        if q2 is None:  # ablation without the mutual enhancement module: EMD alone
            return self.stream_loss(q1, g1, temperature, state)
        if self.learning_stream(state) == "emd":
            q, g, teacher = q1, g1, q2.detach() @ g2.detach().T / temperature
        else:
            q, g, teacher = q2, g2, q1.detach() @ g1.detach().T / temperature
        return self.stream_loss(q, g, temperature, state, teacher)

    @torch.no_grad()
    def explain(self, reference_pixels: torch.Tensor, texts: list[str]) -> dict:
        """Per query: the adaptive combiner's image and text weights (w_v, w_t)."""
        v = F.normalize(self.backbone_image_features(reference_pixels), dim=-1)
        t = F.normalize(self.query_text_features(texts), dim=-1)
        w = self.modality_weights(*self.edited(v, t))
        return {"image_weight": w[:, 0].tolist(), "text_weight": w[:, 1].tolist()}


register_variant(
    "dwc-hard-labels", DWC, "Ablation: one-hot labels (no SSG).", soft_label_weight=0.0
)
register_variant(
    "dwc-no-editors", DWC, "Ablation: without the two modality editors.", editors=False
)
register_variant(
    "dwc-equal-weights",
    DWC,
    "Ablation: w_v = w_t = 1/2 instead of the combiner.",
    weighting="equal",
)
register_variant(
    "dwc-frozen-text",
    DWC,
    "Ablation: the text tower frozen too (a pure fusion module, like the Combiner).",
    finetune_text=False,
)
register_variant(
    "dwc-no-mutual", DWC, "Ablation: the EMD stream alone (no mutual module).", mutual=False
)

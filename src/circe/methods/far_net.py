"""FAR-Net: multi-stage fusion with enhanced semantic alignment and adaptive reconciliation
(Park, Kim, Lee).

Early fusion (one encoder over both inputs) over-weights the words the text mentions and
loses the visual context; late fusion (each input encoded alone, combined at the end)
misses which image regions the words refer to. FAR-Net runs both and combines them. On a
frozen CLIP-like backbone, with the reference image's tokens V (class token, then the
patches) and the text's tokens T with padding mask m, pooled features v, t and
v̂ = norm(v), t̂ = norm(t):

Token projections into the fusion width d (shared by the two modules; the image tokens
carry their positions from the ViT's own position embeddings):
    R = LN(V W_r)  [B, N, d] (regions),   W = LN(T W_w)  [B, L, d] (words)

ESAM, enhanced semantic alignment module (late fusion by cross-attention):
    W' = Block(W ← R)         words read the regions they refer to        (word-to-region)
    R' = Block(R ← W; m)      regions read the words that refer to them   (region-to-word)
    e  = (v̂ + t̂)/2 + W_e [mean(R') ‖ mean_m(W')]
where Block(X ← C) = X + Drop(MHA(LN X, LN C, LN C)), then + FFN(LN ·) (a pre-norm
transformer block, dropout on the attention maps and in the FFN too), padded words are
masked as keys and left out of every mean (mean_m), so padding never changes the query.

ARM, adaptive reconciliation module (early fusion with uncertainty embeddings):
    X = Block([R + s_img ; W + s_txt]; m)   one joint self-attention over both streams
    h_v = mean(X_img),  h_t = mean_m(X_txt)
    μ_v = v̂ + W_μv h_v,  log σ²_v = W_σv h_v   (and the same for t)   uncertainty embeddings
    π_v = σ_v⁻² / (σ_v⁻² + σ_t⁻²)  per dimension                       precision shares
    a   = π_v ⊙ μ_v + π_t ⊙ μ_t                                         reconciled query
Each stream is a Gaussian N(μ, diag σ²) in the output space, read from the jointly encoded
tokens; the reconciled query is the mean of their product, so the stream that is less
certain about a dimension counts less there (`explain` reports the image share).

Final query: γ = σ(w_γ · [a ‖ e] + b_γ),  q = norm(γ a + (1 - γ) e);  targets g = norm(v_g).

Every output layer starts at zero: at initialisation e = a = (v̂ + t̂)/2 and γ = 1/2, so
FAR-Net starts as the zero-shot feature sum and learns the corrections (as the Combiner's
residual mix does).

Loss (`embedding_loss`, over the batch; g the targets, τ the trainer's temperature):
    L = InfoNCE(q, g) + λ_e InfoNCE(norm(e), g) + λ_a InfoNCE(norm(a), g) + λ_u L_u
    L_u = ½ mean_{s ∈ {v, t}, d} [ (g_d − sg(μ_s,d))² / σ²_s,d + log σ²_s,d ]
The stage losses make each stage a retriever of its own, so that neither hides behind the
gate; L_u is the Gaussian likelihood of the target under each stream with its mean held
fixed (sg), so σ² learns the stream's expected error per dimension and the precision
shares π weigh the streams by it: an uncertainty trained as one, not a gate under another
name (the precisions still also get the final loss's gradient).

Ablations: `far-net-final-loss-only` (circe's first FAR-Net: the final InfoNCE alone),
`far-net-no-uncertainty-loss` (stage losses, no L_u), `far-net-word-dropout` (an
experiment: word tokens hidden at random in training, `word_dropout`), and one stage only:
`far-net-esam-only` (q = norm(e)) and `far-net-arm-only` (q = norm(a)); a single stage has
no stage loss beside the final one.

Reading of the paper's open points (no public code): the backbone towers stay frozen (their
token sequences are cached, `MethodInputs(query="tokens")`); ESAM attends in both
directions; the uncertainty embeddings are per-dimension Gaussians whose precisions weigh
the streams, without sampling (sampled noise would add variance to the contrastive loss
and only teach the variances to shrink; the likelihood term trains them directly); the
stages are combined by a learned per-query gate; the auxiliary weights (0.5, 0.5, 1.0) are
our guess, as is the likelihood on unit targets in the output space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from circe.backbones.base import Backbone
from circe.methods.base import (
    FrozenBackboneMethod,
    MethodInputs,
    TrainingState,
    contrastive_loss,
    register_method,
    register_variant,
)
from circe.methods.inputs import TokenFeatures


@dataclass(frozen=True)
class FARNetConfig:
    width: int = 128  # d, the fusion width both token streams are projected to
    heads: int = 4  # attention heads of every block
    expansion: int = 2  # hidden width of the blocks' feed-forward layers, in multiples of d
    dropout: float = 0.1  # in every attention block (attention maps, residuals, FFN)
    esam: bool = True  # the late-fusion stage (ablation: ARM only)
    arm: bool = True  # the early-fusion stage (ablation: ESAM only)
    # Auxiliary InfoNCE losses on each stage's own query (norm(e), norm(a)), added to the final
    # query's with these weights (0: the stage learns only through the final query).
    esam_loss: float = 0.5
    arm_loss: float = 0.5
    # Weight of ARM's uncertainty loss: the Gaussian negative log-likelihood of the target
    # under each stream's N(μ, diag σ²), with μ held fixed, so σ² learns the stream's error.
    uncertainty_loss: float = 1.0
    # In training, each real word token is hidden from ESAM and ARM with this probability
    # (the last one, CLIP's end token that holds the whole text, never): fusion that cannot
    # count on any one word (the move probe: FAR-Net's moves suffer from new wording).
    word_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not (self.esam or self.arm):
            raise ValueError("FAR-Net needs at least one of its stages: esam or arm")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} does not split into {self.heads} heads")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {self.word_dropout}")
        for name in ("esam_loss", "arm_loss", "uncertainty_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is a loss weight: 0 or more, got {getattr(self, name)}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x [B, L, d]` over the positions where `mask [B, L]` is True -> `[B, d]`."""
    weights = mask.unsqueeze(-1).to(x.dtype)  # [B, L, 1]
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def _zero(layer: nn.Linear) -> nn.Linear:
    """An output layer that starts at zero (the query starts at the feature sum)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TokenProjection(nn.Module):
    """LN(X W): one tower's tokens `[B, L, W]` -> `[B, L, d]`."""

    def __init__(self, in_width: int, width: int):
        super().__init__()
        self.linear = nn.Linear(in_width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(tokens))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: X + Drop(MHA(LN X, LN C, LN C)), then + FFN(LN ·).

    `cross=True`: the sequence reads a context C (cross-attention); otherwise C = X.
    """

    def __init__(self, config: FARNetConfig, cross: bool):
        super().__init__()
        d = config.width
        self.norm = nn.LayerNorm(d)
        self.context_norm = nn.LayerNorm(d) if cross else None
        self.attention = nn.MultiheadAttention(
            d, config.heads, dropout=config.dropout, batch_first=True
        )
        self.dropout = nn.Dropout(config.dropout)
        self.ffn = nn.Sequential(
            nn.LayerNorm(d),
            nn.Linear(d, config.expansion * d),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.expansion * d, d),
            nn.Dropout(config.dropout),
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`x [B, Lx, d]`, `context [B, Lc, d]` (cross only), `padding [B, Lc]` True where a
        context position is padding -> (`[B, Lx, d]`, attention `[B, Lx, Lc]` averaged over
        heads when `need_weights`)."""
        query = self.norm(x)
        keys = query if self.context_norm is None else self.context_norm(context)
        attended, weights = self.attention(
            query, keys, keys, key_padding_mask=padding, need_weights=need_weights
        )
        x = x + self.dropout(attended)
        return x + self.ffn(x), weights


class ESAM(nn.Module):
    """Enhanced semantic alignment module: late fusion by cross-attention in both directions
    between words and image regions -> a correction `[B, D]` of the feature sum."""

    def __init__(self, config: FARNetConfig, out_dim: int):
        super().__init__()
        self.word_to_region = AttentionBlock(config, cross=True)
        self.region_to_word = AttentionBlock(config, cross=True)
        self.output = _zero(nn.Linear(2 * config.width, out_dim))  # W_e

    def forward(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`regions [B, N, d]`, `words [B, L, d]`, `word_mask [B, L]` -> (correction `[B, D]`,
        word-to-region attention `[B, L, N]`)."""
        grounded_words, attention = self.word_to_region(words, regions, need_weights=True)
        edited_regions, _ = self.region_to_word(regions, words, padding=~word_mask)
        summary = torch.cat(
            [edited_regions.mean(dim=1), masked_mean(grounded_words, word_mask)], dim=-1
        )  # [B, 2d]
        return self.output(summary), attention


class UncertaintyEmbedding(nn.Module):
    """One stream's Gaussian N(μ, diag σ²) in the output space, from its pooled joint
    encoding h: μ = x̂ + W_μ h (a correction of the stream's own feature x̂), log σ² = W_σ h."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.mean = _zero(nn.Linear(width, out_dim))  # W_μ
        self.log_variance = _zero(nn.Linear(width, out_dim))  # W_σ

    def forward(self, h: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`h [B, d]`, `feature [B, D]` -> (μ `[B, D]`, log σ² `[B, D]`)."""
        return feature + self.mean(h), self.log_variance(h)


class ARM(nn.Module):
    """Adaptive reconciliation module: early fusion of both token streams in one joint
    self-attention, then each stream's uncertainty embedding, reconciled by precision."""

    def __init__(self, config: FARNetConfig, out_dim: int):
        super().__init__()
        # s_img, s_txt: which stream a token of the joint sequence comes from.
        self.stream_embedding = nn.Parameter(torch.zeros(2, config.width))
        nn.init.normal_(self.stream_embedding, std=0.02)
        self.joint_encoder = AttentionBlock(config, cross=False)
        self.image_uncertainty = UncertaintyEmbedding(config.width, out_dim)
        self.text_uncertainty = UncertaintyEmbedding(config.width, out_dim)

    def forward(
        self,
        regions: torch.Tensor,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        v: torch.Tensor,
        t: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens as for ESAM, unit features `v`, `t` `[B, D]` -> (reconciled query `a`
        `[B, D]`, the image stream's precision share π_v `[B, D]`, the streams' Gaussians
        `[4, B, D]`: μ_v, μ_t, log σ²_v, log σ²_t)."""
        n = regions.shape[1]
        joint = torch.cat([regions + self.stream_embedding[0], words + self.stream_embedding[1]], 1)
        padding = torch.cat([torch.zeros_like(word_mask[:, :1]).expand(-1, n), ~word_mask], 1)
        joint, _ = self.joint_encoder(joint, padding=padding)  # [B, N + L, d]
        mu_v, log_var_v = self.image_uncertainty(joint[:, :n].mean(dim=1), v)
        mu_t, log_var_t = self.text_uncertainty(masked_mean(joint[:, n:], word_mask), t)
        # π_s = σ_s⁻² / Σ σ⁻²: a softmax of the negative log-variances over the two streams.
        shares = torch.softmax(-torch.stack([log_var_v, log_var_t]), dim=0)  # [2, B, D]
        streams = torch.stack([mu_v, mu_t, log_var_v, log_var_t])
        return shares[0] * mu_v + shares[1] * mu_t, shares[0], streams


def uncertainty_nll(streams: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ARM's uncertainty loss: the mean negative log-likelihood (up to a constant) of the unit
    targets `[B, D]` under each stream's N(μ, diag σ²), `streams [B, 4, D]` (μ_v, μ_t,
    log σ²_v, log σ²_t). μ is held fixed (the contrastive losses move it), so σ² learns the
    expected squared error of its stream, dimension by dimension: a calibrated uncertainty,
    whose precisions then weigh the streams, rather than a gate under another name."""
    means, log_variances = streams[:, :2].detach(), streams[:, 2:]  # [B, 2, D] each
    error = (targets.unsqueeze(1) - means).square()
    return 0.5 * (error * torch.exp(-log_variances) + log_variances).mean()


@dataclass
class Composition:
    """A batch of composed queries and how they were made (for `explain`)."""

    query: torch.Tensor  # [B, D] unit vectors
    arm_share: torch.Tensor | None  # [B] γ, ARM's share of the final query (both stages)
    image_share: torch.Tensor | None  # [B, D] π_v, ARM's image precision share
    word_to_region: torch.Tensor | None  # [B, L, N] ESAM's attention of words over regions
    late: torch.Tensor | None = None  # [B, D] e, ESAM's query (not normalised)
    early: torch.Tensor | None = None  # [B, D] a, ARM's reconciled query (not normalised)
    streams: torch.Tensor | None = None  # [4, B, D] ARM's μ_v, μ_t, log σ²_v, log σ²_t


@register_method("far-net")
class FARNet(FrozenBackboneMethod):
    """ESAM (late fusion, cross-attention) + ARM (early fusion, uncertainty), on a frozen
    backbone's token sequences (about 0.52M parameters at d = 128 on circe-tiny)."""

    inputs = MethodInputs(query="tokens")
    # Checkpoints saved before the stage losses were trained by the final loss alone (the
    # weights change training only; recorded so that the rebuilt config says what was done).
    settings_before_they_existed: ClassVar[dict] = {
        "esam_loss": 0.0,
        "arm_loss": 0.0,
        "uncertainty_loss": 0.0,
    }

    def __init__(self, backbone: Backbone, **config):
        super().__init__(backbone)
        self.config = c = FARNetConfig(**config)
        (_, image_width), (_, text_width) = backbone.token_shapes()
        d, out = c.width, backbone.embed_dim
        self.region_projection = TokenProjection(image_width, d)  # W_r
        self.word_projection = TokenProjection(text_width, d)  # W_w
        self.esam = ESAM(c, out) if c.esam else None
        self.arm = ARM(c, out) if c.arm else None
        if c.esam and c.arm:
            self.stage_gate = _zero(nn.Linear(2 * out, 1))  # w_γ, b_γ

    def compose(self, image: TokenFeatures, text: TokenFeatures) -> Composition:
        """The reference image's and the text's token features -> the composed queries."""
        v, t = F.normalize(image.pooled, dim=-1), F.normalize(text.pooled, dim=-1)  # [B, D]
        regions = self.region_projection(image.tokens)  # [B, N, d]
        words = self.word_projection(text.tokens)  # [B, L, d]
        if self.training and self.config.word_dropout:
            text = TokenFeatures(text.pooled, text.tokens, self._drop_words(text.mask))
        e = a = gamma = image_share = attention = streams = None
        if self.esam is not None:
            correction, attention = self.esam(regions, words, text.mask)
            e = (v + t) / 2 + correction
        if self.arm is not None:
            a, image_share, streams = self.arm(regions, words, text.mask, v, t)
        if e is None:
            query = a
        elif a is None:
            query = e
        else:
            gamma = torch.sigmoid(self.stage_gate(torch.cat([a, e], dim=-1)))  # [B, 1]
            query = gamma * a + (1 - gamma) * e
            gamma = gamma.squeeze(-1)
        return Composition(F.normalize(query, dim=-1), gamma, image_share, attention, e, a, streams)

    def _drop_words(self, mask: torch.Tensor) -> torch.Tensor:
        """`mask [B, L]` with each real token but the last of its row hidden at random."""
        last = mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)  # the last real token ...
        last &= mask  # ... itself, not the padding after it
        kept = torch.rand(mask.shape, device=mask.device) >= self.config.word_dropout
        return mask & (kept | last)

    def encode_queries_from_features(
        self, image_features: TokenFeatures, text_features: TokenFeatures
    ) -> torch.Tensor:
        return self.compose(image_features, text_features).query

    def encode_training_queries_from_features(
        self, image_features: TokenFeatures, text_features: TokenFeatures
    ) -> torch.Tensor:
        """`[B, 7, D]`: the final query, then what the stage losses read: norm(e), norm(a),
        μ_v, μ_t, log σ²_v, log σ²_t (zeros for a stage the ablation removed)."""
        parts = self.compose(image_features, text_features)
        zeros = torch.zeros_like(parts.query)
        late = zeros if parts.late is None else F.normalize(parts.late, dim=-1)
        early = zeros if parts.early is None else F.normalize(parts.early, dim=-1)
        streams = zeros.expand(4, *zeros.shape) if parts.streams is None else parts.streams
        return torch.stack([parts.query, late, early, *streams], dim=1)

    def embedding_loss(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        temperature: float | torch.Tensor,
        state: TrainingState,
    ) -> torch.Tensor:
        """InfoNCE of the final query, plus the weighted stage losses: InfoNCE of each stage's
        own query, and ARM's uncertainty loss (`uncertainty_nll`)."""
        c = self.config
        if queries.dim() == 2:  # retrieval queries only (a caller outside the trainer)
            return contrastive_loss(queries, targets, temperature)
        loss = contrastive_loss(queries[:, 0], targets, temperature)
        if c.esam and c.arm and c.esam_loss:
            loss = loss + c.esam_loss * contrastive_loss(queries[:, 1], targets, temperature)
        if c.esam and c.arm and c.arm_loss:
            loss = loss + c.arm_loss * contrastive_loss(queries[:, 2], targets, temperature)
        if c.arm and c.uncertainty_loss:
            loss = loss + c.uncertainty_loss * uncertainty_nll(queries[:, 3:], targets)
        return loss

    @torch.no_grad()
    def explain(self, reference_pixels: torch.Tensor, texts: list[str]) -> dict:
        """Per query, as far as the stages exist: `arm_share` (γ), `image_share` (ARM's
        precision share of the image stream, averaged over dimensions) and `region_attention`
        (ESAM's word-to-region attention averaged over the words: a grid over the patches,
        row by row, when the image tokens are a class token and a square of patches)."""
        text = self.query_text_features(texts)
        parts = self.compose(self.query_image_features(reference_pixels), text)
        explanation = {}
        if parts.arm_share is not None:
            explanation["arm_share"] = parts.arm_share.tolist()
        if parts.image_share is not None:
            explanation["image_share"] = parts.image_share.mean(dim=-1).tolist()
        if parts.word_to_region is not None:
            regions = masked_mean(parts.word_to_region, text.mask)  # [B, 1 + P]
            patches = regions[:, 1:] / regions[:, 1:].sum(dim=-1, keepdim=True)  # [B, P]
            side = math.isqrt(patches.shape[1])
            if side * side == patches.shape[1]:
                patches = patches.reshape(-1, side, side)
            explanation["region_attention"] = patches.tolist()
        return explanation


register_variant(
    "far-net-esam-only", FARNet, "Ablation: the late-fusion stage alone (no ARM).", arm=False
)
register_variant(
    "far-net-arm-only", FARNet, "Ablation: the early-fusion stage alone (no ESAM).", esam=False
)
register_variant(
    "far-net-final-loss-only",
    FARNet,
    "Ablation: the final query's loss alone, no stage losses and no uncertainty loss "
    "(circe's first FAR-Net).",
    esam_loss=0.0,
    arm_loss=0.0,
    uncertainty_loss=0.0,
)
register_variant(
    "far-net-word-dropout",
    FARNet,
    "Experiment: 30 % of the word tokens hidden from ESAM and ARM in training (not the end "
    "token), against the wording sensitivity the move probe found.",
    word_dropout=0.3,
)
register_variant(
    "far-net-no-uncertainty-loss",
    FARNet,
    "Ablation: the stage losses without ARM's uncertainty loss (σ² learned as a gate).",
    uncertainty_loss=0.0,
)

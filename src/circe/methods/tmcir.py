"""TMCIR: intent-aware cross-modal alignment and adaptive token fusion (2025; "Token Merge
Benefits Composed Image Retrieval", arXiv 2504.10995). No public code; this is our reading of
the abstract and two public summaries.

Fusion in CIR tends to be visual-dominant (the query stays close to the reference image) or
text-dominant (it follows the words and forgets the picture). TMCIR trains in two stages,
here two runs of the shared trainer (`circe train`), the second starting from the first:

Stage 1, intent-aware cross-modal alignment (`stage: 1`). An image editor turns each training
query (reference image, modification text) into a pseudo-target image that shows what the
text asks for (`circe pseudo-targets`: a diffusion editor such as InstructPix2Pix or Stable
Diffusion 3; on the synthetic benchmark a scene editor with a set rate of mistakes). The
towers are fine-tuned contrastively so that the modification text alone lands on its
pseudo-target, as the summaries describe:
    L₁ = InfoNCE(norm(t), norm(g̃))          (`alignment: text`)
with t the text feature and g̃ the pseudo-target's image feature. The text learns to say in
image space what the edit asks for; real targets are never seen in this stage
(`training_split` swaps every target for its pseudo-target). `alignment: composed`
(`tmcir-composed-alignment`, circe's first reading) aligns norm(v̂ + t̂) instead.

Stage 2, adaptive token fusion with a token merge (`stage: 2`, `init_from: STAGE1_RUN/best`).
The reference image's tokens V (class token, then patches) and the text's tokens T (padding
mask m) are projected to the fusion width d, told apart by a modality embedding, given a
learned position embedding per patch and per word slot, and read in context by a pre-norm
transformer layer over the joint sequence:
    H = Transformer([LN(V W_v) + e_img + p_img ; LN(T W_t) + e_txt + p_txt]; m)
Token merge (`merge`, `AdaptiveTokenFusion.merge`): the cosine similarity of every patch
state to every word state, s_ij; each patch's best word j*(i); the `merge_ratio` share of
patches most similar to a word are merged into it, each by its similarity,
    H_j ← (H_j + Σ_{i→j} w_i H_i) / (1 + Σ_{i→j} w_i),   w_i = (1 + s_ij*) / 2,
and leave the sequence. Positions are in the states the similarity compares, so which
patch merges into which word depends on where the patch is ("position-aware").
Adaptive token weights over what is left: a softmax over all real tokens of both modalities
together, so visual and textual tokens compete for one budget:
    a_i = softmax_i(s(H_i) − log n_mod(i)),   padding and merged patches excluded
where n_mod is the number of tokens left in token i's modality: with equal scores each
modality gets half the weight whatever its length (the scorer s starts at zero). The query
mixes the pooled features by the modality shares and adds what the weighted tokens say:
    w_v = Σ_{i ∈ image} a_i,   q = norm(w_v v̂ + (1 − w_v) t̂ + W_o Σ_i a_i H_i)
Targets are norm(g). W_o starts at zero, so the query starts as the feature sum. The text
tower keeps training (from its stage-1 weights), the image tower too with
`finetune_image`; `explain` reports every token's weight (merged patches weigh 0).

Ablations: `tmcir-token-weights` (circe's first TMCIR: the weighting without merge and
positions); `tmcir-mean-pool` (that, with mean pooling per modality instead of the learned
weights); `tmcir` without `init_from` (no stage 1); `tmcir-composed-alignment` (stage 1 on
the composed query); stage 1 on pseudo-targets made with more or fewer mistakes
(`circe pseudo-targets --noise`).

Choices the paper leaves open, and ours:
- Merge direction: patches into words (the words carry the intent; a word gathers the
  patches it is about), not words into patches nor a ToMe-style merge within a modality.
- How many merge: a fixed share of the patches (`merge_ratio`, 0.5), chosen per query by
  similarity (bipartite, as ToMe); the class token never merges. The choice is discrete and
  the merged states carry the gradients.
- Where: after one context layer (the states of both towers are then in one space); the
  similarity is a plain cosine, without a learned temperature.
- Merge weights: (1 + cosine) / 2 per patch, the word itself counting 1 (a size-weighted
  average in ToMe's sense, sizes replaced by similarities).
- Position: learned embeddings added before the context layer, for patches and word slots.
- Pooling: the adaptive token weights above, kept from circe's first reading.
- Stage 1: one pseudo-target per query; both towers fine-tuned with `finetune_image` (the
  paper); on a CPU the image tower stays frozen in both stages so that its features and
  tokens are cached, and a stage 2 from a stage 1 that trained it must train it too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from circe.backbones.base import Backbone
from circe.data.types import CIRSplit
from circe.methods.base import (
    FrozenBackboneMethod,
    MethodInputs,
    method_class,
    register_method,
    register_variant,
)
from circe.methods.checkpoint import load_checkpoint
from circe.methods.inputs import TokenFeatures
from circe.pseudo_targets.manifest import with_pseudo_targets

FUSIONS = ("adaptive", "mean")
ALIGNMENTS = ("text", "composed")


@dataclass(frozen=True)
class TMCIRConfig:
    stage: int = 2  # 1: intent-aware alignment on pseudo-targets; 2: adaptive token fusion
    # Stage 1: a directory written by `circe pseudo-targets` for the training split.
    pseudo_targets: str | None = None
    # Stage 2: the stage-1 checkpoint to start from (RUN_DIR or RUN_DIR/best); None: without
    # stage 1. Checkpoints of stage 2 hold the whole backbone, so a saved config has None
    # here and names the stage-1 checkpoint in `initialised_from` (a record, not read).
    init_from: str | None = None
    initialised_from: str | None = None
    fusion: str = "adaptive"  # adaptive (learned token weights) | mean (mean pooling)
    # Stage 2: merge image tokens into the text tokens they resemble before the weighting
    # (the paper's token merge); False is the weighting alone (`tmcir-token-weights`).
    merge: bool = True
    merge_ratio: float = 0.5  # share of the patch tokens merged away (the class token stays)
    # Stage 1: what is aligned with the pseudo-target: "text" alone (the paper) or
    # "composed", norm(v̂ + t̂) (`tmcir-composed-alignment`).
    alignment: str = "text"
    width: int = 128  # d, the fusion width both token streams are projected to
    heads: int = 4
    layers: int = 1  # context transformer layers before the weighting (0: none)
    expansion: int = 2  # their feed-forward width, in multiples of d
    dropout: float = 0.1
    # Stage 2 fine-tunes the text tower (stage 1 always does: that is its point).
    finetune_text: bool = True
    # Both stages: fine-tune the image tower too (the paper fine-tunes all encoders). Off by
    # default so that image features and tokens stay cached on a CPU.
    finetune_image: bool = False

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} does not split into {self.heads} heads")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if not 0.0 <= self.merge_ratio < 1.0:
            raise ValueError(f"merge_ratio must be in [0, 1), got {self.merge_ratio!r}")
        if self.stage == 1 and self.init_from:
            raise ValueError("init_from is stage 2's: stage 1 starts from the backbone")
        if self.stage == 2 and self.pseudo_targets:
            raise ValueError("pseudo_targets are stage 1's: stage 2 trains on the real targets")
        if self.init_from and not self.finetune_text:
            # A frozen tower's features are cached under the backbone's identity, which the
            # stage-1 text tower does not change: its features would pass for the original's.
            raise ValueError(
                "stage 2 from a stage-1 checkpoint fine-tunes the text tower it starts from; "
                "finetune_text: false is only possible without init_from"
            )


@dataclass
class Fused:
    """A batch of composed queries and the token weights that made them."""

    query: torch.Tensor  # [B, D] unit vectors
    weights: torch.Tensor  # [B, N + L] per-token weights a_i, image tokens first; 0 on padding
    image_share: torch.Tensor  # [B] w_v, the image tokens' total weight
    # [B, N] the text token each image token was merged into (-1: kept); None without merge
    merged_into: torch.Tensor | None = None


def _zero(layer: nn.Linear) -> nn.Linear:
    """An output layer that starts at zero."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class AdaptiveTokenFusion(nn.Module):
    """Stage 2's fusion: image and text tokens in context, one weight per token, the
    weighted tokens and the modality-weighted pooled features -> the query."""

    def __init__(
        self,
        image_shape: tuple[int, int],
        text_shape: tuple[int, int],
        out_dim: int,
        config: TMCIRConfig,
    ):
        super().__init__()
        (image_tokens, image_width), (text_tokens, text_width) = image_shape, text_shape
        d = config.width
        self.image_projection = nn.Sequential(nn.Linear(image_width, d), nn.LayerNorm(d))
        self.text_projection = nn.Sequential(nn.Linear(text_width, d), nn.LayerNorm(d))
        self.modality_embedding = nn.Parameter(0.02 * torch.randn(2, d))  # e_img, e_txt
        self.context = None
        if config.layers:
            layer = nn.TransformerEncoderLayer(
                d,
                config.heads,
                config.expansion * d,
                config.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.context = nn.TransformerEncoder(
                layer, config.layers, norm=nn.LayerNorm(d), enable_nested_tensor=False
            )
        # s(H_i): absent in mean pooling; otherwise it starts at zero (= mean pooling).
        self.scorer = None
        if config.fusion == "adaptive":
            self.scorer = nn.Sequential(
                nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), _zero(nn.Linear(d, 1))
            )
        self.output = _zero(nn.Linear(d, out_dim))  # W_o
        # The merge's positions: one embedding per patch and per word slot, so that which
        # patch resembles which word can depend on where the patch is (created last, and
        # only with the merge, so that the ablation without it starts from the same draws).
        self.merged_patches = 0
        if config.merge:
            self.merged_patches = round(config.merge_ratio * (image_tokens - 1))
            self.image_positions = nn.Parameter(0.02 * torch.randn(image_tokens, d))
            self.text_positions = nn.Parameter(0.02 * torch.randn(text_tokens, d))

    def token_weights(
        self, states: torch.Tensor, mask: torch.Tensor, image_tokens: int
    ) -> torch.Tensor:
        """`states [B, N + L, d]`, `mask [B, N + L]` (True on real tokens), the first
        `image_tokens` positions being the image's -> weights `[B, N + L]`, each row a
        distribution over the real tokens (exactly 0 on padding)."""
        is_image = torch.zeros_like(mask)
        is_image[:, :image_tokens] = True
        image_count = mask[:, :image_tokens].sum(dim=1, keepdim=True)  # [B, 1]
        text_count = mask[:, image_tokens:].sum(dim=1, keepdim=True)  # [B, 1]
        # − log n_mod: equal scores give each modality half of the weight.
        prior = -torch.where(is_image, image_count, text_count).clamp(min=1).log()
        scores = prior if self.scorer is None else prior + self.scorer(states).squeeze(-1)
        return torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)

    def merge(
        self, states: torch.Tensor, mask: torch.Tensor, image_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token merge across modalities: the `merged_patches` patch tokens most similar to a
        word (cosine of their contextual states) are merged into that word, each counted by
        its similarity, and leave the sequence (masked out; the shapes stay fixed).

            s_ij = cos(H_i, H_j),  i a patch, j a real text token;  j*(i) = argmax_j s_ij
            M = the patches with the largest s_ij*(i) (bipartite matching, as in ToMe)
            H_j ← (H_j + Σ_{i ∈ M, j*(i) = j} w_i H_i) / (1 + Σ w_i),  w_i = (1 + s_ij*)/2

        The class token (the whole image) never merges. The choice of M is discrete; the
        merged states and their weights w carry gradients, so training makes the words and
        the patches they absorb agree. -> (states, mask, `[B, N]` word index per image token
        or -1)."""
        n = image_tokens
        image, text = states[:, :n], states[:, n:]  # [B, N, d], [B, L, d]
        text_mask = mask[:, n:]  # [B, L]
        similarity = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).transpose(1, 2)
        similarity = similarity.masked_fill(~text_mask[:, None, :], -math.inf)  # [B, N, L]
        best, word = similarity.max(dim=-1)  # [B, N] each
        best = best.clone()
        best[:, 0] = -math.inf  # the class token stays
        chosen = best.topk(self.merged_patches, dim=-1).indices  # [B, r]
        selected = torch.zeros_like(mask[:, :n]).scatter(1, chosen, True)  # [B, N]
        weight = torch.where(selected, (1 + best.clamp(min=-1)) / 2, 0.0)  # [B, N] w_i
        assignment = F.one_hot(word, text.shape[1]).to(states.dtype) * weight[..., None]
        absorbed = assignment.transpose(1, 2) @ image  # [B, L, d]
        counts = assignment.sum(dim=1)[..., None]  # [B, L, 1]
        text = (text + absorbed) / (1 + counts)
        image_mask = mask[:, :n] & ~selected
        merged_into = torch.where(selected, word, -1)
        return (
            torch.cat([image, text], dim=1),
            torch.cat([image_mask, text_mask], dim=1),
            merged_into,
        )

    def forward(self, image: TokenFeatures, text: TokenFeatures) -> Fused:
        v, t = F.normalize(image.pooled, dim=-1), F.normalize(text.pooled, dim=-1)  # [B, D]
        n = image.tokens.shape[1]
        states = torch.cat(
            [
                self.image_projection(image.tokens) + self.modality_embedding[0],
                self.text_projection(text.tokens) + self.modality_embedding[1],
            ],
            dim=1,
        )  # [B, N + L, d]
        mask = torch.cat([image.mask, text.mask], dim=1)  # [B, N + L]
        if self.merged_patches:
            positions = torch.cat(
                [self.image_positions[:n], self.text_positions[: text.tokens.shape[1]]]
            )
            states = states + positions
        if self.context is not None:
            states = self.context(states, src_key_padding_mask=~mask)
        merged = None
        if self.merged_patches:
            states, mask, merged = self.merge(states, mask, n)
        weights = self.token_weights(states, mask, n)  # [B, N + L]
        image_share = weights[:, :n].sum(dim=1, keepdim=True)  # [B, 1]
        tokens = torch.einsum("bl,bld->bd", weights, states)  # [B, d]
        query = image_share * v + (1 - image_share) * t + self.output(tokens)
        return Fused(F.normalize(query, dim=-1), weights, image_share.squeeze(-1), merged)


@register_method("tmcir")
class TMCIR(FrozenBackboneMethod):
    """Stage 1: the text tower aligned on pseudo-targets; stage 2: adaptive token fusion
    (about 0.19M fusion parameters at d = 128 on circe-tiny, plus the text tower)."""

    # Checkpoints saved before the token merge and the text-alone stage 1 are the first design.
    settings_before_they_existed: ClassVar[dict] = {"merge": False, "alignment": "composed"}

    def __init__(self, backbone: Backbone, **config):
        self.config = c = TMCIRConfig(**config)
        super().__init__(backbone)
        if c.init_from:
            self._start_from_stage1(c.init_from)
        self.fusion = None
        if c.stage == 2:
            image_shape, text_shape = self.backbone.token_shapes()
            self.fusion = AdaptiveTokenFusion(image_shape, text_shape, backbone.embed_dim, c)

    def _start_from_stage1(self, path: str) -> None:
        """Load a stage-1 run's backbone (its aligned text tower) into this method's copy."""
        checkpoint = load_checkpoint(path)
        info = checkpoint.info
        if not (
            issubclass(method_class(info["method"]), TMCIR)
            and info["method_config"].get("stage") == 1
        ):
            raise ValueError(
                f"init_from {path}: stage 2 starts from a TMCIR stage-1 run, but this is a "
                f"run of {info['method']!r} {info['method_config']}"
            )
        if info["backbone"]["weights_sha256"] != self.backbone.identity.weights_sha256:
            raise ValueError(
                f"init_from {path}: stage 1 was trained on other backbone weights "
                f"({info['backbone']['weights']}); train stage 2 on the same backbone"
            )
        if info["method_config"].get("finetune_image") and not self.config.finetune_image:
            # Its image tower is not the backbone file's any more, but a frozen tower's
            # features are cached under the file's identity: they would pass for the original's.
            raise ValueError(
                f"init_from {path}: stage 1 fine-tuned the image tower, so stage 2 must too "
                "(finetune_image: true)"
            )
        prefix = "method.backbone."
        weights = {
            k.removeprefix(prefix): v for k, v in checkpoint.weights.items() if k.startswith(prefix)
        }
        self.backbone.load_state_dict(weights)
        self.config = replace(self.config, initialised_from=str(checkpoint.path))

    def config_dict(self) -> dict:
        # The checkpoint holds the whole backbone, stage 1's text tower included: recreating
        # the method from it must not read stage 1 again (`initialised_from` names it).
        return {**asdict(self.config), "init_from": None}

    @property
    def inputs(self) -> MethodInputs:
        """Stage 1 aligns pooled features and trains the text tower; stage 2 fuses token
        sequences, with the text tower trained when `finetune_text` says so."""
        c = self.config
        trains = {"text"} if c.stage == 1 or c.finetune_text else set()
        if c.finetune_image:
            trains.add("image")
        return MethodInputs(query="tokens" if c.stage == 2 else "pooled", trains=trains)

    def training_split(self, split: CIRSplit) -> CIRSplit:
        """Stage 1 trains on the pseudo-targets: every target swapped for its query's."""
        if self.config.stage == 2:
            return split
        if self.config.pseudo_targets is None:
            raise ValueError(
                "TMCIR stage 1 aligns the text with pseudo-target images: make them with "
                "`circe pseudo-targets --dataset D --generator G --out DIR` and give "
                "method_config pseudo_targets: DIR"
            )
        return with_pseudo_targets(split, self.config.pseudo_targets)

    # -- the contract ------------------------------------------------------------------------

    def encode_queries_from_features(
        self,
        image_features: torch.Tensor | TokenFeatures,
        text_features: torch.Tensor | TokenFeatures,
    ) -> torch.Tensor:
        if self.fusion is None:  # stage 1: q = norm(t̂), or norm(v̂ + t̂) when composed
            t = F.normalize(text_features, dim=-1)
            if self.config.alignment == "text":
                return t
            return F.normalize(F.normalize(image_features, dim=-1) + t, dim=-1)
        return self.fusion(image_features, text_features).query

    @torch.no_grad()
    def explain(self, reference_pixels: torch.Tensor, texts: list[str]) -> dict:
        """Stage 2, per query: the image and text shares (w_v, 1 − w_v), each text token with
        its weight, and the image tokens' weights (the class token's, and the patches' as a
        grid, row by row, when they form a square). All weights of a query sum to one."""
        if self.fusion is None:
            return {}
        token_ids = self.backbone.tokenize(texts).to(self.backbone.device)
        text = TokenFeatures(*self.backbone.encode_text(token_ids, tokens=True))
        fused = self.fusion(self.backbone_image_tokens(reference_pixels), text)
        names = self.backbone.token_strings(token_ids.cpu())
        n = fused.weights.shape[1] - token_ids.shape[1]  # image tokens: class + patches
        side = math.isqrt(n - 1)
        text_tokens, patch_weights = [], []
        for row, (weights, mask) in enumerate(zip(fused.weights, text.mask, strict=True)):
            kept = mask.nonzero().squeeze(-1).tolist()
            text_tokens.append([[names[row][i], weights[n + i].item()] for i in kept])
            patches = weights[1:n]
            patch_weights.append(
                patches.reshape(side, side).tolist() if side * side == n - 1 else patches.tolist()
            )
        return {
            "image_share": fused.image_share.tolist(),
            "text_share": (1 - fused.image_share).tolist(),
            "text_tokens": text_tokens,
            "image_class_weight": fused.weights[:, 0].tolist(),
            "image_patch_weights": patch_weights,
        }


register_variant(
    "tmcir-token-weights",
    TMCIR,
    "Ablation: the learned per-token weights without the token merge (circe's first TMCIR).",
    merge=False,
)
register_variant(
    "tmcir-composed-alignment",
    TMCIR,
    "Ablation of stage 1: (reference + text), not the text alone, aligned with the pseudo-target.",
    alignment="composed",
)
register_variant(
    "tmcir-mean-pool",
    TMCIR,
    "Ablation of `tmcir-token-weights`: mean pooling per modality instead of the learned "
    "per-token weights (no merge).",
    fusion="mean",
    merge=False,
)

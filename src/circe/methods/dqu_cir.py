"""DQU-CIR (Wen, Song, Chen, Wei, Nie, Chua; SIGIR 2024): raw-data level fusion.

Feature-level fusion can push the fused query off the pretrained image-text space. DQU-CIR
fuses the query before the encoders instead, into two single-modal queries (Dual Query
Unification), each read by the unchanged CLIP encoder of its modality:

    T_u = cap(I_r) + ", but " + m                  text-oriented unification  (§3.2)
    I_u = write(I_r, keywords(m))                  vision-oriented unification (§3.3)
    f_t = ℓ2(CLIP_text(T_u)),  f_v = ℓ2(CLIP_image(I_u))                       [B, d] each
    λ   = σ(MLP([f_t ‖ f_v]))                      adaptive weight             [B, 1]
    q   = ℓ2(λ·f_t + (1 − λ)·f_v)                  linear fusion               (§3.4)
    L   = InfoNCE(q, ℓ2(CLIP_image(I_t)))          with a learnable logit scale (§3.5)

The raw-data stage is `prepare_query` (see `circe.methods.base`): the data pipeline gives
it the reference image before preprocessing, with its caption, and `encode_queries` then
receives the pixels of I_u and the text T_u. When T_u is longer than the text encoder's
context, its caption is shortened (`fitted_unified_text`), never the modification. Captions come from the data set or a captions
file (`circe.data.captions`), key words from a rule-based extractor or a key-word file
(`circe.data.keywords`), and the words are drawn by `circe.data.render.write_words`.

Fine-tuning (`finetune`): the paper fine-tunes both CLIP towers. On a CPU the default
fine-tunes the text tower only: the image tower stays frozen, so every image feature (the
targets and the words-on-image queries, both deterministic) is computed once by the
trainer's feature cache, and only the small text tower runs per step. `"full"` is the
paper's setting (pixels every step); `"none"` trains the λ head alone.

The learnable logit scale of the loss is the trainer's learned temperature
(`circe.train.objective.ContrastiveObjective`), shared by every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from circe.backbones.base import Backbone
from circe.data.captions import CaptionFile
from circe.data.keywords import keyword_extractor
from circe.data.render import write_words
from circe.data.types import RawQuery
from circe.methods.base import (
    FrozenBackboneMethod,
    MethodInputs,
    register_method,
    register_variant,
)

LAMBDA_MODES = ("learned", "fixed", "text", "image")
FINETUNE_MODES = ("none", "text", "full")
# The paper's textual-query template (its code, FashionIQ / Shoes; CIRR lacks the space).
TEMPLATE = "{caption}, but {text}"


@dataclass(frozen=True)
class DQUCIRConfig:
    # How λ is chosen: "learned" (the paper: σ(MLP)), "fixed" (`fixed_lambda`), "text"
    # (λ = 1, the unified textual query alone), "image" (λ = 0, the visual query alone).
    lambda_mode: str = "learned"
    fixed_lambda: float = 0.5
    # Which CLIP towers are trained: "none", "text" (CPU default), "full" (the paper).
    finetune: str = "text"
    # Hidden width of the λ MLP (None: d, as in the paper) and its dropouts (the paper: 0.5).
    hidden: int | None = None
    dropout: float = 0.5
    # "dataset": the data set's own caption of the reference image; else a captions file.
    captions: str = "dataset"
    # "rules": `RuleKeywords`; else a key-word JSON file.
    keywords: str = "rules"
    template: str = TEMPLATE

    def __post_init__(self) -> None:
        if self.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"lambda_mode must be one of {LAMBDA_MODES}, got {self.lambda_mode!r}")
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if not 0.0 <= self.fixed_lambda <= 1.0:
            raise ValueError(f"fixed_lambda must be in [0, 1], got {self.fixed_lambda}")
        if "{caption}" not in self.template or "{text}" not in self.template:
            raise ValueError(f"template must contain {{caption}} and {{text}}: {self.template!r}")


def unified_text(caption: str, text: str, template: str = TEMPLATE) -> str:
    """Text-oriented unification T_u: the reference caption, then the modification."""
    if not caption or not caption.strip():
        raise ValueError("the reference image's caption is empty")
    if not text or not text.strip():
        raise ValueError("a modification text is empty: describe how the target differs")
    return template.format(caption=caption.strip(), text=text.strip())


def fitted_unified_text(caption: str, text: str, template: str, fits: Callable[[str], bool]) -> str:
    """T_u shortened until `fits` says the text encoder reads all of it: the caption loses
    its trailing parts (", "-separated), then its trailing words; the modification is never
    cut here. A long caption ("a small red circle in the top left, a large ...") plus the
    modification can exceed a small text context (circe-tiny: 48 tokens), and a tokenizer
    cuts from the end: the modification, the one part of the query that says what changes.
    """
    unified = unified_text(caption, text, template)
    if fits(unified):
        return unified
    parts = [part.strip() for part in caption.split(",") if part.strip()]
    shorter = [", ".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)]
    words = parts[0].split() if parts else []
    shorter += [" ".join(words[:n]) for n in range(len(words) - 1, 0, -1)]
    for candidate in shorter:
        unified = unified_text(candidate, text, template)
        if fits(unified):
            return unified
    return unified  # the modification alone is too long: the tokenizer cuts it


def unified_image(image: Image.Image, keywords: str) -> Image.Image:
    """Vision-oriented unification I_u: the key words written onto the reference image."""
    return write_words(image, keywords)


@register_method("dqu-cir")
class DQUCIR(FrozenBackboneMethod):
    """Dual query unification + adaptive linear fusion (λ head: about 2d² + d parameters)."""

    def __init__(self, backbone: Backbone, **config):
        self.config = DQUCIRConfig(**config)
        super().__init__(backbone)
        source = self.config.captions
        self.captions = None if source == "dataset" else CaptionFile(source)
        self.keywords = keyword_extractor(self.config.keywords)
        d = backbone.embed_dim
        hidden = self.config.hidden or d
        p = self.config.dropout
        self.weight_head = None
        if self.config.lambda_mode == "learned":
            # λ = σ(w3ᵀ Drop(ReLU(W2 Drop(ReLU(W1 [f_t ‖ f_v]))))): [B, 2d] -> [B, 1]
            self.weight_head = nn.Sequential(
                nn.Linear(2 * d, hidden),  # W1
                nn.ReLU(),
                nn.Dropout(p),
                nn.Linear(hidden, hidden),  # W2
                nn.ReLU(),
                nn.Dropout(p),
                nn.Linear(hidden, 1),  # w3
                nn.Sigmoid(),
            )

    @property
    def inputs(self) -> MethodInputs:
        """Pooled features of a prepared query; `finetune` none / text / full trains no tower,
        the text tower, or both."""
        towers = ("text", "image")[: FINETUNE_MODES.index(self.config.finetune)]
        return MethodInputs(query="pooled", trains=towers, prepares_queries=True)

    # -- query unification (raw data, before the encoders) ----------------------------------

    def caption_of(self, query: RawQuery) -> str:
        if self.captions is not None:
            return self.captions.caption(query.reference_id)
        if query.caption is None:
            raise ValueError(
                f"no caption for reference image {query.reference_id!r}: this data set has "
                "none; write a captions file with `circe caption` and pass it as "
                "method_config captions=PATH"
            )
        return query.caption

    def prepare_query(self, query: RawQuery) -> tuple[Image.Image, str]:
        """(I_u, T_u) of a raw query: the words-on-image query and the unified text."""
        text = fitted_unified_text(
            self.caption_of(query), query.text, self.config.template, self.backbone.fits_context
        )
        words = self.keywords.extract(query.text, query.query_id)
        return unified_image(query.image, words), text

    def prepare_fingerprint(self) -> dict:
        config = self.config
        return {
            "method": "dqu-cir",
            "template": config.template,
            "captions": config.captions,
            "keywords": config.keywords,
            "render": "write_words/1",
            "caption_fit": "trailing-parts/1",  # T_u's caption shortened to fit the context
        }

    # -- encoders ------------------------------------------------------------------------------

    def fusion_weight(self, f_t: torch.Tensor, f_v: torch.Tensor) -> torch.Tensor:
        """λ `[B, 1]` from unit features `[B, d]` each (§3.4, or the ablation's constant)."""
        mode = self.config.lambda_mode
        if mode == "learned":
            return self.weight_head(torch.cat([f_t, f_v], dim=-1))  # [B, 1]
        value = {"fixed": self.config.fixed_lambda, "text": 1.0, "image": 0.0}[mode]
        return f_t.new_full((len(f_t), 1), value)

    def encode_queries_from_features(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        """Features of I_u `[B, d]` and of T_u `[B, d]` -> the fused query `[B, d]`."""
        f_v = F.normalize(image_features, dim=-1)
        f_t = F.normalize(text_features, dim=-1)
        lam = self.fusion_weight(f_t, f_v)  # [B, 1]
        return F.normalize(lam * f_t + (1 - lam) * f_v, dim=-1)

    @torch.no_grad()
    def text_share(self, reference_pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """λ per query `[B]` (the paper's case study): the share of the textual query.
        Inputs as for `encode_queries`: pixels of I_u and the unified texts T_u."""
        f_v = F.normalize(self.backbone_image_features(reference_pixels), dim=-1)
        f_t = F.normalize(self.query_text_features(texts), dim=-1)
        return self.fusion_weight(f_t, f_v).squeeze(-1)

    def explain(self, reference_pixels: torch.Tensor, texts: list[str]) -> dict:
        return {"lambda": self.text_share(reference_pixels, texts).tolist()}


register_variant(
    "dqu-cir-text-only",
    DQUCIR,
    "Ablation: λ = 1, the unified textual query alone.",
    lambda_mode="text",
)
register_variant(
    "dqu-cir-image-only",
    DQUCIR,
    "Ablation: λ = 0, the words-on-image query alone.",
    lambda_mode="image",
)
register_variant(
    "dqu-cir-fixed",
    DQUCIR,
    "Ablation: a fixed λ (0.5 unless `fixed_lambda` says otherwise).",
    lambda_mode="fixed",
)

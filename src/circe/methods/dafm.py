"""DAFM: Dynamic Adaptive Fusion for multi-model collaboration in CIR (Cai, Mi, Ji, Rong,
Zhang, Li, Guo, Xie; 2025). No public code; this is our reading of the paper's abstract.

One model cannot see the whole picture and the fine details at once, and fixed fusion
weights let a fused query drift away from its target. DAFM runs several trained CIR models
(the members) side by side and weighs them per query.

Members: trained circe methods loaded from their checkpoints, any mix, on any backbones.
Each keeps its own embedding space, preprocessing and raw-query preparation (DQU-CIR writes
words on the image), so DAFM takes raw inputs (`MethodInputs(query="raw")`) and hands every member
its own. Members are frozen: no gradient ever reaches them.

Fusion at the similarity level, per member space (q_m, g_m: member m's unit embeddings), on
calibrated scores:
    z_m(q, g) = (cos_m(q_m, g_m) − μ_m(q)) / σ_m(q)                      member m's z-score
    score(q, g) = Σ_m w_m(q) · z_m(q, g)                                  fused score
    w(q) = softmax(gate([q_1 ‖ … ‖ q_M ‖ s_1 ‖ … ‖ s_M]))                 per-query weights
μ_m(q), σ_m(q): mean and spread of member m's cosines from q to a pool of K training
targets of its space (`anchors`), so that a member whose scores spread wider no longer
dominates at equal weights. s_m are the gate's statistics, read from member m's own short
list for the query: the z-scores of its top_k pool candidates (the best, its margin over
the second, their mean, the entropy of a softmax over them): how sure the member is about
this query, comparable across members. The gate's last layer starts at zero, so an
untrained DAFM is the equal-weight fusion of z-scores, one of the baselines it has to beat
(with the best single member, the raw-cosine `dafm-equal`, static weights tuned on val and
the cascade, which `circe bench fusion` reports).

One embedding space, for the contract and the index. The shift −Σ w_m μ_m / σ_m is the same
for every candidate of a query and changes no ranking, so only the scales remain: with
ŵ_m = (w_m / σ_m) / Σ_k (w_k / σ_k) (`fusion_weights`),
    query = normalize([ŵ_1 q_1 ‖ … ‖ ŵ_M q_M]),      target = [g_1 ‖ … ‖ g_M] / √M
query·target = Σ_m ŵ_m cos_m / (√M ‖ŵ‖): a positive factor per query, so every query ranks
the gallery exactly as the fused z-scores do, and a FAISS inner-product index over the
targets searches DAFM like any method. `fused_scores` recovers the fused similarity itself
from the two embeddings; the training loss uses it, so the gate cannot lower the loss
through that per-query factor (a sharper or softer softmax) instead of through the ranking.

Training: InfoNCE on the fused similarity with the trainer's learned temperature. The
members' embeddings of the training pairs and images are computed once per run
(`training_features`), so an epoch costs a few small matrix products on a CPU, and each
query is scored against every training image, as retrieval ranks them, rather than against
the batch's targets only (on a 1500-pair synthetic benchmark: +1.3 points of test R@1 over
in-batch negatives, mean of three gate seeds, the gate learning to drop a weaker member).
Frozen members embed an input the same way every time, so DAFM remembers their embeddings
by input (`_Memo`): the validation after every epoch then costs a gate pass, not a pass of
every member over the validation split.

Ablation: `dafm-first-design` (circe's first DAFM: raw cosines, and gate statistics — max,
mean, std, entropy of the raw cosines — over 256 fixed training targets).

Choices the paper leaves open, and ours: fusion of scores, not of embeddings (members live
in different spaces); frozen members; the gate's inputs (member queries and calibrated
short-list statistics); the candidate list that calibrates and feeds the statistics is a
fixed pool of training-split images, not the gallery being searched, so that a query's
embedding does not depend on the gallery and an index works (a z-score over the searched
gallery itself would need its covariance per member at query time); calibration by
z-score (a rank-based calibration would not survive as one embedding space); the gate
trained with InfoNCE over every training image.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from circe.backbones import file_sha256
from circe.backbones.base import Backbone
from circe.data.batching import loaded_batches
from circe.data.types import RawQuery
from circe.methods.base import (
    CIRMethod,
    MethodInputs,
    TrainingState,
    register_method,
    register_variant,
)
from circe.methods.checkpoint import load_checkpoint, load_trained_method
from circe.methods.inputs import FeaturePairs, Pairs, QueryFeatures
from circe.progress import Progress

# Per member, four statistics of its cosines to the pool (`DAFM.score_statistics`).
STATISTICS = 4
CALIBRATIONS = ("zscore", "none")
STATISTIC_KINDS = ("top-k", "anchors")
# Softmax temperature of the entropy statistic (a trained member's cosines to a gallery have
# a std of about 0.23 on the synthetic benchmark: 0.05 keeps the softmax far from uniform).
STATISTICS_TEMPERATURE = 0.05
# Memory for the member embeddings DAFM remembers by input (`_Memo`).
MEMO_BYTES = 256 * 2**20
_PIXELS = (
    "dafm cannot take pixels: each member preprocesses images (and DQU-CIR prepares queries) "
    "in its own way. Give it raw inputs (encode_raw_queries, encode_target_images, "
    "explain_raw), as circe's evaluation, index and search do."
)


@dataclass(frozen=True)
class DAFMConfig:
    # Checkpoints of the trained members: RUN_DIR or RUN_DIR/best of `circe train`.
    members: tuple[str, ...] = ()
    # sha256 of each member's weights, recorded when DAFM is first built and checked whenever
    # it is loaded again: a gate trained over other member weights would trust the wrong one.
    member_sha256: tuple[str, ...] = ()
    hidden: int = 128  # width of the gate's hidden layer
    dropout: float = 0.1
    # K training targets per member space: the candidate pool that calibrates each member's
    # scores and that the gate's statistics are read from.
    anchors: int = 1024
    # "zscore": each member's cosines to a query are z-scored over the pool before they are
    # weighed (a member whose scores spread wider no longer dominates); "none": raw cosines.
    calibration: str = "zscore"
    # The gate's score statistics: "top-k", from each member's top_k pool candidates for the
    # query, in z-scores; "anchors", max / mean / std / entropy of the raw cosines to the
    # whole pool (the first design).
    statistics: str = "top-k"
    top_k: int = 10

    def __post_init__(self) -> None:
        # Saved configs come back from JSON with lists; keep tuples (hashable, immutable).
        object.__setattr__(self, "members", tuple(str(m) for m in self.members))
        object.__setattr__(self, "member_sha256", tuple(self.member_sha256))
        if len(self.members) < 2:
            raise ValueError(
                "dafm fuses at least two trained methods: give their checkpoints as "
                "method_config members=[RUN_DIR/best, RUN_DIR/best, ...]"
            )
        if self.member_sha256 and len(self.member_sha256) != len(self.members):
            raise ValueError("member_sha256 must name one hash per member")
        if self.anchors < 2:
            raise ValueError(f"anchors must be at least 2, got {self.anchors}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}: {self.calibration!r}")
        if self.statistics not in STATISTIC_KINDS:
            raise ValueError(f"statistics must be one of {STATISTIC_KINDS}: {self.statistics!r}")
        if not 2 <= self.top_k <= self.anchors:
            raise ValueError(f"top_k must be between 2 and anchors ({self.anchors})")


def _load_member(path: str, number: int, backbone: Backbone) -> tuple[CIRMethod, str]:
    """A trained member in eval mode on `backbone`'s device (on `backbone` itself when it was
    trained on it: one copy in memory), and the sha256 of its weights file."""
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"dafm member {number} ({path}): {error}") from None
    member = load_trained_method(checkpoint.path, backbone.device, shared=backbone)
    return member, file_sha256(checkpoint.path / "model.safetensors")


def _unique_names(names: Iterable[str]) -> list[str]:
    """Method names, with #2, #3, ... on repeats (two combiners are two members)."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def _image_key(image: Image.Image) -> tuple:
    return image.mode, image.size, hashlib.blake2b(image.tobytes(), digest_size=16).digest()


def _query_key(query: RawQuery) -> tuple:
    """Everything a member's raw-data stage may read: the image's content and every field."""
    others = tuple(getattr(query, f.name) for f in fields(query) if f.name != "image")
    return _image_key(query.image), others


class _Memo:
    """Embeddings by input, for a pure function: frozen members always embed an input the
    same way, so DAFM's validation after every epoch (and a repeated query) costs a gate pass
    instead of a pass of every member. The least recently used entries go beyond `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.rows: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def embed(self, items: Sequence, key: Callable, encode: Callable) -> torch.Tensor:
        """`encode(items)` `[B, D]`, encoding only the items not remembered."""
        keys = [key(item) for item in items]
        new = [n for n, k in enumerate(keys) if k not in self.rows]
        if new:
            for n, row in zip(new, encode([items[n] for n in new]), strict=True):
                self.rows[keys[n]] = row
        rows = torch.stack([self.rows[k] for k in keys])
        for k in keys:
            self.rows.move_to_end(k)
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)
        return rows


def _encode_all(
    batches: Iterable, encode: Callable, total: int, progress: Progress, description: str
) -> torch.Tensor:
    return torch.cat([encode(batch).cpu() for batch in progress(batches, total, description)])


@register_method("dafm")
class DAFM(CIRMethod):
    """Per-query weighted fusion of trained members' similarities (gate: ~(ΣD + 4M)·h)."""

    requires = "trained member runs (config `members`: RUN_DIR/best of each)"
    # Checkpoints saved before calibration and top-k statistics are the first design.
    settings_before_they_existed: ClassVar[dict] = {"calibration": "none", "statistics": "anchors"}
    # Raw inputs, from which it computes its own training inputs (`training_features`). Its
    # own backbone (the trainer's `backbone`) only identifies the run and places the members
    # on their device: no tower trains, so it is not stored, like a frozen backbone.
    inputs = MethodInputs(query="raw")
    # False: every member weighs 1/M (`dafm-equal`), no gate.
    adaptive = True

    def __init__(self, backbone: Backbone, **config):
        super().__init__(backbone)
        config = DAFMConfig(**config)
        self.backbone.requires_grad_(False)
        loaded = [_load_member(p, n, backbone) for n, p in enumerate(config.members, 1)]
        hashes = tuple(sha for _, sha in loaded)
        # A new DAFM has no recorded hashes (nothing to check); a saved one has one per member.
        for n, (path, saved, now) in enumerate(
            zip(config.members, config.member_sha256, hashes, strict=False), 1
        ):
            if saved != now:
                raise ValueError(
                    f"dafm member {n} ({path}) has changed since this DAFM was trained "
                    f"(weights sha256 {now[:12]}, trained over {saved[:12]}): restore that "
                    "checkpoint, or train DAFM again over the current members"
                )
        # Absolute paths: the saved config must load the members from any directory.
        members = tuple(str(Path(p).absolute()) for p in config.members)
        self.config = replace(config, members=members, member_sha256=hashes)
        self.members = nn.ModuleList(member for member, _ in loaded)
        self.members.requires_grad_(False)
        self.member_names = _unique_names(member.name for member in self.members)
        with torch.no_grad():  # each member's embedding width, from one blank image
            probe = [Image.new("RGB", (32, 32), (127, 127, 127))]
            self.dims = [m.encode_target_images(probe).shape[-1] for m in self.members]
        width = sum(self.dims)
        self.memo = _Memo(MEMO_BYTES // (4 * width))  # rows of ΣD float32
        if self.calibrated or self.adaptive:
            # Member target embeddings of K training images, side by side: [K, ΣD].
            self.register_buffer("anchors", torch.zeros(config.anchors, width))
        if self.adaptive:
            count = len(self.members)
            self.gate = nn.Sequential(  # [B, ΣD + 4M] -> [B, M] logits
                nn.Linear(width + STATISTICS * count, config.hidden),
                nn.ReLU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden, count),
            )
            nn.init.zeros_(self.gate[-1].weight)  # start as the equal-weight fusion
            nn.init.zeros_(self.gate[-1].bias)
            # DAFM's target embeddings of every training image [I, ΣD], while it trains (set
            # by `training_features`; not saved).
            self.register_buffer("training_gallery", None, persistent=False)
        # The members live in their own checkpoints (named and hashed in the config), so
        # DAFM's state leaves them out, and loading it keeps the members as they are.
        self.register_state_dict_post_hook(_leave_out_members)
        self.register_load_state_dict_pre_hook(_keep_members)

    def train(self, mode: bool = True) -> DAFM:
        super().train(mode)
        self.backbone.eval()
        self.members.eval()  # frozen: no dropout in the members while the gate trains
        return self

    # -- the members ---------------------------------------------------------------------

    def split(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`[B, ΣD]` -> one `[B, D_m]` block per member."""
        return torch.split(features, self.dims, dim=-1)

    @torch.no_grad()
    def member_query_features(self, queries: Sequence[RawQuery]) -> torch.Tensor:
        """`[B, ΣD]`: every member's query embedding (its own preparation, preprocessing and
        space), side by side."""
        device = self.backbone.device

        def encode(batch: Sequence[RawQuery]) -> torch.Tensor:
            return torch.cat([m.encode_raw_queries(batch).to(device) for m in self.members], -1)

        return self.memo.embed(queries, _query_key, encode)

    @torch.no_grad()
    def member_target_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """`[N, ΣD]`: every member's target embedding of the images, side by side."""
        device = self.backbone.device

        def encode(batch: Sequence[Image.Image]) -> torch.Tensor:
            return torch.cat([m.encode_target_images(batch).to(device) for m in self.members], -1)

        return self.memo.embed(images, _image_key, encode)

    # -- the gate ------------------------------------------------------------------------

    @property
    def calibrated(self) -> bool:
        return self.config.calibration == "zscore"

    def pool_cosines(self, query_features: torch.Tensor) -> list[torch.Tensor]:
        """`[B, ΣD]` member query embeddings -> per member, its cosines `[B, K]` from each
        query to the K pool targets of its space."""
        return [
            query @ pool.T
            for query, pool in zip(
                self.split(query_features), self.split(self.anchors), strict=True
            )
        ]

    def score_statistics(self, cosines: list[torch.Tensor]) -> torch.Tensor:
        """Per member, four statistics of its pool cosines `[B, K]` -> `[B, 4M]`.

        "top-k": of the member's top_k candidates, in z-scores over the pool (so that they
        compare across members): the best one's z, its margin over the second, the mean z of
        the top_k, and the normalised entropy of a softmax over them (how peaked the member's
        short list is). "anchors": max, mean, std and normalised entropy of the raw cosines
        to the whole pool."""
        statistics = []
        for member in cosines:
            if self.config.statistics == "anchors":
                p = torch.softmax(member / STATISTICS_TEMPERATURE, dim=-1)
                entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(-1) / math.log(p.shape[-1])
                statistics += [member.amax(-1), member.mean(-1), member.std(-1), entropy]
                continue
            mean, spread = member.mean(-1, keepdim=True), _spread(member)
            top = (member.topk(self.config.top_k, dim=-1).values - mean) / spread  # [B, k]
            p = torch.softmax(top, dim=-1)
            entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(-1) / math.log(top.shape[-1])
            statistics += [top[:, 0], top[:, 0] - top[:, 1], top.mean(-1), entropy]
        return torch.stack(statistics, dim=-1)

    def member_scales(self, cosines: list[torch.Tensor]) -> torch.Tensor:
        """`[B, M]`: what each member's cosines are multiplied by before they are weighed:
        1 / σ_m(q), the spread of member m's cosines from query q over the pool (its
        z-score; the z-score's shift, −μ_m(q)/σ_m(q), is the same for every candidate of
        the query, so it changes no ranking and is left out), or 1 without calibration."""
        if not self.calibrated:
            return cosines[0].new_ones(len(cosines[0]), len(cosines))
        return 1 / torch.cat([_spread(member) for member in cosines], dim=-1)

    def member_weights(self, query_features: torch.Tensor) -> torch.Tensor:
        """w(q) `[B, M]`, the gate's weights (each row summing to one), from the member query
        embeddings `[B, ΣD]`; 1/M each without a gate."""
        if not self.adaptive:
            return query_features.new_full(
                (len(query_features), len(self.dims)), 1 / len(self.dims)
            )
        statistics = self.score_statistics(self.pool_cosines(query_features))
        return torch.softmax(self.gate(torch.cat([query_features, statistics], dim=-1)), dim=-1)

    def fusion_weights(self, query_features: torch.Tensor) -> torch.Tensor:
        """The weights the members' raw cosines are fused with `[B, M]`: w_m(q) / σ_m(q),
        rescaled to sum to one (a per-query factor, which changes no ranking)."""
        weights = self.member_weights(query_features)
        if not self.calibrated:
            return weights
        weights = weights * self.member_scales(self.pool_cosines(query_features))
        return weights / weights.sum(dim=-1, keepdim=True)

    # -- one space: the fused query and target embeddings --------------------------------

    def encode_queries_from_features(
        self, query_features: torch.Tensor, text_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Member query embeddings `[B, ΣD]` -> normalize([w_1 q_1 ‖ … ‖ w_M q_M]) `[B, ΣD]`.
        `text_features` is unused (the trainer's batches carry an empty `[B, 0]`): the
        members' query embeddings already hold the texts."""
        weights = self.fusion_weights(query_features)  # [B, M]
        sizes = torch.tensor(self.dims, device=weights.device)
        return F.normalize(query_features * weights.repeat_interleave(sizes, dim=-1), dim=-1)

    def encode_targets_from_features(self, target_features: torch.Tensor) -> torch.Tensor:
        """Member target embeddings `[N, ΣD]` -> [g_1 ‖ … ‖ g_M] / √M, unit length."""
        return target_features / math.sqrt(len(self.dims))

    def fused_scores(self, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ_m w_m cos_m(q_m, g_m) `[Q, N]` from DAFM embeddings `[Q, ΣD]`, `[N, ΣD]`.

        Query block m is w_m q_m / ‖w‖, so its norm is w_m / ‖w‖ and the block norms sum to
        1 / ‖w‖ (the weights sum to one); target block m is g_m / √M. Hence
        Σ_m w_m cos_m = √M · (query · target) / Σ_m ‖query block m‖.
        """
        block_norms = torch.stack([b.norm(dim=-1) for b in self.split(queries)], dim=-1)
        return math.sqrt(len(self.dims)) * (queries @ targets.T) / block_norms.sum(-1, True)

    def embedding_loss(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        temperature: float | torch.Tensor,
        state: TrainingState,
    ) -> torch.Tensor:
        """InfoNCE on the fused similarity of each query to every training image; the
        positive is the query's target."""
        gallery = self.training_gallery  # [I, ΣD]
        if gallery is None:
            raise RuntimeError("dafm trains from `training_features` (the trainer calls it)")
        # Each target is a row of the gallery, so its best match there is itself.
        labels = (targets @ gallery.T).argmax(dim=-1)  # [B]
        logits = self.fused_scores(queries, gallery) / temperature  # [B, I]
        return F.cross_entropy(logits, labels)

    # -- the contract, on raw inputs -----------------------------------------------------

    def encode_raw_queries(self, queries: Sequence[RawQuery]) -> torch.Tensor:
        return self.encode_queries_from_features(self.member_query_features(queries))

    def encode_target_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encode_targets_from_features(self.member_target_features(images))

    @torch.no_grad()
    def explain_raw(self, queries: Sequence[RawQuery]) -> dict:
        """Per query and member name: the gate's weight, and (calibrated) the weight its raw
        cosines get once divided by their spread."""
        features = self.member_query_features(queries)

        def by_name(weights: torch.Tensor) -> list[dict[str, float]]:
            return [dict(zip(self.member_names, row, strict=True)) for row in weights.tolist()]

        explanation = {"member_weights": by_name(self.member_weights(features))}
        if self.calibrated:
            explanation["cosine_weights"] = by_name(self.fusion_weights(features))
        return explanation

    def encode_queries(self, reference_pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        raise TypeError(_PIXELS)

    def encode_targets(self, pixels: torch.Tensor) -> torch.Tensor:
        raise TypeError(_PIXELS)

    def explain(self, reference_pixels: torch.Tensor, texts: list[str]) -> dict:
        raise TypeError(_PIXELS)

    # -- training ------------------------------------------------------------------------

    def training_features(
        self, pairs: Pairs, batch_size: int, workers: int, progress: Progress
    ) -> FeaturePairs:
        """The members' embeddings of the training pairs, computed once: queries `[P, ΣD]`
        and targets `[I, ΣD]` (one row per image of `pairs.images`). Also fixes the anchor
        targets of the score statistics (K images spread evenly over the training images)
        and the training gallery the loss ranks against."""
        gallery = pairs.split.gallery
        images = _encode_all(
            loaded_batches(pairs.images, gallery.open, batch_size, workers),
            self.member_target_features,
            -(-len(pairs.images) // batch_size),
            progress,
            "member targets",
        )  # [I, ΣD]
        queries = _encode_all(
            loaded_batches(range(len(pairs)), pairs.raw_query, batch_size, workers),
            self.member_query_features,
            -(-len(pairs) // batch_size),
            progress,
            "member queries",
        )  # [P, ΣD]
        if self.calibrated or self.adaptive:
            rows = torch.linspace(0, len(images) - 1, len(self.anchors)).round().long()
            self.anchors.copy_(images[rows])
        if self.adaptive:
            fused = self.encode_targets_from_features(images)  # [I, ΣD]
            self.training_gallery = fused.to(self.anchors.device)
        no_text = torch.empty(len(pairs.texts), 0)  # [T, 0]: the queries hold the texts
        queries = QueryFeatures(reference_features=queries, texts=pairs.texts, text=pairs.text)
        return FeaturePairs(pairs, images, no_text, queries)


def _spread(cosines: torch.Tensor) -> torch.Tensor:
    """`[B, K]` -> `[B, 1]` standard deviations, kept away from 0 (a pool of one image)."""
    return cosines.std(dim=-1, keepdim=True).clamp(min=1e-4)


def _leave_out_members(module: DAFM, state: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state if k.startswith(f"{prefix}members.")]:
        del state[key]


def _keep_members(module: DAFM, state: dict, prefix: str, *_) -> None:
    """Before DAFM's state is loaded: give every member its own current weights."""
    for key, value in module.members.state_dict(prefix=f"{prefix}members.").items():
        state.setdefault(key, value)


@register_method("dafm-equal", variant_of="dafm")
class DAFMEqual(DAFM):
    """Baseline: every member's raw cosines weigh 1/M for every query (nothing to train, so
    no pool to calibrate with; `circe bench fusion` also reports equal weights on z-scores,
    with the trained DAFM's pool)."""

    trainable = False
    adaptive = False

    def __init__(self, backbone: Backbone, **config):
        super().__init__(backbone, **{**config, "calibration": "none"})


register_variant(
    "dafm-first-design",
    DAFM,
    "Ablation: circe's first DAFM, raw cosines and gate statistics over 256 fixed "
    "training targets.",
    calibration="none",
    statistics="anchors",
    anchors=256,
)

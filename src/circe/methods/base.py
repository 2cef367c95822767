"""The method contract: two encoders into one space, and a training loss."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from circe.backbones.base import Backbone, TokensUnsupportedError
from circe.data.types import CIRSplit, RawQuery
from circe.methods.inputs import FeaturePairs, Pairs, TokenFeatures
from circe.progress import Progress

TOWERS = ("image", "text")


@dataclass(frozen=True)
class MethodInputs:
    """What a method consumes and what it trains: its one declaration, which the trainer,
    evaluation and the index read through `circe.methods.plan` (never each on its own).

    `query`, what the query-side fusion takes:
      - "pixels": the method runs its backbone on pixels itself; no feature path (a method
        that trains its whole backbone, the zero-shot baselines);
      - "pooled": pooled `[B, D]` backbone embeddings of each tower
        (`FrozenBackboneMethod.encode_queries_from_features`);
      - "tokens": `TokenFeatures` (pooled + token sequence + mask) of each tower; targets
        stay pooled;
      - "raw": decoded images and raw queries, which the method prepares and preprocesses
        itself (DAFM hands each member its own), and from which it computes its own
        training inputs (`CIRMethod.training_features`).
    `trains`: the backbone towers the method fine-tunes ("image", "text"); a tower not named
    is frozen, so its outputs are a pure function of the input and may be cached.
    `prepares_queries`: `prepare_query` changes the (image, text) before the encoders (DQU-CIR
    writes words on the image), so query-side caches key on the prepared inputs.
    """

    query: Literal["pixels", "pooled", "tokens", "raw"] = "pooled"
    trains: frozenset[str] = frozenset()
    prepares_queries: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.trains) - set(TOWERS)
        if unknown:
            raise ValueError(f"unknown towers {sorted(unknown)}: towers are {TOWERS}")
        object.__setattr__(self, "trains", frozenset(self.trains))


@dataclass(frozen=True)
class TrainingState:
    """Where training stands, for losses that change over a run (annealed soft labels,
    alternating updates): optimizer step `step` of `total_steps`."""

    step: int = 0
    total_steps: int = 1

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))


def contrastive_loss(
    queries: torch.Tensor, targets: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """Batch contrastive (InfoNCE) loss: query i's positive is target i, every other target
    of the batch is a negative. `queries [B, D]`, `targets [B, D]`, unit vectors."""
    logits = queries @ targets.T / temperature  # [B, B]
    labels = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, labels)


class CIRMethod(nn.Module, ABC):
    """A composed image retrieval model.

    `encode_targets` maps gallery images and `encode_queries` maps (reference image, text)
    pairs into one embedding space of unit vectors; retrieval is cosine top-k between them.
    """

    name: ClassVar[str]
    trainable: ClassVar[bool] = True
    # What must exist before this method can be created, for a user to read ("" = nothing):
    # DAFM fuses trained members, so it is not part of "every method" runs.
    requires: ClassVar[str] = ""
    # Config fields added after checkpoints of the method were already being saved, with the
    # value that rebuilds those checkpoints as they were trained (a saved config holds every
    # field it had, so only older ones miss any): `load_trained_method` fills them in.
    settings_before_they_existed: ClassVar[dict[str, Any]] = {}
    # What the method consumes and trains (a property where it depends on the config). A
    # plain method takes pixels and trains whatever of its backbone has gradients.
    inputs: MethodInputs = MethodInputs(query="pixels", trains=frozenset(TOWERS))

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def encode_targets(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[N, 3, H, W]` -> `[N, D]` unit vectors. Default: the backbone's image embedding."""
        return F.normalize(self.backbone.encode_image(pixels), dim=-1)

    @abstractmethod
    def encode_queries(self, reference_pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """`[B, 3, H, W]` + B texts -> `[B, D]` unit vectors."""

    # Raw-data stage of the query (additive to the two encoders). Before a reference image
    # is preprocessed into pixels, the data pipeline hands the method the raw query and uses
    # the (image, text) it returns: `encode_queries` then receives the pixels of that image
    # and that text. The default changes nothing, so a method that fuses features never
    # notices. A method that fuses raw data (DQU-CIR writes words onto the reference image
    # and puts its caption into the text) overrides it, and declares `prepares_queries` in its
    # `inputs` so that caches key the query side on the prepared inputs (`prepare_fingerprint`).

    def prepare_query(self, query: RawQuery) -> tuple[Image.Image, str]:
        """A raw query -> the (image, text) that `encode_queries` sees. Default: as given."""
        return query.image, query.text

    def prepare_fingerprint(self) -> dict:
        """What `prepare_query` depends on besides its input (for cache keys)."""
        return {}

    def explain(self, reference_pixels: torch.Tensor, texts: list[str]) -> dict:
        """What the method can say about how it composed these queries (for `circe search
        --explain`): e.g. a fusion weight per query. Inputs as for `encode_queries`.
        Default: nothing to say."""
        return {}

    # Raw inputs (additive to the two encoders). The pipeline (evaluation, indexing, search)
    # normally decodes images, preprocesses them with `backbone.preprocess` in DataLoader
    # workers and hands the encoders pixels. A method whose parts each need their own
    # preprocessing and query preparation (DAFM fuses trained methods on different
    # backbones) cannot take one pixel tensor: it declares `query="raw"`, and the pipeline
    # hands it decoded images and raw queries instead. The defaults below do what the pixel
    # path does, so every method keeps this raw-input pair of encoders (the contract test
    # drives each method so; DAFM drives its members so).

    def query_inputs(self, queries: Sequence[RawQuery]) -> tuple[torch.Tensor, list[str]]:
        """Raw queries -> what `encode_queries` takes: pixels `[B, 3, H, W]` (of the images
        `prepare_query` returns) on the backbone's device, and the texts it returns."""
        prepared = [self.prepare_query(query) for query in queries]
        pixels = torch.stack([self.backbone.preprocess(image) for image, _ in prepared])
        return pixels.to(self.backbone.device), [text for _, text in prepared]

    def encode_raw_queries(self, queries: Sequence[RawQuery]) -> torch.Tensor:
        """B raw queries -> `[B, D]` unit vectors."""
        return self.encode_queries(*self.query_inputs(queries))

    def encode_target_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """N decoded RGB images -> `[N, D]` unit vectors."""
        pixels = torch.stack([self.backbone.preprocess(image) for image in images])
        return self.encode_targets(pixels.to(self.backbone.device))

    def explain_raw(self, queries: Sequence[RawQuery]) -> dict:
        """`explain` for raw queries, with the texts the raw-data stage made of them (per
        query) where it changed them."""
        pixels, texts = self.query_inputs(queries)
        explanation = self.explain(pixels, texts)
        if texts != [query.text for query in queries]:
            explanation = {"prepared_text": texts, **explanation}
        return explanation

    def training_split(self, split: CIRSplit) -> CIRSplit:
        """The training split as this method trains on it; the trainer asks before anything
        is built from it. TMCIR's alignment stage swaps every target for the query's
        pseudo-target image. Default: as loaded."""
        return split

    def training_features(
        self, pairs: Pairs, batch_size: int, workers: int, progress: Progress
    ) -> FeaturePairs:
        """Training inputs that the method computes itself, once per run, in place of the
        trainer's pixels or cached backbone features: what a method that takes raw inputs
        trains from (DAFM: its members' outputs). Others never need it."""
        raise NotImplementedError(
            f"{self.name} takes raw inputs, so it must compute its own training inputs"
        )

    def config_dict(self) -> dict:
        """Keyword arguments that recreate this method with `create_method` (saved with
        checkpoints). Methods keep their settings as a dataclass in `self.config`."""
        config = getattr(self, "config", None)
        return asdict(config) if config is not None else {}

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """B texts -> `[B, D]` backbone text embeddings (not normalised)."""
        token_ids = self.backbone.tokenize(texts).to(self.backbone.device)
        return self.backbone.encode_text(token_ids)

    def encode_training_queries(
        self, reference_pixels: torch.Tensor, texts: list[str]
    ) -> torch.Tensor:
        """What the training loss reads of a batch of queries: `[B, D]` queries, or `[B, K, D]`
        where a method's loss also reads intermediate embeddings (FAR-Net's stage queries),
        the retrieval query first. Default: the retrieval queries."""
        return self.encode_queries(reference_pixels, texts)

    def encode_training_queries_from_features(
        self,
        image_features: torch.Tensor | TokenFeatures,
        text_features: torch.Tensor | TokenFeatures,
    ) -> torch.Tensor:
        """`encode_training_queries` from the features a feature-fed method trains on (cached
        backbone features; DAFM's member embeddings). Default: the retrieval queries."""
        return self.encode_queries_from_features(image_features, text_features)

    def embedding_loss(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        temperature: float | torch.Tensor,
        state: TrainingState,
    ) -> torch.Tensor:
        """The training loss of a batch's query and target embeddings `[B, D]` (row i of
        each is one triplet, gathered over processes; queries as `encode_training_queries`
        gives them). Default: the batch contrastive loss.
        A method with its own objective (DWC's soft labels and alternating streams)
        overrides this; the trainer calls it for every method."""
        return contrastive_loss(queries, targets, temperature)

    def resting_parameters(self, state: TrainingState) -> list[nn.Parameter]:
        """Parameters that must not change at this step (alternating schedules). The trainer
        drops their gradients before the optimizer step, so the optimizer leaves them as they
        are (no update from momentum or weight decay either). Default: none."""
        return []


class FrozenBackboneMethod(CIRMethod):
    """A method that trains only a fusion module on top of a frozen backbone.

    The fusion is written against backbone features (`encode_*_from_features`); the pixel
    and text entry points of the contract run the backbone and then the same functions, so
    training from cached features and inference share one code path. The trainer may
    compute `backbone_image_features` / `backbone_text_features` (and the `*_tokens` twins
    for a method whose `inputs.query` is "tokens") once per image and text, store them
    (`circe.train.cache`) and call the `*_from_features` functions directly.

    Such a method may still fine-tune towers, as its `inputs.trains` declares (set `config`
    before calling this `__init__` where that depends on it): the text tower alone (DQU-CIR's
    fast default; every image feature stays cacheable and the trainer hands the method the
    texts of a feature batch to encode with gradients, `query_text_features`), or both
    (DQU-CIR's paper setting; the trainer then feeds pixels, and `backbone_image_features`
    must keep gradients).
    """

    inputs = MethodInputs(query="pooled")

    def __init__(self, backbone: Backbone):
        towers = self.inputs.trains
        if towers:
            # Fine-tuning changes the weights: work on a copy so that a backbone shared with
            # other methods (evaluation, tests) is left as it was.
            backbone = copy.deepcopy(backbone)
        super().__init__(backbone)
        # Frozen: no gradients (and so no optimizer state) for the backbone. This flags the
        # backbone object itself, which is what frozen means when it is shared ...
        self.backbone.requires_grad_(False)
        for tower in sorted(towers):  # ... except for the towers the method fine-tunes
            for parameter in backbone.tower_parameters(tower):
                parameter.requires_grad_(True)

    def train(self, mode: bool = True) -> FrozenBackboneMethod:
        super().train(mode)
        self.backbone.eval()  # a frozen backbone never runs in training mode (dropout etc.)
        return self

    def backbone_image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, D]` pooled image embeddings (not normalised): what is cached,
        or, when the method trains its image tower, computed with gradients."""
        with torch.set_grad_enabled(self._image_tower_learns()):
            return self.backbone.encode_image(pixels)

    def _image_tower_learns(self) -> bool:
        return "image" in self.inputs.trains and torch.is_grad_enabled()

    @torch.no_grad()
    def backbone_text_features(self, texts: list[str]) -> torch.Tensor:
        """B texts -> `[B, D]` pooled text embeddings (not normalised): what is cached."""
        return self.encode_texts(texts)

    def backbone_image_tokens(self, pixels: torch.Tensor) -> TokenFeatures:
        """`[B, 3, H, W]` -> the image tower's `TokenFeatures`: what a token method caches (with
        gradients when the method trains its image tower)."""
        with torch.set_grad_enabled(self._image_tower_learns()):
            return TokenFeatures(*self.backbone.encode_image(pixels, tokens=True))

    @torch.no_grad()
    def backbone_text_tokens(self, texts: list[str]) -> TokenFeatures:
        """B texts -> the text tower's `TokenFeatures`: what a token method caches."""
        return self.encode_text_tokens(texts)

    def encode_text_tokens(self, texts: list[str]) -> TokenFeatures:
        """B texts -> the text tower's `TokenFeatures` (with gradients where it is trained)."""
        token_ids = self.backbone.tokenize(texts).to(self.backbone.device)
        return TokenFeatures(*self.backbone.encode_text(token_ids, tokens=True))

    def query_image_features(self, pixels: torch.Tensor) -> torch.Tensor | TokenFeatures:
        """Reference pixels -> what `encode_queries_from_features` takes for the image:
        pooled `[B, D]` features, or `TokenFeatures` for a method that takes tokens."""
        if self.inputs.query == "tokens":
            return self.backbone_image_tokens(pixels)
        return self.backbone_image_features(pixels)

    def query_text_features(self, texts: list[str]) -> torch.Tensor | TokenFeatures:
        """B texts -> `[B, D]` text features for the query (`TokenFeatures` for a method that
        takes tokens), with gradients when the method trains its text tower; otherwise the
        cached kind."""
        tokens = self.inputs.query == "tokens"
        if "text" in self.inputs.trains:
            return self.encode_text_tokens(texts) if tokens else self.encode_texts(texts)
        if tokens:
            return self.backbone_text_tokens(texts)
        return self.backbone_text_features(texts)

    def encode_targets(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_targets_from_features(self.backbone_image_features(pixels))

    def encode_queries(self, reference_pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.encode_queries_from_features(
            self.query_image_features(reference_pixels), self.query_text_features(texts)
        )

    def encode_training_queries(
        self, reference_pixels: torch.Tensor, texts: list[str]
    ) -> torch.Tensor:
        return self.encode_training_queries_from_features(
            self.query_image_features(reference_pixels), self.query_text_features(texts)
        )

    def encode_targets_from_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """`[N, D]` backbone image features -> `[N, D]` unit vectors. Default: normalise."""
        return F.normalize(image_features, dim=-1)

    @abstractmethod
    def encode_queries_from_features(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        """`[B, D]` reference image features + `[B, D]` text features -> `[B, D]` unit vectors
        (`TokenFeatures` of each instead, for a method that takes tokens)."""


class OptionalTextTuning:
    """For a `FrozenBackboneMethod` whose config has `finetune_text`: set, the method
    fine-tunes its text tower (the image tower stays frozen, so image features stay cached),
    and its checkpoints then carry the backbone with the fusion that fits it."""

    @property
    def inputs(self) -> MethodInputs:
        return MethodInputs(query="pooled", trains={"text"} if self.config.finetune_text else ())


_REGISTRY: dict[str, type[CIRMethod]] = {}
_VARIANT_OF: dict[str, str] = {}  # ablation or baseline variant -> the method it varies
M = TypeVar("M", bound=CIRMethod)


def register_method(
    name: str, variant_of: str | None = None
) -> Callable[[type[CIRMethod]], type[CIRMethod]]:
    """Class decorator: make a method creatable by name (`create_method`); `variant_of`: the
    registered method this one is an ablation or baseline of (listed under it)."""

    def add(cls: type[CIRMethod]) -> type[CIRMethod]:
        if name in _REGISTRY:
            raise ValueError(f"method name {name!r} is registered twice")
        if variant_of is not None and variant_of not in _REGISTRY:
            raise ValueError(f"{name!r} is a variant of {variant_of!r}, which is not registered")
        cls.name = name
        _REGISTRY[name] = cls
        if variant_of is not None:
            _VARIANT_OF[name] = variant_of
        return cls

    return add


def register_variant(name: str, base: type[M], doc: str, **settings) -> type[M]:
    """Register an ablation of `base` as `name`: the same class with some config `settings`
    fixed by default (settings given to `create_method` still win, so a saved config
    recreates the variant exactly)."""

    def __init__(self, backbone: Backbone, **config):
        base.__init__(self, backbone, **{**settings, **config})

    class_name = "".join(part.capitalize() for part in name.split("-"))
    namespace = {"__init__": __init__, "__doc__": doc, "__module__": base.__module__}
    return register_method(name, variant_of=base.name)(type(class_name, (base,), namespace))


def list_methods(variants: bool = True) -> list[str]:
    """Registered names, sorted; `variants=False`: the methods alone, without their
    ablation and baseline variants."""
    return sorted(n for n in _REGISTRY if variants or n not in _VARIANT_OF)


def variant_of(name: str) -> str | None:
    """The method that `name` is a variant of; None for a method of its own."""
    method_class(name)  # an unknown name is an error, not "no variant"
    return _VARIANT_OF.get(name)


def standalone_methods() -> list[str]:
    """What "every method" means (`circe bench quality` without `--method`): each method
    but not its variants, and not one that needs other trained runs first (`requires`)."""
    return [n for n in list_methods(variants=False) if not _REGISTRY[n].requires]


def method_class(name: str) -> type[CIRMethod]:
    """The class registered as `name` (to ask e.g. `trainable` before building anything)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; choose one of: {', '.join(list_methods())}"
        ) from None


def create_method(name: str, backbone: Backbone, **config) -> CIRMethod:
    cls = method_class(name)
    try:
        return cls(backbone, **config)
    except TokensUnsupportedError as error:  # raised while the method sizes its layers
        raise TokensUnsupportedError(
            f"method {name} fuses the token sequences of both towers, and {error}"
        ) from None

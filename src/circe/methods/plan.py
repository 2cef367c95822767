"""The one reading of a method's declared inputs (`MethodInputs`).

The trainer, evaluation and the index each need to know how to feed a method: pixels, cached
backbone features (pooled or token sequences, of the prepared query or the plain one), or raw
inputs; whether its backbone goes into checkpoints; whether a gallery's image features can
be reused. They ask here, so a method that fits an existing shape is one file and one
registry line, and a new shape is one change in this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from circe.data.types import RawQuery
from circe.methods.base import CIRMethod, FrozenBackboneMethod


@dataclass(frozen=True)
class TrainingFeed:
    """Where the trainer's batches come from.

    `source`: "method" (the method computes its own inputs, `training_features`), "pixels"
    (decoded every step), or "features" (backbone outputs computed once and cached). With
    "features", `references` says what the query's image side is (pooled features of the
    reference image, its token sequences, or pooled features of the *prepared* reference
    image) and `texts` what the text side is (cached pooled features or token sequences, or
    "encoded": the method encodes the texts itself, with gradients, because it trains its
    text tower). Targets are always cached pooled image features.
    """

    source: Literal["method", "pixels", "features"]
    references: Literal["pooled", "tokens", "prepared"] | None = None
    texts: Literal["pooled", "tokens", "encoded"] | None = None


def training_feed(method: CIRMethod, feature_cache: bool = True) -> TrainingFeed:
    """How the trainer feeds `method` (`feature_cache=False`: never from the cache)."""
    inputs = method.inputs
    if inputs.query == "raw":
        return TrainingFeed("method")
    cacheable = (
        isinstance(method, FrozenBackboneMethod)
        and inputs.query in ("pooled", "tokens")
        and "image" not in inputs.trains
    )
    if not (feature_cache and cacheable):
        return TrainingFeed("pixels")
    if inputs.prepares_queries and inputs.query == "tokens":
        raise NotImplementedError(
            f"{method.name}: the feature cache holds no token sequences of prepared queries; "
            "train this method with feature_cache: false"
        )
    references = "prepared" if inputs.prepares_queries else inputs.query
    texts = "encoded" if "text" in inputs.trains else inputs.query
    return TrainingFeed("features", references, texts)


def query_preparation(method: CIRMethod) -> Callable[[RawQuery], tuple[Image.Image, str]] | None:
    """The method's raw-data stage for a pixel pipeline, or None where it changes nothing
    (the pipeline then skips building raw queries)."""
    return method.prepare_query if method.inputs.prepares_queries else None


def takes_raw_inputs(method: CIRMethod) -> bool:
    """Whether the pipeline hands the method decoded images and raw queries (it preprocesses
    them itself) instead of pixels."""
    return method.inputs.query == "raw"


def reuses_gallery_features(method: CIRMethod) -> bool:
    """Whether a gallery's pooled backbone image features serve both sides for as long as the
    method lives: its image tower is frozen and its queries take the reference image as it
    is, as pooled features (the fusion may train; the features under it cannot change)."""
    inputs = method.inputs
    return (
        isinstance(method, FrozenBackboneMethod)
        and inputs.query == "pooled"
        and not inputs.prepares_queries
        and "image" not in inputs.trains
    )


def stores_backbone(method: CIRMethod) -> bool:
    """Whether checkpoints hold the method's backbone: only where it trains a tower; a frozen
    backbone is identified by its weights hash and loaded from its own file."""
    return bool(method.inputs.trains)

"""What made an index's embeddings, so that a query is only ever compared with its own kind.

Vectors from two different models live in unrelated spaces: their cosine scores are
meaningless, and nothing in the numbers shows it. So every embedding space of an index
records the identity of the method that filled it: method name and config, the backbone's
weights hash, and for a trained method the checkpoint and its weights hash. The search side
loads that same method back from the record, and refuses a method whose identity differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from circe.backbones import file_sha256, load_backbone
from circe.methods.base import CIRMethod, create_method
from circe.methods.checkpoint import load_checkpoint, load_trained_method

# The fields that decide whether two methods embed into the same space. Where the files
# were loaded from (`source`) does not: a moved checkpoint with the same bytes is the same.
_COMPARED = ("method", "method_config", "backbone_sha256", "image_size", "embed_dim")


class IdentityMismatchError(ValueError):
    """A query method differs from the method an index space was built with."""


@dataclass(frozen=True)
class MethodSource:
    """How to load a method again: a trained checkpoint, or a method name on a backbone."""

    method: str | None = None
    backbone: str = "default"
    weights: str | None = None  # the backbone's local weights file, when the spec needs one
    checkpoint: str | None = None  # RUN_DIR/best of `circe train`; then the rest is unused

    def load(self) -> CIRMethod:
        """The method, in eval mode (raises the loaders' own clear errors)."""
        if self.checkpoint is not None:
            return load_trained_method(self.checkpoint)
        if self.method is None:
            raise ValueError("name a method (or a trained checkpoint) to load")
        return create_method(self.method, load_backbone(self.backbone, self.weights)).eval()


@dataclass(frozen=True)
class MethodIdentity:
    """The identity of a loaded method; stored as `identity.json` in each index space."""

    method: str
    method_config: dict[str, Any]
    backbone: str  # the backbone's short identity, e.g. "circe-tiny@147963ae1162"
    backbone_sha256: str
    image_size: int
    embed_dim: int
    checkpoint_sha256: str | None
    # How the backbone turns inputs into tensors (`Backbone.inputs_sha256`); "" in
    # identities written before it was recorded, which are then not compared on it.
    backbone_inputs_sha256: str = ""
    source: MethodSource = field(default_factory=MethodSource)

    @property
    def weights_sha256(self) -> str:
        """One hash over every weight that shapes the embeddings (backbone + checkpoint)."""
        parts = f"{self.backbone_sha256}:{self.checkpoint_sha256 or ''}"
        return hashlib.sha256(parts.encode()).hexdigest()

    def describe(self) -> str:
        trained = f" (checkpoint {self.source.checkpoint})" if self.source.checkpoint else ""
        return f"method {self.method!r}{trained} on backbone {self.backbone}"

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["weights_sha256"] = self.weights_sha256
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> MethodIdentity:
        fields = {k: v for k, v in record.items() if k != "weights_sha256"}
        fields["source"] = MethodSource(**fields["source"])
        return cls(**fields)

    def differences(self, other: MethodIdentity) -> list[str]:
        """The compared fields where `other` differs from this identity, as 'name: a != b'."""
        mine, theirs = self.to_json(), other.to_json()
        compared = [*_COMPARED, "checkpoint_sha256"]
        if mine["backbone_inputs_sha256"] and theirs["backbone_inputs_sha256"]:
            compared.append("backbone_inputs_sha256")
        return [
            f"{name}: {mine[name]!r} != {theirs[name]!r}"
            for name in compared
            if mine[name] != theirs[name]
        ]

    def check_same(self, other: MethodIdentity, where: str) -> None:
        """Raise a clear error when `other` would embed into a different space."""
        differences = self.differences(other)
        if differences:
            raise IdentityMismatchError(
                f"{where} was built with {self.describe()}, but the query uses "
                f"{other.describe()} ({'; '.join(differences)}). Their vectors are not "
                "comparable: search without --method/--checkpoint to use the index's own "
                "method, or build an index space with this method (circe index ... --space)."
            )


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A config as it reads back from JSON (tuples become lists), so that comparisons of a
    live config with a stored one compare like with like."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def identity_of(method: CIRMethod, source: MethodSource) -> MethodIdentity:
    """The identity of `method`, loaded from `source`."""
    backbone = method.backbone.identity
    checkpoint_sha256 = None
    if source.checkpoint is None:  # absolute, so the index loads it back from any directory
        weights = None if source.weights is None else str(Path(source.weights).resolve())
        source = MethodSource(method=method.name, backbone=source.backbone, weights=weights)
    else:
        resolved = load_checkpoint(source.checkpoint).path  # RUN_DIR -> RUN_DIR/best/...
        checkpoint_sha256 = file_sha256(resolved / "model.safetensors")
        source = MethodSource(checkpoint=str(Path(source.checkpoint).resolve()))
    return MethodIdentity(
        method=method.name,
        method_config=_plain(method.config_dict()),
        backbone=backbone.short(),
        backbone_sha256=backbone.weights_sha256,
        image_size=backbone.image_size,
        embed_dim=backbone.embed_dim,
        checkpoint_sha256=checkpoint_sha256,
        backbone_inputs_sha256=backbone.inputs_sha256,
        source=source,
    )

"""The one interface every vision-language backbone exposes to the methods."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

# Sentences a tokenizer is checked and fingerprinted with: ordinary words, a relation,
# punctuation, case and a long word that needs several pieces.
PROBE_SENTENCES = (
    "a photo of a small red circle left of the blue square",
    "Same shirt, but Longer sleeves!",
    "unbelievably",
)


class WeightsNotFoundError(FileNotFoundError):
    """Raised when a backbone's weights are not on disk (circe never downloads them)."""


class CorruptWeightsError(ValueError):
    """Raised when a weights file cannot be read at all: truncated, or not a checkpoint."""


class TokensUnsupportedError(ValueError):
    """Raised when a method that fuses token sequences meets a tower that cannot give them
    (a ValueError: a choice the user made, refused before any data is read)."""


# How many names of missing, unexpected or reshaped tensors an error shows (a wrong
# architecture mismatches hundreds; the first few say which way it is wrong).
SHOWN_KEYS = 3


def _some(kind: str, keys: list[str]) -> str:
    more = f", and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} {kind} ({', '.join(keys[:SHOWN_KEYS])}{more})"


def fit_weights(path: Path, what: str, load: Callable[[], Any]) -> None:
    """Run `load`, which reads the weights file `path` into `what` (a model) without
    strictness and returns its incompatible keys (`missing_keys`, `unexpected_keys`), and
    turn each way it can fail into one short error: a file that cannot be read is
    `CorruptWeightsError`; weights of another architecture are a `ValueError` that counts
    the missing, unexpected and reshaped tensors and names the first few of each."""
    try:
        incompatible = load()
    except RuntimeError as error:
        reshaped = re.findall(r"size mismatch for ([\w.]+)", str(error))
        if not reshaped:
            raise CorruptWeightsError(_unreadable(path, error)) from None
        raise ValueError(
            f"{path} does not fit {what}: {_some('tensors of another shape', reshaped)}"
        ) from None
    except AssertionError as error:  # open_clip's own shape checks while it adapts a file
        raise ValueError(f"{path} does not fit {what}: {error}") from None
    # Reading an arbitrary file: the parsers raise whatever its bytes lead them to
    # (SafetensorError, UnpicklingError, IndexError from torch's unpickler, EOFError, ...).
    except Exception as error:  # noqa: BLE001
        raise CorruptWeightsError(_unreadable(path, error)) from None
    wrong = [
        _some(kind, list(keys))
        for kind, keys in (
            ("missing", incompatible.missing_keys),
            ("unexpected", incompatible.unexpected_keys),
        )
        if keys
    ]
    if wrong:
        raise ValueError(f"{path} does not fit {what}: " + "; ".join(wrong))


def _unreadable(path: Path, error: Exception) -> str:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return (
        f"{path} is truncated or not a checkpoint (a .safetensors, .pt or .bin state dict "
        f"was expected): {type(error).__name__}: {first_line}"
    )


@dataclass(frozen=True)
class BackboneIdentity:
    """What made an embedding: stored with caches and indexes so mismatches are caught."""

    spec: str  # e.g. "open_clip:ViT-B-32" or "hf:/models/clip"
    weights: str  # path or "builtin:<name>"
    weights_sha256: str
    image_size: int
    embed_dim: int
    # How inputs become tensors (`Backbone.inputs_sha256`): preprocessing, tokenizer, context
    # length. Empty in records written before it existed.
    inputs_sha256: str = ""

    def short(self) -> str:
        return f"{self.spec}@{self.weights_sha256[:12]}"


class Backbone(torch.nn.Module, ABC):
    """A CLIP-like model: an image tower and a text tower into one embedding space.

    `tokens=False` returns the pooled, projected embedding `[B, D]` (not normalised);
    `tokens=True` returns `(pooled [B, D], tokens [B, L, W], mask [B, L])` where the token
    sequence is the tower's last hidden states (before pooling) and `mask` is True on real
    tokens (all True for image patches).
    """

    identity: BackboneIdentity
    # Name prefixes (relative to this module) of the image tower's parameters. Every other
    # parameter, except the contrastive temperature, belongs to the text tower. Methods that
    # fine-tune one tower only (DQU-CIR) select parameters with `tower_parameters`.
    image_tower_prefixes: ClassVar[tuple[str, ...]] = ()

    def tower_parameters(self, tower: str) -> list[torch.nn.Parameter]:
        """The parameters of the `"image"` or `"text"` tower."""
        if tower not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        if not self.image_tower_prefixes:
            raise NotImplementedError(f"{type(self).__name__} does not name its image tower")
        chosen = []
        for name, parameter in self.named_parameters():
            if name.rsplit(".", 1)[-1] in ("logit_scale", "logit_bias"):
                continue  # the pretraining temperature belongs to neither tower
            in_image = name.startswith(self.image_tower_prefixes)
            if in_image == (tower == "image"):
                chosen.append(parameter)
        return chosen

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> `[3, H, W]` float tensor, exactly as the checkpoint expects."""

    @abstractmethod
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Strings -> `[B, L]` token ids."""

    def fits_context(self, text: str) -> bool:
        """Whether `text` reaches the text encoder whole: its tokens end before the context
        does (a tokenizer silently cuts what does not fit). Without a `text_mask` to read
        the tokens by, a backbone says yes."""
        text_mask = getattr(self, "text_mask", None)
        if text_mask is None:
            return True
        return not bool(text_mask(self.tokenize([text]))[0, -1])

    def token_strings(self, token_ids: torch.Tensor) -> list[list[str]]:
        """`[B, L]` ids -> each token as text (explanations name the tokens they weigh).
        Default, for a tokenizer that cannot say: the ids themselves."""
        return [[f"#{i}" for i in row] for row in token_ids.tolist()]

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor, tokens: bool = False):
        """`[B, 3, H, W]` -> `[B, D]` (or the token triple, see class doc)."""

    @abstractmethod
    def encode_text(self, token_ids: torch.Tensor, tokens: bool = False):
        """`[B, L]` -> `[B, D]` (or the token triple, see class doc)."""

    @torch.no_grad()
    def token_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(L, W) of the image and of the text `tokens=True` sequences (methods size their
        token projections with them, when they are built). Default: read off one probe
        forward of each tower; a tower without token sequences is `TokensUnsupportedError`."""
        size = self.identity.image_size
        try:
            _, image_tokens, _ = self.encode_image(
                torch.zeros(1, 3, size, size, device=self.device), tokens=True
            )
            _, text_tokens, _ = self.encode_text(self.tokenize(["a"]).to(self.device), tokens=True)
        except NotImplementedError as error:
            raise TokensUnsupportedError(
                f"backbone {self.identity.spec} gives no token sequences: {error}"
            ) from None
        return tuple(image_tokens.shape[1:]), tuple(text_tokens.shape[1:])

    def train_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> `[3, H, W]` with training-time augmentation (random crops), ending
        in the same tensor layout and normalisation as `preprocess`."""
        raise NotImplementedError(f"{type(self).__name__} has no training transform")

    def enable_gradient_checkpointing(self, towers: frozenset[str]) -> None:
        """Recompute the activations of `towers` ("image", "text") in the backward pass;
        `NotImplementedError` naming the tower where it cannot."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")

    def input_files(self) -> list[Path]:
        """Files besides the weights that shape how inputs become tensors (a transformers
        directory's tokenizer and image processor files). Default: none (open_clip's come
        with the package)."""
        return []

    def inputs_sha256(self) -> str:
        """A hash of everything between raw inputs and the towers: the pixels the
        preprocessing makes of a fixed probe image, the token ids of fixed probe sentences
        (their length is the context length), and `input_files`. A changed tokenizer,
        transform or context length changes it, and so every cache key and index identity
        that includes it, even where the weights are the same."""
        digest = hashlib.sha256()
        probe = Image.linear_gradient("L").resize((97, 61)).convert("RGB")  # not square
        digest.update(self.preprocess(probe).contiguous().numpy().tobytes())
        token_ids = self.tokenize(list(PROBE_SENTENCES))
        digest.update(str(tuple(token_ids.shape)).encode())
        digest.update(token_ids.to(torch.int64).numpy().tobytes())
        for path in sorted(self.input_files()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def record_inputs(self) -> None:
        """Put `inputs_sha256` into `identity` (a backbone calls it last in `__init__`)."""
        self.identity = replace(self.identity, inputs_sha256=self.inputs_sha256())

    @property
    def embed_dim(self) -> int:
        return self.identity.embed_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

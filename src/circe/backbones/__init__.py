"""Vision-language backbones: one `load_backbone(spec, weights)` entry point.

Accepted specs (circe never downloads weights; every file must already be on disk):

- `"default"` / `"circe-tiny"`: the small open_clip model that ships with circe
  (`default/circe-tiny.json` + `default/circe-tiny.safetensors`, made by `circe pretrain`).
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
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_NAME",
    "DEFAULT_WEIGHTS_PATH",
    "Backbone",
    "BackboneIdentity",
    "CorruptWeightsError",
    "HFClipBackbone",
    "OpenClipBackbone",
    "TokensUnsupportedError",
    "WeightsNotFoundError",
    "build_openclip_model",
    "file_sha256",
    "load_backbone",
    "register_builtin_config",
]

DEFAULT_NAME = "circe-tiny"
# The shipped open_clip architecture config, and where its trained weights live (the weights
# file is produced by `circe pretrain`; it may be absent in a fresh checkout).
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "default" / f"{DEFAULT_NAME}.json"
DEFAULT_WEIGHTS_PATH = DEFAULT_CONFIG_PATH.with_suffix(".safetensors")

_DEFAULT_ALIASES = ("default", DEFAULT_NAME)

_SPEC_FORMS = (
    '"default" or "circe-tiny" (the shipped model), '
    '"open_clip:ARCH" with weights=<local file> (ARCH from open_clip.list_models()), '
    '"open_clip:/path/to/model_config.json" with weights=<local file>, '
    '"hf:/path/to/transformers/clip/dir"'
)


def __getattr__(name: str):
    # Lazy exports: the backbone classes import open_clip / transformers on first use only.
    if name == "OpenClipBackbone":
        from circe.backbones.openclip import OpenClipBackbone

        return OpenClipBackbone
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

    return register_config(DEFAULT_CONFIG_PATH)


def build_openclip_model(arch_or_config_path: str | Path = DEFAULT_NAME, device: Any = "cpu"):
    """A randomly initialised open_clip model -> `(model, preprocess, tokenizer)`.

    `arch_or_config_path`: "default"/"circe-tiny" (the shipped config), an open_clip model name,
    or a path to a model-config JSON. `preprocess` is open_clip's eval transform (PIL ->
    `[3, H, W]`), `tokenizer` maps `list[str]` -> `[B, L]`. The model is left in train mode
    (this is what pretraining starts from); nothing is downloaded.
    """
    from circe.backbones import openclip

    if str(arch_or_config_path) in _DEFAULT_ALIASES:
        arch_or_config_path = DEFAULT_CONFIG_PATH
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

    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "open_clip":
        if not rest:
            raise ValueError(f"empty architecture in {spec!r}; accepted forms: {_SPEC_FORMS}")
        from circe.backbones.openclip import OpenClipBackbone

        if rest == DEFAULT_NAME:  # "open_clip:circe-tiny" is the shipped config too
            if weights is None:
                return _load_default(None, device)
            rest = str(DEFAULT_CONFIG_PATH)
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

    raise ValueError(f"unknown backbone spec {spec!r}; accepted forms: {_SPEC_FORMS}")


def _load_default(weights: str | Path | None, device) -> Backbone:
    """circe-tiny: the shipped config + the shipped weights (or `weights`, e.g. a new run's)."""
    from circe.backbones.openclip import OpenClipBackbone

    if weights is not None:
        return OpenClipBackbone(DEFAULT_CONFIG_PATH, weights, device=device, spec=DEFAULT_NAME)
    # Read the module global at call time (tests point it elsewhere with monkeypatch).
    path = DEFAULT_WEIGHTS_PATH
    if not path.is_file():
        raise WeightsNotFoundError(
            f"the default backbone's weights are missing: expected {path}. They are produced by "
            "`circe pretrain` (run it once to train circe-tiny and write that file), or pass "
            "weights=<path to a circe-tiny .safetensors>. circe never downloads weights."
        )
    return OpenClipBackbone(
        DEFAULT_CONFIG_PATH,
        path,
        device=device,
        spec=DEFAULT_NAME,
        weights_label=f"builtin:{DEFAULT_NAME}",
    )

"""open_clip backbones: any open_clip architecture, weights from a local file only.

The architecture is an `open_clip.list_models()` name or a path to a model-config JSON (a bare
config like `default/circe-tiny.json`, or an `open_clip_config.json` from a Hub snapshot, which
wraps it in `model_cfg` next to a `preprocess_cfg`). The weights are a local `.safetensors` /
`.pt` / `.bin` state dict. Preprocessing (the eval transform) and the tokenizer are open_clip's
own for that architecture, so embeddings match what open_clip itself produces.

Nothing here touches the network: pretrained tags ("openai", "laion2b_s34b_b79k"), "hf-hub:"
specs and configs whose tokenizer or text tower would be fetched from the Hub are refused.

Note on GELU flavour: weights trained with QuickGELU (OpenAI's, laion400m, metaclip) need the
"-quickgelu" architecture name (e.g. "ViT-B-32-quickgelu"); loading them into "ViT-B-32" works
without error but gives subtly worse embeddings. That is open_clip's convention, not circe's.
"""

from __future__ import annotations

import inspect
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image

from circe.backbones import file_sha256
from circe.backbones.base import Backbone, BackboneIdentity, WeightsNotFoundError, fit_weights

_NO_DOWNLOAD = (
    "circe never downloads weights: download the checkpoint yourself (e.g. the "
    "open_clip_model.safetensors file from the model's Hugging Face page) and pass the local "
    "file path as weights=..."
)

# open_clip >= 2.27 reads .safetensors in `load_checkpoint` (and grew `weights_only` at the same
# time); older versions torch.load everything, so we read safetensors files ourselves there.
_OPENCLIP_READS_SAFETENSORS = (
    "weights_only" in inspect.signature(open_clip.load_checkpoint).parameters
)

_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


# --------------------------------------------------------------------------------------------
# Architecture resolution: names, config files, and what would need the network.
# --------------------------------------------------------------------------------------------

_config_tmpdir: Path | None = None  # where unwrapped open_clip_config.json model_cfgs are written


def _looks_like_path(arch: str) -> bool:
    return arch.endswith(".json") or "/" in arch or "\\" in arch or Path(arch).is_file()


def _refuse_remote_arch(arch: str) -> None:
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"open_clip architecture {arch!r} uses an open_clip loading schema; circe never "
            "downloads weights and loads configs and weights separately: pass "
            "open_clip:/path/to/open_clip_config.json (or an open_clip.list_models() name) "
            "together with weights=<local checkpoint file>."
        )


def register_config(config_path: str | Path) -> str:
    """Register a model-config JSON with open_clip; returns the arch name (the file stem).

    Idempotent for the same content. A different config under an already-registered name
    (including open_clip's built-ins) is an error rather than a silent override of the global
    open_clip registry. For a wrapped `open_clip_config.json` the name is its folder's name.
    """
    global _config_tmpdir
    path = Path(config_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config not found: expected a JSON file at {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    model_cfg = data.get("model_cfg", data)
    if not all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(
            f"{path} is not an open_clip model config (needs embed_dim, vision_cfg and text_cfg)"
        )
    wrapped = model_cfg is not data
    name = path.parent.name if wrapped and path.stem == "open_clip_config" else path.stem

    existing = open_clip.get_model_config(name)
    if existing is not None:
        if existing == model_cfg:
            return name
        raise ValueError(
            f"open_clip already has a different architecture named {name!r}; rename {path} "
            "(the file name is the architecture name)"
        )
    if wrapped:
        # open_clip's registry only scans bare model configs: write the unwrapped one out.
        if _config_tmpdir is None:
            _config_tmpdir = Path(tempfile.mkdtemp(prefix="circe-openclip-configs-"))
        bare = _config_tmpdir / f"{name}.json"
        bare.write_text(json.dumps(model_cfg), encoding="utf-8")
        open_clip.add_model_config(bare)
    else:
        open_clip.add_model_config(path)
    return name


def _resolve_arch(arch_or_config_path: str | Path) -> tuple[str, dict[str, Any]]:
    """-> (registered arch name, preprocess overrides from the config file, if any)."""
    arch = str(arch_or_config_path)
    _refuse_remote_arch(arch)
    if isinstance(arch_or_config_path, Path) or _looks_like_path(arch):
        name = register_config(arch)
        data = json.loads(Path(arch).expanduser().read_text(encoding="utf-8"))
        return name, dict(data.get("preprocess_cfg", {})) if "model_cfg" in data else {}
    if open_clip.get_model_config(arch) is None:
        raise ValueError(
            f"unknown open_clip architecture {arch!r}: use a name from open_clip.list_models() "
            "or a path to a model-config JSON"
        )
    return arch, {}


def _check_offline(name: str) -> None:
    """Refuse configs whose tokenizer / towers open_clip would fetch from the Hugging Face Hub."""
    cfg = open_clip.get_model_config(name)
    text_cfg, vision_cfg = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    for key, what in (("hf_tokenizer_name", "tokenizer"), ("hf_model_name", "text tower")):
        source = text_cfg.get(key)
        if source and not Path(source).expanduser().is_dir():
            raise ValueError(
                f"open_clip architecture {name!r} takes its {what} from the Hugging Face Hub "
                f"({key}={source!r}), and circe never downloads anything. Save those files to a "
                f"local directory, copy the model config JSON with text_cfg.{key} set to that "
                "directory, and use open_clip:/path/to/that.json."
            )
    if vision_cfg.get("timm_model_pretrained"):
        raise ValueError(
            f"open_clip architecture {name!r} asks timm for pretrained image-tower weights "
            "(vision_cfg.timm_model_pretrained), which would be downloaded; set it to false."
        )
    if "siglip" in name.lower() and not text_cfg.get("hf_tokenizer_name"):
        # open_clip picks a Hub-hosted SigLIP tokenizer from the name alone.
        raise ValueError(
            f"open_clip architecture {name!r} would fetch a SigLIP tokenizer from the Hub; set "
            "text_cfg.hf_tokenizer_name to a local tokenizer directory in a config JSON copy."
        )


def _tag_preprocess(name: str) -> dict[str, Any]:
    """Preprocessing shared by every pretrained tag of `name`, or {} if the tags disagree.

    With pretrained=None open_clip falls back to OpenAI mean/std + "shortest" resize, which is
    wrong for e.g. SigLIP-family weights (mean 0.5, "squash"). The tag table is local data, so
    when all of an arch's checkpoints agree we use their settings for the local file too.
    """
    cfgs = [
        open_clip.get_pretrained_cfg(name, t) for t in open_clip.list_pretrained_tags_by_model(name)
    ]
    settings = {tuple(_hashable(c.get(k)) for k in _PREPROCESS_KEYS) for c in cfgs}
    if len(settings) != 1:
        return {}
    return {k: v for k, v in cfgs[0].items() if k in _PREPROCESS_KEYS and v is not None}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------
# Building and loading.
# --------------------------------------------------------------------------------------------


class _DropRandomInitWarning(logging.Filter):
    """open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger;
    misleading when we load a local checkpoint right after, so it is dropped there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def _build(arch_or_config_path: str | Path, device: Any = "cpu", weights_follow: bool = False):
    """-> (arch name, model [train mode], (train, eval) preprocess, tokenizer); random init,
    offline."""
    name, file_preprocess = _resolve_arch(arch_or_config_path)
    _check_offline(name)
    pp = {**_tag_preprocess(name), **file_preprocess}  # the config file's own settings win
    quiet = _DropRandomInitWarning()
    if weights_follow:
        logging.getLogger().addFilter(quiet)
    try:
        model, train_preprocess, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=None,
            device=device,
            pretrained_hf=False,  # never load Hub text-tower weights (create_model kwarg in 2.x/3.x)
            image_mean=pp.get("mean"),
            image_std=pp.get("std"),
            image_interpolation=pp.get("interpolation"),
            image_resize_mode=pp.get("resize_mode"),
        )
    finally:
        logging.getLogger().removeFilter(quiet)
    tokenizer = open_clip.get_tokenizer(name)
    return name, model, (train_preprocess, preprocess), tokenizer


def build_openclip_model(arch_or_config_path: str | Path, device: Any = "cpu"):
    """Randomly initialised open_clip model -> `(model, preprocess, tokenizer)` (train mode)."""
    _, model, (_, preprocess), tokenizer = _build(arch_or_config_path, device=device)
    return model, preprocess, tokenizer


def resolve_local_weights(weights: str | Path, hint: str = _NO_DOWNLOAD) -> Path:
    """The weights argument as an existing local file; refuses tags, Hub specs and URLs."""
    text = str(weights)
    if text.startswith(("hf-hub:", "hf_hub:", "http://", "https://")) or (
        not Path(text).expanduser().exists() and text in _pretrained_tags()
    ):
        raise ValueError(
            f"weights={text!r} names a download (an open_clip pretrained tag, Hub spec or URL), "
            f"not a local file. {_NO_DOWNLOAD}"
        )
    path = Path(text).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file not found: expected a file at {path.resolve()}. {hint}"
        )
    return path


def _pretrained_tags() -> set[str]:
    return {tag for _, tag in open_clip.list_pretrained()}


def load_openclip_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into `model` (strict: every parameter must be in the file)."""
    path = Path(path)

    def load():
        if path.suffix == ".safetensors" and not _OPENCLIP_READS_SAFETENSORS:
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
            if next(iter(state_dict), "").startswith("module."):  # saved from DataParallel/DDP
                state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
            return model.load_state_dict(state_dict, strict=False)
        # Handles .pt/.bin (incl. {"state_dict": ...} and "module." prefixes), positional
        # embedding resizing and, on >= 2.27, safetensors with weights_only=True.
        return open_clip.load_checkpoint(model, str(path), strict=False)

    fit_weights(path, "this open_clip architecture", load)


# --------------------------------------------------------------------------------------------
# The backbone.
# --------------------------------------------------------------------------------------------


class OpenClipBackbone(Backbone):
    """An open_clip CLIP / CustomTextCLIP model with local weights, in eval mode.

    Token sequences (`tokens=True`) are captured with forward hooks, because open_clip's own
    `output_tokens` differs across versions (and drops the class token):
      - image, ViT tower: the hidden states leaving `visual.transformer`, passed through
        `visual.ln_post` -> `[B, 1 + N, W]`, class token first then the N patches. This
        equals the tensor open_clip pools from (it applies ln_post to the whole sequence) and
        also covers `final_ln_after_pool` towers, where open_clip normalises only the pooled
        token. open_clip <= 2.24 runs towers sequence-first (no `batch_first`).
      - image, timm tower (SigLIP's, timm ViTs and ConvNets): the trunk's `forward_features`
        (a ViT's normed tokens, prefix tokens first; a ConvNet's map, flattened), then its own
        head on the same tensor for the pooled output.
      - image, ResNet tower (RN50 ...): the map leaving `layer4`, flattened -> `[B, N, C]`.
      A tower without a class token gets the mean of its tokens in front (what a ResNet's
      attention pool prepends itself), so position 0 always summarises the image and the
      patches follow, as the methods' explanations expect.
      - text: the output of the text tower's `ln_final` -> `[B, L, W]` (batch-first in every
        version; CLIP keeps the text tower inline as `model.ln_final`, CustomTextCLIP has
        `model.text.ln_final`).
    The pooled output returned alongside is the very same forward's result, so it equals the
    `tokens=False` output exactly. Attention-pooled (CoCa) ViT towers and HF text towers
    support `tokens=False` only.
    """

    image_tower_prefixes = ("model.visual.",)

    def __init__(
        self,
        arch: str | Path,
        weights: str | Path,
        device: str | torch.device = "cpu",
        *,
        spec: str | None = None,
        weights_label: str | None = None,
        missing_hint: str = _NO_DOWNLOAD,
    ):
        super().__init__()
        _refuse_remote_arch(str(arch))
        path = resolve_local_weights(weights, missing_hint)
        name, model, (train_preprocess, preprocess), tokenizer = _build(arch, weights_follow=True)
        load_openclip_weights(model, path)
        self.model = model.to(device)
        self.eval()  # the wrapper too, so `bb.training` is False and train() flips both
        self._preprocess = preprocess
        self._train_preprocess = train_preprocess
        self._tokenizer = tokenizer
        self._eot_id, self._pad_id = _special_token_ids(tokenizer)

        if spec is None:
            spec = f"open_clip:{Path(arch).resolve() if _looks_like_path(str(arch)) else arch}"
        size = getattr(model.visual, "image_size", 0)
        self.identity = BackboneIdentity(
            spec=spec,
            weights=weights_label or str(path.resolve()),
            weights_sha256=file_sha256(path),
            image_size=int(max(size) if isinstance(size, tuple | list) else size),
            embed_dim=int(open_clip.get_model_config(name)["embed_dim"]),
        )
        self.record_inputs()

    # -- inputs --------------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)  # [3, H, W]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(list(texts))  # [B, L] int64

    def text_mask(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`[B, L]` ids -> `[B, L]` bool, True up to and including the first EOT token.

        Rows without an EOT (tokenizers that strip it) fall back to "not padding".
        """
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)  # [L]
        mask = token_ids != self._pad_id  # [B, L]
        if self._eot_id is not None:
            is_eot = token_ids == self._eot_id  # [B, L]
            first_eot = is_eot.int().argmax(dim=1)  # [B] index of the first EOT (0 if none)
            upto_eot = positions[None, :] <= first_eot[:, None]  # [B, L]
            mask = torch.where(is_eot.any(dim=1, keepdim=True), upto_eot, mask)
        return mask

    def token_strings(self, token_ids: torch.Tensor) -> list[list[str]]:
        inner = getattr(self._tokenizer, "tokenizer", None)
        if hasattr(inner, "convert_ids_to_tokens"):  # open_clip's wrapper of an HF tokenizer
            return [inner.convert_ids_to_tokens(row) for row in token_ids.tolist()]
        decode = self._tokenizer.decode  # the CLIP BPE: "red</w>" decodes to "red "
        return [[decode([i]).strip() for i in row] for row in token_ids.tolist()]

    # -- towers --------------------------------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor, tokens: bool = False):
        if not tokens:
            return self.model.encode_image(pixels, normalize=False)  # [B, D]
        visual = self.model.visual
        if hasattr(visual, "trunk"):  # open_clip's TimmModel
            pooled, seq = self._timm_tokens(visual, pixels)
        elif hasattr(visual, "layer4") and hasattr(visual, "attnpool"):  # ModifiedResNet
            with _OutputCapture(visual.layer4) as captured:
                pooled = self.model.encode_image(pixels, normalize=False)  # [B, D]
            seq = _with_summary(captured[-1].flatten(2).transpose(1, 2))  # [B, 1 + HW, C]
        elif (
            hasattr(visual, "transformer")
            and hasattr(visual, "ln_post")
            and getattr(visual, "attn_pool", None) is None
        ):
            pooled, seq = vit_tokens(
                visual, lambda: self.model.encode_image(pixels, normalize=False)
            )
        else:
            raise NotImplementedError(
                f"its image tower {type(visual).__name__} pools by attention over its tokens "
                "(CoCa-style), and circe reads no token sequence from it"
            )
        mask = torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)  # [B, 1 + N]
        return pooled, seq, mask

    @staticmethod
    def _timm_tokens(visual, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled `[B, D]`, tokens `[B, 1 + N, W]`) of an open_clip TimmModel: its forward
        (`head(trunk(x))`, trunk = `forward_head(forward_features(x))`) split where the
        tokens are."""
        trunk = visual.trunk
        features = trunk.forward_features(pixels)  # [B, P + N, W] (ViT) or [B, C, H, W]
        pooled = visual.head(trunk.forward_head(features))  # [B, D]
        if features.ndim == 4:
            return pooled, _with_summary(features.flatten(2).transpose(1, 2))
        if getattr(trunk, "num_prefix_tokens", 0) == 0:  # SigLIP: patches only
            return pooled, _with_summary(features)
        return pooled, features

    def train_transform(self):
        """open_clip's own training transform for this architecture (the second of
        `create_model_and_transforms`: RandomResizedCrop at scale 0.9-1, then as `preprocess`)."""
        return self._train_preprocess

    def enable_gradient_checkpointing(self, towers: frozenset[str]) -> None:
        model = self.model
        if "image" in towers:
            visual = model.visual
            if hasattr(visual, "trunk"):  # timm: its own switch, which says when it cannot
                try:
                    visual.trunk.set_grad_checkpointing(True)
                except Exception as error:  # noqa: BLE001  (timm raises what the model raises)
                    raise NotImplementedError(
                        f"its timm image tower {type(visual.trunk).__name__} cannot: {error}"
                    ) from None
            elif hasattr(visual, "transformer"):
                visual.set_grad_checkpointing(True)
            else:  # open_clip's ModifiedResNet accepts the call and does nothing
                raise NotImplementedError(
                    f"its image tower {type(visual).__name__} has no gradient checkpointing "
                    "(open_clip checkpoints transformer blocks only)"
                )
        if "text" in towers:
            text = getattr(model, "text", None)
            if hasattr(model, "transformer"):  # CLIP: the text transformer is on the model
                model.transformer.grad_checkpointing = True
            elif hasattr(text, "set_grad_checkpointing"):
                text.set_grad_checkpointing(True)
            else:
                raise NotImplementedError(
                    f"its text tower {type(text).__name__} has no gradient checkpointing"
                )

    def encode_text(self, token_ids: torch.Tensor, tokens: bool = False):
        if not tokens:
            return self.model.encode_text(token_ids, normalize=False)  # [B, D]
        with _OutputCapture(self._text_final_norm()) as captured:
            pooled = self.model.encode_text(token_ids, normalize=False)  # [B, D]
        seq = captured[-1]  # [B, L, W]
        if seq.ndim != 3 or seq.shape[:2] != token_ids.shape:
            # e.g. a tower that normalises only the pooled token
            raise NotImplementedError("this open_clip text tower does not expose a token sequence")
        return pooled, seq, self.text_mask(token_ids)

    def _text_final_norm(self) -> torch.nn.Module:
        model = self.model
        if hasattr(model, "token_embedding") and hasattr(model, "ln_final"):
            return model.ln_final  # CLIP: the text tower's modules live on the model itself
        text = getattr(model, "text", None)
        if hasattr(text, "ln_final") and getattr(text, "cls_emb", None) is None:
            return text.ln_final  # CustomTextCLIP with an open_clip TextTransformer
        raise NotImplementedError(
            f"tokens=True is not supported for the text tower of {type(model).__name__} "
            f"({type(text).__name__})"
        )


def vit_tokens(visual, encode) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled `[B, D]`, tokens `[B, 1 + N, W]`) of an open_clip VisionTransformer: `encode()`
    runs the forward that pools, and the hidden states leaving `visual.transformer` are caught
    on the way and passed through `visual.ln_post`, the tensor the pooling reads."""
    with _OutputCapture(visual.transformer) as captured:
        pooled = encode()  # [B, D]
    hidden = captured[-1]
    if not hasattr(visual.transformer, "batch_first"):  # open_clip <= 2.24: [1+N, B, W]
        hidden = hidden.permute(1, 0, 2)
    return pooled, visual.ln_post(hidden)


def _with_summary(tokens: torch.Tensor) -> torch.Tensor:
    """`[B, N, W]` -> `[B, 1 + N, W]`: the tokens' mean in front, where a class token sits."""
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)


class _OutputCapture:
    """Context manager: a forward hook collecting `module`'s outputs into a list."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.outputs: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:
        self._handle = self.module.register_forward_hook(
            lambda _module, _inputs, output: self.outputs.append(output)
        )
        return self.outputs

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _special_token_ids(tokenizer) -> tuple[int | None, int]:
    """-> (end-of-text id or None, padding id) for open_clip's tokenizer classes."""
    eot = getattr(tokenizer, "eot_token_id", None)  # SimpleTokenizer (the CLIP BPE)
    pad = 0  # SimpleTokenizer pads with 0
    inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer / SigLipTokenizer wrap an HF one
    if eot is None and inner is not None:
        eot = getattr(inner, "eos_token_id", None)
        if eot is None and not getattr(tokenizer, "strip_sep_token", False):
            eot = getattr(inner, "sep_token_id", None)  # BERT-style: [SEP] ends the text
    if inner is not None and getattr(inner, "pad_token_id", None) is not None:
        pad = inner.pad_token_id
    return eot, pad

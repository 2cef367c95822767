"""The training configuration: one dataclass, loadable from YAML, overridable field by field."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

# Fields that may differ when a run is resumed: they change how the run is executed, not what
# it computes (anything else would make the resumed run a different run).
RESUMABLE_OVERRIDES = frozenset({"max_steps", "workers", "threads", "cache_dir", "eval_batch_size"})


@dataclass
class TrainConfig:
    """How to train one method on one data set.

    Model selection: after every `eval_every` epochs the method is evaluated on `eval_split`
    with `circe.eval.evaluate.evaluate`; the selection score is the mean of R@1, R@10 and
    R@50 (R@1 alone is too noisy on a few hundred validation queries). `best` is the
    checkpoint with the highest score; training stops after `patience` evaluations without
    improvement.
    """

    method: str = "combiner"
    method_config: dict[str, Any] = field(default_factory=dict)  # create_method(**this)
    dataset: str = "synthetic"
    root: str = "data/synthetic"
    # The data set's protocol preset (e.g. FashionIQ's clip4cir | dqu-cir | dwc: caption join,
    # text clean-up, gallery); None: the data set's default. Recorded with the run's config.
    protocol: str | None = None
    backbone: str = "default"
    backbone_weights: str | None = None
    seed: int = 0

    epochs: int = 20
    # Global batch: queries per optimizer step, over all processes and accumulation steps.
    # The contrastive negatives of a query are the other queries' targets of its micro-batch
    # (batch_size / grad_accum_steps, gathered over processes).
    batch_size: int = 128
    grad_accum_steps: int = 1
    lr: float = 2e-3  # fusion (non-backbone) parameters
    backbone_lr: float = 1e-5  # backbone parameters, for methods that train the backbone
    weight_decay: float = 0.05  # matrices only; biases, norms and the temperature get none
    warmup_steps: int = 50  # linear warm-up, then cosine decay to 0 at the last step
    max_grad_norm: float | None = 1.0  # None: no clipping
    temperature: float = 0.05  # initial softmax temperature of the contrastive loss
    learn_temperature: bool = True
    mixed_precision: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU) | no | fp16 | bf16
    device: str = "auto"  # auto (a GPU when there is one, else CPU) | cpu

    # Fraction of training pairs whose modification text is swapped for another pair's
    # (simulated label noise, for robustness experiments; validation and test stay clean).
    text_noise: float = 0.0

    feature_cache: bool = True  # reuse frozen-backbone features across epochs and runs
    cache_dir: str = ".cache/circe/features"

    # The split whose pairs train the method: `train`, or a held-out one for a method that
    # combines already trained models (DAFM's gate learns whom to trust from queries its
    # members never saw; on their own training pairs every member looks right).
    train_split: str = "train"
    # Train on this share of the split's queries (a subset drawn with `seed`): the few-labels
    # regime, where a stage that needs no labels (TMCIR's pseudo-target alignment) should pay.
    train_fraction: float = 1.0
    eval_split: str = "val"
    eval_every: int = 1  # epochs between validations; 0: never (then `best` = `last`)
    patience: int | None = 5  # validations without improvement before stopping; None: never
    # Splits the best checkpoint is scored on at the end (the synthetic benchmark's by default).
    test_splits: list[str] = field(default_factory=lambda: ["test", "test_phrasing", "test_unseen"])
    eval_batch_size: int = 256

    # Stop (and save `last`) after this many optimizer steps; not kept by `resume`.
    max_steps: int | None = None
    workers: int = 0  # image decoding worker processes
    # Torch CPU threads (0: torch's default). On a busy machine, 1 avoids thread
    # oversubscription, which slows the small matrix products of a fusion module tenfold.
    threads: int = 0
    log_every: int = 10  # optimizer steps between metrics.jsonl step records

    def __post_init__(self) -> None:
        _check_types(self)
        self.check()

    def check(self) -> None:
        positive = ("epochs", "batch_size", "grad_accum_steps", "log_every", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of grad_accum_steps "
                f"{self.grad_accum_steps}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(
                f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}"
            )
        if self.device not in ("auto", "cpu"):
            raise ValueError(f"device must be auto or cpu, got {self.device!r}")
        if not 0 <= self.text_noise <= 1:
            raise ValueError(f"text_noise must be a fraction in [0, 1], got {self.text_noise}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with some fields changed; unknown names are an error that lists the known."""
        _check_names(overrides, "override")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        _check_names(values, "config key")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise TypeError(f"{path} must hold a mapping of config fields, got {values!r}")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None


# The annotation of each field, as the checks below read it (annotations are strings here).
_SIMPLE = {"int": int, "float": float, "str": str, "bool": bool}


def _check_types(config: TrainConfig) -> None:
    """Every field holds its annotated type, so that a config mistake (`lr: fast`,
    `epochs: 2.5`, `test_splits: test`) stops before anything is built or written, naming
    the field. Whole numbers are accepted for floats."""
    for spec in fields(config):
        value = getattr(config, spec.name)
        kinds = [part.strip() for part in str(spec.type).split("|")]
        if value is None and "None" in kinds:
            continue
        if any(_fits(value, kind) for kind in kinds):
            continue
        wanted = " or ".join("null" if kind == "None" else kind for kind in kinds)
        hint = ""
        if "float" in kinds and isinstance(value, str) and _is_number(value):
            hint = " (YAML reads 1e-4 as text: write 1.0e-4)"
        raise ValueError(f"{spec.name} must be {wanted}, got {value!r}{hint}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _fits(value: Any, kind: str) -> bool:
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in _SIMPLE:
        return isinstance(value, _SIMPLE[kind])
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind.startswith("dict["):
        return isinstance(value, dict)
    raise TypeError(f"no check for the field type {kind!r}")  # a new field's type: add it


def _check_names(values: dict[str, Any], what: str) -> None:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown training {what}(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )

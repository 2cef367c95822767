"""The training configuration: one dataclass, loadable from YAML, overridable field by field."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from circe.data.errors import shown
from circe.train.selection import check_selection_metric

# A training config is a few hundred bytes, a paper recipe a few kilobytes.
MAX_CONFIG_BYTES = 2**20
# Nesting a config needs: method_config and `reported` (split -> metric -> number) are the
# deepest, at three levels.
MAX_CONFIG_DEPTH = 16

# Fields that may differ when a run is resumed: they change how the run is executed, not what
# it computes (anything else would make the resumed run a different run).
# Gradient checkpointing recomputes the same activations (with the same random state), so a
# run may be resumed with it switched, e.g. on a GPU with less memory.
RESUMABLE_OVERRIDES = frozenset(
    {"max_steps", "workers", "threads", "cache_dir", "eval_batch_size", "gradient_checkpointing"}
)


@dataclass
class TrainConfig:
    """How to train one method on one data set.

    Model selection: after every `eval_every` epochs the method is evaluated on `eval_split`;
    the selection score is `selection_metric` (by default the mean of R@1, R@10 and R@50 of
    `circe.eval.evaluate.evaluate`: R@1 alone is too noisy on a few hundred validation
    queries; `circe.train.selection` for the data sets' own). `best` is the checkpoint with
    the highest score; training stops after `patience` evaluations without improvement.
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
    # How a method that trains its text tower changes it (`circe.methods.adaptation`):
    # "full" (every weight, at backbone_lr) or "lora" (low-rank adapters of rank `lora_rank`
    # on the attention projections, peft's LoRA; the pretrained weights stay as they are).
    # Freezing the tower is the method's own setting (combiner vs combiner-ft, DWC's
    # finetune_text, DQU-CIR's finetune).
    text_adaptation: str = "full"
    lora_rank: int = 8
    # L2-SP: the loss gains (l2sp_weight / 2) * ||θ - θ₀||² over the trained backbone weights θ,
    # θ₀ their pretrained values: fine-tuning pulled towards what the tower already knows.
    l2sp_weight: float = 0.0
    weight_decay: float = 0.05
    # Which parameters decay: "matrices" (biases, norms and the temperature get none) or
    # "all" (AdamW on every parameter, as DQU-CIR's code does).
    weight_decay_on: str = "matrices"
    # The learning rate after the warm-up: "cosine" (decay to 0 at the last step),
    # "constant" (CLIP4Cir's Combiner), or "step" (× `lr_gamma` at the start of each epoch
    # listed in `lr_milestones`, counted from 0: DQU-CIR's ×0.1 at epoch index 7 is [7]).
    lr_schedule: str = "cosine"
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    warmup_steps: int = 50  # linear warm-up over these steps (0: none), then `lr_schedule`
    max_grad_norm: float | None = 1.0  # None: no clipping
    # The contrastive loss's logits are cos / temperature, i.e. cos × logit scale (1 / τ).
    temperature: float = 0.05  # its initial value (CLIP4Cir: 0.01 = scale 100)
    learn_temperature: bool = True  # False: fixed (CLIP4Cir's fixed scale 100)
    # What is learned: "log-temperature" (log τ, as CLIP learns its scale) or "scale" (the
    # multiplicative logit scale 1/τ itself, as DQU-CIR's code does, starting at 10).
    temperature_learned_as: str = "log-temperature"
    mixed_precision: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU) | no | fp16 | bf16
    device: str = "auto"  # auto (a GPU when there is one, else CPU) | cpu

    # Fraction of training pairs whose modification text is swapped for another pair's
    # (simulated label noise, for robustness experiments; validation and test stay clean).
    text_noise: float = 0.0

    feature_cache: bool = True  # reuse frozen-backbone features across epochs and runs
    # Training-time image augmentation (the backbone's train transform: open_clip's
    # RandomResizedCrop at scale 0.9-1) on every training image. Augmented pixels differ every
    # epoch, so no image feature can be cached: it needs `feature_cache: false`, said in the
    # config so that a reader sees the cost.
    augment: bool = False
    # Recompute the trained towers' activations in the backward pass instead of keeping them
    # (less memory for ViT-H-size towers, about a third more compute). Refused for a method
    # that trains no tower, and for a tower that cannot (open_clip's ResNets).
    gradient_checkpointing: bool = False
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
    # What picks `best` (`circe.train.selection`): "r1-r10-r50" (the mean of R@1, R@10, R@50
    # over the whole eval split), "avg" (the data set's own headline: CIRR's (R@5 +
    # Rsubset@1) / 2, FashionIQ's mean over categories of (R@10 + R@50) / 2), or
    # "sum:M1,M2,..." (the sum of those metrics of the data set's own set, e.g. DQU-CIR's
    # "sum:R@10,R@50" on FashionIQ).
    selection_metric: str = "r1-r10-r50"
    # Splits the best checkpoint is scored on at the end (the synthetic benchmark's by default).
    test_splits: list[str] = field(
        default_factory=lambda: ["test", "test_free", "test_phrasing", "test_unseen"]
    )
    eval_batch_size: int = 256

    # Stop (and save `last`) after this many optimizer steps; not kept by `resume`.
    max_steps: int | None = None
    workers: int = 0  # image decoding worker processes
    # Torch CPU threads (0: torch's default). On a busy machine, 1 avoids thread
    # oversubscription, which slows the small matrix products of a fusion module tenfold.
    threads: int = 0
    log_every: int = 10  # optimizer steps between metrics.jsonl step records

    # What the paper reports for this recipe (a paper config's numbers, in percent, by split
    # and metric, e.g. {"val": {"R@10": 61.97}}): recorded with the run for comparison,
    # never read by training.
    reported: dict[str, Any] = field(default_factory=dict)

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
                f"mixed_precision must be auto, no, fp16 or bf16, got {shown(self.mixed_precision)}"
            )
        if self.device not in ("auto", "cpu"):
            raise ValueError(f"device must be auto or cpu, got {shown(self.device)}")
        if not 0 <= self.text_noise <= 1:
            raise ValueError(f"text_noise must be a fraction in [0, 1], got {self.text_noise}")
        for name in ("threads", "workers"):  # 0 is their default (torch's threads, no workers)
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        _one_of("weight_decay_on", self.weight_decay_on, ("matrices", "all"))
        _one_of("text_adaptation", self.text_adaptation, ("full", "lora"))
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if self.l2sp_weight < 0:
            raise ValueError(f"l2sp_weight must not be negative, got {self.l2sp_weight}")
        _one_of("lr_schedule", self.lr_schedule, ("cosine", "constant", "step"))
        _one_of("temperature_learned_as", self.temperature_learned_as, ("log-temperature", "scale"))
        if self.lr_schedule == "step" and not self.lr_milestones:
            raise ValueError("lr_schedule step needs lr_milestones: the epochs where it steps")
        if self.lr_milestones and self.lr_schedule != "step":
            raise ValueError(f"lr_milestones are for lr_schedule step, not {self.lr_schedule}")
        if any(m < 1 for m in self.lr_milestones) or self.lr_milestones != sorted(
            set(self.lr_milestones)
        ):
            raise ValueError(
                f"lr_milestones must be increasing epochs from 1, got {shown(self.lr_milestones)}"
            )
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if self.augment and self.feature_cache:
            raise ValueError(
                "augment: true changes every training image every epoch, so no feature can be "
                "cached: set feature_cache: false as well"
            )
        check_selection_metric(self.selection_metric)
        _check_reported(self.reported)

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
        values = read_config_yaml(path) or {}
        if not isinstance(values, dict):
            raise TypeError(f"{path} must hold a mapping of config fields, got {shown(values)}")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None


class _RefusedYaml(yaml.YAMLError):
    """What a config may not hold, at `line` (1-based) of its file."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.safe_load` without aliases and with a nesting bound. Aliases (`*name`) are what
    a "billion laughs" config is made of: nine references to nine references ... build a
    value of 9**n items from a few lines, which formatting or copying then takes gigabytes
    and minutes over. A config needs none, so one is refused where it stands; so is a value
    nested past `MAX_CONFIG_DEPTH` (PyYAML composes nesting by recursion)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _RefusedYaml(
                event.start_mark.line + 1,
                f"YAML aliases (*{event.anchor}) are refused in a config: write the value out",
            )
        if self.depth >= MAX_CONFIG_DEPTH:
            raise _RefusedYaml(
                event.start_mark.line + 1,
                f"values nested more than {MAX_CONFIG_DEPTH} deep are refused in a config",
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_config_yaml(path: Path) -> Any:
    """The YAML document of a config file (None when empty), through `_ConfigLoader`; every
    problem (missing, too large, not UTF-8, not YAML, an alias) is one ValueError line naming
    the file (FileNotFoundError for a missing one)."""
    if not path.is_file():
        raise FileNotFoundError(f"training config not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{path} is {size:,} bytes; a training config may be at most {MAX_CONFIG_BYTES:,}"
        )
    try:
        text = path.read_bytes().decode("utf-8")
        return yaml.load(text, Loader=_ConfigLoader)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    except _RefusedYaml as error:
        raise ValueError(f"{path}: line {error.line}: {error.message}") from None
    except yaml.YAMLError as error:  # PyYAML's message spans lines: kept on one
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {shown(value)}")


def _check_reported(reported: dict[str, Any], where: str = "reported") -> None:
    """A paper's numbers: mappings down to numbers (split -> metric -> percent). A wrong
    type is a ValueError, as every config mistake is (`_check_types`)."""
    for key, value in reported.items():
        if not isinstance(key, str):
            raise ValueError(f"{where} keys must be text, got {shown(key)}")  # noqa: TRY004
        if isinstance(value, dict):
            _check_reported(value, f"{where}.{key}")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(  # noqa: TRY004
                f"{where}.{key} must be a number or a mapping, got {shown(value)}"
            )


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
        raise ValueError(f"{spec.name} must be {wanted}, got {shown(value)}{hint}")


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
    if kind == "list[int]":
        return isinstance(value, list) and all(_fits(v, "int") for v in value)
    if kind.startswith("dict["):
        return isinstance(value, dict)
    raise TypeError(f"no check for the field type {kind!r}")  # a new field's type: add it


def _check_names(values: dict[str, Any], what: str) -> None:
    known = {f.name for f in fields(TrainConfig)}
    # A YAML key may be a number, or a megabyte of text: each is shown shortened.
    unknown = sorted(shown(name) for name in values if name not in known)
    if unknown:
        raise ValueError(
            f"unknown training {what}(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )

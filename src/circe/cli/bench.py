"""`circe bench`: the benchmarks of `circe.bench`, each writing a JSON
record and the Markdown table printed here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from circe.cli.common import (
    DEFAULT_SYNTHETIC_ROOT,
    ConfigBackboneOption,
    RootOption,
    ThreadsOption,
    WeightsOption,
    console,
    fail,
    train_overrides,
    train_settings,
)

bench_app = typer.Typer(
    help="Benchmarks: method quality over seeds, the feature cache's speed-up.",
    no_args_is_help=True,
)

BenchOutOption = Annotated[
    Path, typer.Option(help="Directory for the JSON record and the Markdown table.")
]
ConfigOption = Annotated[Path | None, typer.Option(help="YAML TrainConfig for every run.")]
EpochsOption = Annotated[int | None, typer.Option(help="Epochs per training run.")]
# Where a bench keeps its training runs: an interrupted bench given the same directory goes
# on where it stopped, and finished runs are reused (DAFM over members trained before).
RunsOption = Annotated[
    Path | None,
    typer.Option(
        "--runs",
        help="Keep the training runs under DIR; finished ones there are reused, interrupted "
        "ones continued (default: temporary, discarded).",
    ),
]


def _command_line() -> str:
    """The command as typed, recorded with the results so that anyone can run it again."""
    return " ".join(["circe", *sys.argv[1:]])


@bench_app.command("quality")
def bench_quality(
    root: RootOption = DEFAULT_SYNTHETIC_ROOT,
    out: BenchOutOption = Path("benchmarks/results"),
    seeds: Annotated[int, typer.Option(help="Training seeds per trainable method.")] = 3,
    epochs: EpochsOption = None,
    method: Annotated[
        list[str] | None,
        typer.Option(
            help="Only these methods (default: every method; no variants, nothing that "
            "needs other runs first)."
        ),
    ] = None,
    config: ConfigOption = None,
    backbone: ConfigBackboneOption = None,
    weights: WeightsOption = None,
    threads: ThreadsOption = None,
    runs: RunsOption = None,
    recipe: Annotated[
        list[str] | None,
        typer.Option(
            help="METHOD=CONFIG.yaml: train METHOD with this config instead of --config "
            "(a recipe chosen on validation); repeatable."
        ),
    ] = None,
    plan: Annotated[
        Path | None,
        typer.Option(
            help="YAML with `methods:` (a list, used when no --method is given) and "
            "`recipes:` (METHOD: CONFIG.yaml): a committed bench setup."
        ),
    ] = None,
) -> None:
    """Evaluate every zero-shot method and train every trainable one over seeds; write
    quality.json and quality.md."""
    from circe.bench.quality import quality
    from circe.bench.record import read_plan

    overrides = train_overrides(
        root=root, threads=threads, weights=weights, epochs=epochs, backbone=backbone
    )
    try:
        base = train_settings(config, overrides)
        planned_methods, planned_recipes = read_plan(plan) if plan else ([], {})
        given = dict(item.partition("=")[::2] for item in recipe or [])
        recipes = {}
        for name, path in {**planned_recipes, **given}.items():
            if not name or not path:
                raise ValueError(f"--recipe takes METHOD=CONFIG.yaml, got {name}={path}")
            recipes[name] = train_settings(Path(path), overrides)
        methods = method or planned_methods or None  # None: every method (circe.bench)
        record = quality(
            base, out, range(seeds), methods, _command_line(), runs_dir=runs, recipes=recipes
        )
    except (FileNotFoundError, TypeError, ValueError) as error:  # WeightsNotFoundError too
        raise fail(str(error)) from None
    console.print((out / "quality.md").read_text())
    console.print(f"{len(record['methods'])} methods; written to {out}/quality.json and .md")


@bench_app.command("label-noise")
def bench_label_noise(
    root: RootOption = DEFAULT_SYNTHETIC_ROOT,
    out: BenchOutOption = Path("benchmarks/results"),
    method: Annotated[
        list[str] | None, typer.Option(help="Methods to compare (default: dwc, dwc-hard-labels).")
    ] = None,
    rate: Annotated[
        list[float] | None, typer.Option(help="Noise rates (default: 0, 0.3, 0.6).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Training seeds per method and rate.")] = 2,
    config: ConfigOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Train methods on increasingly noisy modification texts; write label_noise.json, .md
    and the curve label_noise.png."""
    from circe.bench.quality import label_noise

    try:
        base = train_settings(config, train_overrides(root=root, threads=threads))
        label_noise(
            base,
            out,
            method or ("dwc", "dwc-hard-labels"),
            rate or (0.0, 0.3, 0.6),
            range(seeds),
            _command_line(),
        )
    except (FileNotFoundError, ImportError, TypeError, ValueError) as error:
        raise fail(str(error)) from None
    console.print((out / "label_noise.md").read_text())


@bench_app.command("cache-speed")
def bench_cache_speed(
    root: RootOption = DEFAULT_SYNTHETIC_ROOT,
    out: BenchOutOption = Path("benchmarks/results"),
    method: str = "combiner",
    batch_size: int | None = None,
    backbone: ConfigBackboneOption = None,
    weights: WeightsOption = None,
    threads: ThreadsOption = None,
) -> None:
    """One training epoch with and without the feature cache; write cache_speed.json and .md."""
    from circe.bench.quality import cache_speed

    overrides = train_overrides(
        root=root,
        threads=threads,
        weights=weights,
        method=method,
        batch_size=batch_size,
        backbone=backbone,
    )
    try:
        cache_speed(train_settings(None, overrides), out, _command_line())
    except (FileNotFoundError, TypeError, ValueError) as error:  # WeightsNotFoundError too
        raise fail(str(error)) from None
    console.print((out / "cache_speed.md").read_text())


@bench_app.command("fusion")
def bench_fusion(
    root: RootOption = DEFAULT_SYNTHETIC_ROOT,
    out: BenchOutOption = Path("benchmarks/results/fusion"),
    seeds: Annotated[int, typer.Option(help="Training seeds (members and DAFM).")] = 3,
    member: Annotated[
        list[str] | None,
        typer.Option(help="Member methods to train and fuse (default: combiner, dwc, dqu-cir)."),
    ] = None,
    random_member: Annotated[
        bool, typer.Option(help="Also fuse a copy of the first member with random weights.")
    ] = False,
    epochs: EpochsOption = None,
    config: ConfigOption = None,
    backbone: ConfigBackboneOption = None,
    weights: WeightsOption = None,
    threads: ThreadsOption = None,
    runs: RunsOption = None,
    gate_split: Annotated[
        str,
        typer.Option(
            help="Split DAFM's gate is trained on: train (the members' own pairs) or val "
            "(held out from the members; then no model selection)."
        ),
    ] = "train",
    split: Annotated[
        list[str] | None,
        typer.Option(
            help="Splits to score (default: the synthetic benchmark's test_free, test_phrasing, "
            "test, test_unseen; on CIRR give val, which adds both readings of Rmean)."
        ),
    ] = None,
) -> None:
    """Train member methods, then DAFM over them; compare DAFM with each member, equal and
    static (val-tuned) weights, the cascade in both orders and its first design, and measure
    its cost; write fusion.json and fusion.md."""
    from circe.bench.fusion import DEFAULT_MEMBERS, TEST_SPLITS, fusion

    overrides = train_overrides(
        root=root, threads=threads, weights=weights, epochs=epochs, backbone=backbone
    )
    try:
        fusion(
            train_settings(config, overrides),
            out,
            range(seeds),
            member or DEFAULT_MEMBERS,
            random_member,
            _command_line(),
            runs_dir=runs,
            gate_split=gate_split,
            splits=tuple(split) if split else TEST_SPLITS,
        )
    except (FileNotFoundError, TypeError, ValueError) as error:  # WeightsNotFoundError too
        raise fail(str(error)) from None
    console.print((out / "fusion.md").read_text())

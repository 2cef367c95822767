"""The `circe` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from circe.index.cli import index_command, search_command
from circe.pretrain import PretrainConfig
from circe.progress import track
from circe.pseudo_targets.cli import pseudo_targets_command
from circe.serve.cli import serve_command

if TYPE_CHECKING:
    from circe.train import TrainConfig

app = typer.Typer(
    help="circe: composed image retrieval (reference image + modification text).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()

BackboneOption = Annotated[
    str,
    typer.Option(help="default | open_clip:ARCH (with --weights FILE) | hf:MODEL_DIR"),
]
WeightsOption = Annotated[
    Path | None, typer.Option(help="Local weights file for an open_clip backbone.")
]
DEFAULT_SYNTHETIC_ROOT = Path("data/synthetic")


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


def _load_method(name: str, backbone: str, weights: Path | None):
    from circe.backbones import WeightsNotFoundError, load_backbone
    from circe.methods import create_method

    try:
        model = load_backbone(backbone, weights)
        return create_method(name, model)
    except (WeightsNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None


def _load_checkpoint(path: Path):
    from circe.backbones import WeightsNotFoundError
    from circe.methods.checkpoint import load_trained_method

    try:
        return load_trained_method(path)
    except (FileNotFoundError, WeightsNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None


def _metrics_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    table = Table(title=title)
    columns = list(next(iter(rows.values())))
    table.add_column("")
    for column in columns:
        table.add_column(column, justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{values[c]:.2f}" for c in columns))
    return table


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Directory to write the benchmark to.")] = (
        DEFAULT_SYNTHETIC_ROOT
    ),
    seed: int = 0,
    train: Annotated[int, typer.Option(help="Training queries.")] = 3000,
    val: int = 400,
    test: int = 1000,
    test_unseen: int = 400,
    edits_per_reference: int = 3,
    max_objects: Annotated[
        int, typer.Option(help="Most objects in a scene (1 to 9: one per grid cell).")
    ] = 5,
    image_size: Annotated[int, typer.Option(help="Side of the rendered images in pixels.")] = 128,
) -> None:
    """Write the synthetic benchmark (PNG images + JSON annotations), deterministic from SEED.
    `val_phrasing` and `test_phrasing` hold val's and test's pairs worded anew."""
    from circe.data.synthetic import (
        SPLITS,
        SynthConfig,
        load_synthetic,
        wording_stats,
        write_synthetic,
    )

    config = SynthConfig(
        seed=seed,
        train=train,
        val=val,
        test=test,
        test_unseen=test_unseen,
        edits_per_reference=edits_per_reference,
        max_objects=max_objects,
        image_size=image_size,
    )
    try:
        root = write_synthetic(out, config, track)
    except (FileExistsError, ValueError) as error:
        raise _fail(str(error)) from None
    wordings = wording_stats(root)
    for split in SPLITS:
        loaded = load_synthetic(root, split)
        words = wordings[split]
        shared = "" if split == "train" else f" ({words['wordings_in_train']} also in train)"
        console.print(
            f"{split:>13}: {len(loaded.queries)} queries, {len(loaded.gallery)} images, "
            f"{words['texts']} distinct texts, {words['wordings']} wordings{shared}"
        )
    console.print(f"written to {root}")


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Weights file to write (safetensors).")] = Path(
        "circe-tiny.safetensors"
    ),
    steps: int = PretrainConfig.steps,
    images: Annotated[int, typer.Option(help="Size of the rendered image pool.")] = (
        PretrainConfig.images
    ),
    batch_size: int = PretrainConfig.batch_size,
    lr: float = PretrainConfig.lr,
    warmup_steps: int = PretrainConfig.warmup_steps,
    seed: int = 0,
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0: torch default).")] = 0,
) -> None:
    """Pretrain the default backbone (circe-tiny, a small CLIP) on synthetic image-text pairs."""
    from circe.pretrain import pretrain as run

    config = PretrainConfig(
        seed=seed,
        images=images,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        threads=threads,
    )
    report = run(out, config, track)
    console.print_json(json.dumps(report))
    console.print(f"weights written to {out}")


@app.command("methods")
def list_registered() -> None:
    """List the registered CIR methods."""
    from circe.methods import create_method, list_methods  # noqa: F401

    for name in list_methods():
        console.print(name)


@app.command("eval")
def evaluate_command(
    method: Annotated[
        list[str] | None, typer.Option(help="Method name; repeat to compare several.")
    ] = None,
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option(
            help="A trained method: RUN_DIR/best (or /last) of `circe train`; repeatable."
        ),
    ] = None,
    dataset: Annotated[
        str,
        typer.Option(help="synthetic | fashioniq | cirr | circo | shoes | fashion200k | folder"),
    ] = "synthetic",
    root: Annotated[Path, typer.Option(help="Data set directory.")] = DEFAULT_SYNTHETIC_ROOT,
    split: Annotated[
        str | None, typer.Option(help="Split (default: the one papers report for the data set).")
    ] = None,
    protocol: Annotated[
        str | None, typer.Option(help="Protocol preset, e.g. clip4cir | dqu-cir | dwc (FashionIQ).")
    ] = None,
    backbone: BackboneOption = "default",
    weights: WeightsOption = None,
    batch_size: int = 128,
    workers: Annotated[int, typer.Option(help="Image decoding worker processes.")] = 0,
    threads: Annotated[int, typer.Option(min=0, help="Torch CPU threads (0: default).")] = 0,
    by_kind: Annotated[
        bool, typer.Option(help="Also print metrics per edit kind (CIRCO: aspect; folder: kind).")
    ] = False,
    submission: Annotated[
        Path | None, typer.Option(help="Write the test server's files (CIRR, CIRCO) here.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
) -> None:
    """Evaluate methods on a benchmark split with the benchmark's own protocol and metrics."""
    from circe.data.registry import load_benchmark
    from circe.eval.benchmark import score_benchmark
    from circe.eval.evaluate import score_matrix
    from circe.eval.submission import write_submission
    from circe.threads import set_torch_threads

    set_torch_threads(threads)
    candidates = [
        (name, lambda name=name: _load_method(name, backbone, weights)) for name in method or []
    ]
    candidates += [
        (f"{path}", lambda path=path: _load_checkpoint(path)) for path in checkpoint or []
    ]
    if not candidates:
        raise _fail("name a --method or a trained --checkpoint RUN_DIR/best to evaluate")
    if submission is not None and len(candidates) != 1:
        raise _fail("--submission writes one method's rankings: give one --method or --checkpoint")
    if dataset != "synthetic" and root == DEFAULT_SYNTHETIC_ROOT:
        raise _fail(f"give the {dataset} directory with --root (README: 'Real benchmarks')")
    _ensure_synthetic(dataset, root)
    try:
        data = load_benchmark(dataset, root, split, protocol)
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    if not data.labelled and submission is None:
        hint = "; write the test server's files with --submission DIR" if data.submission else ""
        raise _fail(f"{dataset} {data.split} has hidden test labels: it cannot be scored{hint}")
    results, per_kind, per_part = {}, {}, {}
    for name, load in candidates:
        model = load()
        started = time.time()
        scores = [score_matrix(model, part, batch_size, workers, track) for part in data.parts]
        if submission is not None:
            try:
                written = write_submission(data, scores, submission)
            except ValueError as error:
                raise _fail(str(error)) from None
            console.print(f"{name}: wrote {', '.join(map(str, written))}")
        if data.labelled:
            result = score_benchmark(data, scores)
            results[name], per_kind[name] = result.metrics, result.per_tag
            per_part[name] = result.per_part
        console.print(f"{name}: {time.time() - started:.1f}s")
    if results:
        sizes = f"{sum(len(p.queries) for p in data.parts)} queries, " + " + ".join(
            str(len(p.gallery)) for p in data.parts
        )
        console.print(_metrics_table(f"{dataset} {data.split} ({sizes} images)", results))
    for name in results:
        if per_part[name]:
            console.print(_metrics_table(f"{name} per part", per_part[name]))
        if by_kind and per_kind[name]:
            console.print(_metrics_table(f"{name} by edit kind", per_kind[name]))
    if json_out is not None:
        record = {
            "dataset": dataset,
            "split": data.split,
            "backbone": backbone,
            "protocol": data.protocol,
            "results": results,
            "per_part": per_part,
            "per_kind": per_kind,
        }
        json_out.write_text(json.dumps(record, indent=2))


@app.command("check-dataset")
def check_dataset_command(
    dataset: Annotated[str, typer.Option(help="fashioniq | cirr | circo | shoes | ... | folder")],
    root: Annotated[Path, typer.Option(help="Data set directory.")],
    split: Annotated[str | None, typer.Option(help="Split (default: the evaluated one).")] = None,
    protocol: Annotated[str | None, typer.Option(help="Protocol preset.")] = None,
) -> None:
    """Validate a data set's files: counts, and every problem found (not just the first)."""
    from circe.data.registry import check_dataset

    try:
        report = check_dataset(dataset, root, split, protocol)
    except ValueError as error:
        raise _fail(str(error)) from None
    for part, (queries, images) in report.counts.items():
        console.print(f"{part}: {queries} queries, {images} gallery images")
    for problem in report.problems:
        console.print(f"problem: {problem}", markup=False, highlight=False, soft_wrap=True)
    if report.problems:
        console.print(f"{len(report.problems)} problem(s) in {root}")
        raise typer.Exit(code=1)
    console.print(f"{dataset} at {root}: no problems found")


def _ensure_synthetic(dataset: str, root: Path) -> None:
    """Generate the default synthetic benchmark when it is asked for and absent."""
    from circe.data.synthetic import SynthConfig, write_synthetic

    if (
        dataset == "synthetic"
        and root == DEFAULT_SYNTHETIC_ROOT
        and not (root / "meta.json").exists()
    ):
        console.print(f"no benchmark at {root}: generating the default one (circe synth)")
        write_synthetic(root, SynthConfig(), track)


def _print_run(results: dict) -> None:
    console.print(
        _metrics_table(
            f"{results['method']} (best epoch {results['best_epoch'] + 1})", results["test"]
        )
    )
    parameters = results["parameters"]
    console.print(
        f"trained {results['global_step']} steps in {results['train_seconds']:.1f}s; "
        f"{parameters['trainable']:,} trainable of {parameters['total']:,} parameters"
    )


@app.command("train")
def train_command(
    method: Annotated[str | None, typer.Option(help="Method to train (default: combiner).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Data set (synthetic).")] = None,
    root: Annotated[Path | None, typer.Option(help="Data set directory.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML file of TrainConfig fields; flags override it.")
    ] = None,
    epochs: int | None = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate of the fusion parameters.")
    ] = None,
    backbone_lr: Annotated[
        float | None, typer.Option(help="Learning rate of the backbone.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch per optimizer step.")] = None,
    seed: int | None = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone spec (default: default).")] = None,
    weights: WeightsOption = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/METHOD-TIME).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this directory from its `last`.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    feature_cache: Annotated[
        bool | None, typer.Option(help="Cache frozen-backbone features (default: on).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (0: default).")] = None,
    workers: Annotated[int | None, typer.Option(help="Image decoding worker processes.")] = None,
) -> None:
    """Train a method (with checkpoints in RUN_DIR, metrics.jsonl and results.json)."""
    from circe.backbones import WeightsNotFoundError
    from circe.train import TrainConfig, train
    from circe.train import resume as resume_run

    flags = {
        "method": method,
        "dataset": dataset,
        "root": None if root is None else str(root),
        "epochs": epochs,
        "lr": lr,
        "backbone_lr": backbone_lr,
        "batch_size": batch_size,
        "seed": seed,
        "backbone": backbone,
        "backbone_weights": None if weights is None else str(weights),
        "max_steps": max_steps,
        "feature_cache": feature_cache,
        "threads": threads,
        "workers": workers,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    try:
        if resume is not None:
            if config is not None:
                raise ValueError("--config cannot be used with --resume: the run has its config")
            result = resume_run(resume, overrides)
        else:
            settings = TrainConfig.from_yaml(config) if config else TrainConfig()
            settings = settings.replace(**overrides)
            _ensure_synthetic(settings.dataset, Path(settings.root))
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = out or Path("runs") / f"{settings.method}-{settings.dataset}-{stamp}"
            console.print(f"training {settings.method} on {settings.dataset} -> {run_dir}")
            result = train(settings, run_dir)
    except (
        FileNotFoundError,
        FileExistsError,
        WeightsNotFoundError,
        TypeError,
        ValueError,
    ) as error:
        raise _fail(str(error)) from None
    if not result.finished:
        console.print(f"stopped at max_steps; continue with: circe train --resume {result.run_dir}")
    elif result.results is not None:
        _print_run(result.results)
        best = result.run_dir / "best"
        console.print(f"run written to {result.run_dir} (evaluate: circe eval --checkpoint {best})")


bench_app = typer.Typer(
    help="Benchmarks: method quality over seeds, the feature cache's speed-up.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")
BenchOutOption = Annotated[
    Path, typer.Option(help="Directory for the JSON record and the Markdown table.")
]


def _bench_config(
    config: Path | None,
    root: Path,
    threads: int | None,
    weights: Path | None = None,
    **overrides,
) -> TrainConfig:
    """A bench's TrainConfig: the YAML `config` (or the defaults) with the flags given."""
    from circe.train import TrainConfig

    settings = TrainConfig.from_yaml(config) if config else TrainConfig()
    overrides |= {
        "root": str(root),
        "threads": threads,
        "backbone_weights": None if weights is None else str(weights),
    }
    settings = settings.replace(**{k: v for k, v in overrides.items() if v is not None})
    _ensure_synthetic(settings.dataset, Path(settings.root))
    return settings


def _read_bench_plan(path: Path) -> tuple[list[str], dict[str, str]]:
    """(methods, {method: recipe config path}) from a bench plan YAML."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"bench plan not found: {path}")
    plan = yaml.safe_load(path.read_text()) or {}
    methods, recipes = plan.get("methods", []), plan.get("recipes", {})
    unknown = set(plan) - {"methods", "recipes"}
    if unknown or not isinstance(methods, list) or not isinstance(recipes, dict):
        raise ValueError(
            f"{path}: a bench plan holds `methods:` (a list of names) and `recipes:` "
            f"(method: config path), got {sorted(plan)}"
        )
    return [str(m) for m in methods], {str(k): str(v) for k, v in recipes.items()}


def _command_line() -> str:
    return " ".join(["circe", *sys.argv[1:]])


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


@bench_app.command("quality")
def bench_quality(
    root: Annotated[Path, typer.Option(help="Data set directory.")] = DEFAULT_SYNTHETIC_ROOT,
    out: BenchOutOption = Path("benchmarks/results"),
    seeds: Annotated[int, typer.Option(help="Training seeds per trainable method.")] = 3,
    epochs: Annotated[int | None, typer.Option(help="Epochs per training run.")] = None,
    method: Annotated[
        list[str] | None, typer.Option(help="Only these methods (default: all registered).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML TrainConfig for every run.")] = None,
    backbone: BackboneOption = "default",
    weights: WeightsOption = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (0: default).")] = None,
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
    from circe.backbones import WeightsNotFoundError
    from circe.bench import quality

    try:
        base = _bench_config(config, root, threads, weights, epochs=epochs, backbone=backbone)
        planned_methods, planned_recipes = _read_bench_plan(plan) if plan else ([], {})
        given = dict(item.partition("=")[::2] for item in recipe or [])
        recipes = {}
        for name, path in {**planned_recipes, **given}.items():
            if not name or not path:
                raise ValueError(f"--recipe takes METHOD=CONFIG.yaml, got {name}={path}")
            recipes[name] = _bench_config(
                Path(path), root, threads, weights, epochs=epochs, backbone=backbone
            )
        methods = method or planned_methods or None
        record = quality(
            base, out, range(seeds), methods, _command_line(), runs_dir=runs, recipes=recipes
        )
    except (FileNotFoundError, WeightsNotFoundError, TypeError, ValueError) as error:
        raise _fail(str(error)) from None
    console.print((out / "quality.md").read_text())
    console.print(f"{len(record['methods'])} methods; written to {out}/quality.json and .md")


@bench_app.command("label-noise")
def bench_label_noise(
    root: Annotated[Path, typer.Option(help="Data set directory.")] = DEFAULT_SYNTHETIC_ROOT,
    out: BenchOutOption = Path("benchmarks/results"),
    method: Annotated[
        list[str] | None, typer.Option(help="Methods to compare (default: dwc, dwc-hard-labels).")
    ] = None,
    rate: Annotated[
        list[float] | None, typer.Option(help="Noise rates (default: 0, 0.3, 0.6).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Training seeds per method and rate.")] = 2,
    config: Annotated[Path | None, typer.Option(help="YAML TrainConfig for every run.")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (0: default).")] = None,
) -> None:
    """Train methods on increasingly noisy modification texts; write label_noise.json, .md
    and the curve label_noise.png."""
    from circe.bench import label_noise

    try:
        base = _bench_config(config, root, threads)
        label_noise(
            base,
            out,
            method or ("dwc", "dwc-hard-labels"),
            rate or (0.0, 0.3, 0.6),
            range(seeds),
            _command_line(),
        )
    except (FileNotFoundError, ImportError, TypeError, ValueError) as error:
        raise _fail(str(error)) from None
    console.print((out / "label_noise.md").read_text())


@bench_app.command("cache-speed")
def bench_cache_speed(
    root: Annotated[Path, typer.Option(help="Data set directory.")] = DEFAULT_SYNTHETIC_ROOT,
    out: BenchOutOption = Path("benchmarks/results"),
    method: str = "combiner",
    batch_size: int | None = None,
    backbone: BackboneOption = "default",
    weights: WeightsOption = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (0: default).")] = None,
) -> None:
    """One training epoch with and without the feature cache; write cache_speed.json and .md."""
    from circe.backbones import WeightsNotFoundError
    from circe.bench import cache_speed

    try:
        base = _bench_config(
            None, root, threads, weights, method=method, batch_size=batch_size, backbone=backbone
        )
        cache_speed(base, out, _command_line())
    except (FileNotFoundError, WeightsNotFoundError, TypeError, ValueError) as error:
        raise _fail(str(error)) from None
    console.print((out / "cache_speed.md").read_text())


@bench_app.command("fusion")
def bench_fusion(
    root: Annotated[Path, typer.Option(help="Data set directory.")] = DEFAULT_SYNTHETIC_ROOT,
    out: BenchOutOption = Path("benchmarks/results/fusion"),
    seeds: Annotated[int, typer.Option(help="Training seeds (members and DAFM).")] = 3,
    member: Annotated[
        list[str] | None,
        typer.Option(help="Member methods to train and fuse (default: combiner, dwc, dqu-cir)."),
    ] = None,
    random_member: Annotated[
        bool, typer.Option(help="Also fuse a copy of the first member with random weights.")
    ] = False,
    epochs: Annotated[int | None, typer.Option(help="Epochs per training run.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML TrainConfig for every run.")] = None,
    backbone: BackboneOption = "default",
    weights: WeightsOption = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (0: default).")] = None,
    runs: RunsOption = None,
    gate_split: Annotated[
        str,
        typer.Option(
            help="Split DAFM's gate is trained on: train (the members' own pairs) or val "
            "(held out from the members; then no model selection)."
        ),
    ] = "train",
) -> None:
    """Train member methods, then DAFM over them; compare DAFM with each member and with
    equal-weight fusion, and measure its cost; write fusion.json and fusion.md."""
    from circe.backbones import WeightsNotFoundError
    from circe.bench_fusion import DEFAULT_MEMBERS, fusion

    try:
        base = _bench_config(config, root, threads, weights, epochs=epochs, backbone=backbone)
        fusion(
            base,
            out,
            range(seeds),
            member or DEFAULT_MEMBERS,
            random_member,
            _command_line(),
            runs_dir=runs,
            gate_split=gate_split,
        )
    except (FileNotFoundError, WeightsNotFoundError, TypeError, ValueError) as error:
        raise _fail(str(error)) from None
    console.print((out / "fusion.md").read_text())


@app.command()
def caption(
    model: Annotated[Path, typer.Option(help="Local Hugging Face BLIP / BLIP-2 model directory.")],
    out: Annotated[Path, typer.Option(help="Captions JSON {image id: caption} (resumed).")],
    dataset: Annotated[str, typer.Option(help="Data set (synthetic).")] = "synthetic",
    root: Annotated[Path, typer.Option(help="Data set directory.")] = DEFAULT_SYNTHETIC_ROOT,
    split: Annotated[str, typer.Option(help="Whose gallery images to caption.")] = "test",
    batch_size: int = 16,
    max_new_tokens: int = 30,
) -> None:
    """Caption a split's images with a local captioning model into a JSON file (DQU-CIR's
    reference captions); rerunning it resumes and only captions what is missing."""
    from circe.data.captions import HFCaptioner, caption_gallery
    from circe.train.data import load_split

    try:
        data = load_split(dataset, root, split)
        captioner = HFCaptioner(model, max_new_tokens=max_new_tokens)
        captions = caption_gallery(data.gallery, captioner, out, batch_size, track)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    console.print(f"{len(captions)} captions in {out}")


@app.command("show-query")
def show_query(
    out: Annotated[Path, typer.Option(help="PNG file for the unified image query.")],
    method: Annotated[str, typer.Option(help="A method that prepares queries.")] = "dqu-cir",
    checkpoint: Annotated[
        Path | None, typer.Option(help="A trained run's RUN_DIR/best (for its λ).")
    ] = None,
    query: Annotated[str | None, typer.Option(help="Query id (default: the first).")] = None,
    dataset: Annotated[str, typer.Option(help="Data set (synthetic).")] = "synthetic",
    root: Annotated[Path, typer.Option(help="Data set directory.")] = DEFAULT_SYNTHETIC_ROOT,
    split: str = "test",
    scale: Annotated[int, typer.Option(help="Enlarge the PNG this many times.")] = 1,
    backbone: BackboneOption = "default",
    weights: WeightsOption = None,
) -> None:
    """Save a query as the method's encoders see it (DQU-CIR: the reference image with the
    key words written on it) and print its unified text and, where the method has one, λ."""
    from circe.data.batching import raw_query
    from circe.train.data import load_split

    model = _load_checkpoint(checkpoint) if checkpoint else _load_method(method, backbone, weights)
    if not model.prepares_queries:
        raise _fail(f"method {model.name!r} encodes queries as given; nothing to show")
    try:
        data = load_split(dataset, root, split)
        chosen = next((q for q in data.queries if query in (None, q.query_id)), None)
        if chosen is None:
            raise ValueError(f"split {split!r} has no query {query!r}")
        image, text = model.prepare_query(raw_query(chosen, data.gallery))
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise _fail(str(error)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * scale, image.height * scale)).save(out)
    console.print(f"query {chosen.query_id}: {chosen.reference_id} + {chosen.text!r}")
    console.print(f"unified text: {text!r}")
    pixels = model.backbone.preprocess(image)[None].to(model.backbone.device)
    for name, values in model.explain(pixels, [text]).items():  # DQU-CIR: λ, the text share
        console.print(f"{name}: {values[0]:.3f}")
    console.print(f"unified image query written to {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the gallery and pictures.")] = Path(
        "circe-demo"
    ),
    method: str = "sum",
    queries: Annotated[int, typer.Option(help="How many queries to show.")] = 6,
    backbone: BackboneOption = "default",
    weights: WeightsOption = None,
) -> None:
    """Build a small synthetic gallery, run composed queries, draw the results (PNG)."""
    from circe.demo import run_demo

    started = time.time()
    model = _load_method(method, backbone, weights)
    split, result, picks = run_demo(model, out, queries, track)
    metrics = ", ".join(f"{k} {v:.1f}" for k, v in result.metrics.items())
    console.print(
        f"[bold]{method}[/] on {len(split.queries)} demo queries, "
        f"{len(split.gallery)} images: {metrics}"
    )
    for n, pick in enumerate(picks, 1):
        rank = pick.target_rank
        verdict = f"[green]target at #{rank}[/]" if rank else "[red]target not in top 10[/]"
        console.print(f'\n[bold]query {n}[/]: {pick.reference_id} + "{pick.text}" -> {verdict}')
        for position, (image_id, score) in enumerate(
            zip(pick.ranked_ids[:5], pick.ranked_scores), 1
        ):
            mark = "  <- target" if image_id == pick.target_id else ""
            console.print(f"   {position}. {image_id}  {score:.3f}{mark}")
        console.print(f"   picture: {out / f'query-{n}.png'}")
    console.print(f"\ndone in {time.time() - started:.1f}s")


# Search your own images (circe.index, circe.serve): the command bodies live beside the code.
app.command("index")(index_command)
app.command("search")(search_command)
app.command("serve")(serve_command)
app.command("pseudo-targets")(pseudo_targets_command)


if __name__ == "__main__":
    app()

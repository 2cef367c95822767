"""Method and training commands: `circe methods`, `circe pretrain` (the default backbone) and
`circe train`."""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from circe.cli.common import (
    ThreadsOption,
    WeightsOption,
    console,
    fail,
    metrics_table,
    train_overrides,
    train_settings,
)
from circe.pretrain import PretrainConfig
from circe.progress import track

if TYPE_CHECKING:
    from circe.methods import CIRMethod


def list_registered() -> None:
    """List the registered CIR methods, each with its variants (ablations, baselines) under it."""
    from circe.methods import list_methods, method_class, variant_of

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column()
    for method in list_methods(variants=False):
        needs = method_class(method).requires
        table.add_row(method, _description(method_class(method), needs=""))
        for variant in (name for name in list_methods() if variant_of(name) == method):
            # A variant needs what its method needs; said again only where it differs.
            table.add_row(f"  {variant}", _description(method_class(variant), needs))
    console.print(table)


def _description(cls: type[CIRMethod], needs: str) -> str:
    """The summary paragraph of a method's docstring, and what the method needs first where
    that is not `needs` (escaped: shown as written, never read as markup)."""
    summary = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
    if cls.requires != needs:
        summary += f"\nneeds first: {cls.requires}"
    return escape(summary)


def pretrain(
    out: Annotated[Path, typer.Option(help="Weights file to write (safetensors).")] = Path(
        "circe-minilm.safetensors"
    ),
    backbone: Annotated[
        str, typer.Option(help="circe-minilm (the default) or circe-tiny (the earlier one).")
    ] = PretrainConfig.backbone,
    steps: int = PretrainConfig.steps,
    images: Annotated[int, typer.Option(help="Size of the rendered image pool.")] = (
        PretrainConfig.images
    ),
    batch_size: int = PretrainConfig.batch_size,
    lr: float = PretrainConfig.lr,
    warmup_steps: int = PretrainConfig.warmup_steps,
    text_layers_trained: Annotated[
        int, typer.Option(help="circe-minilm: top language-model layers trained (0: locked).")
    ] = PretrainConfig.text_layers_trained,
    text_lr: Annotated[
        float, typer.Option(help="circe-minilm: learning rate of those layers.")
    ] = PretrainConfig.text_lr,
    paraphrase_batch: Annotated[
        int, typer.Option(help="circe-tiny: paraphrase pairs per step (its shipped run: 128).")
    ] = PretrainConfig.paraphrase_batch,
    seed: int = 0,
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0: torch default).")] = 0,
) -> None:
    """Pretrain the default backbone's image tower against its language model (or all of
    circe-tiny) on synthetic image-text pairs. Run it again to resume an interrupted run."""
    from circe.pretrain import pretrain as run

    try:
        config = PretrainConfig(
            backbone=backbone,
            seed=seed,
            images=images,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=warmup_steps,
            text_layers_trained=text_layers_trained,
            text_lr=text_lr,
            paraphrase_batch=paraphrase_batch,
            threads=threads,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    report = run(out, config, track)
    console.print_json(json.dumps(report))
    console.print(f"weights written to {out}")


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
    threads: ThreadsOption = None,
    workers: Annotated[int | None, typer.Option(help="Image decoding worker processes.")] = None,
) -> None:
    """Train a method (with checkpoints in RUN_DIR, metrics.jsonl and results.json)."""
    from circe.train import resume as resume_run
    from circe.train import train

    overrides = train_overrides(
        method=method,
        dataset=dataset,
        root=root,
        epochs=epochs,
        lr=lr,
        backbone_lr=backbone_lr,
        batch_size=batch_size,
        seed=seed,
        backbone=backbone,
        weights=weights,
        max_steps=max_steps,
        feature_cache=feature_cache,
        threads=threads,
        workers=workers,
    )
    try:
        if resume is not None:
            if config is not None:
                raise ValueError("--config cannot be used with --resume: the run has its config")
            result = resume_run(resume, overrides)
        else:
            settings = train_settings(config, overrides)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = out or Path("runs") / f"{settings.method}-{settings.dataset}-{stamp}"
            console.print(f"training {settings.method} on {settings.dataset} -> {run_dir}")
            result = train(settings, run_dir)
    # WeightsNotFoundError is a FileNotFoundError; TypeError: a YAML file of the wrong shape.
    except (FileNotFoundError, FileExistsError, TypeError, ValueError) as error:
        raise fail(str(error)) from None
    if not result.finished:
        console.print(f"stopped at max_steps; continue with: circe train --resume {result.run_dir}")
    elif result.results is not None:
        _print_run(result.results)
        best = result.run_dir / "best"
        console.print(f"run written to {result.run_dir} (evaluate: circe eval --checkpoint {best})")


def _print_run(results: dict[str, Any]) -> None:
    title = f"{results['method']} (best epoch {results['best_epoch'] + 1})"
    if results["test"]:
        console.print(metrics_table(title, results["test"]))
    else:  # `test_splits: []`: trained and selected, nothing tested
        console.print(f"{title}: no test splits in the config, nothing tested")
    parameters = results["parameters"]
    console.print(
        f"trained {results['global_step']} steps in {results['train_seconds']:.1f}s; "
        f"{parameters['trainable']:,} trainable of {parameters['total']:,} parameters"
    )

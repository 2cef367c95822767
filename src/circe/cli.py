"""The `circe` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from circe.pretrain import PretrainConfig
from circe.progress import track

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
) -> None:
    """Write the synthetic benchmark (PNG images + JSON annotations), deterministic from SEED."""
    from circe.data.synthetic import SPLITS, SynthConfig, load_synthetic, write_synthetic

    config = SynthConfig(
        seed=seed,
        train=train,
        val=val,
        test=test,
        test_unseen=test_unseen,
        edits_per_reference=edits_per_reference,
    )
    try:
        root = write_synthetic(out, config, track)
    except FileExistsError as error:
        raise _fail(str(error)) from None
    for split in SPLITS:
        loaded = load_synthetic(root, split)
        console.print(f"{split:>10}: {len(loaded.queries)} queries, {len(loaded.gallery)} images")
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
    method: Annotated[list[str], typer.Option(help="Method name; repeat to compare several.")],
    dataset: Annotated[str, typer.Option(help="Data set (synthetic).")] = "synthetic",
    root: Annotated[Path, typer.Option(help="Data set directory.")] = DEFAULT_SYNTHETIC_ROOT,
    split: str = "test",
    backbone: BackboneOption = "default",
    weights: WeightsOption = None,
    batch_size: int = 128,
    workers: Annotated[int, typer.Option(help="Image decoding worker processes.")] = 0,
    by_kind: Annotated[bool, typer.Option(help="Also print metrics per edit kind.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
) -> None:
    """Evaluate methods on a benchmark split; prints R@1/R@10/R@50."""
    from circe.eval.evaluate import evaluate

    if dataset != "synthetic":
        raise _fail(f"unknown dataset {dataset!r}; available: synthetic")
    from circe.data.synthetic import SynthConfig, load_synthetic, write_synthetic

    if root == DEFAULT_SYNTHETIC_ROOT and not (root / "meta.json").exists():
        console.print(f"no benchmark at {root}: generating the default one (circe synth)")
        write_synthetic(root, SynthConfig(), track)
    try:
        data = load_synthetic(root, split)
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    results, per_kind = {}, {}
    for name in method:
        model = _load_method(name, backbone, weights)
        started = time.time()
        result = evaluate(model, data, batch_size=batch_size, workers=workers, progress=track)
        results[name] = result.metrics
        per_kind[name] = result.per_tag
        console.print(f"{name}: {time.time() - started:.1f}s")
    title = f"{dataset} {split} ({len(data.queries)} queries, {len(data.gallery)} images)"
    console.print(_metrics_table(title, results))
    if by_kind:
        for name in method:
            console.print(_metrics_table(f"{name} by edit kind", per_kind[name]))
    if json_out is not None:
        record = {
            "dataset": dataset,
            "split": split,
            "backbone": backbone,
            "protocol": data.protocol,
            "results": results,
            "per_kind": per_kind,
        }
        json_out.write_text(json.dumps(record, indent=2))


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


if __name__ == "__main__":
    app()

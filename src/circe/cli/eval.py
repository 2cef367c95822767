"""`circe eval`: compare methods on a benchmark (`circe.eval.compare`) and print the tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from circe.cli.common import (
    DEFAULT_SYNTHETIC_ROOT,
    BackboneOption,
    RootOption,
    WeightsOption,
    console,
    ensure_synthetic,
    fail,
    metrics_table,
)
from circe.progress import track

if TYPE_CHECKING:
    from circe.eval.compare import Scored


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
    root: RootOption = DEFAULT_SYNTHETIC_ROOT,
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
    from circe.eval.compare import check_candidates, compare
    from circe.eval.submission import SERVERS
    from circe.threads import set_torch_threads

    set_torch_threads(threads)
    methods, checkpoints = method or [], checkpoint or []
    try:  # before the default benchmark is generated for a command that cannot run
        check_candidates(methods, checkpoints, submission)
    except ValueError as error:
        raise fail(str(error)) from None
    if dataset != "synthetic" and root == DEFAULT_SYNTHETIC_ROOT:
        raise fail(f"give the {dataset} directory with --root (README: 'Real benchmarks')")
    ensure_synthetic(dataset, root)

    def report(scored: Scored) -> None:
        if submission is not None:
            console.print(f"{scored.name}: wrote {', '.join(map(str, scored.written))}")
        console.print(f"{scored.name}: {scored.seconds:.1f}s")

    try:
        comparison = compare(
            dataset,
            root,
            split,
            protocol,
            methods=methods,
            checkpoints=checkpoints,
            backbone=backbone,
            weights=weights,
            batch_size=batch_size,
            workers=workers,
            submission=submission,
            progress=track,
            on_scored=report,
        )
    except (FileNotFoundError, ValueError) as error:  # WeightsNotFoundError included
        raise fail(str(error)) from None
    results, benchmark = comparison.results, comparison.benchmark
    if submission is not None:
        console.print(f"upload them to {SERVERS[benchmark.submission]}", soft_wrap=True)
    if results:
        sizes = f"{sum(len(p.queries) for p in benchmark.parts)} queries, " + " + ".join(
            str(len(p.gallery)) for p in benchmark.parts
        )
        console.print(metrics_table(f"{dataset} {benchmark.split} ({sizes} images)", results))
    for name in results:
        if comparison.per_part[name]:
            console.print(metrics_table(f"{name} per part", comparison.per_part[name]))
        if by_kind and comparison.per_kind[name]:
            console.print(metrics_table(f"{name} by edit kind", comparison.per_kind[name]))
    if json_out is not None:
        json_out.write_text(json.dumps(comparison.to_json(), indent=2))

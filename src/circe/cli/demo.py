"""Seeing what a method does: `circe demo` (queries on a small gallery, drawn) and
`circe show-query` (a query as the method's encoders see it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from circe.cli.common import (
    DEFAULT_SYNTHETIC_ROOT,
    BackboneOption,
    RootOption,
    WeightsOption,
    console,
    fail,
    load_method,
    load_trained,
)
from circe.progress import track


def show_query(
    out: Annotated[Path, typer.Option(help="PNG file for the unified image query.")],
    method: Annotated[str, typer.Option(help="A method that prepares queries.")] = "dqu-cir",
    checkpoint: Annotated[
        Path | None, typer.Option(help="A trained run's RUN_DIR/best (for its λ).")
    ] = None,
    query: Annotated[str | None, typer.Option(help="Query id (default: the first).")] = None,
    dataset: Annotated[str, typer.Option(help="Data set (synthetic).")] = "synthetic",
    root: RootOption = DEFAULT_SYNTHETIC_ROOT,
    split: str = "test",
    scale: Annotated[int, typer.Option(help="Enlarge the PNG this many times.")] = 1,
    backbone: BackboneOption = "default",
    weights: WeightsOption = None,
) -> None:
    """Save a query as the method's encoders see it (DQU-CIR: the reference image with the
    key words written on it) and print its unified text and, where the method has one, λ."""
    from circe.data.batching import raw_query
    from circe.data.registry import load_split

    model = load_trained(checkpoint) if checkpoint else load_method(method, backbone, weights)
    if not model.inputs.prepares_queries:
        raise fail(f"method {model.name!r} encodes queries as given; nothing to show")
    try:
        data = load_split(dataset, root, split)
        chosen = next((q for q in data.queries if query in (None, q.query_id)), None)
        if chosen is None:
            raise ValueError(f"split {split!r} has no query {query!r}")
        image, text = model.prepare_query(raw_query(chosen, data.gallery))
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise fail(str(error)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * scale, image.height * scale)).save(out)
    console.print(f"query {chosen.query_id}: {chosen.reference_id} + {chosen.text!r}")
    console.print(f"unified text: {text!r}")
    pixels = model.backbone.preprocess(image)[None].to(model.backbone.device)
    for name, values in model.explain(pixels, [text]).items():  # DQU-CIR: λ, the text share
        console.print(f"{name}: {values[0]:.3f}")
    console.print(f"unified image query written to {out}")


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
    model = load_method(method, backbone, weights)
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

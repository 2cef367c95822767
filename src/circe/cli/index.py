"""`circe index` and `circe search`: a folder of images indexed with a method
(`circe.index.build`), and searched (`circe.index.search`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from circe.cli.common import (
    BackboneOption,
    IndexOption,
    PgvectorOption,
    SpaceOption,
    console,
    fail,
    load_method,
    load_trained,
)
from circe.progress import track

if TYPE_CHECKING:
    from circe.index.identity import MethodSource
    from circe.methods import CIRMethod

DEFAULT_INDEX_NAME = ".circe-index"  # inside the image folder; hidden, so never scanned

_METHOD_HELP = "Method name (see `circe methods`), e.g. sum."
_CHECKPOINT_HELP = "A trained method: RUN_DIR/best of `circe train`."
# Every error a user can cause here (bad path, bad index, wrong method, empty text) is one.
_USER_ERRORS = (OSError, ValueError)


def _source(
    method: str | None, checkpoint: Path | None, backbone: str, weights: Path | None
) -> MethodSource:
    """The `MethodSource` the flags name (nothing loaded yet)."""
    from circe.index.identity import MethodSource

    if checkpoint is not None:
        return MethodSource(checkpoint=str(checkpoint))
    if method is None:
        raise fail("name a --method (e.g. sum) or a trained --checkpoint RUN_DIR/best")
    return MethodSource(method, backbone, None if weights is None else str(weights))


def _load(source: MethodSource) -> CIRMethod:
    if source.checkpoint is not None:
        return load_trained(Path(source.checkpoint))
    weights = None if source.weights is None else Path(source.weights)
    return load_method(source.method, source.backbone, weights)


def _method_and_source(
    method: str | None, checkpoint: Path | None, backbone: str, weights: Path | None
) -> tuple[CIRMethod, MethodSource]:
    """Load the method the flags name -> (method, `MethodSource` to record)."""
    source = _source(method, checkpoint, backbone, weights)
    return _load(source), source


def index_command(
    path: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    method: Annotated[str | None, typer.Option(help=_METHOD_HELP)] = None,
    checkpoint: Annotated[Path | None, typer.Option(help=_CHECKPOINT_HELP)] = None,
    out: Annotated[
        Path | None, typer.Option(help=f"Index directory (default: PATH/{DEFAULT_INDEX_NAME}).")
    ] = None,
    space: Annotated[
        str | None, typer.Option(help="Embedding space name (default: the method's name).")
    ] = None,
    backbone: BackboneOption = "default",
    weights: Annotated[Path | None, typer.Option(help="Local backbone weights file.")] = None,
    batch_size: int = 64,
    workers: Annotated[
        int, typer.Option(min=0, help="Image decoding worker processes (0: threads, see below).")
    ] = 0,
    decode_threads: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Threads decoding the next batches while one is embedded (default: the "
            "cores torch leaves free; 0: decode and embed in turn).",
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="Stored vectors: float32 or float16.")] = "float32",
    exact_below: Annotated[
        int, typer.Option(help="Exact search below this many images, approximate above.")
    ] = 100_000,
    approximate: Annotated[
        str, typer.Option(help="The approximate index above --exact-below: ivf or hnsw.")
    ] = "ivf",
    pgvector: Annotated[
        str | None,
        typer.Option(
            help="Search on this PostgreSQL server (pgvector) instead of in-process FAISS: "
            "a connection string, e.g. postgresql://USER@HOST/DB (not stored in the index)."
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Embed on a Ray cluster: 'local' (a Ray instance on this machine), 'auto' "
            "(the cluster this machine joined) or its address (HOST:6379, ray://HOST:10001). "
            "PATH and the weights must be on storage every node mounts at the same path. "
            "Needs circe[ray]."
        ),
    ] = None,
    ray_actors: Annotated[int, typer.Option(min=1, help="Ray: method copies at once.")] = 2,
    ray_gpus: Annotated[
        float, typer.Option(min=0, help="Ray: GPUs per actor (0.5: two share one).")
    ] = 0.0,
    ray_cpus: Annotated[float, typer.Option(min=0.1, help="Ray: CPUs per actor.")] = 1.0,
) -> None:
    """Embed every image under PATH into an index (only new or changed images on re-runs;
    an interrupted run resumes)."""
    from circe.index.build import build_index, unchanged_report
    from circe.index.engine import EngineOptions
    from circe.index.ray_embed import RayOptions, RayUnavailableError
    from circe.index.reader import AUTO, check_batch_size

    source = _source(method, checkpoint, backbone, weights)
    index_dir = out or path / DEFAULT_INDEX_NAME
    try:
        check_batch_size(batch_size)  # before a model is loaded for nothing
        cluster = None
        if ray is not None:
            cluster = RayOptions(ray, ray_actors, ray_gpus, ray_cpus, batch_size)
        # A re-run over an unchanged folder is told from the files, without loading the model.
        report = unchanged_report(path, index_dir, source, space, dtype, pgvector)
        report = report or build_index(
            path,
            index_dir,
            _load(source),
            source,
            space=space,
            batch_size=batch_size,
            workers=workers,
            threads=AUTO if decode_threads is None else decode_threads,
            dtype=dtype,
            engine_options=EngineOptions(exact_below=exact_below, approximate=approximate),
            progress=track,
            pgvector=pgvector,
            ray=cluster,
        )
    except (*_USER_ERRORS, RayUnavailableError) as error:
        raise fail(str(error)) from None
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted:[/] the last committed index is unchanged and the images "
            "embedded so far are kept; run the same command again to resume"
        )
        raise typer.Exit(code=130) from None
    table = Table(title=f"{index_dir} · space {report.space!r}", show_header=False)
    counts = {
        "images indexed": report.images,
        "unchanged (kept)": report.unchanged,
        "embedded now": report.embedded,
        "resumed from an interrupted run": report.resumed,
        "added / changed": f"{report.added} / {report.changed}",
        "removed (deleted files)": report.removed,
        "unreadable (skipped)": len(report.failed),
    }
    for name, value in counts.items():
        table.add_row(name, str(value))
    console.print(table)
    console.print(f"search engine: {report.engine['reason']}")
    for failure in report.failed[:20]:
        console.print(f"[yellow]skipped[/] {failure.path}: {failure.error}")
    if len(report.failed) > 20:
        console.print(f"... and {len(report.failed) - 20} more")
    report_file = index_dir / report.space / "report.json"
    console.print(f"done in {report.seconds:.1f}s; report: {report_file}")


def search_command(
    index: IndexOption,
    image: Annotated[
        str, typer.Option(help="Reference: an image file, or a gallery image's id or path.")
    ],
    text: Annotated[str, typer.Option(help="How the wanted image differs from the reference.")],
    k: Annotated[int, typer.Option("-k", "--k", help="How many results.")] = 10,
    space: SpaceOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    explain: Annotated[bool, typer.Option(help="Also print the method's internals.")] = False,
    method: Annotated[
        str | None, typer.Option(help="Check the index was built with this method.")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help=_CHECKPOINT_HELP)] = None,
    backbone: BackboneOption = "default",
    weights: Annotated[Path | None, typer.Option(help="Local backbone weights file.")] = None,
    pgvector: PgvectorOption = None,
) -> None:
    """Rank the indexed images for a reference image changed as TEXT says."""
    from circe.index.search import IndexSearcher

    given, source = (None, None)
    if method is not None or checkpoint is not None:
        given, source = _method_and_source(method, checkpoint, backbone, weights)
    try:
        searcher = IndexSearcher(index, space, given, source, pgvector)
        reference = searcher.resolve_reference(image)
        hits = searcher.search(reference, text, k)
        explanation = searcher.explain(reference, text) if explain else None
    except _USER_ERRORS as error:
        raise fail(str(error)) from None
    if json_out:
        record = {
            "index": str(index),
            "space": searcher.space.name,
            "method": searcher.space.identity.to_json(),
            "reference": {"image": image, "id": reference.id, "path": reference.path},
            "text": text.strip(),
            "results": [{**vars(hit), "file": str(searcher.root / hit.path)} for hit in hits],
        }
        if explanation is not None:
            record["explain"] = explanation
        typer.echo(json.dumps(record, indent=2))
        return
    table = Table(title=f"{image} + {text.strip()!r}")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("path")
    table.add_column("id")
    for hit in hits:
        table.add_row(str(hit.rank), f"{hit.score:.4f}", str(searcher.root / hit.path), hit.id)
    console.print(table)
    if explanation is not None:
        if explanation:
            console.print_json(json.dumps(explanation))
        else:
            console.print(f"method {searcher.method.name!r} has no internals to explain")

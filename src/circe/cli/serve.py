"""`circe serve`: the HTTP API and the search page (`circe.serve`) over an index."""

from __future__ import annotations

from typing import Annotated

import typer

from circe.cli.common import IndexOption, PgvectorOption, SpaceOption, console, fail


def serve_command(
    index: IndexOption,
    space: SpaceOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: int = 8000,
    batch_max: Annotated[
        int, typer.Option(help="Most concurrent queries encoded in one batch (1: no batching).")
    ] = 32,
    batch_window_ms: Annotated[
        float, typer.Option(help="How long a query waits for others to batch with.")
    ] = 2.0,
    pgvector: PgvectorOption = None,
) -> None:
    """Serve the HTTP API (/search, /images, /thumbnails, /healthz, /docs) and the search
    web page (/) over an index."""
    try:
        import uvicorn

        from circe.serve.app import create_app
        from circe.serve.batching import BatchOptions
    except ImportError as error:
        raise fail(
            f"circe serve needs the serve extra ({error.name} is missing): "
            "pip install 'circe[serve]'"
        ) from None
    from circe.index.search import IndexSearcher

    try:
        batching = BatchOptions(batch_max, batch_window_ms)
        searcher = IndexSearcher(index, space, pgvector=pgvector)  # the model loads once, here
    except (OSError, ValueError) as error:
        raise fail(str(error)) from None
    console.print(
        f"serving {len(searcher)} images ({searcher.space.identity.describe()}) at "
        f"http://{host}:{port}/  (API docs: /docs)"
    )
    uvicorn.run(create_app(searcher, batching=batching), host=host, port=port)

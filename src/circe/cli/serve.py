"""`circe serve`: the HTTP API and the search page (`circe.serve`) over an index."""

from __future__ import annotations

from typing import Annotated

import typer

from circe.cli.common import IndexOption, PgvectorOption, SpaceOption, console, fail


def serve_command(
    index: IndexOption,
    space: SpaceOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Another Host name the server answers to (repeatable; '*' for any). "
            "Default: localhost, 127.0.0.1, ::1 and the --host address."
        ),
    ] = None,
    batch_max: Annotated[
        int, typer.Option(help="Most concurrent queries encoded in one batch (1: no batching).")
    ] = 32,
    batch_window_ms: Annotated[
        float, typer.Option(help="How long a query waits for others to batch with.")
    ] = 2.0,
    pgvector: PgvectorOption = None,
) -> None:
    """Serve the HTTP API (/search, /images, /thumbnails, /healthz; schema at /openapi.json)
    and the search web page (/) over an index."""
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
        f"http://{host}:{port}/  (API schema: /openapi.json)"
    )
    # Requests naming another host are refused (DNS rebinding); a wildcard bind address
    # names no host, so only the loopback names and --allow-host ones are answered.
    hosts = ["localhost", "127.0.0.1", "[::1]", *(allow_host or [])]
    if host not in ("0.0.0.0", "::"):
        hosts.append(f"[{host}]" if ":" in host else host)
    app = create_app(searcher, batching=batching, trusted_hosts=hosts)
    uvicorn.run(app, host=host, port=port)

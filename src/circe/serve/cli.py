"""`circe serve`: the command body (registered in `circe.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve_command(
    index: Annotated[Path, typer.Option(help="Index directory made by `circe index`.")],
    space: Annotated[str | None, typer.Option(help="Embedding space (if several).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Serve the HTTP API (/search, /images, /thumbnails, /healthz, /docs) and the search
    web page (/) over an index."""
    from circe.cli import _fail, console

    try:
        import uvicorn

        from circe.serve.app import create_app
    except ImportError as error:
        raise _fail(
            f"circe serve needs the serve extra ({error.name} is missing): "
            "pip install 'circe[serve]'"
        ) from None
    from circe.index.search import IndexSearcher

    try:
        searcher = IndexSearcher(index, space)  # the model is loaded once, here
    except (OSError, ValueError) as error:
        raise _fail(str(error)) from None
    console.print(
        f"serving {len(searcher)} images ({searcher.space.identity.describe()}) at "
        f"http://{host}:{port}/  (API docs: /docs)"
    )
    uvicorn.run(create_app(searcher), host=host, port=port)

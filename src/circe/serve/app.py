"""The HTTP API and the web page over one index (`circe serve`).

The method is loaded once, when the app is made (`IndexSearcher`), and every request reuses
it; concurrent searches are encoded together in batches (`circe.serve.batching`). Everything a client can get wrong (a file that is not an image, a huge image, an empty
or huge text, k out of range, an unknown id) is answered with a 4xx and a message; the
OpenAPI description is at /docs and /openapi.json.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.middleware.trustedhost import TrustedHostMiddleware

from circe import __version__
from circe.data.images import load_rgb
from circe.data.types import DatasetFormatError
from circe.index.files import resolved
from circe.index.search import MAX_K, IndexSearcher, QueryError, Reference, UnknownImageError
from circe.serve.batching import BatchOptions, QueryBatcher
from circe.serve.thumbnails import MAX_SIZE, MIN_SIZE, thumbnail
from circe.serve.uploads import UploadError, UploadLimits, decode_upload

STATIC = files("circe.serve") / "static"


class Result(BaseModel):
    rank: int
    id: str
    path: str
    score: float
    image_url: str
    thumbnail_url: str


class SearchResponse(BaseModel):
    text: str
    k: int
    reference_id: str | None  # when the reference was a gallery image
    results: list[Result]
    took_ms: float


class GalleryItem(BaseModel):
    id: str
    path: str
    image_url: str
    thumbnail_url: str


class GalleryPage(BaseModel):
    total: int
    offset: int
    items: list[GalleryItem]


def _unreadable(relative: str, error: DatasetFormatError) -> HTTPException:
    """409 for an indexed file that no longer reads as an image, named by its path in the
    gallery (the server's own paths stay private)."""
    return HTTPException(409, f"{relative} no longer reads as an image; re-index")


def _gallery_image(relative: str, path: Path):
    try:
        return load_rgb(path)
    except DatasetFormatError as error:
        raise _unreadable(relative, error) from None


def _urls(image_id: str) -> dict[str, str]:
    return {"image_url": f"/images/{image_id}", "thumbnail_url": f"/thumbnails/{image_id}"}


class BodyLimit:
    """Refuse a request body past `max_bytes` (413) while it arrives, before the multipart
    parser spools it to disk: by its Content-Length when it says one, and by counting when
    it is chunked (which names no length). Past the limit the app is told the body ended,
    and whatever it answers to the cut body is replaced by the 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        received, over = 0, False

        async def counted():
            nonlocal received, over
            if over:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def answered(message):
            if not over:
                return await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                await self._refuse(scope, receive, send)

        await self.app(scope, counted, answered)

    async def _refuse(self, scope, receive, send) -> None:
        message = f"the request is larger than {self.max_bytes // 2**20} MiB"
        await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)


def create_app(
    searcher: IndexSearcher,
    limits: UploadLimits | None = None,
    batching: BatchOptions | None = None,
    trusted_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """The FastAPI app serving `searcher`'s index. `trusted_hosts`: the Host header values
    answered (others get 400), against DNS rebinding: a page elsewhere that points its name
    at 127.0.0.1 must not read the gallery; None: no check (`circe serve` always sets it)."""
    limits = limits or UploadLimits()
    batcher = QueryBatcher(searcher, batching)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        batcher.close()  # queued queries are answered before the server stops

    app = FastAPI(
        lifespan=lifespan,
        title="circe",
        version=__version__,
        # The interactive docs load their scripts from a CDN: blank offline, and a third
        # party on a private gallery. The schema stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
        description=(
            "Composed image retrieval over an indexed folder: a reference image plus a "
            f"modification text -> ranked gallery images ({searcher.space.identity.describe()})."
        ),
    )
    app.state.batcher = batcher
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # The upload check below still applies to what gets through (form fields add a little).
    app.add_middleware(BodyLimit, max_bytes=limits.max_bytes + 2**16)
    if trusted_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(trusted_hosts))
    root = searcher.root.resolve()

    def gallery_file(image_id: str):
        """The indexed file of `image_id`, only as it was indexed: a regular file inside the
        indexed folder (a link re-pointed elsewhere is not followed out), with the size and
        mtime the index recorded (404 when gone, 410 when changed: re-index)."""
        try:
            file = searcher.image_file(image_id)
        except UnknownImageError as error:
            raise HTTPException(404, str(error)) from None
        path = resolved(searcher.root / file.path)  # None: replaced by a loop of links
        try:
            info = None if path is None else path.stat()
        except OSError:
            info = None
        if info is None or not path.is_relative_to(root) or not stat.S_ISREG(info.st_mode):
            raise HTTPException(
                404, f"image {image_id} ({file.path}) is indexed but its file is gone; re-index"
            )
        if not file.same_file(info.st_size, info.st_mtime_ns):
            raise HTTPException(
                410, f"image {image_id} ({file.path}) has changed since it was indexed; re-index"
            )
        return file, path

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (STATIC / "index.html").read_text()

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness, and what is being served."""
        identity = searcher.space.identity
        return {
            "status": "ok",
            "images": len(searcher),
            "space": searcher.space.name,
            "method": identity.method,
            "backbone": identity.backbone,
            "engine": searcher.engine.choice.kind,
            "batching": batcher.stats(),
        }

    @app.post("/search", response_model=SearchResponse)
    def search(
        text: Annotated[str, Form(description="How the target differs from the reference.")],
        k: Annotated[int, Form(description=f"How many results (1..{MAX_K}).")] = 10,
        image_id: Annotated[
            str | None, Form(alias="id", description="A gallery image id as the reference.")
        ] = None,
        image: Annotated[
            UploadFile | None, File(description="An uploaded reference image.")
        ] = None,
    ) -> SearchResponse:
        """Rank the gallery for a reference image (upload OR gallery id) changed by `text`.

        A gallery reference is left out of its own results."""
        started = time.perf_counter()
        if (image is None) == (image_id is None):
            raise HTTPException(422, "give exactly one reference: an image file or a gallery id")
        try:
            if image is not None:
                reference = Reference(decode_upload(image.file.read(limits.max_bytes + 1), limits))
            else:
                file, path = gallery_file(image_id)
                reference = Reference(_gallery_image(file.path, path), file.id, file.path)
            hits = batcher.search(reference, text, k)
        except UploadError as error:
            raise HTTPException(error.status, str(error)) from None
        except QueryError as error:
            raise HTTPException(422, str(error)) from None
        return SearchResponse(
            text=text.strip(),
            k=k,
            reference_id=reference.id,
            results=[Result(**vars(hit), **_urls(hit.id)) for hit in hits],
            took_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    @app.get("/gallery", response_model=GalleryPage)
    def gallery(
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 48,
    ) -> GalleryPage:
        """A page of the indexed images, in path order (to pick a reference from)."""
        chosen = searcher.space.files[offset : offset + limit]
        return GalleryPage(
            total=len(searcher),
            offset=offset,
            items=[GalleryItem(id=f.id, path=f.path, **_urls(f.id)) for f in chosen],
        )

    @app.get("/images/{image_id}")
    def original(image_id: str) -> FileResponse:
        """The gallery image file itself."""
        _, path = gallery_file(image_id)
        return FileResponse(path)

    @app.get("/thumbnails/{image_id}", responses={200: {"content": {"image/jpeg": {}}}})
    def preview(
        image_id: str, size: Annotated[int, Query(ge=MIN_SIZE, le=MAX_SIZE)] = 192
    ) -> Response:
        """A JPEG preview of a gallery image that fits `size` x `size`."""
        file, path = gallery_file(image_id)
        try:
            data = thumbnail(path, size)
        except DatasetFormatError as error:
            raise _unreadable(file.path, error) from None
        return Response(data, media_type="image/jpeg")

    return app

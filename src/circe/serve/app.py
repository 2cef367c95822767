"""The HTTP API and the web page over one index (`circe serve`).

The method is loaded once, when the app is made (`IndexSearcher`), and every request reuses
it; concurrent searches are encoded together in batches (`circe.serve.batching`). Everything a client can get wrong (a file that is not an image, a huge image, an empty
or huge text, k out of range, an unknown id) is answered with a 4xx and a message; the
OpenAPI description is at /docs and /openapi.json.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from circe import __version__
from circe.data.images import load_rgb
from circe.data.types import DatasetFormatError
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


def _urls(image_id: str) -> dict[str, str]:
    return {"image_url": f"/images/{image_id}", "thumbnail_url": f"/thumbnails/{image_id}"}


def create_app(
    searcher: IndexSearcher,
    limits: UploadLimits | None = None,
    batching: BatchOptions | None = None,
) -> FastAPI:
    """The FastAPI app serving `searcher`'s index."""
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
        description=(
            "Composed image retrieval over an indexed folder: a reference image plus a "
            f"modification text -> ranked gallery images ({searcher.space.identity.describe()})."
        ),
    )
    app.state.batcher = batcher
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.middleware("http")
    async def refuse_huge_bodies(request: Request, call_next):
        # Refused before the multipart parser spools the body to disk; the upload check
        # below still applies to what gets through (the form fields add a little).
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_bytes + 2**16:
            message = f"the request is larger than {limits.max_bytes // 2**20} MiB"
            return JSONResponse({"detail": message}, status_code=413)
        return await call_next(request)

    def gallery_file(image_id: str):
        try:
            file = searcher.image_file(image_id)
        except UnknownImageError as error:
            raise HTTPException(404, str(error)) from None
        path = searcher.root / file.path
        if not path.is_file():
            raise HTTPException(
                404, f"image {image_id} ({file.path}) is indexed but its file is gone; re-index"
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
                reference = Reference(load_rgb(path), file.id, file.path)
            hits = batcher.search(reference, text, k)
        except UploadError as error:
            raise HTTPException(error.status, str(error)) from None
        except QueryError as error:
            raise HTTPException(422, str(error)) from None
        except DatasetFormatError as error:  # a gallery file that no longer decodes
            raise HTTPException(409, f"{error}; re-index the gallery") from None
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
        _, path = gallery_file(image_id)
        try:
            data = thumbnail(path, size)
        except DatasetFormatError as error:
            raise HTTPException(409, f"{error}; re-index the gallery") from None
        return Response(data, media_type="image/jpeg")

    return app

"""The HTTP API of `circe serve` (FastAPI TestClient): answers, and 4xx for every bad input."""

import io
import random

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from circe.data.render import render_scene
from circe.data.synthetic import random_scene
from circe.index.build import build_index
from circe.index.identity import MethodSource
from circe.index.search import IndexSearcher
from circe.methods import create_method
from circe.serve.app import create_app
from circe.serve.uploads import UploadLimits

LIMITS = UploadLimits(max_bytes=300_000, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    rng = random.Random(3)
    for i in range(16):
        render_scene(random_scene(rng), 64).save(root / f"scene-{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def client(gallery, tmp_path_factory, default_backbone):
    index = tmp_path_factory.mktemp("index")
    method = create_method("sum", default_backbone)
    build_index(gallery, index, method, MethodSource(method="sum"), batch_size=8)
    searcher = IndexSearcher(index, method=method, source=MethodSource(method="sum"))
    return TestClient(create_app(searcher, LIMITS))


def png_bytes(image):
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def ids(client):
    return [item["id"] for item in client.get("/gallery", params={"limit": 100}).json()["items"]]


def test_healthz_and_docs(client):
    health = client.get("/healthz").json()
    assert health == {
        "status": "ok",
        "images": 16,
        "space": "sum",
        "method": "sum",
        "backbone": health["backbone"],
        "engine": "flat",
        "batching": health["batching"],
    }
    assert health["batching"]["max_batch"] == 32
    assert "/search" in client.get("/openapi.json").json()["paths"]
    # No interactive docs: their scripts come from a CDN (blank offline, a third party).
    assert client.get("/docs").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_search_by_upload_and_by_gallery_id(client, gallery, ids):
    upload = {"image": ("ref.png", (gallery / "scene-00.png").read_bytes(), "image/png")}
    response = client.post("/search", data={"text": "make it red", "k": "5"}, files=upload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reference_id"] is None and len(body["results"]) == 5
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert body["results"][0]["id"] in ids  # the same picture, uploaded, ranks first
    assert body["results"][0]["path"] == "scene-00.png"

    response = client.post("/search", data={"text": "make it red", "k": 20, "id": ids[0]})
    body = response.json()
    assert body["reference_id"] == ids[0] and len(body["results"]) == 15  # reference left out
    assert ids[0] not in {r["id"] for r in body["results"]}
    first = body["results"][0]
    assert first["image_url"] == f"/images/{first['id']}"


def test_images_thumbnails_and_gallery(client, gallery, ids):
    original = client.get(f"/images/{ids[0]}")
    assert (
        original.status_code == 200 and original.content == (gallery / "scene-00.png").read_bytes()
    )
    thumb = client.get(f"/thumbnails/{ids[0]}", params={"size": 32})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 32
    page = client.get("/gallery", params={"offset": 10, "limit": 4}).json()
    assert page["total"] == 16 and [i["id"] for i in page["items"]] == ids[10:14]


def test_bad_inputs_are_4xx_with_a_message(client, ids):
    huge = png_bytes(Image.new("RGB", (1200, 1000), "white"))  # small file, many pixels
    sliver = png_bytes(Image.new("RGB", (4000, 1), "white"))  # preprocessing would upscale it
    noise = Image.frombytes("RGB", (400, 400), random.Random(0).randbytes(400 * 400 * 3))
    cases = {
        "not an image": ({"text": "red"}, {"image": ("x.png", b"hello", "image/png")}, 400),
        "empty file": ({"text": "red"}, {"image": ("x.png", b"", "image/png")}, 400),
        "too many bytes": (
            {"text": "red"},
            {"image": ("n.png", png_bytes(noise), "image/png")},
            413,
        ),
        "too many pixels": ({"text": "red"}, {"image": ("h.png", huge, "image/png")}, 413),
        "a sliver": ({"text": "red"}, {"image": ("s.png", sliver, "image/png")}, 422),
        "empty text": ({"text": "", "id": ids[0]}, None, 422),
        "blank text": ({"text": "   ", "id": ids[0]}, None, 422),
        "no text": ({"id": ids[0]}, None, 422),
        "huge text": ({"text": "red " * 400, "id": ids[0]}, None, 422),
        "k zero": ({"text": "red", "k": 0, "id": ids[0]}, None, 422),
        "k too big": ({"text": "red", "k": 100_000, "id": ids[0]}, None, 422),
        "k not a number": ({"text": "red", "k": "ten", "id": ids[0]}, None, 422),
        "unknown id": ({"text": "red", "id": "0123456789abcdef"}, None, 404),
        "no reference": ({"text": "red"}, None, 422),
        "two references": (
            {"text": "red", "id": ids[0]},
            {"image": ("x.png", png_bytes(Image.new("RGB", (8, 8))), "image/png")},
            422,
        ),
    }
    for name, (data, files, status) in cases.items():
        response = client.post("/search", data=data, files=files)
        assert response.status_code == status, (name, response.text)
        assert response.json()["detail"], name
    huge_body = b"x" * (LIMITS.max_bytes + 2**17)
    response = client.post("/search", data={"text": "red"}, files={"image": ("b.png", huge_body)})
    assert response.status_code == 413 and "larger than" in response.json()["detail"]
    assert client.get("/images/nope").status_code == 404
    assert client.get(f"/thumbnails/{ids[0]}", params={"size": 5000}).status_code == 422
    assert client.get("/gallery", params={"limit": 0}).status_code == 422


def test_a_deleted_gallery_file_is_404_not_500(client, gallery, ids):
    victim = gallery / "scene-15.png"
    saved = victim.read_bytes()
    victim.unlink()
    try:
        image_id = ids[15]
        assert client.get(f"/images/{image_id}").status_code == 404
        assert client.post("/search", data={"text": "red", "id": image_id}).status_code == 404
        assert "re-index" in client.get(f"/thumbnails/{image_id}").json()["detail"]
    finally:
        victim.write_bytes(saved)

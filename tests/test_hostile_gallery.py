"""A gallery as a hostile user leaves it: every image goes through one guard
(`circe.data.images.read_image`), so indexing finishes, each bad file is reported with its
reason, and serving never answers 5xx for one (also when a file changes after indexing)."""

import io
import os
import random

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from circe.data.images import ImageLimits, ImageRejected, read_image
from circe.data.render import render_scene
from circe.data.synthetic import random_scene
from circe.index.build import build_index
from circe.index.identity import MethodSource
from circe.index.search import IndexSearcher
from circe.methods import create_method
from circe.serve.app import create_app
from circe.serve.uploads import UploadLimits


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def bomb() -> bytes:
    """A few kilobytes that decode to 100 million pixels."""
    return png(Image.new("1", (10_000, 10_000)))


def sideways_photo() -> bytes:
    """A 40 x 20 JPEG whose EXIF says: rotate 90° to view (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 30, 30)).save(out, format="JPEG", exif=exif)
    return out.getvalue()


BAD = {  # file name -> the reason the report must give
    "strip.png": "one side may be at most",  # 100000 x 1: gigabytes once preprocessed
    "bomb.png": "pixels",
    "cut.png": "truncated",
    "notes.jpg": "cannot identify image",
    "empty.png": "empty",
    "pipe.png": "not a regular file",  # a FIFO would block a reader forever
    "escape.png": "outside the indexed folder",
    "caf\\udce9.png": "not valid UTF-8",
}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    rng = random.Random(7)
    for i in range(6):
        render_scene(random_scene(rng), 64).save(root / f"scene-{i}.png")
    (root / "sideways.jpg").write_bytes(sideways_photo())
    (root / "strip.png").write_bytes(png(Image.new("RGB", (100_000, 1))))
    (root / "bomb.png").write_bytes(bomb())
    whole = png(Image.new("RGB", (64, 64), (10, 200, 10)))
    (root / "cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "notes.jpg").write_text("not a picture\n")
    (root / "empty.png").write_bytes(b"")
    os.mkfifo(root / "pipe.png")
    outside = root.parent / "outside.png"
    render_scene(random_scene(rng), 64).save(outside)
    (root / "escape.png").symlink_to(outside)
    # A name that is not UTF-8 (a Latin-1 "é" written by an old camera or archive).
    os.close(os.open(os.fsencode(root) + b"/caf\xe9.png", os.O_CREAT | os.O_WRONLY))
    return root


def test_the_guard_applies_exif_orientation_and_limits():
    upright = read_image(sideways_photo())
    assert upright.size == (20, 40)  # turned as the camera said
    with pytest.raises(ImageRejected, match="pixels") as caught:
        read_image(bomb())
    assert caught.value.status == 413
    with pytest.raises(ImageRejected, match="times the other") as caught:
        read_image(png(Image.new("RGB", (300, 10))), ImageLimits(max_aspect=10))
    assert caught.value.status == 422


def test_index_finishes_and_reports_every_bad_file_with_its_reason(
    gallery, tmp_path, default_backbone
):
    method = create_method("sum", default_backbone)
    report = build_index(gallery, tmp_path / "index", method, MethodSource(method="sum"))
    assert report.images == 7  # the six scenes and the sideways photo
    reasons = {failure.path: failure.error for failure in report.failed}
    assert set(reasons) == set(BAD)
    for name, reason in BAD.items():
        assert reason in reasons[name], (name, reasons[name])


def test_serve_answers_4xx_not_5xx_for_files_that_went_bad(gallery, tmp_path, default_backbone):
    """Files replaced after indexing (a bomb, an endless strip, garbage): search by their
    id and their thumbnails are refused with a reason, never a server error."""
    method = create_method("sum", default_backbone)
    index = tmp_path / "index"
    build_index(gallery, index, method, MethodSource(method="sum"))
    client = TestClient(create_app(IndexSearcher(index, method=method)))
    items = client.get("/gallery", params={"limit": 100}).json()["items"]
    ids = {item["path"]: item["id"] for item in items}
    replacements = {
        "scene-0.png": bomb(),
        "scene-1.png": png(Image.new("RGB", (100_000, 1))),
        "scene-2.png": b"garbage",
    }
    for name, data in replacements.items():
        (gallery / name).write_bytes(data)
        image_id = ids[name]
        search = client.post("/search", data={"text": "make it red", "id": image_id})
        thumbnail = client.get(f"/thumbnails/{image_id}")
        for response in (search, thumbnail):
            assert response.status_code == 410, (name, response.status_code, response.text)
            assert "changed since it was indexed; re-index" in response.json()["detail"]
    # The untouched images still answer.
    fine = client.post("/search", data={"text": "make it red", "id": ids["scene-3.png"]})
    assert fine.status_code == 200 and fine.json()["results"]


def test_index_of_a_missing_folder_creates_nothing(tmp_path, default_backbone):
    method = create_method("sum", default_backbone)
    missing = tmp_path / "no" / "photos"
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        build_index(missing, missing / ".circe-index", method, MethodSource(method="sum"))
    assert not (tmp_path / "no").exists()


def test_serve_follows_no_link_out_of_the_folder_and_checks_the_host(tmp_path, default_backbone):
    """A link indexed inside the folder and re-pointed afterwards at a file outside it is
    not served; a request naming an untrusted host (DNS rebinding) is refused; a chunked
    upload past the limit is refused while it arrives."""
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = random.Random(1)
    for i in range(3):
        render_scene(random_scene(rng), 64).save(gallery / f"scene-{i}.png")
    (gallery / "link.png").symlink_to(gallery / "scene-0.png")
    method = create_method("sum", default_backbone)
    build_index(gallery, tmp_path / "index", method, MethodSource(method="sum"))
    app = create_app(
        IndexSearcher(tmp_path / "index", method=method),
        UploadLimits(max_bytes=50_000),
        trusted_hosts=["localhost"],
    )
    client = TestClient(app, base_url="http://localhost")
    items = client.get("/gallery").json()["items"]
    link = next(item["id"] for item in items if item["path"] == "link.png")
    assert client.get(f"/images/{link}").status_code == 200
    secret = tmp_path / "secret.png"
    secret.write_bytes((gallery / "scene-1.png").read_bytes())
    (gallery / "link.png").unlink()
    (gallery / "link.png").symlink_to(secret)
    response = client.get(f"/images/{link}")
    assert response.status_code == 404 and str(tmp_path) not in response.text
    assert TestClient(app, base_url="http://evil.example").get("/healthz").status_code == 400

    def chunks():  # a file part that goes on for 200 kB, with no Content-Length
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(20):
            yield b"x" * 10_000

    multipart = {"content-type": "multipart/form-data; boundary=b"}
    response = client.post("/search", content=chunks(), headers=multipart)
    assert response.status_code == 413

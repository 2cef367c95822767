"""A gallery as a hostile user leaves it: every image goes through one guard
(`circe.data.images.read_image`), so indexing finishes, each bad file is reported with its
reason, and serving never answers 5xx for one (also when a file changes after indexing).
The folder itself may be hostile too: links that loop, folders nested past any recursion
limit, photos in formats this Pillow cannot decode."""

import io
import os
import random

import pytest
from fastapi.testclient import TestClient
from PIL import Image, features
from typer.testing import CliRunner

from circe.cli import app
from circe.data import loading
from circe.data.images import ImageLimits, ImageRejected, read_image, readable_suffixes
from circe.data.render import render_scene
from circe.data.synthetic import random_scene
from circe.index.build import build_index
from circe.index.files import scan_gallery
from circe.index.identity import MethodSource
from circe.index.search import IndexSearcher
from circe.index.store import open_space
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


DEPTH = 1100  # past Python's recursion limit of 1000, which os.walk hit before 3.12
DEEP = "/".join(["d"] * DEPTH) + "/bottom.png"


def nested(root, depth):
    """`root/d/d/.../d`, `depth` levels, made one level at a time (`Path.mkdir(parents=True)`
    recurses, and would stop at the recursion limit itself)."""
    folder = root
    for _ in range(depth):
        folder = folder / "d"
        folder.mkdir()
    return folder


def remove_nested(root, depth):
    """Undo `nested`, from the bottom up: pytest removes old temporary folders with a
    recursive rmtree, which a folder this deep would stop with RecursionError (in a later
    session, for every test)."""
    folder = root.joinpath(*["d"] * depth)
    for _ in range(depth):
        for entry in folder.iterdir():
            entry.unlink()
        folder.rmdir()
        folder = folder.parent


@pytest.fixture(scope="module")
def tangled(tmp_path_factory):
    """A folder whose shape is hostile: a loop of file links, folder links back up and to
    themselves, an image 1,100 folders down, and photos in formats beyond the old suffix
    list (AVIF, PPM) and one this Pillow cannot decode (HEIC without pillow-heif)."""
    root = tmp_path_factory.mktemp("tangled")
    rng = random.Random(3)
    for i in range(2):
        render_scene(random_scene(rng), 64).save(root / f"scene-{i}.png")
    (root / "a.png").symlink_to("b.png")
    (root / "b.png").symlink_to("a.png")
    album = root / "album"
    album.mkdir()
    render_scene(random_scene(rng), 64).save(album / "inside.jpg")
    (album / "up").symlink_to("..")
    (album / "here").symlink_to(".")
    render_scene(random_scene(rng), 64).save(nested(root, DEPTH) / "bottom.png")
    render_scene(random_scene(rng), 64).save(root / "portable.ppm")
    if features.check("avif"):
        render_scene(random_scene(rng), 64).save(root / "phone.avif")
    (root / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))
    yield root
    remove_nested(root, DEPTH)


@pytest.fixture(scope="module")
def tangled_index(tangled, tmp_path_factory, default_backbone):
    """(report, indexed paths) of `circe index` over the tangled folder."""
    method = create_method("sum", default_backbone)
    index = tmp_path_factory.mktemp("tangled-index")
    report = build_index(tangled, index, method, MethodSource(method="sum"))
    return report, {file.path for file in open_space(index, "sum").files}


def reasons(report):
    return {failure.path: failure.error for failure in report.failed}


def test_a_loop_of_file_links_is_reported_not_a_traceback(tangled_index):
    report, indexed = tangled_index
    for name in ("a.png", "b.png"):
        assert "a loop of symbolic links" in reasons(report)[name]
        assert name not in indexed


def test_a_folder_nested_past_the_recursion_limit_is_indexed(tangled_index):
    _, indexed = tangled_index
    assert DEEP in indexed


def test_links_back_up_the_tree_end_the_walk_and_index_each_image_once(tangled_index):
    report, indexed = tangled_index
    assert "album/inside.jpg" in indexed
    assert not [path for path in indexed if "/up/" in path or "/here/" in path]
    assert not [path for path in reasons(report) if path.startswith("album")]


def test_an_absurd_depth_is_reported_and_the_rest_scanned(tangled, monkeypatch):
    monkeypatch.setattr(loading, "MAX_DEPTH", 3)
    files, failed = scan_gallery(tangled)
    assert {"d/d/d": "3 folders deep: the folders in it are not searched"}.items() <= {
        failure.path: failure.error for failure in failed
    }.items()
    assert DEEP not in {file.path for file in files}
    assert {"scene-0.png", "album/inside.jpg"} <= {file.path for file in files}


def test_every_format_this_pillow_decodes_is_indexed(tangled_index):
    _, indexed = tangled_index
    assert "portable.ppm" in indexed
    if features.check("avif"):
        assert "phone.avif" in indexed
    assert {".png", ".jpg", ".webp", ".tiff", ".ppm", ".qoi", ".jp2"} <= readable_suffixes()
    assert not {".pdf", ".h5", ".mpg"} & readable_suffixes()  # written or identified only


def test_a_format_without_its_plugin_is_reported_with_the_package(tangled_index):
    if ".heic" in readable_suffixes():
        pytest.skip("pillow-heif is installed here: HEIC files decode")
    report, indexed = tangled_index
    assert "phone.heic" not in indexed
    assert "no decoder for .heic images; install pillow-heif" in reasons(report)["phone.heic"]


def test_a_served_file_turned_into_a_link_loop_is_404_not_500(tmp_path, default_backbone):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = random.Random(5)
    for name in ("scene.png", "loop.png"):
        render_scene(random_scene(rng), 64).save(gallery / name)
    method = create_method("sum", default_backbone)
    build_index(gallery, tmp_path / "index", method, MethodSource(method="sum"))
    client = TestClient(create_app(IndexSearcher(tmp_path / "index", method=method)))
    items = client.get("/gallery").json()["items"]
    looped = next(item["id"] for item in items if item["path"] == "loop.png")
    (gallery / "loop.png").unlink()
    (gallery / "loop.png").symlink_to("other.png")
    (gallery / "other.png").symlink_to("loop.png")
    for route in (f"/images/{looped}", f"/thumbnails/{looped}"):
        response = client.get(route)
        assert response.status_code == 404, (route, response.status_code, response.text)


@pytest.mark.parametrize("size", ["0", "-5"])
def test_index_batch_size_below_one_is_a_one_line_error(tangled, tmp_path, size):
    result = CliRunner().invoke(
        app,
        [
            "index",
            str(tangled),
            "--method",
            "sum",
            "--out",
            str(tmp_path / "index"),
            f"--batch-size={size}",
        ],
    )
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip()
        == f"error: the batch size (--batch-size) must be at least 1, not {size}"
    )
    assert not (tmp_path / "index").exists()

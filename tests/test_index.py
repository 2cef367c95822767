"""`circe index` / `circe search`: incremental, resumable, atomic indexing and its queries."""

import errno
import json
import os
import random
import shutil
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

import circe.backbones
from circe.cli import app
from circe.data.render import render_scene
from circe.data.synthetic import random_scene
from circe.index.build import build_index
from circe.index.engine import EngineOptions, build_engine
from circe.index.identity import IdentityMismatchError, MethodIdentity, MethodSource
from circe.index.search import IndexSearcher, QueryError, UnknownImageError
from circe.index.store import IndexStoreError, open_space, read_manifest
from circe.methods import create_method

SUM = MethodSource(method="sum")


def render_gallery(root, count, seed=0, start=0):
    """`count` synthetic scenes as PNGs, half of them in a subfolder."""
    rng = random.Random(seed)
    for i in range(start, start + count):
        folder = root / ("nested/deeper" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        render_scene(random_scene(rng), 64).save(folder / f"scene-{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def method(default_backbone):
    return create_method("sum", default_backbone).eval()


@pytest.fixture
def gallery(tmp_path):
    return render_gallery(tmp_path / "gallery", 24)


def one_line(output):
    """CLI output with rich's line wrapping undone."""
    return " ".join(output.split())


def count_encoded(monkeypatch, method, fail_after=None):
    """Wrap `encode_targets` to count the images it embeds (and raise after N batches)."""
    seen = []
    original = type(method).encode_targets

    def encode(pixels):
        if fail_after is not None and len(seen) == fail_after:
            raise RuntimeError("simulated crash")
        seen.append(len(pixels))
        return original(method, pixels)

    monkeypatch.setattr(method, "encode_targets", encode)
    return seen


def test_index_then_search(gallery, tmp_path, method):
    report = build_index(gallery, tmp_path / "index", method, SUM, batch_size=8)
    assert (report.images, report.embedded, report.added, report.failed) == (24, 24, 24, [])
    space = open_space(tmp_path / "index")
    assert space.name == "sum" and space.embeddings.shape == (24, 128)
    assert [f.path for f in space.files] == sorted(f.path for f in space.files)
    assert "nested/deeper/scene-001.png" in space.rows_by_path
    np.testing.assert_allclose(np.linalg.norm(space.embeddings, axis=1), 1, atol=1e-5)

    searcher = IndexSearcher(tmp_path / "index")
    reference = searcher.resolve_reference("nested/deeper/scene-001.png")
    hits = searcher.search(reference, "add a small red circle", k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert reference.id not in {h.id for h in hits}  # a gallery reference is left out
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    by_id = searcher.search(searcher.resolve_reference(reference.id), "add a small red circle", 5)
    assert by_id == hits
    outside = tmp_path / "outside.png"
    shutil.copy(gallery / "scene-000.png", outside)
    assert searcher.resolve_reference(str(outside)).id is None  # an external file
    with pytest.raises(UnknownImageError, match="neither an image id"):
        searcher.resolve_reference("no-such-image")
    with pytest.raises(QueryError, match="empty"):
        searcher.search(reference, "   ", 5)
    with pytest.raises(QueryError, match="k must be"):
        searcher.search(reference, "red", 0)
    assert searcher.explain(reference, "red") == {}  # `sum` has no internals


def test_interrupted_index_keeps_last_good_and_resumes_to_the_same_index(
    gallery, tmp_path, method, monkeypatch
):
    reference = build_index(gallery, tmp_path / "reference", method, SUM, batch_size=4)
    index = tmp_path / "index"

    # A crash in the third batch of the very first run: nothing is committed ...
    count_encoded(monkeypatch, method, fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(gallery, index, method, SUM, batch_size=4, shard_size=4)
    assert read_manifest(index) is None
    assert len(list((index / "sum" / "pending").glob("shard-*.npz"))) == 2
    # ... and the next run embeds only what the crashed one had not finished.
    embedded = count_encoded(monkeypatch, method)
    report = build_index(gallery, index, method, SUM, batch_size=4, shard_size=4)
    assert (report.resumed, report.embedded, sum(embedded)) == (8, 16, 16)
    assert not (index / "sum" / "pending").exists()
    resumed, uninterrupted = open_space(index), open_space(tmp_path / "reference")
    assert resumed.files == uninterrupted.files and report.images == reference.images
    np.testing.assert_allclose(resumed.embeddings, uninterrupted.embeddings, atol=1e-5)

    # A crash while updating a committed index leaves the committed index whole.
    render_gallery(gallery, 8, seed=1, start=100)
    count_encoded(monkeypatch, method, fail_after=1)
    with pytest.raises(RuntimeError):
        build_index(gallery, index, method, SUM, batch_size=4, shard_size=4)
    still = open_space(index)
    assert still.files == resumed.files and still.directory == resumed.directory
    searcher = IndexSearcher(index)
    assert len(searcher.search(searcher.resolve_reference("scene-000.png"), "make it blue", 3)) == 3
    embedded = count_encoded(monkeypatch, method)
    report = build_index(gallery, index, method, SUM, batch_size=4, shard_size=4)
    assert (report.images, report.resumed, report.embedded, sum(embedded)) == (32, 4, 4, 4)


def test_reindex_embeds_only_new_and_changed_files_and_drops_deleted(
    gallery, tmp_path, method, monkeypatch
):
    index = tmp_path / "index"
    build_index(gallery, index, method, SUM, batch_size=8)
    before = open_space(index)

    embedded = count_encoded(monkeypatch, method)
    report = build_index(gallery, index, method, SUM, batch_size=8)
    assert (report.unchanged, report.embedded, embedded) == (24, 0, [])
    assert open_space(index).directory == before.directory  # nothing to commit

    render_gallery(gallery, 2, seed=7, start=200)  # 2 new files
    changed = gallery / "scene-000.png"
    render_scene(random_scene(random.Random(99)), 64).save(changed)
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))
    (gallery / "scene-002.png").unlink()
    (gallery / "nested/deeper/scene-003.png").unlink()
    report = build_index(gallery, index, method, SUM, batch_size=8)
    assert (report.added, report.changed, report.removed) == (2, 1, 2)
    assert (report.embedded, sum(embedded), report.unchanged, report.images) == (3, 3, 21, 24)

    after = open_space(index)
    assert "scene-002.png" not in after.rows_by_path
    assert {"scene-200.png", "nested/deeper/scene-201.png"} <= set(after.rows_by_path)
    old, new = before.rows_by_path, after.rows_by_path
    for path in ("scene-004.png", "nested/deeper/scene-005.png"):  # unchanged: same vector
        np.testing.assert_array_equal(after.embeddings[new[path]], before.embeddings[old[path]])
    path = "scene-000.png"  # changed: same id, new vector
    assert after.files[new[path]].id == before.files[old[path]].id
    assert not np.allclose(after.embeddings[new[path]], before.embeddings[old[path]])
    assert len(list((index / "sum").glob("gen-*"))) == 1  # older generations are removed


def test_unreadable_files_are_reported_and_skipped(tmp_path, method):
    root = render_gallery(tmp_path / "gallery", 6)
    scene = render_scene(random_scene(random.Random(5)), 64)
    frames = [scene, scene.rotate(90)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    for suffix in ("webp", "bmp", "tiff", "jpeg"):
        scene.save(root / f"scene.{suffix}")
    (root / "notes.txt").write_text("not an image, not a candidate")
    (root / "text.jpg").write_text("this is not a JPEG")
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes((root / "scene-000.png").read_bytes()[:80])
    os.symlink(root / "missing.png", root / "broken-link.png")

    report = build_index(root, tmp_path / "index", method, SUM, batch_size=4)
    failed = {f.path for f in report.failed}
    assert failed == {"text.jpg", "empty.png", "truncated.png", "broken-link.png"}
    assert report.images == 11  # 6 scenes, gif, webp, bmp, tiff, jpeg
    written = json.loads((tmp_path / "index" / "sum" / "report.json").read_text())
    assert {f["path"] for f in written["failed"]} == failed
    assert all(f["error"] for f in written["failed"])


def test_a_query_with_another_method_is_a_clear_error(gallery, tmp_path, method, default_backbone):
    index = tmp_path / "index"
    build_index(gallery, index, method, SUM, batch_size=8)
    image_only = create_method("image-only", default_backbone)
    with pytest.raises(IdentityMismatchError, match="built with method 'sum'.*'image-only'"):
        IndexSearcher(index, method=image_only, source=MethodSource(method="image-only"))
    with pytest.raises(IndexStoreError, match="holds vectors of method 'sum'"):
        build_index(gallery, index, image_only, MethodSource("image-only"), space="sum")

    # Another method gets its own space over the same gallery ids.
    build_index(gallery, index, image_only, MethodSource("image-only"), batch_size=8)
    assert sorted(read_manifest(index)["spaces"]) == ["image-only", "sum"]
    assert open_space(index, "image-only").files == open_space(index, "sum").files
    with pytest.raises(IndexStoreError, match="several embedding spaces"):
        open_space(index)


def test_cli_index_then_search(gallery, tmp_path):
    runner = CliRunner()
    index = tmp_path / "index"
    result = runner.invoke(app, ["index", str(gallery), "--method", "sum", "--out", str(index)])
    assert result.exit_code == 0, result.output
    assert "images indexed" in result.output and "IndexFlatIP" in result.output
    args = ["search", "--index", str(index), "--image", "scene-000.png", "--text", "make it red"]
    result = runner.invoke(app, [*args, "-k", "3", "--json", "--explain"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert len(record["results"]) == 3 and record["explain"] == {}
    assert record["method"]["method"] == "sum" and record["reference"]["path"] == "scene-000.png"
    result = runner.invoke(app, [*args, "--method", "image-only"])
    assert result.exit_code == 2 and "built with method 'sum'" in one_line(result.output)
    result = runner.invoke(app, ["search", "--index", str(tmp_path / "none"), *args[3:]])
    assert result.exit_code == 2 and "no index at" in one_line(result.output)


def test_cli_reindex_of_an_unchanged_folder_loads_no_model(gallery, tmp_path, monkeypatch):
    """Nothing changed: decided from the files before any model is loaded. Anything changed
    (here a new image; also another method or changed weights) loads it and embeds."""
    runner = CliRunner()
    index = tmp_path / "index"
    args = ["index", str(gallery), "--method", "sum", "--out", str(index)]
    assert runner.invoke(app, args).exit_code == 0
    loads = []
    real_load = circe.backbones.load_backbone

    def counted(*given, **kwargs):
        loads.append(given)
        return real_load(*given, **kwargs)

    monkeypatch.setattr(circe.backbones, "load_backbone", counted)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert loads == []
    assert json.loads((index / "sum" / "report.json").read_text())["unchanged"] == 24
    render_gallery(gallery, 1, seed=5, start=100)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(loads) == 1 and open_space(index, "sum").embeddings.shape[0] == 25
    # Another weights file for the same backbone spec: not the recorded bytes, so it loads
    # (and is then refused as another space).
    loads.clear()
    other = tmp_path / "other.safetensors"
    other.write_bytes(circe.backbones.DEFAULT_WEIGHTS_PATH.read_bytes()[:-1] + b"\0")
    result = runner.invoke(app, [*args, "--weights", str(other)])
    assert len(loads) == 1


def test_engine_goes_approximate_above_the_threshold_and_keeps_recall(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    vectors = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    flat = build_engine(vectors, EngineOptions(exact_below=5000))
    ivf = build_engine(vectors, EngineOptions(exact_below=1000))
    hnsw = build_engine(vectors, EngineOptions(exact_below=1000, approximate="hnsw"))
    assert (flat.choice.kind, ivf.choice.kind, hnsw.choice.kind) == ("flat", "ivf", "hnsw")
    assert "3,000 vectors >= exact_below=1,000" in ivf.choice.reason
    assert "nprobe=" in ivf.choice.reason and "reaches the target" in ivf.choice.reason
    for engine in (ivf, hnsw):
        assert engine.choice.recall_at_10 >= 0.95
        (tmp_path / "engine.json").write_text(json.dumps(engine.save(tmp_path)))
        loaded = type(engine).load(tmp_path, vectors)
        queries = vectors[:5]
        np.testing.assert_array_equal(loaded.search(queries, 10)[1], engine.search(queries, 10)[1])
        assert loaded.search(queries, 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]

    # Vectors without structure: no approximate setting reaches the target -> exact search.
    spread = rng.normal(size=(3000, 32))
    spread = (spread / np.linalg.norm(spread, axis=1, keepdims=True)).astype(np.float32)
    kept = build_engine(spread, EngineOptions(exact_below=1000, target_recall=0.999))
    assert kept.choice.kind == "flat" and "exact search (IndexFlatIP) is kept" in kept.choice.reason


def test_an_index_refuses_a_backbone_that_reads_inputs_differently():
    """Same weights, another tokenizer or preprocessing (`inputs_sha256`): not one space. An
    identity written before the field existed ("") is not compared on it."""
    built = MethodIdentity("sum", {}, "b@1", "w" * 64, 32, 16, None, "a" * 64)
    assert built.differences(replace(built, backbone_inputs_sha256="b" * 64)) == [
        f"backbone_inputs_sha256: {'a' * 64!r} != {'b' * 64!r}"
    ]
    old = MethodIdentity.from_json(
        {k: v for k, v in built.to_json().items() if k != "backbone_inputs_sha256"}
    )
    assert old.backbone_inputs_sha256 == "" and not old.differences(built)


def test_a_full_disk_is_named_and_a_killed_runs_leftovers_are_cleared(
    gallery, tmp_path, method, monkeypatch
):
    index = tmp_path / "index"
    build_index(gallery, index, method, SUM)
    before = open_space(index, "sum").embeddings.copy()
    # What kill -9 leaves: a half-written manifest, generation and shard.
    (index / ".tmp-index.json-dead").write_text("{")
    (index / "sum" / ".tmp-gen-000002-dead").mkdir()
    (index / "sum" / "pending").mkdir(exist_ok=True)
    (index / "sum" / "pending" / ".tmp-shard-000001-dead.npz").write_bytes(b"\0")
    render_gallery(gallery, 2, seed=9, start=200)  # something to commit

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patched:
        patched.setattr("circe.index.store.np.save", full)
        with pytest.raises(IndexStoreError, match="no space left on the device while writing"):
            build_index(gallery, index, method, SUM)
    assert np.array_equal(open_space(index, "sum").embeddings, before)  # still the last one
    assert not list(index.rglob(".tmp-*"))
    report = build_index(gallery, index, method, SUM)  # space again: it goes on
    assert report.images == 26 and report.resumed == 2 and not list(index.rglob(".tmp-*"))


@pytest.mark.parametrize(
    ("damage", "named"),
    [("manifest", "index.json"), ("embeddings", "embeddings.npy"), ("rows", "rows.jsonl")],
)
def test_a_damaged_index_file_is_named(gallery, tmp_path, method, damage, named):
    index = tmp_path / "index"
    build_index(gallery, index, method, SUM)
    generation = open_space(index, "sum").directory
    if damage == "manifest":
        (index / "index.json").write_text('{"format": 1, "spa')
    elif damage == "embeddings":
        data = (generation / "embeddings.npy").read_bytes()
        (generation / "embeddings.npy").write_bytes(data[: len(data) // 2])
    else:
        (generation / "rows.jsonl").write_text('{"id": "x", "pa\n')
    with pytest.raises(IndexStoreError, match=f"{named} is damaged"):
        IndexSearcher(index, method=method, source=SUM)

"""`circe index --ray`: embedding on a Ray cluster gives the index a local build gives, and a
run stopped midway resumes. The cluster is a local Ray instance of 2 CPUs started here."""

import logging
import sys
from dataclasses import replace

import numpy as np
import pytest
from test_index import one_line, render_gallery
from typer.testing import CliRunner

from circe.cli import app
from circe.index.build import build_index
from circe.index.identity import MethodSource, identity_of
from circe.index.pending import PendingRun
from circe.index.ray_embed import EmbeddingActor, RayOptions, RayUnavailableError, embed_with_ray
from circe.index.search import IndexSearcher
from circe.index.store import open_space
from circe.methods import create_method

SUM = MethodSource(method="sum")
# Ray Data's own configuration warns about its deprecated fields when it is first read.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'circe[ray]'")
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 * 2**20,
            logging_level=logging.WARNING,
        )
    except Exception as error:  # noqa: BLE001 (whatever stops Ray here is the skip reason)
        pytest.skip(f"Ray cannot start on this machine: {type(error).__name__}: {error}")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def method(default_backbone):
    return create_method("sum", default_backbone).eval()


@pytest.fixture
def gallery(tmp_path):
    root = render_gallery(tmp_path / "gallery", 14)
    (root / "nested" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.mark.slow
def test_a_ray_build_is_the_local_build(cluster, gallery, tmp_path, method):
    local = build_index(gallery, tmp_path / "local", method, SUM, batch_size=4)
    result = CliRunner().invoke(
        app,
        ["index", str(gallery), "--method", "sum", "--out", str(tmp_path / "ray")]
        + ["--ray", "local", "--ray-actors", "2", "--batch-size", "4"],
    )
    assert result.exit_code == 0, result.output
    output = one_line(result.output)
    assert "embedded now │ 14" in output and "unreadable (skipped) │ 1" in output
    on_ray, here = open_space(tmp_path / "ray"), open_space(tmp_path / "local")
    assert on_ray.files == here.files and on_ray.identity == here.identity
    np.testing.assert_allclose(on_ray.embeddings, here.embeddings, atol=1e-5)
    report = on_ray.directory.parent / "report.json"
    assert "nested/broken.png" in report.read_text() and local.failed[0].path == "nested/broken.png"
    # Searched alike: `circe search` and `circe serve` cannot tell the two apart.
    queries = [IndexSearcher(tmp_path / name) for name in ("ray", "local")]
    hits = [q.search(q.resolve_reference("scene-002.png"), "make it blue", 5) for q in queries]
    assert [h.id for h in hits[0]] == [h.id for h in hits[1]]


@pytest.mark.slow
def test_a_ray_run_stopped_midway_resumes(cluster, gallery, tmp_path, method, monkeypatch):
    index = tmp_path / "index"
    written, original = [], PendingRun.write

    def write(self, files, vectors):  # the driver dies after its first shard is on disk
        if written:
            raise RuntimeError("simulated crash")
        written.append(len(files))
        original(self, files, vectors)

    monkeypatch.setattr(PendingRun, "write", write)
    options = RayOptions(actors=2, batch_size=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(gallery, index, method, SUM, shard_size=4, ray=options)
    monkeypatch.setattr(PendingRun, "write", original)
    assert len(written) == 1 and len(list((index / "sum" / "pending").glob("shard-*"))) == 1

    report = build_index(gallery, index, method, SUM, shard_size=4, ray=options)
    assert (report.images, report.resumed, report.embedded) == (14, written[0], 14 - written[0])
    straight = build_index(gallery, tmp_path / "straight", method, SUM)
    np.testing.assert_allclose(
        open_space(index).embeddings, open_space(tmp_path / "straight").embeddings, atol=1e-5
    )
    assert straight.images == report.images


def test_a_worker_that_loads_another_model_refuses_to_embed(method, tiny_weights):
    arch, weights = tiny_weights
    source = MethodSource(method="sum", backbone=f"open_clip:{arch}", weights=str(weights))
    # What a node with another file at the same path loads: not what the driver recorded.
    recorded = replace(identity_of(method, SUM), source=source)
    with pytest.raises(RuntimeError, match="files differ between machines"):
        EmbeddingActor(recorded.to_json(), threads=1)
    assert EmbeddingActor(identity_of(method, SUM).to_json(), threads=1).dim == 128


def test_without_ray_the_error_says_how_to_install_it(method, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    with pytest.raises(RayUnavailableError, match=r"pip install 'circe\[ray\]'"):
        embed_with_ray(identity_of(method, SUM), tmp_path, [], None, RayOptions())
    with pytest.raises(ValueError, match="at least 1"):
        RayOptions(actors=0)

"""The scale-out engine on a real PostgreSQL server with pgvector, started in a temp dir.

The server's binaries come from $CIRCE_PG_BINDIR, else the `pgserver` wheel (PostgreSQL 16
with pgvector, in the dev extra), else Debian's /usr/lib/postgresql/N/bin where its
postgresql-N-pgvector package is installed. Without any of them, or without psycopg, the
tests are skipped, saying what to install.
"""

import importlib.util
import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from circe.data.render import render_scene
from circe.data.synthetic import random_scene
from circe.index.build import build_index
from circe.index.engine import EngineOptions, exact_top_k, recall_at_k
from circe.index.identity import MethodSource
from circe.index.search import IndexSearcher
from circe.methods import create_method
from circe.serve.app import create_app

pytest.importorskip("psycopg", reason="the pgvector engine needs psycopg[binary] (dev extra)")

# Imported after the skip, which names the missing driver.
from circe.index.pgvector import (
    PgVectorError,
    build_pgvector_engine,
    connect,
    table_prefix,
)

SUM = MethodSource(method="sum")
INSTALL = (
    "a PostgreSQL with pgvector is needed: pip install pgserver (bundles both), or apt-get "
    "install postgresql-N-pgvector (Debian 13+), or set CIRCE_PG_BINDIR"
)


def _share_dir(bindir: Path) -> Path | None:
    """The share directory of the PostgreSQL installation whose programs are in `bindir`."""
    if (bindir / "pg_config").exists():
        command = [bindir / "pg_config", "--sharedir"]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode == 0:
            return Path(done.stdout.strip())
    if bindir.parent.parent.name == "postgresql":  # Debian: /usr/lib/postgresql/N/bin
        return Path("/usr/share/postgresql") / bindir.parent.name
    return None


def postgres_with_pgvector() -> Path | None:
    """The bin directory of a PostgreSQL that has the pgvector extension, if any."""
    candidates = [Path(os.environ["CIRCE_PG_BINDIR"])] if "CIRCE_PG_BINDIR" in os.environ else []
    # Located without importing it: importing pgserver sets up its own server machinery.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin")
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bindir in candidates:
        share = _share_dir(bindir)
        if (bindir / "initdb").exists() and share and (share / "extension/vector.control").exists():
            return bindir
    return None


@pytest.fixture(scope="module")
def dsn():
    """A connection string to a fresh PostgreSQL server, stopped and deleted afterwards."""
    bindir = postgres_with_pgvector()
    if bindir is None:
        pytest.skip(INSTALL)
    # PostgreSQL refuses to run as root: as root, run it as `nobody` in a directory of its own
    # (pytest's temporary directories are private to root).
    user = "nobody" if os.geteuid() == 0 else None
    home = Path(tempfile.mkdtemp(prefix="circe-pg-"))
    if user:
        shutil.chown(home, user)

    def run(*command):
        subprocess.run(command, check=True, user=user, capture_output=True, timeout=120)

    data = home / "data"
    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync")
        options = f"-k {home} -c listen_addresses='' -c fsync=off"
        run(bindir / "pg_ctl", "-D", data, "-l", home / "log", "-o", options, "-w", "start")
    except subprocess.CalledProcessError as error:
        shutil.rmtree(home, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL from {bindir}: {error.stderr.decode()}")
    yield f"host={home} port=5432 user=postgres dbname=postgres"
    run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    shutil.rmtree(home, ignore_errors=True)


def clustered(count, dim, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, dim))
    vectors = centres[rng.integers(0, 32, count)] + 0.5 * rng.normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_exact_and_hnsw_search_against_exact_inner_product(dsn):
    vectors = clustered(3000, 32)
    queries = clustered(40, 32, seed=1)
    truth = exact_top_k(queries, vectors, 10)

    exact = build_pgvector_engine(vectors, "unit", dsn, EngineOptions())
    assert exact.choice.kind == "pgvector-exact" and len(exact) == 3000
    scores, rows = exact.search(queries, 10)
    assert recall_at_k(rows, truth) == 1.0
    expected = np.take_along_axis(queries @ vectors.T, rows, axis=1)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first

    options = EngineOptions(exact_below=0, hnsw_m=8, ef_construction=32, tune_queries=64)
    hnsw = build_pgvector_engine(vectors, "unit", dsn, options)
    assert hnsw.choice.kind == "pgvector-hnsw", hnsw.choice.reason
    assert hnsw.choice.recall_at_10 >= 0.95 and "ef_search" in hnsw.choice.params
    # Tuned to 0.95 on its own sample queries; HNSW's graph differs per build, so held-out
    # queries get a margin.
    assert recall_at_k(hnsw.search(queries, 10)[1], truth) >= 0.85
    assert hnsw.search(queries[:2], 50)[1].shape == (2, 50)  # k above the tuned ef_search


def test_index_search_and_serve_on_pgvector(dsn, tmp_path, default_backbone):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = random.Random(2)
    for i in range(12):
        render_scene(random_scene(rng), 64).save(gallery / f"scene-{i:02d}.png")
    method = create_method("sum", default_backbone)
    build_index(gallery, tmp_path / "faiss", method, SUM, batch_size=6)
    report = build_index(gallery, tmp_path / "pg", method, SUM, batch_size=6, pgvector=dsn)
    assert report.engine["kind"] == "pgvector-exact"
    assert not list((tmp_path / "pg").glob("sum/gen-*/engine.faiss"))  # vectors on the server

    local = IndexSearcher(tmp_path / "faiss", method=method, source=SUM)
    remote = IndexSearcher(tmp_path / "pg", method=method, source=SUM, pgvector=dsn)
    reference = local.resolve_reference("scene-04.png")
    expected = local.search(reference, "add a red circle", 5)
    got = remote.search(reference, "add a red circle", 5)
    assert [h.id for h in got] == [h.id for h in expected]
    assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-5)

    client = TestClient(create_app(remote))
    response = client.post("/search", data={"text": "add a red circle", "k": 5, "id": reference.id})
    assert response.status_code == 200 and len(response.json()["results"]) == 5

    # A re-index with a new image builds a new table and drops the old one.
    render_scene(random_scene(rng), 64).save(gallery / "scene-new.png")
    old_table = remote.engine.table
    report = build_index(gallery, tmp_path / "pg", method, SUM, batch_size=6, pgvector=dsn)
    assert report.added == 1
    with connect(dsn) as connection:
        tables = connection.execute(
            "SELECT tablename FROM pg_tables WHERE starts_with(tablename, %s)",
            (table_prefix("sum"),),
        ).fetchall()
    assert len(tables) == 1 and tables[0][0] != old_table
    searcher = IndexSearcher(tmp_path / "pg", method=method, source=SUM, pgvector=dsn)
    assert len(searcher.engine) == 13


def test_clear_errors_without_a_server(dsn, tmp_path, monkeypatch):
    monkeypatch.delenv("CIRCE_PGVECTOR_DSN", raising=False)
    with pytest.raises(PgVectorError, match="no PostgreSQL server named"):
        connect()
    with pytest.raises(PgVectorError, match="cannot connect"):
        connect(f"host={tmp_path} port=1 user=postgres dbname=postgres connect_timeout=2")


def test_cli_index_and_search_with_pgvector(dsn, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from circe.cli import app

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = random.Random(4)
    for i in range(6):
        render_scene(random_scene(rng), 64).save(gallery / f"scene-{i}.png")
    index = str(tmp_path / "index")
    runner = CliRunner()
    built = runner.invoke(
        app, ["index", str(gallery), "--method", "sum", "--out", index, "--pgvector", dsn]
    )
    assert built.exit_code == 0, built.output
    assert "pgvector exact scan" in " ".join(built.output.split())

    monkeypatch.delenv("CIRCE_PGVECTOR_DSN", raising=False)
    query = [
        "search",
        "--index",
        index,
        "--image",
        "scene-1.png",
        "--text",
        "make it red",
        "--json",
    ]
    refused = runner.invoke(app, query)
    assert refused.exit_code != 0 and "CIRCE_PGVECTOR_DSN" in " ".join(refused.output.split())
    found = runner.invoke(app, query, env={"CIRCE_PGVECTOR_DSN": dsn})
    assert found.exit_code == 0, found.output
    assert len(json.loads(found.output)["results"]) == 5

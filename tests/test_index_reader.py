"""The index build's reader: batches decoded ahead of the encoder, by threads or processes,
come out as the plain in-turn reader makes them, and a build does not depend on which."""

import errno
import threading

import numpy as np
import pytest
import torch
from test_index import render_gallery

from circe.index.build import build_index
from circe.index.files import scan_gallery
from circe.index.identity import MethodSource
from circe.index.pending import PendingRun
from circe.index.reader import read_batches
from circe.index.store import IndexStoreError, open_space
from circe.methods import create_method

SUM = MethodSource(method="sum")


@pytest.fixture(scope="module")
def method(default_backbone):
    return create_method("sum", default_backbone).eval()


@pytest.fixture
def gallery(tmp_path):
    root = render_gallery(tmp_path / "gallery", 13)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # fails to decode
    return root


def flattened(batches):
    """(positions, pixels [n, 3, H, W], failures) over all batches, and the batch sizes."""
    batches = list(batches)
    positions = [p for b in batches for p in b.positions]
    failed = [f for b in batches for f in b.failed]
    pixels = torch.cat([b.inputs for b in batches if b.positions])
    return positions, pixels, failed, [len(b.positions) + len(b.failed) for b in batches]


@pytest.mark.parametrize("ahead", [{"threads": 1}, {"threads": 3}, {"workers": 2}])
def test_read_ahead_batches_are_the_in_turn_batches(gallery, default_backbone, ahead):
    files, _ = scan_gallery(gallery)
    preprocess = default_backbone.preprocess
    plain = flattened(read_batches(gallery, files, preprocess, 4, threads=0))
    positions, pixels, failed, sizes = flattened(
        read_batches(gallery, files, preprocess, 4, **ahead)
    )
    assert positions == plain[0] and sizes == plain[3] == [4, 4, 4, 2]
    assert torch.equal(pixels, plain[1])
    broken = [i for i, f in enumerate(files) if f.path == "broken.png"]
    assert [p for p, _ in failed] == [p for p, _ in plain[2]] == broken
    assert "cannot identify image file" in failed[0][1]


def test_an_abandoned_reader_leaves_no_thread_behind(gallery, default_backbone):
    files, _ = scan_gallery(gallery)
    before = threading.active_count()
    batches = read_batches(gallery, files, default_backbone.preprocess, 2, threads=2)
    next(batches)
    batches.close()  # what a crash in the encoder does to the generator
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("circe-decode")]


def test_a_build_is_the_same_whichever_reader(gallery, tmp_path, method):
    indexes = {}
    for name, reader in {
        "in-turn": {"threads": 0},
        "threads": {"threads": 2},
        "processes": {"workers": 1},
    }.items():
        report = build_index(gallery, tmp_path / name, method, SUM, batch_size=4, **reader)
        assert (report.images, [f.path for f in report.failed]) == (13, ["broken.png"])
        indexes[name] = open_space(tmp_path / name)
    for name in ("threads", "processes"):
        assert indexes[name].files == indexes["in-turn"].files
        np.testing.assert_array_equal(indexes[name].embeddings, indexes["in-turn"].embeddings)


def test_a_shard_that_cannot_be_written_stops_the_run_and_keeps_the_ones_before(
    gallery, tmp_path, method, monkeypatch
):
    written = []
    original = PendingRun.write

    def write(self, files, vectors):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(files))
        original(self, files, vectors)

    monkeypatch.setattr(PendingRun, "write", write)
    with pytest.raises(IndexStoreError, match="no space left on the device"):
        build_index(gallery, tmp_path / "index", method, SUM, batch_size=2, shard_size=2)
    assert len(written) == 1  # the first shard, written before the disk filled
    assert len(list((tmp_path / "index" / "sum" / "pending").glob("shard-*.npz"))) == 1
    monkeypatch.setattr(PendingRun, "write", original)
    report = build_index(gallery, tmp_path / "index", method, SUM, batch_size=2, shard_size=2)
    assert (report.images, report.resumed) == (13, written[0])

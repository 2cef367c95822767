"""Batching concurrent searches in the server (`circe.serve.batching`): same answers as one
query at a time, in fewer forward passes, and a failing query fails alone."""

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from circe.data.render import render_scene
from circe.data.synthetic import random_scene
from circe.index.build import build_index
from circe.index.identity import MethodSource
from circe.index.search import IndexSearcher, QueryError, Reference
from circe.methods import create_method
from circe.serve.app import create_app
from circe.serve.batching import BatchOptions, QueryBatcher

TEXTS = ["make it red", "add a small blue circle", "remove the square", "move it left"]
# A window long enough that queries sent together certainly meet in one batch.
TOGETHER = BatchOptions(max_batch=8, window_ms=300)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    rng = random.Random(7)
    for i in range(20):
        render_scene(random_scene(rng), 64, jitter_seed=str(i)).save(root / f"scene-{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def searcher(gallery, tmp_path_factory, default_backbone):
    index = tmp_path_factory.mktemp("index")
    method = create_method("sum", default_backbone)
    source = MethodSource(method="sum")
    build_index(gallery, index, method, source, batch_size=8)
    return IndexSearcher(index, method=method, source=source)


def queries(searcher, count):
    """(form data, upload or None) pairs: gallery ids and uploads, varied texts and k."""
    files = searcher.space.files
    made = []
    for i in range(count):
        data = {"text": TEXTS[i % len(TEXTS)], "k": str(3 + i % 5)}
        if i % 2:
            data["id"] = files[i % len(files)].id
            made.append((data, None))
        else:
            upload = (searcher.root / files[i % len(files)].path).read_bytes()
            made.append((data, {"image": ("ref.png", upload, "image/png")}))
    return made


def ranked(response):
    assert response.status_code == 200, response.text
    return [(hit["id"], hit["score"]) for hit in response.json()["results"]]


def assert_same_ranking(got, expected):
    assert [i for i, _ in got] == [i for i, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)


def test_concurrent_requests_get_the_answers_of_sequential_ones(searcher):
    asked = queries(searcher, 12)
    unbatched = TestClient(create_app(searcher, batching=BatchOptions(max_batch=1)))
    sequential = [ranked(unbatched.post("/search", data=d, files=f)) for d, f in asked]

    app = create_app(searcher, batching=TOGETHER)
    with TestClient(app) as client, ThreadPoolExecutor(len(asked)) as pool:
        responses = list(pool.map(lambda q: client.post("/search", data=q[0], files=q[1]), asked))
    for got, expected in zip(map(ranked, responses), sequential, strict=True):
        assert_same_ranking(got, expected)
    stats = app.state.batcher.stats()
    assert stats["queries"] == 12 and stats["batches"] < 12 and stats["largest_batch"] > 1
    assert stats["largest_batch"] <= TOGETHER.max_batch


def test_a_query_that_breaks_its_batch_fails_alone(searcher, gallery, monkeypatch):
    method = searcher.method
    encode = type(method).encode_raw_queries

    def fragile(raw_queries):
        if any(query.text == "boom" for query in raw_queries):
            raise RuntimeError("the method cannot encode this query")
        return encode(method, raw_queries)

    monkeypatch.setattr(method, "encode_raw_queries", fragile)
    batcher = QueryBatcher(searcher, TOGETHER)
    reference = searcher.resolve_reference("scene-03.png")
    start = threading.Barrier(4)  # all four ask at once

    def ask(text):
        start.wait()
        try:
            return batcher.search(reference, text, 5)
        except RuntimeError as error:
            return error

    texts = ["make it red", "boom", "add a circle", "remove it"]
    with ThreadPoolExecutor(len(texts)) as pool:
        answers = dict(zip(texts, pool.map(ask, texts), strict=True))
    batcher.close()
    assert isinstance(answers.pop("boom"), RuntimeError)
    for text, hits in answers.items():
        assert [h.id for h in hits] == [h.id for h in searcher.search(reference, text, 5)]
    assert batcher.stats()["largest_batch"] > 1  # they did meet in one batch


def test_bad_queries_fail_in_the_callers_thread(searcher):
    batcher = QueryBatcher(searcher, TOGETHER)
    reference = Reference(searcher.resolve_reference("scene-00.png").image)
    with pytest.raises(QueryError, match="empty"):
        batcher.search(reference, "  ", 5)
    with pytest.raises(QueryError, match="k must be"):
        batcher.search(reference, "red", 0)
    assert batcher.stats()["queries"] == 0
    with pytest.raises(ValueError, match="max_batch"):
        BatchOptions(max_batch=0)


def test_an_upload_that_is_slow_to_decode_holds_no_other_request(searcher, monkeypatch):
    """Uploads are decoded in their own request's thread, before joining a batch: one that
    takes long (a huge image, a slow client) delays only itself."""
    import circe.serve.app

    asked = queries(searcher, 6)
    slow_upload = asked[0][1]["image"][1]
    decoding, release = threading.Event(), threading.Event()
    decode = circe.serve.app.decode_upload

    def decode_slowly(data, limits):
        if data == slow_upload:
            decoding.set()
            assert release.wait(timeout=60), "the test never released the slow upload"
        return decode(data, limits)

    monkeypatch.setattr(circe.serve.app, "decode_upload", decode_slowly)
    app = create_app(searcher, batching=TOGETHER)
    with TestClient(app) as client, ThreadPoolExecutor(1) as slow_pool:
        slow = slow_pool.submit(client.post, "/search", data=asked[0][0], files=asked[0][1])
        try:
            assert decoding.wait(timeout=30)
            others = [q for q in asked[1:] if q[1] is None or q[1]["image"][1] != slow_upload]
            for data, files in others:  # answered while the slow upload is still decoding
                assert ranked(client.post("/search", data=data, files=files))
            assert not slow.done()
        finally:
            release.set()
        assert ranked(slow.result(timeout=60))

"""The evaluation loop on a written synthetic benchmark."""

import dataclasses

import pytest

from circe.data.synthetic import SynthConfig, load_synthetic, write_synthetic
from circe.data.types import CIRSplit, DatasetFormatError, Query
from circe.eval.evaluate import evaluate
from circe.methods import create_method

CONFIG = SynthConfig(seed=5, train=6, val=6, test=30, test_unseen=3)


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    root = write_synthetic(tmp_path_factory.mktemp("bench") / "synthetic", CONFIG)
    return load_synthetic(root, "test")


def identity_split(split: CIRSplit, exclude_reference: bool) -> CIRSplit:
    """Queries whose target is their own reference image."""
    queries = [dataclasses.replace(q, target_ids=(q.reference_id,)) for q in split.queries]
    return dataclasses.replace(split, queries=queries, exclude_reference=exclude_reference)


def test_reference_exclusion_is_applied(tiny_backbone, test_split):
    image_only = create_method("image-only", tiny_backbone)
    kept = evaluate(image_only, identity_split(test_split, exclude_reference=False), ks=(1,))
    assert kept.metrics["R@1"] == 100.0  # an image is its own nearest neighbour
    dropped = evaluate(image_only, identity_split(test_split, exclude_reference=True), ks=(1,))
    assert dropped.metrics["R@1"] == 0.0
    for query, ranked in zip(test_split.queries, dropped.ranked_ids):
        assert query.reference_id not in ranked


def test_result_shapes_and_per_kind_breakdown(tiny_backbone, test_split):
    result = evaluate(
        create_method("sum", tiny_backbone), test_split, ks=(1, 10, 50), keep_top=7, batch_size=8
    )
    assert set(result.metrics) == {"R@1", "R@10", "R@50"}
    assert 0 <= result.metrics["R@1"] <= result.metrics["R@10"] <= result.metrics["R@50"] <= 100
    assert set(result.per_tag) == {q.tags[0] for q in test_split.queries}
    assert len(result.ranked_ids) == len(test_split.queries)
    assert all(len(r) == 7 for r in result.ranked_ids)
    assert all(s == sorted(s, reverse=True) for s in result.ranked_scores)
    assert result.protocol["dataset"] == "synthetic"


def test_batch_size_does_not_change_results(tiny_backbone, test_split):
    method = create_method("sum", tiny_backbone)
    a = evaluate(method, test_split, batch_size=5)
    b = evaluate(method, test_split, batch_size=64)
    assert a.ranked_ids == b.ranked_ids


def test_bad_splits_are_refused(tiny_backbone, test_split):
    method = create_method("sum", tiny_backbone)
    hidden = dataclasses.replace(
        test_split, queries=[dataclasses.replace(q, target_ids=()) for q in test_split.queries]
    )
    with pytest.raises(ValueError, match="hidden test labels"):
        evaluate(method, hidden)
    broken = dataclasses.replace(
        test_split, queries=[Query("q", "no-such-image", ("x",), (test_split.gallery.ids[0],))]
    )
    with pytest.raises(DatasetFormatError, match="no-such-image"):
        broken.check()


@pytest.mark.parametrize("name", ["combiner", "dwc"])
def test_reused_gallery_features_score_like_the_pixel_path(
    name, tiny_backbone, test_split, monkeypatch
):
    """A frozen image tower's gallery features are computed once per method and reused (the
    trainer validates every epoch); the scores equal encoding every image and query anew."""
    import torch

    from circe.eval import evaluate as evaluation

    torch.manual_seed(0)
    method = create_method(name, tiny_backbone).eval()
    reused = evaluation.score_matrix(method, test_split)
    gallery = evaluation.encode_gallery(method, test_split)
    queries = evaluation.encode_queries(method, test_split.queries, test_split)
    torch.testing.assert_close(reused, queries @ gallery.T, atol=1e-5, rtol=1e-5)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the gallery was decoded again")

    monkeypatch.setattr(evaluation, "image_batches", no_decoding)
    torch.testing.assert_close(evaluation.score_matrix(method, test_split), reused)

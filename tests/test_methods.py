"""Every registered method through the same contract: the two encoders, the raw-input pair
the pipeline uses for a method that takes raw inputs, and the trainer's own path with pixel
batches and with cached-feature batches, which must give the same loss."""

import pytest
import torch

from circe.data.batching import raw_query
from circe.data.types import RawQuery
from circe.methods import create_method, list_methods, method_class
from circe.methods.plan import training_feed
from circe.train.data import load_split, to_device
from circe.train.trainer import Trainer

# Methods over trained members (DAFM) need those first: tests/test_dafm.py drives them.
STANDALONE = [n for n in list_methods() if not method_class(n).requires]
TRAINABLE = [n for n in STANDALONE if method_class(n).trainable]


def test_the_baselines_are_registered():
    assert {"image-only", "text-only", "sum"} <= set(list_methods())


def test_unknown_method_names_the_choices(tiny_backbone):
    with pytest.raises(ValueError, match="unknown method 'summ'.*image-only"):
        create_method("summ", tiny_backbone)


@pytest.mark.parametrize("name", STANDALONE)
def test_contract(name, tiny_backbone, bench):
    torch.manual_seed(0)
    method = create_method(name, tiny_backbone).eval()
    split = load_split("synthetic", bench, "val")
    queries = [raw_query(q, split.gallery) for q in split.queries[:3]]
    images = [query.image for query in queries]
    with torch.no_grad():
        targets = method.encode_target_images(images)
        composed = method.encode_raw_queries(queries)
        # The pixel encoders are the same functions, once the pipeline has preprocessed.
        pixels = torch.stack([tiny_backbone.preprocess(image) for image in images])
        torch.testing.assert_close(method.encode_targets(pixels), targets)
        torch.testing.assert_close(method.encode_queries(*method.query_inputs(queries)), composed)
    # One space for both sides; its width is the method's (DWC joins two streams).
    assert composed.shape[0] == targets.shape[0] == 3
    assert composed.shape[1] == targets.shape[1] >= tiny_backbone.embed_dim
    torch.testing.assert_close(composed.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(targets.norm(dim=-1), torch.ones(3))
    # The text is part of the query for every method but the image-only baseline.
    other_text = [
        RawQuery(q.image, "remove everything", q.reference_id, q.query_id, q.caption)
        for q in queries
    ]
    with torch.no_grad():
        changed = not torch.allclose(method.encode_raw_queries(other_text), composed)
    assert changed == (name != "image-only")


@pytest.mark.parametrize("name", TRAINABLE)
def test_the_trainer_gets_one_loss_from_pixels_and_from_cached_features(
    name, bench, tiny_train_config, tmp_path
):
    """The trainer's two feeds of one batch (decoded pixels; backbone outputs from the
    feature cache) through the same objective, for every trainable method."""
    losses, feeds = {}, {}
    for cache in (False, True):
        config = tiny_train_config(
            bench, tmp_path / "cache", method=name, feature_cache=cache, eval_every=0
        )
        trainer = Trainer(config, tmp_path / f"run-{cache}", progress=False)
        feeds[cache] = training_feed(trainer.method, cache).source
        trainer.objective.eval()  # no dropout: the two feeds must see one function
        batch = next(iter(trainer.source.batches([list(range(8))])))
        with torch.no_grad():
            losses[cache] = trainer.objective(to_device(batch, trainer.accelerator.device))
    assert feeds[False] == "pixels" and torch.isfinite(losses[False])
    if feeds[True] == "features":
        # Token sequences are cached as float16: agreement to that precision.
        torch.testing.assert_close(losses[True], losses[False], rtol=2e-3, atol=2e-3)
    else:  # a method that trains its image tower is fed pixels either way
        assert feeds[True] == "pixels"
        torch.testing.assert_close(losses[True], losses[False])


def test_baselines_use_what_they_say(tiny_backbone):
    size = tiny_backbone.identity.image_size
    pixels = torch.randn(2, 3, size, size)
    image_only = create_method("image-only", tiny_backbone)
    text_only = create_method("text-only", tiny_backbone)
    feature_sum = create_method("sum", tiny_backbone)
    with torch.no_grad():
        a = image_only.encode_queries(pixels, ["red", "blue"])
        b = image_only.encode_queries(pixels, ["a green square", "nothing"])
        torch.testing.assert_close(a, b)  # text ignored
        c = text_only.encode_queries(pixels, ["red", "blue"])
        d = text_only.encode_queries(torch.randn_like(pixels), ["red", "blue"])
        torch.testing.assert_close(c, d)  # image ignored
        expected = torch.nn.functional.normalize(a + c, dim=-1)
        torch.testing.assert_close(feature_sum.encode_queries(pixels, ["red", "blue"]), expected)

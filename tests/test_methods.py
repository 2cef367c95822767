"""Every registered method through the same contract (forward, shapes, norms, loss)."""

import pytest
import torch

from circe.methods import Batch, create_method, list_methods, method_class

# Methods over trained members (DAFM) take raw inputs, not pixels: tests/test_dafm.py.
PIXEL_METHODS = [n for n in list_methods() if not method_class(n).encodes_raw_inputs]


def test_the_baselines_are_registered():
    assert {"image-only", "text-only", "sum"} <= set(list_methods())


def test_unknown_method_names_the_choices(tiny_backbone):
    with pytest.raises(ValueError, match="unknown method 'summ'.*image-only"):
        create_method("summ", tiny_backbone)


@pytest.mark.parametrize("name", PIXEL_METHODS)
def test_contract(name, tiny_backbone):
    method = create_method(name, tiny_backbone)
    size = tiny_backbone.identity.image_size
    pixels = torch.randn(3, 3, size, size)
    texts = ["make the circle red", "remove the square", "add a small blue diamond"]
    queries = method.encode_queries(pixels, texts)
    targets = method.encode_targets(pixels)
    # One space for both sides; its width is the method's (DWC joins two streams).
    assert queries.shape[0] == targets.shape[0] == 3
    assert queries.shape[1] == targets.shape[1] >= tiny_backbone.embed_dim
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(targets.norm(dim=-1), torch.ones(3))
    losses = method.loss(Batch(pixels, texts, pixels))
    assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])


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

"""FAR-Net and the token feature cache it trains from."""

import numpy as np
import pytest
import torch

from circe.methods import create_method
from circe.methods.base import TrainingState, contrastive_loss
from circe.methods.far_net import uncertainty_nll
from circe.methods.inputs import Pairs, TokenFeatures
from circe.progress import no_progress
from circe.train.cache import FeatureCache, image_items, image_token_batches, text_token_batches
from circe.train.data import load_split
from circe.train.runlog import read_log
from circe.train.trainer import train


@pytest.fixture
def config(bench, tiny_train_config, tmp_path):
    return tiny_train_config(
        bench,
        tmp_path / "cache",
        method="far-net",
        epochs=1,
        batch_size=16,
        warmup_steps=2,
        log_every=1,
        eval_every=0,
        test_splits=[],
        eval_batch_size=64,
    )


@pytest.fixture
def far_net(tiny_backbone):
    torch.manual_seed(0)
    return create_method("far-net", tiny_backbone).eval()


def randomised(method):
    """The method with every trained weight random: the output layers start at zero, which
    would hide from a test whatever happens before them."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in method.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return method


def random_pixels(backbone, count):
    size = backbone.identity.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_token_cache_round_trip(far_net, tiny_backbone, bench, tmp_path):
    pairs = Pairs.from_split(load_split("synthetic", bench, "train"))
    gallery, ids, texts = pairs.split.gallery, pairs.images[:40], pairs.texts
    cache = FeatureCache(tmp_path)
    key, fields = cache.key(tiny_backbone, "image:tokens", image_items(gallery, ids))
    cache.store_tokens(key, fields, image_token_batches(far_net, gallery, ids, 16, 0, no_progress))
    text_key, text_fields = cache.key(tiny_backbone, "text:tokens", texts)
    cache.store_tokens(text_key, text_fields, text_token_batches(far_net, texts, 16, no_progress))
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())

    images = cache.load_tokens(key)
    assert isinstance(images.tokens, np.memmap) and images.tokens.dtype == np.float16
    pixels = torch.stack([tiny_backbone.preprocess(gallery.open(i)) for i in ids])
    expected = far_net.backbone_image_tokens(pixels)
    rows = torch.tensor([3, 0, 17, 39])
    got = images[rows]
    assert got.tokens.dtype == torch.float32
    torch.testing.assert_close(got.tokens, expected.tokens[rows], rtol=2e-3, atol=2e-3)
    assert torch.equal(got.pooled, expected.pooled[rows]) and got.mask.all()

    # Text padding is not stored: the sequences end at the longest text's last token.
    words = cache.load_tokens(text_key)
    expected = far_net.backbone_text_tokens(texts)
    length = int(expected.mask.sum(dim=1).max())
    assert words.tokens.shape == (len(texts), length, expected.tokens.shape[-1])
    assert length < expected.tokens.shape[1] and not expected.mask[:, length:].any()
    rows = torch.arange(len(texts))
    got = words[rows]
    torch.testing.assert_close(got.tokens, expected.tokens[:, :length], rtol=2e-3, atol=2e-3)
    assert torch.equal(got.mask, expected.mask[:, :length])
    # The cut changes nothing FAR-Net computes (padding is masked out).
    method, k = randomised(far_net), min(len(ids), len(texts))
    image = method.backbone_image_tokens(pixels[:k])
    torch.testing.assert_close(
        method.encode_queries_from_features(image, words[torch.arange(k)]),
        method.encode_queries_from_features(image, method.backbone_text_tokens(texts[:k])),
        rtol=2e-3,
        atol=2e-3,
    )


def test_the_token_cache_is_computed_once_then_hit(config, tmp_path, monkeypatch):
    from circe.backbones.openclip import OpenClipBackbone

    encoded = {"encode_image": 0, "encode_text": 0}  # rows through each tower
    for tower in encoded:
        original = getattr(OpenClipBackbone, tower)

        def counted(self, inputs, *args, _tower=tower, _original=original, **kwargs):
            encoded[_tower] += len(inputs)
            return _original(self, inputs, *args, **kwargs)

        monkeypatch.setattr(OpenClipBackbone, tower, counted)
    first = train(config, tmp_path / "a", progress=False)
    pairs = Pairs.from_split(load_split("synthetic", config.root, "train"))
    references = len(pairs.reference.unique())
    # Pooled features of every image (targets), tokens of the references and of the texts,
    # and FAR-Net's one-row probe of each tower's token shape.
    assert encoded == {
        "encode_image": len(pairs.images) + references + 1,
        "encode_text": len(pairs.texts) + 1,
    }
    report = first.results["feature_cache"]
    assert report["hits"] == 0 and report["entries"] == 3 and report["disk_mb"] > 0
    before = dict(encoded)
    second = train(config, tmp_path / "b", progress=False)
    assert second.results["feature_cache"]["hits"] == 3
    assert {k: encoded[k] - before[k] for k in encoded} == {"encode_image": 1, "encode_text": 1}


def test_padding_changes_nothing(far_net, tiny_backbone):
    method = randomised(far_net)
    image = method.backbone_image_tokens(random_pixels(tiny_backbone, 2))
    text = method.backbone_text_tokens(["make the circle red", "remove the big blue square"])
    assert not text.mask.all()  # the short text has padding
    noise = torch.randn(text.tokens.shape, generator=torch.Generator().manual_seed(2))
    noisy = TokenFeatures(
        text.pooled, torch.where(text.mask[..., None], text.tokens, noise), text.mask
    )
    torch.testing.assert_close(
        method.encode_queries_from_features(image, noisy),
        method.encode_queries_from_features(image, text),
    )
    # ... while a real word does change the query.
    changed = TokenFeatures(text.pooled, text.tokens.clone(), text.mask)
    changed.tokens[0, 1] += 1.0
    queries = method.encode_queries_from_features(image, changed)
    difference = queries - method.encode_queries_from_features(image, text)
    assert difference[0].abs().max() > 1e-4 and difference[1].abs().max() == 0


def test_at_initialisation_far_net_is_the_feature_sum(far_net, tiny_backbone):
    pixels, texts = random_pixels(tiny_backbone, 2), ["add a red circle", "move the square left"]
    feature_sum = create_method("sum", tiny_backbone)
    with torch.no_grad():
        torch.testing.assert_close(
            far_net.encode_queries(pixels, texts), feature_sum.encode_queries(pixels, texts)
        )


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("far-net", {"arm_share", "image_share", "region_attention"}),
        ("far-net-esam-only", {"region_attention"}),
        ("far-net-arm-only", {"image_share"}),
    ],
)
def test_stages_and_explanations(name, keys, tiny_backbone):
    method = randomised(create_method(name, tiny_backbone).eval())
    assert (method.esam is not None, method.arm is not None) == (
        "region_attention" in keys,
        "image_share" in keys,
    )
    pixels, texts = random_pixels(tiny_backbone, 2), ["add a red circle", "remove the square"]
    explanation = method.explain(pixels, texts)
    assert set(explanation) == keys
    if "region_attention" in explanation:  # 32 px images, 8 px patches: a 4 x 4 grid
        grid = torch.tensor(explanation["region_attention"])
        assert grid.shape == (2, 4, 4)
        torch.testing.assert_close(grid.sum(dim=(1, 2)), torch.ones(2))
    for share in ("arm_share", "image_share"):
        assert all(0 < w < 1 for w in explanation.get(share, []))
    # A variant is its settings: the saved config recreates it.
    assert create_method(name, tiny_backbone, **method.config_dict()).config == method.config


def test_token_cache_and_pixel_training_agree(config, tmp_path):
    config = config.replace(max_steps=2, method_config={"dropout": 0.0})
    train(config, tmp_path / "cached", progress=False)
    train(config.replace(feature_cache=False), tmp_path / "pixels", progress=False)
    cached = [r["loss"] for r in read_log(tmp_path / "cached", "step")]
    pixels = [r["loss"] for r in read_log(tmp_path / "pixels", "step")]
    assert len(cached) == 2 and cached == pytest.approx(pixels, abs=2e-3)  # float16 tokens


def test_loss_falls(config, tmp_path):
    result = train(config.replace(epochs=6, lr=5e-3), tmp_path / "run", progress=False)
    assert result.finished
    epochs = read_log(tmp_path / "run", "epoch")
    assert epochs[-1]["train_loss"] < 0.9 * epochs[0]["train_loss"]  # 2.78 -> 2.28 here


# -- the stage losses and the uncertainty loss ---------------------------------------------------


def test_the_training_loss_adds_each_stage_loss_with_its_weight(tiny_backbone):
    texts = ["make the circle red", "remove the square", "add a star", "move the circle left"]
    pixels = random_pixels(tiny_backbone, 4)
    targets = torch.nn.functional.normalize(torch.randn(4, tiny_backbone.embed_dim), dim=-1)
    weights = {"esam_loss": 0.3, "arm_loss": 0.7, "uncertainty_loss": 2.0}
    method = randomised(create_method("far-net", tiny_backbone, dropout=0.0, **weights)).eval()
    with torch.no_grad():
        stacked = method.encode_training_queries(pixels, texts)  # [B, 7, D]
        parts = method.compose(
            method.query_image_features(pixels), method.query_text_features(texts)
        )
        loss = method.embedding_loss(stacked, targets, 0.1, TrainingState())
    assert stacked.shape == (4, 7, tiny_backbone.embed_dim)
    torch.testing.assert_close(stacked[:, 0], method.encode_queries(pixels, texts))
    nce = [contrastive_loss(stacked[:, k], targets, 0.1) for k in range(3)]
    expected = nce[0] + 0.3 * nce[1] + 0.7 * nce[2] + 2.0 * uncertainty_nll(stacked[:, 3:], targets)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stacked[:, 2], torch.nn.functional.normalize(parts.early, dim=-1))
    # The first design is the final query's loss alone.
    old = create_method("far-net-final-loss-only", tiny_backbone, dropout=0.0)
    old.load_state_dict(method.state_dict())
    with torch.no_grad():
        only = old.embedding_loss(old.encode_training_queries(pixels, texts), targets, 0.1, None)
    torch.testing.assert_close(only, nce[0])


def test_the_uncertainty_loss_teaches_the_variance_the_streams_error():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(512, 8, generator=generator)
    means = torch.stack([targets + 0.1 * torch.randn(512, 8), targets + torch.randn(512, 8)], 1)
    means.requires_grad_(True)
    log_variances = torch.zeros(2, 8, requires_grad=True)  # one σ² per stream and dimension
    optimizer = torch.optim.Adam([log_variances], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        streams = torch.cat([means, log_variances.expand(512, 2, 8)], dim=1)
        uncertainty_nll(streams, targets).backward()
        optimizer.step()
    assert means.grad is None or not means.grad.any()  # μ is left to the contrastive losses
    learned = log_variances.detach().exp()
    expected = (targets.unsqueeze(1) - means.detach()).square().mean(dim=0)  # [2, 8]
    torch.testing.assert_close(learned, expected, rtol=0.05, atol=1e-3)
    # So the precision shares trust the accurate stream: about 0.99 of the weight.
    assert (torch.softmax(-log_variances.detach(), dim=0)[0] > 0.95).all()


def test_the_stage_terms_are_in_the_training_loss_from_the_first_step(config, tmp_path):
    config = config.replace(max_steps=3, method_config={"dropout": 0.0})
    train(config, tmp_path / "new", progress=False)
    train(config.replace(method="far-net-final-loss-only"), tmp_path / "old", progress=False)
    new = [r["loss"] for r in read_log(tmp_path / "new", "step")]
    old = [r["loss"] for r in read_log(tmp_path / "old", "step")]
    assert new[0] != pytest.approx(old[0])  # the stage terms are in the loss from step one


def test_word_dropout_hides_words_in_training_only_and_keeps_the_end_token(tiny_backbone):
    method = randomised(create_method("far-net", tiny_backbone, word_dropout=0.5, dropout=0.0))
    texts = ["make the small red circle large", "remove it"]
    text = method.query_text_features(texts)
    torch.manual_seed(0)
    dropped = method._drop_words(text.mask)
    assert (dropped <= text.mask).all() and dropped.sum() < text.mask.sum()
    last = text.mask.sum(dim=1) - 1
    assert dropped[torch.arange(2), last].all()  # the end token, which holds the whole text
    pixels = random_pixels(tiny_backbone, 2)
    image = method.query_image_features(pixels)
    with torch.no_grad():
        method.eval()
        first, second = (method.compose(image, text).query for _ in range(2))
        torch.testing.assert_close(first, second)  # evaluation sees every word
        method.train()
        assert not torch.allclose(method.compose(image, text).query, first)

"""`circe pretrain` on a small budget, for circe-tiny and for circe-minilm (with a tiny
random BERT standing in for all-MiniLM-L6-v2): the loss falls, the weights load back, and an
interrupted run resumes to the same weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from circe import backbones
from circe.backbones import load_backbone
from circe.pretrain import PretrainConfig, pretrain

QUICK = {
    "backbone": "circe-tiny",
    "images": 128,
    "batch_size": 16,
    "paraphrase_batch": 16,
    "warmup_steps": 3,
    "lr": 2e-3,
    "heldout_queries": 30,
}


@pytest.mark.slow
def test_short_pretraining_learns_and_writes_loadable_weights(tmp_path):
    out = tmp_path / "tiny.safetensors"
    report = pretrain(out, PretrainConfig(steps=80, **QUICK))
    assert report["loss_last"] < report["loss_first"] - 0.3
    # Held-out captions find their images above chance (R@5 by chance: 5 x chance R@1;
    # measured 18.6 against 11.6 here).
    assert report["text_to_image_R@5"] > 1.25 * 5 * report["chance_R@1"]
    saved = json.loads((tmp_path / "tiny.report.json").read_text())
    assert saved["config"]["steps"] == 80
    assert not (tmp_path / "tiny.safetensors.resume.pt").exists()
    backbone = load_backbone("circe-tiny", weights=out)
    assert backbone.identity.weights_sha256 != load_backbone("circe-tiny").identity.weights_sha256
    with torch.no_grad():
        embedding = backbone.encode_text(backbone.tokenize(["small red circle top left"]))
    assert embedding.shape == (1, backbone.embed_dim)


LANGUAGE_MODEL_ARCHITECTURE = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "context_length": 24,
}
ON_TINY_BERT = {
    "images": 64,
    "batch_size": 16,
    "warmup_steps": 2,
    "captions_per_image": 2,
    "heldout_queries": 20,
    "lr": 3e-3,
}


@pytest.fixture
def on_tiny_bert(tiny_language_model, monkeypatch, tmp_path):
    """circe-minilm's pretraining with the tiny BERT as its language model and a small image
    tower."""
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(LANGUAGE_MODEL_ARCHITECTURE))
    monkeypatch.setattr(backbones, "MINILM_CONFIG_PATH", arch)
    monkeypatch.setattr(
        "circe.backbones.language_model.packaged_text_model", lambda: tiny_language_model
    )
    return tiny_language_model


@pytest.mark.parametrize("text_layers_trained", [0, 1])
def test_language_model_pretraining_learns_and_keeps_the_locked_layers(
    on_tiny_bert, tmp_path, text_layers_trained
):
    out = tmp_path / "m.safetensors"
    config = PretrainConfig(steps=150, text_layers_trained=text_layers_trained, **ON_TINY_BERT)
    report = pretrain(out, config)
    assert report["loss_last"] < report["loss_first"] - 0.2
    assert report["text_layers_trained"] == text_layers_trained
    assert (
        report["text_weights_sha256"]
        == load_backbone(f"lm:{on_tiny_bert}", weights=out).text_weights_sha256
    )
    assert not (tmp_path / "m.safetensors.resume.pt").exists()
    assert not (tmp_path / "m.safetensors.text-cache.pt").exists()
    # Only the trained top layer (if any) is in the file: the rest is the language model's.
    layers = {k.split(".")[3] for k in load_file(out) if k.startswith("text.encoder.")}
    assert layers == ({"1"} if text_layers_trained else set())


@pytest.mark.parametrize(
    "backbone",
    [
        pytest.param("circe-tiny", marks=pytest.mark.slow),
        "circe-minilm",  # with a trained top layer: its dropout must resume too
    ],
)
def test_interrupted_pretraining_resumes_to_the_same_weights(request, tmp_path, backbone):
    if backbone == "circe-tiny":
        config = PretrainConfig(steps=12, save_every=4, **QUICK)
    else:
        request.getfixturevalue("on_tiny_bert")
        config = PretrainConfig(steps=8, save_every=4, text_layers_trained=1, **ON_TINY_BERT)
    pretrain(tmp_path / "straight.safetensors", config)

    def interrupt_after_six(items, total, description):
        for n, item in enumerate(items):
            if description == "pretraining" and n == 6:
                raise KeyboardInterrupt
            yield item

    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        pretrain(out, config, progress=interrupt_after_six)
    assert not out.exists() and (tmp_path / "resumed.safetensors.resume.pt").exists()
    if backbone == "circe-minilm":  # the captions' features are not computed again
        assert (tmp_path / "resumed.safetensors.text-cache.pt").exists()
    report = pretrain(out, config)
    assert report["resumed_from_step"] == 4
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(out)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0)


def test_pretraining_captions_never_use_the_independent_wording():
    """`test_free` measures wording nothing of ours trained on: no verb form of
    `circe.data.free_wording` may occur in the captions the backbone is pretrained on."""
    import random
    import re

    from circe.data.free_wording import VERBS
    from circe.data.phrasing import varied_caption
    from circe.data.synthetic import random_scene
    from circe.pretrain import _random_words

    forms = {form for verbs in VERBS.values() for v in verbs for form in (v.base, v.ing, v.done)}
    rng = random.Random(0)
    captions = [
        f"{varied_caption(random_scene(rng, 1, 5), rng)}, {_random_words(rng)}" for _ in range(3000)
    ]
    used = {word for text in captions for word in re.findall(r"[a-z']+", text.lower())}
    assert used and not used & forms, sorted(used & forms)

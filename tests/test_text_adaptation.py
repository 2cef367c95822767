"""Recipes that keep the language: LoRA adapters on the text tower (peft) and the L2-SP pull
towards the pretrained weights, on a language-model backbone over a tiny random BERT."""

import json

import pytest
import torch
from safetensors.torch import load_file

from circe.backbones import load_backbone
from circe.backbones.language_model import LanguageModelBackbone
from circe.methods import create_method
from circe.methods.adaptation import adapt_text_tower
from circe.methods.checkpoint import load_trained_method
from circe.train.config import TrainConfig
from circe.train.trainer import resume, train

ARCHITECTURE = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "context_length": 24,
}


@pytest.fixture(scope="module")
def language_backbone(tiny_language_model, tmp_path_factory):
    """(spec, weights file) of an untrained image tower + projection over the tiny BERT."""
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("lm-weights") / "lm.safetensors"
    LanguageModelBackbone(tiny_language_model, architecture=ARCHITECTURE).save(weights)
    return f"lm:{tiny_language_model}", weights


@pytest.fixture
def config(bench, language_backbone, tmp_path):
    spec, weights = language_backbone
    return TrainConfig(
        method="combiner-ft",
        backbone=spec,
        backbone_weights=str(weights),
        root=str(bench),
        cache_dir=str(tmp_path / "cache"),
        epochs=2,
        batch_size=16,
        lr=2e-3,
        backbone_lr=1e-2,  # large, so that two epochs move the text weights measurably
        warmup_steps=1,
        eval_batch_size=64,
        test_splits=["test"],
    )


def _text_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".backbone.text." in k or k.startswith("text.")}


def test_lora_trains_adapters_only_and_reloads(config, language_backbone, tmp_path):
    spec, weights = language_backbone
    pretrained = load_backbone(spec, weights).text.state_dict()
    run = tmp_path / "run"
    train(config.replace(text_adaptation="lora", lora_rank=2), run, progress=False)
    saved = load_file(str(run / "last" / "model.safetensors"))
    adapters = {k: v for k, v in saved.items() if "lora_B" in k}
    assert adapters and any(v.abs().sum() > 0 for v in adapters.values())  # B left zero
    # Every pretrained weight of the language model is where it was.
    prefix = "method.backbone.text."
    for key, value in saved.items():
        if key.startswith(prefix) and "lora_" not in key:
            original = pretrained[key.removeprefix(prefix).replace(".base_layer", "")]
            assert torch.equal(value, original), key
    # A checkpoint builds the same adapters before it reads them: equal embeddings.
    method = load_trained_method(run / "last")
    fresh = create_method("combiner-ft", load_backbone(spec, weights))
    adapt_text_tower(fresh, "lora", 2)
    fresh.load_state_dict(
        {k.removeprefix("method."): v for k, v in saved.items() if k.startswith("method.")}
    )
    texts = ["remove the red circle", "add a blue square"]
    with torch.no_grad():
        ids = method.backbone.tokenize(texts)
        assert torch.allclose(
            method.backbone.encode_text(ids), fresh.eval().backbone.encode_text(ids), atol=1e-6
        )
        assert not torch.allclose(
            method.backbone.encode_text(ids), load_backbone(spec, weights).encode_text(ids)
        )


def test_l2sp_keeps_fine_tuned_weights_near_the_pretrained_ones(
    config, language_backbone, tmp_path
):
    spec, weights = language_backbone
    pretrained = load_backbone(spec, weights).text.state_dict()

    def distance(run_dir):
        saved = load_file(str(run_dir / "last" / "model.safetensors"))
        prefix = "method.backbone.text."
        return sum(
            (v - pretrained[k.removeprefix(prefix)]).pow(2).sum().item()
            for k, v in saved.items()
            if k.startswith(prefix)
        )

    train(config, tmp_path / "free", progress=False)
    train(config.replace(l2sp_weight=50.0), tmp_path / "pulled", progress=False)
    free, pulled = distance(tmp_path / "free"), distance(tmp_path / "pulled")
    assert free > 0 and pulled < 0.5 * free


def test_l2sp_resumes_to_the_same_weights(config, tmp_path):
    """The anchors are the pretrained weights again after a resume, not the resumed ones."""
    config = config.replace(l2sp_weight=5.0)
    train(config, tmp_path / "whole", progress=False)
    train(config.replace(max_steps=7), tmp_path / "parted", progress=False)
    resume(tmp_path / "parted", {}, progress=False)
    whole = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    parted = load_file(str(tmp_path / "parted" / "last" / "model.safetensors"))
    assert all(torch.allclose(whole[k], parted[k], atol=1e-6) for k in whole)


def test_recipes_refuse_what_they_cannot_do(config, tiny_backbone):
    with pytest.raises(ValueError, match="does not train its text tower"):
        adapt_text_tower(create_method("combiner", tiny_backbone), "lora", 4)
    with pytest.raises(ValueError, match="LoRA is available on language-model backbones"):
        adapt_text_tower(create_method("combiner-ft", tiny_backbone), "lora", 4)
    with pytest.raises(ValueError, match="text_adaptation must be one of"):
        config.replace(text_adaptation="adapters")
    with pytest.raises(ValueError, match="nothing to pull"):
        train(config.replace(method="combiner", l2sp_weight=1.0), config.cache_dir + "/r", False)
    assert json.loads(json.dumps(config.to_dict()))["text_adaptation"] == "full"

"""`circe pretrain` on a small budget: the loss falls and the weights load back."""

import json

import torch

from circe.backbones import load_backbone
from circe.pretrain import PretrainConfig, pretrain


def test_short_pretraining_learns_and_writes_loadable_weights(tmp_path):
    out = tmp_path / "tiny.safetensors"
    config = PretrainConfig(images=256, steps=40, batch_size=32, warmup_steps=5, lr=2e-3)
    report = pretrain(out, config)
    assert report["loss_last"] < report["loss_first"] - 0.3
    assert report["text_to_image_R@1"] > report["chance_R@1"]
    saved = json.loads((tmp_path / "tiny.report.json").read_text())
    assert saved["config"]["steps"] == 40
    backbone = load_backbone("default", weights=out)
    assert backbone.identity.weights_sha256 != load_backbone("default").identity.weights_sha256
    with torch.no_grad():
        embedding = backbone.encode_text(backbone.tokenize(["small red circle top left"]))
    assert embedding.shape == (1, backbone.embed_dim)

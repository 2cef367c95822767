"""The Combiner (CLIP4Cir): its equations, its frozen backbone, its one code path; and
combiner-ft, the same with the text tower fine-tuned."""

import pytest
import torch
import torch.nn.functional as F

from circe.methods import create_method, method_class
from circe.methods.checkpoint import load_trained_method
from circe.methods.plan import stores_backbone
from circe.train.runlog import read_log
from circe.train.trainer import Trainer


@pytest.fixture
def combiner(tiny_backbone):
    torch.manual_seed(0)
    return create_method("combiner", tiny_backbone)


def test_registered_as_a_trainable_frozen_backbone_method(tiny_backbone):
    assert method_class("combiner").trainable and method_class("combiner-ft").trainable
    combiner = create_method("combiner", tiny_backbone)
    assert combiner.inputs.trains == frozenset() and not stores_backbone(combiner)


def test_only_the_fusion_is_trainable_and_the_backbone_stays_in_eval(combiner):
    d = combiner.backbone.embed_dim
    trainable = [p for p in combiner.parameters() if p.requires_grad]
    # W_t, W_v: d -> 4d; W_c: 8d -> 8d; MLP for λ: 8d -> 8d -> 1; W_o: 8d -> d (with biases).
    expected = 2 * (d * 4 * d + 4 * d) + 2 * (64 * d * d + 8 * d) + (8 * d + 1) + (8 * d * d + d)
    assert sum(p.numel() for p in trainable) == expected
    assert not any(p.requires_grad for p in combiner.backbone.parameters())
    combiner.train()
    assert combiner.training and not combiner.backbone.training


def test_config_sets_the_widths_and_rejects_unknown_keys(tiny_backbone):
    narrow = create_method("combiner", tiny_backbone, expansion=2, dropout=0.0)
    assert narrow.text_projection[0].out_features == 2 * tiny_backbone.embed_dim
    assert narrow.config_dict() == {"expansion": 2, "dropout": 0.0, "finetune_text": False}
    with pytest.raises(TypeError, match="hidden"):
        create_method("combiner", tiny_backbone, hidden=3)


def test_query_is_the_papers_equation(combiner):
    """q = normalize(W_o h + λ t + (1 - λ) v), λ = σ(MLP([t' ‖ v'])), in eval mode."""
    combiner.eval()
    v, t = torch.randn(4, combiner.backbone.embed_dim), torch.randn(4, combiner.backbone.embed_dim)
    with torch.no_grad():
        c = torch.cat([combiner.text_projection(t), combiner.image_projection(v)], dim=-1)
        lam = combiner.dynamic_scalar(c)
        expected = F.normalize(
            combiner.output_layer(combiner.combiner_layer(c)) + lam * t + (1 - lam) * v, dim=-1
        )
        torch.testing.assert_close(combiner.encode_queries_from_features(v, t), expected)
    assert ((lam > 0) & (lam < 1)).all()


def test_pixels_and_features_take_the_same_path(combiner):
    combiner.eval()
    size = combiner.backbone.identity.image_size
    pixels, texts = torch.randn(3, 3, size, size), ["add a red circle", "remove it", "move it"]
    with torch.no_grad():
        image_features = combiner.backbone.encode_image(pixels)
        text_features = combiner.encode_texts(texts)
        torch.testing.assert_close(
            combiner.encode_queries(pixels, texts),
            combiner.encode_queries_from_features(image_features, text_features),
        )
        torch.testing.assert_close(
            combiner.encode_targets(pixels), F.normalize(image_features, dim=-1)
        )


def test_gradients_reach_every_fusion_parameter_and_not_the_backbone(combiner):
    combiner.train()
    d = combiner.backbone.embed_dim
    queries = combiner.encode_queries_from_features(torch.randn(8, d), torch.randn(8, d))
    queries.sum().backward()
    for name, parameter in combiner.named_parameters():
        if name.startswith("backbone."):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- combiner-ft


def tower(backbone, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in backbone.tower_parameters(name)]


def test_combiner_ft_trains_the_text_tower_of_its_own_backbone_copy(tiny_backbone):
    method = create_method("combiner-ft", tiny_backbone)
    assert method.config.finetune_text and method.config_dict()["finetune_text"]
    assert method.inputs.trains == {"text"} and stores_backbone(method)  # saved in checkpoints
    assert method.backbone is not tiny_backbone  # fine-tuning must not change a shared one
    assert all(p.requires_grad for p in method.backbone.tower_parameters("text"))
    assert not any(p.requires_grad for p in method.backbone.tower_parameters("image"))
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    fusion = create_method("combiner", tiny_backbone)
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    text = sum(p.numel() for p in method.backbone.tower_parameters("text"))
    assert trainable == text + sum(p.numel() for p in fusion.parameters() if p.requires_grad)


def test_combiner_ft_fine_tunes_the_text_tower_into_its_checkpoint(
    bench, tiny_train_config, tiny_backbone, tmp_path
):
    """Trained like dwc: the loss falls, the text tower changes and is saved with the fusion,
    the image tower stays as loaded (so its features are still cached), and the checkpoint
    reloads to the very query embeddings of the model that was trained."""
    torch.manual_seed(0)
    config = tiny_train_config(
        bench,
        tmp_path / "cache",
        method="combiner-ft",
        epochs=4,
        batch_size=16,
        warmup_steps=2,
        eval_every=0,
        backbone_lr=1e-4,
        test_splits=["test"],
    )
    trainer = Trainer(config, tmp_path / "run", progress=False)
    result = trainer.fit()
    losses = [record["train_loss"] for record in read_log(result.run_dir, "epoch")]
    assert losses[-1] < losses[0]
    assert result.results["feature_cache"]["used"]  # image features, at least

    reloaded = load_trained_method(result.run_dir / "best")
    assert reloaded.name == "combiner-ft" and reloaded.inputs.trains == {"text"}
    for trained, loaded in zip(
        tower(reloaded.backbone, "image"), tower(tiny_backbone, "image"), strict=True
    ):
        assert torch.equal(trained, loaded)
    assert not any(
        torch.equal(trained, loaded)
        for trained, loaded in zip(
            tower(reloaded.backbone, "text"), tower(tiny_backbone, "text"), strict=True
        )
    )

    size = tiny_backbone.identity.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    texts = ["make the circle red", "remove the square", "add a small blue diamond"]
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.encode_queries(pixels, texts),
            trainer.method.eval().encode_queries(pixels, texts),
        )

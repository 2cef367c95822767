"""The training options the paper recipes need: LR schedules, the logit scale, weight decay,
parameter groups, augmentation, trained towers, gradient checkpointing, mixed precision and
the selection metric. Each on the tiny test backbone and benchmark."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from circe.methods import create_method
from circe.methods.base import contrastive_loss
from circe.train.config import TrainConfig
from circe.train.objective import ContrastiveObjective
from circe.train.runlog import read_log
from circe.train.selection import Selection
from circe.train.trainer import _lr_factor, _param_groups, train


@pytest.fixture
def config(bench, tiny_train_config, tmp_path):
    return tiny_train_config(
        bench,
        tmp_path / "cache",
        epochs=2,
        batch_size=16,
        lr=2e-3,
        warmup_steps=2,
        log_every=1,
        eval_batch_size=64,
        test_splits=[],
    )


def _lrs(run_dir) -> list[float]:
    return [record["lr"] for record in read_log(run_dir, "step")]


# -- learning-rate schedules ------------------------------------------------------------------


def test_the_schedules_factor_by_step():
    cosine = [_lr_factor(s, 2, 10) for s in range(10)]
    assert cosine[:2] == [0.5, 1.0] and cosine[2] == 1.0 and 0 < cosine[-1] < cosine[5] < 1
    assert [_lr_factor(s, 0, 10, "constant") for s in range(10)] == [1.0] * 10
    steps = [_lr_factor(s, 0, 10, "step", (4, 7), 0.1) for s in range(10)]
    assert steps == pytest.approx([1.0] * 4 + [0.1] * 3 + [0.01] * 3)


def test_a_constant_schedule_without_warm_up_keeps_the_rate(config, tmp_path):
    config = config.replace(lr_schedule="constant", warmup_steps=0, eval_every=0)
    train(config, tmp_path / "run", progress=False)
    assert _lrs(tmp_path / "run") == [config.lr] * 12  # 96 pairs / 16, 2 epochs


def test_a_step_schedule_steps_at_its_milestone_epochs(config, tmp_path):
    config = config.replace(
        epochs=3, lr_schedule="step", lr_milestones=[1, 2], lr_gamma=0.5, warmup_steps=0,
        eval_every=0,
    )  # fmt: skip
    train(config, tmp_path / "run", progress=False)
    expected = [config.lr] * 6 + [config.lr / 2] * 6 + [config.lr / 4] * 6
    assert _lrs(tmp_path / "run") == pytest.approx(expected)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr_schedule": "linear"}, "lr_schedule must be one of"),
        ({"lr_schedule": "step"}, "needs lr_milestones"),
        ({"lr_milestones": [3]}, "are for lr_schedule step"),
        ({"lr_schedule": "step", "lr_milestones": [3, 2]}, "increasing"),
        ({"lr_milestones": ["7"]}, "lr_milestones must be list"),
        ({"weight_decay_on": "biases"}, "weight_decay_on must be one of"),
        ({"temperature_learned_as": "inverse"}, "temperature_learned_as must be"),
        ({"augment": True}, "set feature_cache: false"),
        ({"selection_metric": "R@1"}, "selection_metric must be"),
        ({"reported": {"val": {"R@10": "high"}}}, r"reported.val.R@10 must be a number"),
    ],
)
def test_option_mistakes_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


# -- the logit scale ------------------------------------------------------------------------


def test_a_learned_multiplicative_scale_starts_at_its_value_and_learns(tiny_backbone):
    method = create_method("combiner", tiny_backbone)
    objective = ContrastiveObjective(method, 0.1, True, "scale")
    assert dict(objective.named_parameters())["logit_scale"].item() == pytest.approx(10.0)
    assert "log_temperature" not in dict(objective.named_parameters())
    queries, targets = (
        F.normalize(torch.randn(6, 8), dim=-1),
        F.normalize(torch.randn(6, 8), dim=-1),
    )
    loss = contrastive_loss(queries, targets, objective.temperature)
    expected = F.cross_entropy(10.0 * queries @ targets.T, torch.arange(6))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert objective.logit_scale.grad is not None and objective.logit_scale.grad != 0


def test_a_fixed_scale_stays_and_a_learned_one_moves(config, tmp_path):
    fixed = config.replace(temperature=0.01, learn_temperature=False, eval_every=0)
    train(fixed, tmp_path / "fixed", progress=False)
    temperatures = [r["temperature"] for r in read_log(tmp_path / "fixed", "step")]
    assert temperatures == pytest.approx([0.01] * 12)  # CLIP4Cir's fixed scale 100
    learned = config.replace(temperature=0.1, temperature_learned_as="scale", eval_every=0)
    train(learned, tmp_path / "learned", progress=False)
    temperatures = [r["temperature"] for r in read_log(tmp_path / "learned", "step")]
    assert temperatures[0] == pytest.approx(0.1, rel=1e-3) and temperatures[-1] != temperatures[0]


# -- parameter groups and weight decay ------------------------------------------------------


@pytest.mark.parametrize("decay_on", ["matrices", "all"])
def test_weight_decay_on_matrices_or_on_every_parameter(tiny_backbone, decay_on):
    method = create_method("combiner-ft", tiny_backbone)
    objective = ContrastiveObjective(method, 0.05, True)
    config = TrainConfig(weight_decay=0.01, weight_decay_on=decay_on, lr=1e-3, backbone_lr=1e-6)
    groups = _param_groups(objective, config)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    lr_of = {id(p): (g["name"], g["lr"]) for g in groups for p in g["params"]}
    named = dict(objective.named_parameters())
    bias = named["method.output_layer.bias"]
    assert decay_of[id(bias)] == (0.01 if decay_on == "all" else 0.0)
    assert decay_of[id(named["log_temperature"])] == (0.01 if decay_on == "all" else 0.0)
    assert decay_of[id(named["method.output_layer.weight"])] == 0.01
    assert lr_of[id(bias)] == ("fusion", 1e-3)
    text_tower = method.backbone.tower_parameters("text")
    assert {lr_of[id(p)] for p in text_tower} == {("backbone", 1e-6)}
    # Every trained parameter is in exactly one group; the frozen image tower in none.
    trained = [p for p in objective.parameters() if p.requires_grad]
    assert len(decay_of) == len(trained) == sum(len(g["params"]) for g in groups)
    assert not any(id(p) in decay_of for p in method.backbone.tower_parameters("image"))


# -- what the trainer feeds: augmentation, trained towers -------------------------------------


def test_the_train_transform_crops_at_random_in_the_eval_layout(tiny_backbone):
    from PIL import Image

    image = Image.linear_gradient("L").resize((80, 60)).convert("RGB")
    augment = tiny_backbone.train_transform()
    first, second = augment(image), augment(image)
    assert first.shape == second.shape == tiny_backbone.preprocess(image).shape
    assert not torch.equal(first, second)


def test_augmented_training_feeds_pixels_and_says_why(config, tmp_path, monkeypatch):
    from circe.train import data as data_module

    seen = []
    original = data_module._PixelTriplets.__getitem__

    def spy(self, p):
        seen.append(self.preprocess)
        return original(self, p)

    monkeypatch.setattr(data_module._PixelTriplets, "__getitem__", spy)
    config = config.replace(augment=True, feature_cache=False, epochs=1, eval_every=0)
    result = train(config, tmp_path / "run", progress=False)
    report = result.results["feature_cache"]
    assert report["used"] is False and "augment: true" in report["why"]
    # open_clip's training transform, a random crop first, made every training image
    crops = [type(transform.transforms[0]).__name__ for transform in seen]
    assert len(crops) == 96 and set(crops) == {"RandomResizedCrop"}
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["augment"] is True and saved["feature_cache"] is False


def test_both_towers_trained_turn_the_cache_off_and_say_so(config, tmp_path):
    config = config.replace(
        method="dqu-cir", method_config={"finetune": "full"}, epochs=1, eval_every=0
    )
    result = train(config, tmp_path / "run", progress=False)
    report = result.results["feature_cache"]
    assert report["used"] is False and "trains its image tower" in report["why"]
    assert not (tmp_path / "cache").exists()  # nothing was cached


# -- gradient checkpointing -------------------------------------------------------------------


def _grads_and_recomputes(backbone, checkpointing: bool, blocks) -> tuple[dict, int]:
    """Gradients of a DQU-CIR loss with both towers trained, and how often the first block's
    MLP ran (twice per forward when its activations are recomputed in the backward pass)."""
    torch.manual_seed(0)
    method = create_method("dqu-cir", backbone, finetune="full", dropout=0.0)
    if checkpointing:
        method.backbone.enable_gradient_checkpointing(method.inputs.trains)
    method.train()
    calls = []
    handle = blocks(method.backbone).register_forward_pre_hook(lambda *_: calls.append(1))
    pixels = torch.randn(4, 3, backbone.identity.image_size, backbone.identity.image_size)
    queries = method.encode_queries(pixels, ["a red circle", "blue", "two squares", "none"])
    loss = contrastive_loss(queries, method.encode_targets(pixels.flip(0)), 0.1)
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return grads, len(calls)


def _openclip_first_mlp(backbone):
    return backbone.model.visual.transformer.resblocks[0].mlp


def _check_checkpointing(backbone, blocks):
    plain, plain_calls = _grads_and_recomputes(backbone, False, blocks)
    checkpointed, checkpointed_calls = _grads_and_recomputes(backbone, True, blocks)
    assert checkpointed_calls == 2 * plain_calls
    assert plain.keys() == checkpointed.keys() and any("backbone" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_backbone):
    _check_checkpointing(tiny_backbone, _openclip_first_mlp)


def test_gradient_checkpointing_of_a_transformers_clip(tmp_path):
    from test_backbones import _tiny_hf_clip_dir

    from circe.backbones import load_backbone

    model_dir, *_ = _tiny_hf_clip_dir(tmp_path)
    backbone = load_backbone(f"hf:{model_dir}")
    _check_checkpointing(backbone, lambda b: b.model.vision_model.encoder.layers[0].mlp)


def test_a_run_resumes_with_gradient_checkpointing_switched_on(config, tmp_path, monkeypatch):
    """The same activations, recomputed: the resumed run ends where the straight one does."""
    from safetensors.torch import load_file

    from circe.backbones.openclip import OpenClipBackbone
    from circe.train.trainer import resume

    switched = []
    original = OpenClipBackbone.enable_gradient_checkpointing

    def spy(self, towers):
        switched.append(towers)
        original(self, towers)

    monkeypatch.setattr(OpenClipBackbone, "enable_gradient_checkpointing", spy)

    config = config.replace(method="combiner-ft", epochs=1, eval_every=0)
    train(config, tmp_path / "whole", progress=False)
    train(config.replace(max_steps=3), tmp_path / "parts", progress=False)
    resume(tmp_path / "parts", {"gradient_checkpointing": True}, progress=False)
    assert switched == [frozenset({"text"})]  # the resumed invocation, on the trained tower
    saved = json.loads((tmp_path / "parts" / "config.json").read_text())
    assert saved["gradient_checkpointing"] is False  # the run's own config is kept
    whole, parts = (
        load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("whole", "parts")
    )
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_is_refused_where_it_cannot_work(config, tmp_path):
    with pytest.raises(ValueError, match="combiner trains no backbone tower"):
        train(config.replace(gradient_checkpointing=True), tmp_path / "run", progress=False)


def test_a_resnet_image_tower_cannot_checkpoint_and_says_so(tmp_path):
    """open_clip's ModifiedResNet accepts the switch and does nothing: circe refuses."""
    from test_backbones import RESNET_CFG, _tiny_openclip

    from circe.backbones import load_backbone
    from circe.train.trainer import _checkpoint_gradients

    config, weights, _ = _tiny_openclip(tmp_path, f"resnet-{tmp_path.name}", RESNET_CFG)
    backbone = load_backbone(f"open_clip:{config}", weights=weights)
    method = create_method("dqu-cir", backbone, finetune="full")
    with pytest.raises(ValueError, match=r"dqu-cir on open_clip:.*ModifiedResNet has no gradient"):
        _checkpoint_gradients(method, "dqu-cir")
    method = create_method("dqu-cir", backbone, finetune="text")  # the text tower can
    _checkpoint_gradients(method, "dqu-cir")
    assert method.backbone.model.transformer.grad_checkpointing


# -- mixed precision on a CPU ---------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator: a run with
    another precision in the same process needs it cleared (a `circe train` process has one
    run), and cleared again for the tests after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("method", ["combiner-ft", "dwc"])
def test_bf16_mixed_precision_runs_the_towers_in_bf16(
    config, tmp_path, monkeypatch, fresh_accelerate_state, method
):
    """The towers and the fusion run in bf16; the loss in float32 (DWC's same-target test,
    a similarity above 1 - 1e-4, never holds in bf16: its loss was NaN)."""
    dtypes = []
    original = torch.nn.Linear.forward

    def spy(self, x):
        out = original(self, x)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    config = config.replace(
        method=method, mixed_precision="bf16", device="cpu", epochs=1, eval_every=0
    )
    train(config, tmp_path / "run", progress=False)
    assert torch.bfloat16 in dtypes
    losses = [r["loss"] for r in read_log(tmp_path / "run", "step")]
    assert all(math.isfinite(loss) for loss in losses)


def test_fp16_on_a_cpu_is_refused_rather_than_run_in_float32(config, tmp_path):
    config = config.replace(mixed_precision="fp16", device="cpu")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        train(config, tmp_path / "run", progress=False)


# -- the selection metric -------------------------------------------------------------------


def test_the_default_selection_is_the_mean_of_three_recalls(config, tmp_path):
    result = train(config.replace(epochs=1), tmp_path / "run", progress=False)
    val = read_log(tmp_path / "run", "epoch")[0]["val"]
    assert val["score"] == pytest.approx((val["R@1"] + val["R@10"] + val["R@50"]) / 3)
    assert result.results["selection_metric"].startswith("mean of R@1, R@10, R@50")


def test_a_sum_of_recalls_selects(config, tmp_path):
    config = config.replace(epochs=1, selection_metric="sum:R@1,R@10")
    train(config, tmp_path / "run", progress=False)
    val = read_log(tmp_path / "run", "epoch")[0]["val"]
    assert val["score"] == pytest.approx(val["R@1"] + val["R@10"])


def test_the_cirr_avg_selects_as_the_benchmark_scores_it(tiny_backbone, tmp_path):
    from benchmark_fixtures import write_cirr

    from circe.data.registry import load_benchmark
    from circe.eval.benchmark import score_benchmark
    from circe.eval.evaluate import score_matrix

    root = write_cirr(tmp_path / "cirr")
    method = create_method("combiner", tiny_backbone).eval()
    val = Selection("avg", "cirr", root, "val", None).score(method, 64, 0)
    benchmark = load_benchmark("cirr", root, "val")
    expected = score_benchmark(benchmark, [score_matrix(method, p) for p in benchmark.parts])
    assert val["score"] == expected.metrics["Avg"] and "Rsubset@1" in val
    summed = Selection(
        "sum:R@1,R@5,R@10,R@50,Rsubset@1,Rsubset@2,Rsubset@3", "cirr", root, "val", None
    )
    assert summed.score(method, 64, 0)["score"] == pytest.approx(
        sum(v for k, v in expected.metrics.items() if k not in ("Avg", "Mean7"))
    )
    with pytest.raises(ValueError, match="scored with .*not R@2"):
        Selection("sum:R@2", "cirr", root, "val", None)


def test_avg_is_refused_for_a_data_set_without_one(bench):
    with pytest.raises(ValueError, match="synthetic is scored with R@1, R@10, R@50, not Avg"):
        Selection("avg", "synthetic", bench, "val", None)

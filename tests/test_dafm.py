"""DAFM: fusion of trained members, its gate, its baselines, and the pipeline around it."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from circe.bench.fusion import write_random_member
from circe.cli import app
from circe.data.batching import raw_query
from circe.eval.evaluate import encode_gallery, encode_queries, score_matrix
from circe.methods import create_method, method_class
from circe.methods.checkpoint import load_trained_method
from circe.train.data import load_split
from circe.train.trainer import Trainer, train

REAL, WORDS, RANDOM = 0, 1, 2  # the members, in order: combiner, dqu-cir, random combiner


# Every test here stands on members trained by the module's fixtures.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config(bench, tiny_train_config, tmp_path_factory):
    return tiny_train_config(
        bench,
        tmp_path_factory.mktemp("cache"),
        batch_size=16,
        lr=1e-2,
        warmup_steps=2,
        eval_every=0,  # best = last: no validation, to keep the tests fast
        eval_batch_size=64,
        test_splits=[],
    )


@pytest.fixture(scope="module")
def members(config, tmp_path_factory):
    """Checkpoints of three members on two backbones: a trained combiner (the tiny test
    backbone), a DQU-CIR (the shipped backbone, its own preprocessing, queries prepared with
    words on the image), and a copy of the combiner with random weights."""
    runs = tmp_path_factory.mktemp("members")
    train(
        config.replace(method="combiner", epochs=4, method_config={"dropout": 0.1}),
        runs / "combiner",
        progress=False,
    )
    words = config.replace(
        method="dqu-cir",
        epochs=1,
        backbone="default",
        backbone_weights=None,
        method_config={"finetune": "none"},
    )
    train(words, runs / "dqu-cir", progress=False)
    random = write_random_member(runs / "combiner" / "best", runs / "random", seed=0)
    return [str(runs / "combiner" / "best"), str(runs / "dqu-cir" / "best"), str(random)]


@pytest.fixture(scope="module")
def trained(config, members, tmp_path_factory):
    """A DAFM trained over the members (the trainer, kept to look at its members after)."""
    run_dir = tmp_path_factory.mktemp("dafm") / "run"
    dafm_config = config.replace(
        method="dafm", epochs=20, method_config={"members": members}, test_splits=["test"]
    )
    trainer = Trainer(dafm_config, run_dir, progress=False)
    trainer.fit()
    return trainer, run_dir


@pytest.fixture(scope="module")
def dafm(trained):
    return load_trained_method(trained[1] / "best")


@pytest.fixture(scope="module")
def test_split(bench):
    return load_split("synthetic", bench, "test")


def test_fused_ranking_is_the_weighted_sum_of_member_cosines(dafm, test_split):
    # By hand, from each member's own evaluation (pixels, its own preprocessing):
    # score(q, g) = Σ_m ŵ_m(q) cos_m(q_m, g_m), ŵ the calibrated weights.
    queries = [encode_queries(m, test_split.queries, test_split) for m in dafm.members]
    gallery = [encode_gallery(m, test_split) for m in dafm.members]
    with torch.no_grad():
        weights = dafm.fusion_weights(torch.cat(queries, -1))  # [Q, M]
    by_hand = sum(w[:, None] * q @ g.T for w, q, g in zip(weights.T, queries, gallery))
    # DAFM through the evaluation pipeline (raw inputs, one embedding space):
    scores = score_matrix(dafm, test_split)  # [Q, N]
    scale = math.sqrt(len(queries)) * weights.norm(dim=-1, keepdim=True)  # √M ‖w‖ per query
    torch.testing.assert_close(scores * scale, by_hand, atol=1e-5, rtol=1e-4)
    assert torch.equal(scores.argmax(-1), by_hand.argmax(-1))  # the same ranking
    dafm_queries = encode_queries(dafm, test_split.queries, test_split)
    dafm_gallery = encode_gallery(dafm, test_split)
    fused = dafm.fused_scores(dafm_queries, dafm_gallery)  # recovered from the embeddings
    torch.testing.assert_close(fused, by_hand, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dafm_queries.norm(dim=-1), torch.ones(len(dafm_queries)))
    torch.testing.assert_close(dafm_gallery.norm(dim=-1), torch.ones(len(dafm_gallery)))


def test_calibrated_fusion_is_the_weighted_sum_of_z_scores_over_the_pool(dafm, test_split):
    # Σ_m w_m(q) (cos_m(q, g) − μ_m(q)) / σ_m(q), with μ and σ over the pool of member m's
    # space, by hand; DAFM's fused score is the same up to a per-query scale and shift.
    queries = [encode_queries(m, test_split.queries, test_split) for m in dafm.members]
    gallery = [encode_gallery(m, test_split) for m in dafm.members]
    pools = dafm.split(dafm.anchors)
    with torch.no_grad():
        weights = dafm.member_weights(torch.cat(queries, -1))  # [Q, M], the gate's
        fused = dafm.fused_scores(
            dafm.encode_queries_from_features(torch.cat(queries, -1)),
            dafm.encode_targets_from_features(torch.cat(gallery, -1)),
        )
    z_sum, scale, shift = 0, 0, 0
    for w, q, g, pool in zip(weights.T, queries, gallery, pools, strict=True):
        on_pool = q @ pool.T  # [Q, K]
        mean, std = on_pool.mean(-1, keepdim=True), on_pool.std(-1, keepdim=True)
        z_sum = z_sum + w[:, None] * (q @ g.T - mean) / std
        scale, shift = scale + w[:, None] / std, shift + w[:, None] * mean / std
    torch.testing.assert_close(fused * scale - shift, z_sum, atol=1e-4, rtol=1e-4)
    # A member whose cosines spread wider does not weigh more: stretch member 0's cosines
    # about their pool mean (its space's geometry unchanged) and the weights stay the same.
    with torch.no_grad():
        cosines = dafm.pool_cosines(torch.cat(queries, -1))
        stretched = [3 * cosines[0], *cosines[1:]]
        ratio = dafm.member_scales(stretched) / dafm.member_scales(cosines)
    torch.testing.assert_close(ratio[:, 0], torch.full_like(ratio[:, 0], 1 / 3))
    torch.testing.assert_close(ratio[:, 1:], torch.ones_like(ratio[:, 1:]))


def test_members_embed_each_input_once(dafm, bench, monkeypatch):
    val = load_split("synthetic", bench, "val")
    first = score_matrix(dafm, val)
    calls = []
    for member in dafm.members:
        for name in ("encode_raw_queries", "encode_target_images"):
            original = getattr(member, name)
            monkeypatch.setattr(member, name, lambda *a, f=original: calls.append(1) or f(*a))
    torch.testing.assert_close(score_matrix(dafm, val), first)  # remembered, same result
    assert calls == []
    dafm.member_target_features([val.gallery.open(val.gallery.ids[0]).rotate(90)])
    assert len(calls) == len(dafm.members)  # a new image: every member embeds it


def test_weights_sum_to_one_and_differ_between_queries(dafm, test_split):
    raw = [raw_query(q, test_split.gallery) for q in test_split.queries]
    with torch.no_grad():
        weights = dafm.member_weights(dafm.member_query_features(raw))  # [Q, M]
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(raw)))
    assert (weights > 0).all()
    assert weights.std(dim=0).max() > 1e-3  # per query, not one weight for all


def test_the_gate_learns_to_distrust_a_member_with_random_weights(dafm, test_split):
    raw = [raw_query(q, test_split.gallery) for q in test_split.queries]
    with torch.no_grad():
        features = dafm.member_query_features(raw)
        weights = dafm.member_weights(features).mean(0)  # [M], the gate's
        on_cosines = dafm.fusion_weights(features).mean(0)  # [M], once calibrated
    # The gate starts at 1/3 each; it learns to give the random member little (0.001 here),
    # and so do the weights its cosines get after calibration.
    assert weights[RANDOM] < 0.05 and weights[REAL] + weights[WORDS] > 0.95, weights
    assert on_cosines[RANDOM] < 0.05, on_cosines


def test_members_stay_frozen(trained, members):
    trainer, run_dir = trained
    fused = trainer.method
    assert not any(p.requires_grad for p in fused.members.parameters())
    assert all(p.requires_grad for p in fused.gate.parameters())
    for member, path in zip(fused.members, members, strict=True):  # trained next to them
        fresh = load_trained_method(path).state_dict()
        for key, value in member.state_dict().items():
            assert torch.equal(value, fresh[key]), key
    # DAFM's checkpoint holds its gate, not the members (they live in their own).
    saved = load_file(str(run_dir / "best" / "model.safetensors"))
    assert {k.split(".")[1] for k in saved if k.startswith("method.")} == {"gate", "anchors"}
    assert fused.anchors.shape[0] == fused.config.anchors and fused.anchors.any()
    assert json.loads((run_dir / "best" / "config.json").read_text())["method_config"][
        "member_sha256"
    ]


def test_explain_names_each_member_with_its_weight(dafm, test_split):
    raw = [raw_query(q, test_split.gallery) for q in test_split.queries[:2]]
    explanation = dafm.explain_raw(raw)
    assert len(explanation["member_weights"]) == 2
    for weights in explanation["member_weights"]:
        assert list(weights) == ["combiner", "dqu-cir", "combiner#2"]
        assert sum(weights.values()) == pytest.approx(1)
    with pytest.raises(TypeError, match="cannot take pixels"):
        dafm.encode_queries(torch.zeros(1, 3, 32, 32), ["red"])


def test_equal_weight_fusion_is_the_mean_cosine(dafm, members, test_split):
    equal = create_method("dafm-equal", dafm.backbone, members=members)
    assert not method_class("dafm-equal").trainable
    raw = [raw_query(q, test_split.gallery) for q in test_split.queries[:4]]
    with torch.no_grad():
        features = equal.member_query_features(raw)
        weights = equal.member_weights(features)
        torch.testing.assert_close(weights, torch.full((4, 3), 1 / 3))
        mean_cosine = features @ equal.member_target_features([r.image for r in raw]).T / 3
        fused = equal.fused_scores(
            equal.encode_raw_queries(raw), equal.encode_target_images([r.image for r in raw])
        )
    torch.testing.assert_close(fused, mean_cosine)


def test_user_mistakes_get_clear_errors(members, tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        create_method("dafm", tiny_backbone, members=members[:1])
    with pytest.raises(FileNotFoundError, match="dafm member 2 .* no checkpoint at"):
        create_method("dafm", tiny_backbone, members=[members[0], str(tmp_path / "gone")])
    with pytest.raises(ValueError, match="dafm member 1 .* has changed since"):
        create_method("dafm", tiny_backbone, members=members[:2], member_sha256=["0" * 64] * 2)


def test_eval_a_checkpoint_through_the_cli(trained, bench, tmp_path):
    _, run_dir = trained
    record = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(run_dir / "best"), "--root", str(bench)]
    result = CliRunner().invoke(app, [*args, "--split", "test", "--json", str(record)])
    assert result.exit_code == 0, result.output
    scores = json.loads(record.read_text())["results"][str(run_dir / "best")]
    tested = json.loads((run_dir / "results.json").read_text())["test"]["test"]
    assert scores["R@10"] == pytest.approx(tested["R@10"])


def test_index_and_search_through_the_cli(config, members, test_split, tmp_path):
    # DQU-CIR needs a caption of the reference, which a folder of images lacks: fuse the
    # two combiners (one epoch is enough to have a checkpoint to index with).
    fused = config.replace(method="dafm", epochs=1, method_config={"members": members[::2]})
    train(fused, tmp_path / "run", progress=False)
    folder = tmp_path / "gallery"
    folder.mkdir()
    for image_id in test_split.gallery.ids[:12]:
        shutil.copy(test_split.gallery.paths[image_id], folder / f"{image_id}.png")
    index = tmp_path / "index"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["index", str(folder), "--checkpoint", str(tmp_path / "run" / "best"), "--out", str(index)],
    )
    assert result.exit_code == 0, result.output
    first = min(folder.iterdir()).name
    search = ["search", "--index", str(index), "--image", first, "--text", "make it red"]
    result = runner.invoke(app, [*search, "-k", "3", "--json", "--explain"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["space"] == "dafm" and len(found["results"]) == 3
    (weights,) = found["explain"]["member_weights"]
    assert list(weights) == ["combiner", "combiner#2"]


def test_bench_fusion_trains_the_gate_on_a_held_out_split_and_reuses_the_members(config, tmp_path):
    from circe.bench.fusion import FUSIONS, fusion
    from circe.bench.quality import quality

    runs, base = tmp_path / "runs", config.replace(epochs=2)
    members = ("combiner", "dwc-frozen-text")
    held_out = fusion(
        base, tmp_path / "val", (0,), members, progress=False, runs_dir=runs, gate_split="val"
    )
    gate_run = json.loads(
        (runs / "dafm-combiner+dwc-frozen-text-gate-val" / "seed-0" / "config.json").read_text()
    )
    assert gate_run["train_split"] == "val" and gate_run["eval_every"] == 0
    assert held_out["gate_split"] == "val"
    assert set(held_out["summary"]["metrics"]["test"]) == {*members, *FUSIONS}
    assert (runs / "dafm-first-design-combiner+dwc-frozen-text-gate-val" / "seed-0").exists()
    static = held_out["runs"][0]["static_weights"]
    assert sum(static.values()) == pytest.approx(1) and set(static) == set(members)
    table = (tmp_path / "val" / "fusion.md").read_text()
    assert "gate on the `val` split" in table and "| `cascade, reversed` |" in table
    # The same members serve a gate trained on their own training pairs: not trained again.
    stamps = {m: (runs / m / "seed-0" / "results.json").stat().st_mtime_ns for m in members}
    on_train = fusion(base, tmp_path / "train", (0,), members, progress=False, runs_dir=runs)
    assert {m: (runs / m / "seed-0" / "results.json").stat().st_mtime_ns for m in members} == (
        stamps
    )
    assert (runs / "dafm-combiner+dwc-frozen-text-gate-train" / "seed-0" / "best").exists()
    # The members are the runs of `circe bench quality`: it reads them back, untrained.
    quality(base, tmp_path / "quality", (0,), members, progress=False, runs_dir=runs)
    assert {m: (runs / m / "seed-0" / "results.json").stat().st_mtime_ns for m in members} == (
        stamps
    )
    for member in members:  # the members' own scores do not depend on the gate
        assert (
            on_train["runs"][0]["metrics"]["test"][member]
            == held_out["runs"][0]["metrics"]["test"][member]
        )

"""The trainer on a tiny synthetic benchmark with the tiny test backbone."""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circe.backbones import WeightsNotFoundError
from circe.eval.evaluate import evaluate
from circe.methods import checkpoint as checkpoint_module
from circe.methods.checkpoint import load_checkpoint, load_trained_method, save_checkpoint
from circe.train import trainer as trainer_module
from circe.train.config import TrainConfig
from circe.train.data import epoch_plan, load_split, query_subset
from circe.train.runlog import read_log
from circe.train.trainer import resume, train, trained


@pytest.fixture
def config(bench, tiny_train_config, tmp_path):
    return tiny_train_config(
        bench,
        tmp_path / "cache",
        epochs=3,
        batch_size=16,
        lr=2e-3,
        warmup_steps=2,
        log_every=1,
        eval_batch_size=64,
    )


def final_weights(run_dir):
    return load_file(str(run_dir / "last" / "model.safetensors"))


def test_loss_falls_and_the_run_is_recorded(config, tmp_path):
    config = config.replace(epochs=8, lr=1e-2, method_config={"dropout": 0.1})
    result = train(config, tmp_path / "run", progress=False)
    assert result.finished
    epochs = read_log(tmp_path / "run", "epoch")
    assert len(epochs) == 8 and all("val" in e for e in epochs)
    assert epochs[-1]["train_loss"] < 0.9 * epochs[0]["train_loss"]  # 2.73 -> 2.32 here
    steps = read_log(tmp_path / "run", "step")
    assert len(steps) == 8 * (96 // 16) and steps[0]["lr"] < steps[1]["lr"]  # warm-up
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["test"]) == {"test", "test_free", "test_phrasing", "test_unseen"}
    assert set(results["test"]["test"]) == {"R@1", "R@5", "R@10", "R@50"}
    assert results["parameters"]["trainable"] > 0 and results["train_seconds"] > 0
    best = load_checkpoint(tmp_path / "run")  # a run directory means its best
    assert best.info["epoch"] - 1 == results["best_epoch"]


@pytest.mark.parametrize("feature_cache", [True, False], ids=["cached", "pixels"])
def test_resume_continues_exactly(config, tmp_path, feature_cache):
    # Dropout on and validation each epoch: the resumed run must replay the same masks.
    config = config.replace(feature_cache=feature_cache)
    whole = train(config, tmp_path / "whole", progress=False)
    stopped = train(config.replace(max_steps=8), tmp_path / "parts", progress=False)
    assert whole.finished and not stopped.finished  # 6 steps an epoch: stopped mid-epoch 2
    assert load_checkpoint(tmp_path / "parts" / "last").info["step_in_epoch"] == 2
    resumed = resume(tmp_path / "parts", progress=False)
    assert resumed.finished
    expected, got = final_weights(tmp_path / "whole"), final_weights(tmp_path / "parts")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    losses = [r["loss"] for r in read_log(tmp_path / "whole", "step")]
    assert [r["loss"] for r in read_log(tmp_path / "parts", "step")] == losses
    assert resumed.results["test"] == whole.results["test"]


def test_a_kill_between_the_link_swaps_resumes_to_the_straight_run(config, tmp_path, monkeypatch):
    """Killed in the end-of-epoch save after `best` moved and before `last` did: the resumed
    run redoes that epoch and ends where a straight run ends (weights, `best`, metrics with
    no repeated records), and no temporary entry of the killed save is left."""
    config = config.replace(epochs=2)
    whole = train(config, tmp_path / "whole", progress=False)
    real_replace, swaps = os.replace, []

    def killed_before_last(source, target):
        swaps.append(Path(target).name)
        if swaps.count("last") == 2 and Path(target).name == "last":  # epoch 2's save
            raise KeyboardInterrupt
        return real_replace(source, target)

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint_module.os, "replace", killed_before_last)
        with pytest.raises(KeyboardInterrupt):
            train(config, tmp_path / "parts", progress=False)
    parts = tmp_path / "parts"
    assert load_checkpoint(parts / "last").info["epoch"] == 1  # `last` did not move
    resumed = resume(parts, progress=False)
    assert resumed.results["test"] == whole.results["test"]
    for name, value in final_weights(tmp_path / "whole").items():
        assert torch.equal(value, final_weights(parts)[name]), name
    assert read_log(parts) != [] and [(r["kind"], r["step"]) for r in read_log(parts)] == [
        (r["kind"], r["step"]) for r in read_log(tmp_path / "whole")
    ]
    assert not [p.name for p in parts.iterdir() if p.name.startswith(".tmp-")]


def test_trained_continues_an_interrupted_run_then_reuses_it(config, tmp_path, monkeypatch):
    # How benches keep their runs (`--runs`): interrupted -> continued, finished -> read back.
    config = config.replace(epochs=2, eval_every=0)
    run = tmp_path / "run"
    assert trained(config.replace(max_steps=3), run, progress=False) is None  # interrupted
    assert not (run / "results.json").exists()
    results = trained(config, run, progress=False)  # goes on from `last`
    assert results["global_step"] == 2 * (96 // 16)
    # ... to where an uninterrupted run ends (its test figures are the same to the digit).
    assert results["test"] == trained(config, tmp_path / "straight", progress=False)["test"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must be reused, not trained again")

    monkeypatch.setattr(trainer_module, "Trainer", no_training)
    assert trained(config.replace(threads=1), run, progress=False) == results  # execution only
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        trained(config.replace(lr=1e-3), run, progress=False)
    # The same settings over other bytes (the weights file retrained in place): not reused.
    weights = Path(config.backbone_weights)
    retrained = tmp_path / "retrained.safetensors"
    retrained.write_bytes(weights.read_bytes()[:-1] + b"\0")
    moved = config.replace(backbone_weights=str(retrained))
    shutil.copytree(run, tmp_path / "moved", symlinks=True)
    json_path = tmp_path / "moved" / "config.json"
    saved = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**saved, "backbone_weights": str(retrained)}))
    with pytest.raises(ValueError, match="trained on backbone weights"):
        trained(moved, tmp_path / "moved", progress=False)


def test_train_fraction_trains_on_a_seeded_share_of_the_queries(config, tmp_path):
    split = load_split("synthetic", config.root, "train")
    half = query_subset(split, 0.5, seed=3)
    assert len(half.queries) == len(split.queries) // 2
    assert [q.query_id for q in query_subset(split, 0.5, seed=3).queries] == [
        q.query_id for q in half.queries
    ]
    assert {q.query_id for q in query_subset(split, 0.5, seed=4).queries} != {
        q.query_id for q in half.queries
    }
    with pytest.raises(ValueError, match="train_fraction"):
        query_subset(split, 0.0, seed=3)
    run = config.replace(epochs=1, eval_every=0, test_splits=[], train_fraction=0.5)
    result = train(run, tmp_path / "run", progress=False)
    assert result.results["global_step"] == (len(split.queries) // 2) // 16


def test_feature_cache_is_computed_once_and_reused(config, tmp_path, monkeypatch):
    from circe.backbones.openclip import OpenClipBackbone

    calls = {"encode_image": 0, "encode_text": 0}
    for tower in calls:
        original = getattr(OpenClipBackbone, tower)

        def counted(self, *args, _tower=tower, _original=original, **kwargs):
            calls[_tower] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(OpenClipBackbone, tower, counted)
    config = config.replace(epochs=2, eval_every=0, test_splits=[])  # no evaluation passes
    first = train(config, tmp_path / "a", progress=False)
    # One pass over the train split's images and texts (batches of 64), none per epoch.
    images, texts = first_split_sizes(config)
    assert calls == {"encode_image": -(-images // 64), "encode_text": -(-texts // 64)}
    assert first.results["feature_cache"]["hits"] == 0
    second = train(config, tmp_path / "b", progress=False)
    assert calls == {"encode_image": -(-images // 64), "encode_text": -(-texts // 64)}
    assert second.results["feature_cache"]["hits"] == 2  # the backbone never ran
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 2 and not any(p.name.startswith(".tmp") for p in entries)


def first_split_sizes(config):
    from circe.methods.inputs import Pairs
    from circe.train.data import load_split

    pairs = Pairs.from_split(load_split("synthetic", config.root, "train"))
    return len(pairs.images), len(pairs.texts)


def test_cached_and_pixel_training_agree(config, tmp_path):
    config = config.replace(epochs=1, max_steps=2, eval_every=0, method_config={"dropout": 0.0})
    train(config, tmp_path / "cached", progress=False)
    train(config.replace(feature_cache=False), tmp_path / "pixels", progress=False)
    cached = [r["loss"] for r in read_log(tmp_path / "cached", "step")]
    pixels = [r["loss"] for r in read_log(tmp_path / "pixels", "step")]
    assert cached == pytest.approx(pixels, abs=1e-4)


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    run = tmp_path / "run"
    info = {"format": 1, "global_step": 1}
    save_checkpoint(run, ("last", "best"), {"w": torch.ones(3)}, info, {"step": 1})

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run, ("last",), {"w": torch.zeros(3)}, {**info, "global_step": 2}, {})
    last = load_checkpoint(run / "last")
    assert torch.equal(last.weights["w"], torch.ones(3)) and last.info["global_step"] == 1
    assert last.training_state() == {"step": 1}
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".tmp")) == []
    assert len(list(run.glob("ckpt-*"))) == 1


def test_trained_method_loads_for_evaluation(config, tmp_path):
    config = config.replace(epochs=1, eval_every=0, test_splits=[])
    train(config, tmp_path / "run", progress=False)
    method = load_trained_method(tmp_path / "run" / "best")
    assert method.name == "combiner" and not method.training
    weights = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    torch.testing.assert_close(
        method.output_layer.weight, weights["method.output_layer.weight"], rtol=0, atol=0
    )


def test_user_mistakes_get_clear_errors(config, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'combinr'"):
        train(config.replace(method="combinr"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="'sum' is zero-shot.*trainable methods: combiner"):
        train(config.replace(method="sum"), tmp_path / "a", progress=False)
    with pytest.raises(FileNotFoundError, match="no training run to resume"):
        resume(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown training override"):
        config.replace(epoch=3)
    run = tmp_path / "run"
    train(config.replace(max_steps=1), run, progress=False)
    with pytest.raises(ValueError, match="run of method 'combiner', not 'sum'"):
        resume(run, {"method": "sum"})
    with pytest.raises(ValueError, match="cannot change lr"):
        resume(run, {"lr": 1.0})
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train(config, run, progress=False)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lr: fast", "lr must be float, got 'fast'"),
        ("lr: 1e-4", "write 1.0e-4"),
        ("epochs: 2.5", "epochs must be int, got 2.5"),
        ("test_splits: test", "test_splits must be list\\[str\\], got 'test'"),
        ("epochs: [3", "is not valid YAML"),
    ],
)
def test_config_mistakes_stop_before_anything_runs(tmp_path, line, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        TrainConfig.from_yaml(path)


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed_or_restarted(
    config, tmp_path, monkeypatch
):
    """Killed after it wrote its config, before any checkpoint: `resume` starts it from step
    0 (nothing was kept, so that is exact), and so does `train` into the same directory."""
    config = config.replace(epochs=1, eval_every=0, test_splits=["test"])
    straight = train(config, tmp_path / "straight", progress=False).results

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # what a kill leaves: config.json, no `last`

    for again in (
        lambda run: resume(run, progress=False),
        lambda run: train(config, run, progress=False),
    ):
        run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        with monkeypatch.context() as patched:
            patched.setattr(trainer_module.Trainer, "fit", killed)
            with pytest.raises(KeyboardInterrupt):
                train(config, run, progress=False)
        assert (run / "config.json").is_file() and not (run / "last").exists()
        assert again(run).results["test"] == straight["test"]


def test_yaml_config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("epochs: 7\nmethod_config:\n  dropout: 0.2\nlr: 1.0e-3\n")
    config = TrainConfig.from_yaml(path)
    assert config.epochs == 7 and config.method_config == {"dropout": 0.2} and config.lr == 1e-3
    path.write_text("epochz: 7\n")
    with pytest.raises(ValueError, match="cfg.yaml: unknown training config key.*epochz"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ValueError, match="not a multiple"):
        TrainConfig(batch_size=10, grad_accum_steps=3)


def test_epoch_plan_is_the_same_global_batch_for_any_process_count():
    single = epoch_plan(100, seed=3, epoch=1, batch_size=16, accum_steps=2)
    assert len(single) == 100 // 16 and all(len(m) == 8 for step in single for m in step)
    shards = [epoch_plan(100, 3, 1, 16, 2, world_size=2, rank=r) for r in range(2)]
    for step, (a, b) in enumerate(zip(*shards, strict=True)):
        assert [x + y for x, y in zip(a, b, strict=True)] == single[step]
    assert epoch_plan(100, 3, 2, 16, 2) != single  # a new order every epoch


def test_cli_train_resume_and_eval_a_checkpoint(bench, tiny_weights, tmp_path):
    from typer.testing import CliRunner

    from circe.cli import app

    def run(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        result.text = " ".join(result.output.split())  # undo rich's line wrapping
        return result

    arch, weights = tiny_weights
    settings = tmp_path / "cfg.yaml"
    settings.write_text(f"cache_dir: {tmp_path / 'cache'}\neval_batch_size: 64\nwarmup_steps: 2\n")
    common = ("--root", bench, "--backbone", f"open_clip:{arch}", "--weights", weights)
    out = tmp_path / "run"
    result = run("train", "--method", "combiner", *common, "--config", settings, "--epochs", 2,
                 "--batch-size", 16, "--out", out, "--max-steps", 3)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "stopped at max_steps; continue with: circe train --resume" in result.text
    result = run("train", "--resume", out, "--method", "sum")
    assert result.exit_code == 2 and "run of method 'combiner', not 'sum'" in result.text
    result = run("train", "--resume", out)
    assert result.exit_code == 0, result.output
    assert "test_unseen" in result.text and (out / "results.json").exists()
    result = run("train", "--method", "text-only", *common, "--out", tmp_path / "other")
    assert result.exit_code == 2 and "zero-shot" in result.text

    record = tmp_path / "eval.json"
    result = run("eval", "--checkpoint", out / "best", "--method", "sum", *common, "--json", record)
    assert result.exit_code == 0, result.output
    scores = json.loads(record.read_text())["results"]
    assert set(scores) == {"sum", str(out / "best")}
    best = json.loads((out / "results.json").read_text())["test"]["test"]
    assert scores[str(out / "best")]["R@10"] == pytest.approx(best["R@10"])
    result = run("eval", "--checkpoint", tmp_path / "nothing", *common)
    assert result.exit_code == 2 and "no checkpoint at" in result.text
    # A config with no test splits trains, selects and reports that nothing was tested.
    settings.write_text(settings.read_text() + "test_splits: []\neval_every: 0\n")
    result = run("train", "--method", "combiner", *common, "--config", settings, "--epochs", 1,
                 "--batch-size", 16, "--out", tmp_path / "untested")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no test splits in the config, nothing tested" in result.text
    assert json.loads((tmp_path / "untested" / "results.json").read_text())["test"] == {}


def test_bench_quality_and_cache_speed_write_their_tables(config, tmp_path):
    from circe.bench.quality import cache_speed, quality

    out = tmp_path / "results"
    base = config.replace(epochs=1, eval_every=0)
    runs = tmp_path / "runs"
    record = quality(
        base, out, seeds=(0, 1), methods=["sum", "combiner"], progress=False, runs_dir=runs
    )
    combiner, zero_shot = record["methods"]["combiner"], record["methods"]["sum"]
    assert len(combiner["test_unseen"]["R@10"]["seeds"]) == 2 and combiner["trainable"]
    assert combiner["parameters"]["trainable"] > 0 and combiner["train_seconds"]["mean"] > 0
    assert zero_shot["test"]["R@50"]["std"] == 0 and zero_shot["parameters"]["trainable"] == 0
    assert json.loads((out / "quality.json").read_text()) == record
    table = (out / "quality.md").read_text()
    assert "| `combiner` |" in table and "| `sum` |" in table and " ± " in table
    # Per edit kind: each query has one kind, so the kinds' R@1 weighted by their query
    # counts is the overall R@1, for every seed.
    queries = load_split("synthetic", config.root, "test").queries
    counts = Counter(tag for q in queries for tag in q.tags)
    for entry in (combiner, zero_shot):
        kinds = entry["per_kind"]["test"]
        assert set(kinds) == set(counts) and "move" in kinds
        for seed, overall in enumerate(entry["test"]["R@1"]["seeds"]):
            weighted = sum(kinds[k]["R@1"]["seeds"][seed] * n for k, n in counts.items())
            assert weighted / len(queries) == pytest.approx(overall)
    assert "R@1 per edit kind" in table and "| method | add |" in table
    # The runs are kept, and a second bench reads them back instead of training again.
    assert (runs / "combiner" / "seed-1" / "results.json").is_file()
    again = quality(
        base, tmp_path / "again", seeds=(0, 1), methods=["combiner"], progress=False, runs_dir=runs
    )
    assert again["methods"]["combiner"]["test"] == combiner["test"]
    assert again["methods"]["combiner"]["train_seconds"] == combiner["train_seconds"]
    assert combiner["recipe"] == {} and "val_phrasing" in combiner
    # A method's own recipe: trained with it, recorded, and named in the table.
    recipe = quality(
        base,
        tmp_path / "recipe",
        seeds=(0,),
        methods=["combiner"],
        progress=False,
        recipes={"combiner": base.replace(lr=5e-4)},
    )
    assert recipe["methods"]["combiner"]["recipe"] == {"lr": 5e-4}
    assert recipe["methods"]["combiner"]["test"]["R@1"] != combiner["test"]["R@1"]
    assert "| `combiner` (lr 0.0005) |" in (tmp_path / "recipe" / "quality.md").read_text()

    speed = cache_speed(config, out)
    runs = speed["runs"]
    assert runs["no cache"]["cache_hits"] == 0 and runs["cache, warm"]["cache_hits"] == 2
    # The speed-up is the ratio of the epochs it timed (how fast they ran is for the bench to
    # report, not for a test on a shared machine to assert).
    warm, uncached = runs["cache, warm"]["epoch_seconds"], runs["no cache"]["epoch_seconds"]
    assert speed["speedup_epoch"] == pytest.approx(uncached / warm)
    assert "Cached epoch speed-up" in (out / "cache_speed.md").read_text()


def test_bench_label_noise_writes_its_table_and_curve(config, tmp_path):
    from PIL import Image

    from circe.bench.quality import label_noise

    out = tmp_path / "results"
    base = config.replace(epochs=1, eval_every=0, test_splits=["test"])
    record = label_noise(
        base, out, ["dwc-frozen-text", "combiner"], (0.0, 0.5), seeds=(0,), progress=False
    )
    assert set(record["methods"]) == {"dwc-frozen-text", "combiner"}
    assert set(record["methods"]["combiner"]) == {"0.0", "0.5"}
    noise_free, noisy = record["methods"]["combiner"]["0.0"], record["methods"]["combiner"]["0.5"]
    # The noise-free point is the plain run of that config; half the texts swapped is not.
    plain = trained(base.replace(method="combiner", seed=0), tmp_path / "plain", progress=False)
    assert {m: v["mean"] for m, v in noise_free.items()} == plain["test"]["test"]
    assert noisy != noise_free
    table = (out / "label_noise.md").read_text()
    assert "| `dwc-frozen-text` |" in table and "noise 50%" in table
    with Image.open(out / "label_noise.png") as plot:
        assert plot.width > 300 and plot.height > 200


@pytest.mark.slow
def test_two_cpu_processes_follow_the_one_process_trajectory(config, tmp_path):
    """`torchrun --nproc_per_node 2 -m circe.cli train` (gloo DDP): each process takes half of
    every global batch, the loss sees the gathered batch, so the steps are the same."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    import circe

    # Dropout off: two processes draw other masks than one (the only intended difference).
    config = config.replace(
        epochs=2, max_steps=5, eval_every=0, test_splits=[], method_config={"dropout": 0.0}
    )
    train(config, tmp_path / "one", progress=False)
    settings = tmp_path / "cfg.yaml"
    settings.write_text(yaml.safe_dump(config.to_dict()))
    src = str(Path(circe.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    command = [
        *torchrun,
        "-m",
        "circe.cli",
        "train",
        "--config",
        settings,
        "--out",
        tmp_path / "two",
    ]
    done = subprocess.run(
        [str(c) for c in command], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = [r["loss"] for r in read_log(tmp_path / "one", "step")]
    two = [r["loss"] for r in read_log(tmp_path / "two", "step")]  # the main process's log
    assert len(one) == 5 and two == pytest.approx(one, abs=1e-5)
    expected, got = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in expected:
        # Adam divides by sqrt(v): float noise in near-zero gradients moves weights by ~1e-5.
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-3)


def test_training_on_a_published_layout_with_a_protocol_preset(tiny_weights, tmp_path):
    """`circe train --dataset fashioniq` on files in FashionIQ's own layout, under the DQU-CIR
    preset (its caption join and spelling fixes), records the preset with the run."""
    from benchmark_fixtures import write_fashioniq

    arch, weights = tiny_weights
    config = TrainConfig(
        method="combiner",
        dataset="fashioniq",
        root=str(write_fashioniq(tmp_path / "fashioniq")),
        protocol="dqu-cir",
        backbone=f"open_clip:{arch}",
        backbone_weights=str(weights),
        cache_dir=str(tmp_path / "cache"),
        epochs=2,
        batch_size=3,
        warmup_steps=1,
        eval_split="val",
        test_splits=["val"],
    )
    result = train(config, tmp_path / "run", progress=False)
    assert set(result.results["test"]["val"]) >= {"R@1", "R@10", "R@50"}
    assert load_checkpoint(tmp_path / "run").info["train_config"]["protocol"] == "dqu-cir"
    with pytest.raises(ValueError, match="preset"):
        train(config.replace(protocol="nonsense"), tmp_path / "bad", progress=False)


def test_a_run_trained_on_relative_paths_moves_and_loads_from_anywhere(
    config, tiny_weights, tmp_path, monkeypatch
):
    """Backbone config and weights given relative to where training ran; the run directory
    is then copied elsewhere and loaded from a third directory (the paths recorded in the
    checkpoint's identity are absolute). A backbone that is nowhere is one clear error."""
    arch, weights = tiny_weights
    monkeypatch.chdir(weights.parent)
    config = config.replace(
        epochs=1, eval_every=0, test_splits=["test"],
        backbone=f"open_clip:{arch.name}", backbone_weights=weights.name,
    )  # fmt: skip
    trained_here = train(config, tmp_path / "run", progress=False).results["test"]["test"]
    shutil.copytree(tmp_path / "run", tmp_path / "moved" / "run", symlinks=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    method = load_trained_method(tmp_path / "moved" / "run" / "best")
    split = load_split("synthetic", config.root, "test")
    assert evaluate(method, split, ks=(1, 5, 10, 50)).metrics == trained_here
    # Neither the recorded nor the configured weights exist: every place tried is named.
    copied = tmp_path / "tiny.safetensors"
    shutil.copy(weights, copied)
    moved_away = config.replace(backbone=f"open_clip:{arch}", backbone_weights=str(copied))
    train(moved_away, tmp_path / "run2", progress=False)
    copied.unlink()
    with pytest.raises(WeightsNotFoundError, match=f"was not found; tried .*{copied}"):
        load_trained_method(tmp_path / "run2" / "best")

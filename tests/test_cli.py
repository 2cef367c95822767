"""The `circe` command line, run in-process as a user would type it."""

import json
import re

import torch
from benchmark_fixtures import write_folder
from PIL import Image
from typer.testing import CliRunner

import circe.bench.quality
import circe.bench.record
from circe.cli import app
from circe.methods import list_methods, method_class, standalone_methods, variant_of

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_synth_then_eval_compares_methods(tmp_path, tiny_weights):
    config, weights = tiny_weights
    root = tmp_path / "bench"
    result = run("synth", "--out", root, "--train", 6, "--val", 6, "--test", 24, "--test-unseen", 3)
    assert result.exit_code == 0, result.output
    assert "test: 24 queries" in result.output
    out = tmp_path / "results.json"
    result = run(
        "eval",
        "--method",
        "image-only",
        "--method",
        "sum",
        "--root",
        root,
        "--backbone",
        f"open_clip:{config}",
        "--weights",
        weights,
        "--by-kind",
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "R@10" in result.output and "sum by edit kind" in result.output
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"image-only", "sum"}
    assert set(record["per_kind"]["sum"]) == {
        "add",
        "remove",
        "recolour",
        "resize",
        "reshape",
        "move",
    }


def test_eval_runs_on_the_torch_threads_it_is_given(tmp_path, tiny_weights):
    """`--threads N` sets torch's CPU threads, as `circe train` does (the autouse fixture
    set 1 and restores it afterwards)."""
    config, weights = tiny_weights
    command = (
        "eval",
        "--method",
        "sum",
        "--dataset",
        "folder",
        "--root",
        write_folder(tmp_path / "own"),
        "--backbone",
        f"open_clip:{config}",
        "--weights",
        weights,
    )
    result = run(*command, "--threads", 2)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2
    result = run(*command, "--threads", 0)  # 0: leave torch's setting alone
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2
    result = run(*command, "--threads", -1)
    assert result.exit_code == 2 and "--threads" in result.output


def test_user_errors_are_one_clear_line(tmp_path, tiny_weights):
    config, weights = tiny_weights
    root = tmp_path / "bench"
    run("synth", "--out", root, "--train", 6, "--val", 6, "--test", 6, "--test-unseen", 3)
    result = run(
        "eval",
        "--method",
        "summ",
        "--root",
        root,
        "--backbone",
        f"open_clip:{config}",
        "--weights",
        weights,
    )
    assert result.exit_code == 2 and "unknown method 'summ'" in result.output
    result = run(
        "eval",
        "--method",
        "sum",
        "--root",
        root,
        "--backbone",
        f"open_clip:{config}",
        "--weights",
        tmp_path / "nope.safetensors",
    )
    assert result.exit_code == 2 and "nope.safetensors" in result.output
    result = run("eval", "--method", "sum", "--root", tmp_path / "empty")
    assert result.exit_code == 2 and "circe synth" in result.output
    result = run("eval", "--root", root)
    assert result.exit_code == 2 and "name a --method" in result.output
    result = run("eval", "--method", "sum", "--method", "image-only", "--submission", tmp_path)
    assert result.exit_code == 2 and "one method's rankings" in result.output
    result = run("synth", "--out", root, "--seed", 1)
    assert result.exit_code == 2 and "other settings" in result.output


def test_demo_prints_rankings_and_draws_pictures(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--queries", 3)
    assert result.exit_code == 0, result.output
    assert result.output.count("query ") >= 3 and "R@1" in result.output
    pictures = sorted((tmp_path / "demo").glob("query-*.png"))
    assert len(pictures) == 3
    with Image.open(pictures[0]) as picture:
        assert picture.width > 6 * 128


def test_show_query_saves_a_query_as_the_encoders_see_it(bench, tiny_weights, tmp_path):
    arch, weights = tiny_weights
    backbone = ("--backbone", f"open_clip:{arch}", "--weights", weights)
    out = tmp_path / "query.png"
    result = run("show-query", "--out", out, "--root", bench, "--scale", 2, *backbone)
    assert result.exit_code == 0, result.output
    assert "unified text:" in result.output and "lambda:" in result.output
    reference = next((bench / "images").glob("*.png"))
    with Image.open(out) as picture, Image.open(reference) as original:
        assert picture.size == (2 * original.width, 2 * original.height)
    result = run("show-query", "--method", "sum", "--out", out, "--root", bench, *backbone)
    assert result.exit_code == 2 and "nothing to show" in result.output


def test_bench_quality_takes_its_settings_from_config_and_flags(bench, tiny_weights, tmp_path):
    arch, weights = tiny_weights
    settings = tmp_path / "cfg.yaml"
    settings.write_text(
        f"cache_dir: {tmp_path / 'cache'}\neval_batch_size: 64\nepochs: 1\nbatch_size: 16\n"
    )
    out = tmp_path / "results"
    result = run(
        "bench", "quality", "--config", settings, "--root", bench, "--method", "sum",
        "--method", "combiner", "--seeds", 1, "--backbone", f"open_clip:{arch}",
        "--weights", weights, "--threads", 1, "--runs", tmp_path / "runs", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "quality.json").read_text())
    train_config = record["train_config"]
    assert train_config["root"] == str(bench) and train_config["backbone_weights"] == str(weights)
    assert train_config["epochs"] == 1 and train_config["threads"] == 1
    assert (tmp_path / "runs" / "combiner" / "seed-0" / "results.json").is_file()
    # A plan: its methods when no --method is given, and a method's own recipe.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(settings.read_text() + "lr: 5.0e-4\n")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"methods: [sum, combiner]\nrecipes:\n  combiner: {recipe}\n")
    common = [
        "bench", "quality", "--config", settings, "--root", bench, "--seeds", 1,
        "--backbone", f"open_clip:{arch}", "--weights", weights, "--threads", 1,
    ]  # fmt: skip
    result = run(*common, "--plan", plan, "--out", tmp_path / "planned")
    assert result.exit_code == 0, result.output
    methods = json.loads((tmp_path / "planned" / "quality.json").read_text())["methods"]
    assert list(methods) == ["sum", "combiner"] and methods["combiner"]["recipe"] == {"lr": 5e-4}
    plan.write_text("method: [sum]\n")
    result = run(*common, "--plan", plan, "--out", tmp_path / "bad")
    assert result.exit_code != 0 and "a bench plan holds" in result.output


def test_methods_lists_each_method_with_its_variants_under_it():
    result = run("methods")
    assert result.exit_code == 0, result.output
    # Names start a row: a method at the margin, a variant indented by two; wrapped
    # descriptions continue further in.
    listed = re.findall(r"^( {2})?(\S+)", result.output, re.MULTILINE)
    expected = []
    for method in list_methods(variants=False):
        expected.append(("", method))
        expected += [("  ", name) for name in list_methods() if variant_of(name) == method]
    assert listed == expected and ("  ", "dqu-cir-fixed") in listed
    text = " ".join(result.output.split())  # undo rich's line wrapping
    # The summary paragraph of the docstring, whole; what a method needs, said once (its
    # variant dafm-equal needs the same).
    assert "on a frozen backbone's token sequences" in text
    assert text.count(f"needs first: {method_class('dafm').requires}") == 1


def test_bench_quality_trains_every_standalone_method_by_default(
    bench, tiny_weights, tmp_path, monkeypatch
):
    """No --method and no --plan: every method of `standalone_methods()`, not the variants
    and not DAFM, which needs trained members first. Training is faked (only the names
    matter here); the zero-shot methods are evaluated for real."""
    trained = []

    def fake_runs(config, seeds, progress, runs_dir=None):
        trained.append(config.method)
        recall = {f"R@{k}": 0.0 for k in circe.bench.record.KS}
        splits = circe.bench.record.REPORT_SPLITS
        return [
            {
                "test": dict.fromkeys(splits, recall),
                "test_per_kind": {split: {} for split in splits},
                "train_seconds": 0.0,
                "wall_seconds": 0.0,
                "best_epoch": 0,
                "parameters": {"trainable": 1, "total": 1},
            }
        ]

    monkeypatch.setattr(circe.bench.quality, "_trained_runs", fake_runs)
    arch, weights = tiny_weights
    out = tmp_path / "results"
    result = run(
        "bench", "quality", "--root", bench, "--seeds", 1, "--backbone", f"open_clip:{arch}",
        "--weights", weights, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    methods = list(json.loads((out / "quality.json").read_text())["methods"])
    assert methods == standalone_methods()
    assert {"dafm", "dafm-equal", "combiner-ft"}.isdisjoint(methods)
    assert not any(variant_of(name) for name in methods)
    assert trained == [name for name in methods if method_class(name).trainable]


def test_bench_quality_keeps_the_backbone_its_config_names(
    bench, tiny_weights, tmp_path, monkeypatch
):
    """A committed bench config pins the backbone its results were measured on; the command
    must not swap in the default one unless --backbone says so."""
    arch, weights = tiny_weights
    config = tmp_path / "bench.yaml"
    config.write_text(f"backbone: open_clip:{arch}\nbackbone_weights: {weights}\n")
    used = []

    def fake_runs(config, seeds, progress, runs_dir=None):
        used.append(config.backbone)
        raise ValueError("stop here")

    monkeypatch.setattr(circe.bench.quality, "_trained_runs", fake_runs)
    args = ["bench", "quality", "--root", bench, "--seeds", 1, "--config", config]
    result = run(*args, "--method", "combiner", "--out", tmp_path / "out")
    assert "stop here" in result.output and used == [f"open_clip:{arch}"]

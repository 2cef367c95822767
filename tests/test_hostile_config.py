"""What a hostile user hands circe besides images: training configs, checkpoints and data
set files. Each is refused at once with one line naming the file and the key (never a
traceback, a hang or gigabytes), or, for what a killed run leaves, cleaned up."""

import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from circe.cli import app
from circe.data.errors import DatasetFormatError
from circe.data.synthetic import SynthConfig, load_synthetic, write_synthetic
from circe.data.types import Query
from circe.methods.checkpoint import WEIGHTS_SHA256, load_checkpoint, save_checkpoint
from circe.train import trainer as trainer_module
from circe.train.config import TrainConfig
from circe.train.trainer import resume, train


def alias_bomb(field: str, levels: int) -> str:
    """A "billion laughs" config: `field`'s value holds anchors each made of nine aliases of
    the one before, so that the last stands for 9**levels strings (levels=9: 387 million,
    from 11 lines). The tests use 6 levels, which a loader that expands them still gets
    through in a second, so that the test fails rather than hangs where aliases pass."""
    item = "  - " if field == "test_splits" else "  l{level}: "
    lines = [f"{field}:", item.format(level=0) + "&l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    for level in range(1, levels + 1):
        aliases = ", ".join([f"*l{level - 1}"] * 9)
        lines.append(item.format(level=level) + f"&l{level} [{aliases}]")
    return "\n".join(lines) + "\n"


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("field", ["lr", "test_splits", "method_config"])
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, field):
    path = write(tmp_path / "bomb.yaml", alias_bomb(field, 6))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=rf"^{path}: line 3: YAML aliases \(\*l0\) are refused"):
        TrainConfig.from_yaml(path)
    assert time.perf_counter() - started < 0.5


def test_a_bench_plan_bomb_is_refused_at_once(tmp_path):
    from circe.bench.record import read_plan

    path = write(tmp_path / "plan.yaml", alias_bomb("methods", 6))
    started = time.perf_counter()
    with pytest.raises(ValueError, match="YAML aliases"):
        read_plan(path)
    assert time.perf_counter() - started < 0.5


def test_train_refuses_a_bomb_config_in_one_line(tmp_path):
    path = write(tmp_path / "bomb.yaml", alias_bomb("lr", 6))
    result = CliRunner().invoke(app, ["train", "--config", str(path), "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output[:1000]
    assert result.output.count("\n") == 1 and len(result.output) < 300, result.output[:1000]
    assert str(path) in result.output


def test_a_config_nested_past_any_need_is_refused(tmp_path):
    path = write(tmp_path / "deep.yaml", "method_config: " + "[" * 50_000 + "]" * 50_000)
    with pytest.raises(ValueError, match=rf"^{path}: line 1: values nested more than 16 deep"):
        TrainConfig.from_yaml(path)


def test_an_oversized_config_is_refused_before_it_is_parsed(tmp_path):
    path = write(tmp_path / "huge.yaml", "# " + "x" * 2**21 + "\n")
    with pytest.raises(ValueError, match=rf"^{path} is 2,097,155 bytes; .* at most 1,048,576"):
        TrainConfig.from_yaml(path)


def test_yaml_errors_are_one_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "epochs: [3\n")
    with pytest.raises(ValueError, match=f"^{path} is not valid YAML") as caught:
        TrainConfig.from_yaml(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "values",
    [
        {"lr": "fast" * 250_000},  # a megabyte of text where a number belongs
        {"test_splits": [["test"] * 1000] * 1000},  # a million items
        {"x" * 1_000_000: 1},  # an unknown key a megabyte long
        {"reported": {"val": {"R@1": "y" * 1_000_000}}},
    ],
    ids=["text", "nested-list", "key", "reported"],
)
def test_type_errors_show_a_bounded_value(values):
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_dict(values)
    assert len(str(caught.value)) < 1_000


@pytest.mark.parametrize("field", ["threads", "workers"])
def test_negative_thread_and_worker_counts_are_refused(tmp_path, field):
    path = write(tmp_path / "config.yaml", f"{field}: -3\n")
    with pytest.raises(ValueError, match=f"{path}: {field} must not be negative, got -3"):
        TrainConfig.from_yaml(path)


# -- checkpoints -------------------------------------------------------------------------


def saved(run_dir, weights):
    save_checkpoint(run_dir, ("last", "best"), weights, {"format": 1, "global_step": 1}, {})
    return run_dir / "last"


def test_a_checkpoint_records_the_sha256_of_its_weights(tmp_path):
    checkpoint = saved(tmp_path / "run", {"w": torch.ones(3)})
    recorded = json.loads((checkpoint / "config.json").read_text())[WEIGHTS_SHA256]
    assert len(recorded) == 64
    assert load_checkpoint(checkpoint).info[WEIGHTS_SHA256] == recorded


@pytest.mark.parametrize("how", ["replaced", "linked"])
def test_weights_of_another_run_are_refused_naming_both_hashes(tmp_path, how):
    checkpoint = saved(tmp_path / "mine", {"w": torch.ones(3)})
    other = saved(tmp_path / "other", {"w": torch.zeros(3)}) / "model.safetensors"
    weights = checkpoint / "model.safetensors"
    weights.unlink()
    if how == "linked":
        weights.symlink_to(other.resolve())
    else:
        weights.write_bytes(other.read_bytes())
    mine = json.loads((checkpoint / "config.json").read_text())[WEIGHTS_SHA256]
    theirs = json.loads((other.parent / "config.json").read_text())[WEIGHTS_SHA256]
    with pytest.raises(ValueError, match=f"^{weights} has sha256 {theirs}, .* saved with {mine}"):
        load_checkpoint(checkpoint)


def test_a_checkpoint_saved_before_hashes_were_recorded_loads_as_before(tmp_path):
    checkpoint = saved(tmp_path / "run", {"w": torch.ones(3)})
    config = checkpoint / "config.json"
    info = json.loads(config.read_text())
    del info[WEIGHTS_SHA256]
    config.write_text(json.dumps(info))
    save_file({"w": torch.full((3,), 2.0)}, checkpoint / "model.safetensors")  # unchecked
    assert torch.equal(load_checkpoint(checkpoint).weights["w"], torch.full((3,), 2.0))


@pytest.mark.parametrize("recorded", [True, False], ids=["hashed", "older"])
def test_weights_that_are_not_safetensors_are_one_line_naming_the_file(tmp_path, recorded):
    checkpoint = saved(tmp_path / "run", {"w": torch.ones(3)})
    if not recorded:
        info = json.loads((checkpoint / "config.json").read_text())
        del info[WEIGHTS_SHA256]
        (checkpoint / "config.json").write_text(json.dumps(info))
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"these are not tensors")
    with pytest.raises(ValueError, match=f"^{weights} is not a safetensors weights file"):
        load_checkpoint(checkpoint)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    result = CliRunner().invoke(app, ["index", str(gallery), "--checkpoint", str(checkpoint)])
    assert result.exit_code == 2 and str(weights) in result.output, result.output
    assert result.output.count("\n") == 1, result.output


def test_a_checkpoint_config_that_is_not_json_names_the_file(tmp_path):
    checkpoint = saved(tmp_path / "run", {"w": torch.ones(3)})
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"^{checkpoint / 'config.json'} is not a checkpoint"):
        load_checkpoint(checkpoint)


# -- data set files ----------------------------------------------------------------------


@pytest.fixture
def synthetic(tmp_path):
    return write_synthetic(tmp_path / "bench", SynthConfig(train=6, val=6, test=6, test_unseen=3))


def rewrite_annotations(root, change):
    path = root / "annotations.json"
    annotations = json.loads(path.read_text())
    change(annotations)
    path.write_text(json.dumps(annotations))
    return path


def test_a_query_text_that_is_a_number_names_the_file_and_the_query(synthetic):
    def number(annotations):
        annotations["splits"]["val"]["queries"][1]["text"] = 3

    path = rewrite_annotations(synthetic, number)
    with pytest.raises(
        DatasetFormatError, match=rf"^{path}: split 'val' query #1 has 'text' = 3, expected a str"
    ):
        load_synthetic(synthetic, "val")
    with pytest.raises(DatasetFormatError, match="query 'q7': its text is 3, a int"):
        Query("q7", "r", (3,))  # whatever loader let it through


def test_a_synthetic_root_without_a_val_split_names_the_file_and_the_split(synthetic):
    path = rewrite_annotations(synthetic, lambda annotations: annotations["splits"].pop("val"))
    with pytest.raises(DatasetFormatError, match=rf"^{path} has no split 'val' \(it has 'train'"):
        load_synthetic(synthetic, "val")


# -- what a killed training run leaves ---------------------------------------------------


def leave_killed_save(run):
    """What a run killed in a checkpoint save leaves: a staging directory, a link not yet
    renamed, a checkpoint directory no link points to."""
    killed = ["ckpt-0000003-0dead000", ".tmp-ckpt-0000003-0dead001", ".tmp-best-0dead002"]
    (run / killed[0]).mkdir()
    (run / killed[0] / "model.safetensors").write_bytes(b"half")
    (run / killed[1]).mkdir()
    (run / killed[2]).symlink_to(killed[0])
    return killed


def kept(run):
    return sorted(p.name for p in run.iterdir() if p.name.startswith((".tmp-", "ckpt-")))


def test_the_next_run_cleans_what_a_killed_save_left(bench, tiny_train_config, tmp_path):
    config = tiny_train_config(bench, tmp_path / "cache", epochs=1, batch_size=16, eval_every=0)
    run = tmp_path / "run"
    train(config.replace(max_steps=2), run, progress=False)
    before = kept(run)
    leave_killed_save(run)

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # killed again, before it saved anything

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(trainer_module.Trainer, "fit", killed)
        with pytest.raises(KeyboardInterrupt):
            resume(run, progress=False)
    assert kept(run) == before


def test_a_run_completed_after_a_kill_at_its_last_save_keeps_only_its_checkpoints(
    bench, tiny_train_config, tmp_path
):
    """Killed at the last checkpoint step, after `last` moved: the resumed run has no step
    left and saves nothing, and still completes with no leftover of the killed save."""
    config = tiny_train_config(
        bench, tmp_path / "cache", epochs=1, batch_size=16, eval_every=0, test_splits=["test"]
    )
    run = tmp_path / "run"
    train(config, run, progress=False)
    (run / "results.json").unlink()  # killed before the test splits were scored
    leave_killed_save(run)
    assert resume(run, progress=False).finished
    assert kept(run) == [os.readlink(run / "last")]
    assert (run / "results.json").is_file()

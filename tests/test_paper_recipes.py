"""The paper recipes (`benchmarks/configs/paper/`) cannot rot: each loads, validates, and trains
two steps on a small copy of its data set's published layout with the backbone swapped for
circe-tiny (the fields that need the paper's files or a GPU-sized batch are swapped too; the
rest, method settings, protocol, schedule, logit scale, precision and selection metric
included, run as written). One slow test runs a recipe's real architecture at random init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_fixtures import (
    F200K_TRAIN,
    FIQ_CATEGORIES,
    cirr_record,
    image,
    write_cirr,
    write_fashion200k,
    write_fashioniq,
    write_json,
    write_shoes,
)
from safetensors.torch import save_file

from circe.data.registry import load_split
from circe.train.config import TrainConfig
from circe.train.runlog import read_log
from circe.train.trainer import train

PAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "paper"
RECIPES = sorted(PAPER.glob("*.yaml"))
# Each data set's small copy (tests/benchmark_fixtures.py) and its evaluation split.
WRITERS = {
    "fashioniq": (write_fashioniq, "val"),
    "cirr": (write_cirr, "val"),
    "shoes": (write_shoes, "test"),
    "fashion200k": (write_fashion200k, "test"),
}
SEED_METHODS = {"combiner", "dqu-cir", "dwc", "far-net", "tmcir", "dafm"}
# The data sets each paper reports: one recipe per pair.
REPORTED = {
    "combiner": {"fashioniq", "cirr"},
    "dqu-cir": {"fashioniq", "cirr", "shoes", "fashion200k"},
    "dwc": {"fashioniq", "shoes", "fashion200k"},
    "far-net": {"fashioniq", "cirr"},
    "tmcir": {"fashioniq", "cirr"},
    "dafm": {"fashioniq", "cirr"},
}


@pytest.fixture
def fresh_accelerate_state():
    """Recipes ask for fp16 or bf16: accelerate fixes the precision of a process at its first
    Accelerator, so each run here starts from a clear state (and leaves one)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_every_seed_method_has_a_recipe_per_data_set_its_paper_reports():
    found = {}
    for path in RECIPES:
        config = TrainConfig.from_yaml(path)
        assert path.stem == f"{config.method}-{config.dataset}", path.name
        found.setdefault(config.method, set()).add(config.dataset)
    assert found == REPORTED and set(found) == SEED_METHODS


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_a_recipe_names_its_sources_marks_its_guesses_and_carries_numbers(path):
    text = path.read_text()
    config = TrainConfig.from_yaml(path)
    assert "Sources:" in text and f"--config benchmarks/configs/paper/{path.name}" in text
    if config.method in ("far-net", "tmcir", "dafm"):  # no public code: settings are guesses
        assert text.count("# guess") >= 5
    if config.method != "far-net":  # FAR-Net's tables could not be read (said in the file)
        assert config.reported and all(
            isinstance(v, int | float) for split in config.reported.values() for v in split.values()
        )
    # The weights are a local file; circe never downloads them.
    assert config.backbone.startswith("open_clip:") and config.backbone_weights.startswith(
        "weights/"
    )


def _more_training_pairs(dataset: str, root: Path) -> None:
    """The copies train on one to three pairs: enough to load, too few for two contrastive
    steps of more than one pair. More pairs over the same training images, in each layout."""
    if dataset == "fashioniq":  # both directions between each category's two train images
        for category in FIQ_CATEGORIES:
            a, b = f"{category[0].upper()}7", f"{category[0].upper()}8"
            records = [
                {"target": b, "candidate": a, "captions": ["is red", "longer"]},
                {"target": a, "candidate": b, "captions": ["is blue", "shorter"]},
            ]
            write_json(root / "captions" / f"cap.{category}.train.json", records)
    elif dataset == "cirr":  # a cycle over the three train images, and one pair back
        members = ["train-0", "train-1", "train-2"]
        pairs = [(0, 1), (1, 2), (2, 0), (1, 0)]
        records = [
            cirr_record(n, members[r], members[t], members) for n, (r, t) in enumerate(pairs)
        ]
        write_json(root / "cirr/captions/cap.rc2.train.json", records)
    elif dataset == "shoes":  # pairs among the three train images (one already exists)
        path = root / "relative_captions_shoes.json"
        names = [f"img_womens_clogs_{i}.jpg" for i in range(4, 7)]
        extra = [(names[1], names[2], "is red"), (names[2], names[0], "is flat"),
                 (names[0], names[2], "has a strap")]  # fmt: skip
        records = json.loads(path.read_text()) + [
            {"ImageName": t, "ReferenceImageName": r, "RelativeCaption": c} for r, t, c in extra
        ]
        write_json(path, records)
    elif dataset == "fashion200k":  # more products, each a word away from another
        rows = F200K_TRAIN + [
            (f"women/dresses/casual/{n}/{n}_0.jpeg", caption)
            for n, caption in enumerate(
                ["red lace gown", "blue maxi dress", "green lace dress", "red maxi dress"], 20
            )
        ]
        lines = [f"{path}\t0.9\t{caption}\n" for path, caption in rows]
        (root / "labels" / "dress_train_detect_all.txt").write_text("".join(lines))
        (root / "labels" / "skirt_train_detect_all.txt").write_text("")
        for n, (path, _) in enumerate(rows):
            image(root / path, 40 + n)


def _captions(root: Path, dataset: str, protocol: str | None, path: Path) -> str:
    """A captions file for every image of the copy (DQU-CIR's BLIP-2 captions stand-in)."""
    captions = {}
    for split in ("train", WRITERS[dataset][1]):
        gallery = load_split(dataset, root, split, protocol).gallery
        captions |= {image_id: f"a photo of {image_id}" for image_id in gallery.ids}
    path.write_text(json.dumps(captions))
    return str(path)


def _on_small_data(config: TrainConfig, tmp_path: Path) -> TrainConfig:
    """The recipe on the data set's small copy, circe-tiny and a CPU: what must change."""
    writer, _ = WRITERS[config.dataset]
    root = writer(tmp_path / config.dataset)
    _more_training_pairs(config.dataset, root)
    pairs = len(load_split(config.dataset, root, config.train_split, config.protocol).queries)
    method_config = dict(config.method_config)
    if config.method == "dqu-cir":
        method_config["keywords"] = "rules"
        if method_config.get("captions", "dataset") != "dataset":
            path = tmp_path / "captions.json"
            method_config["captions"] = _captions(root, config.dataset, config.protocol, path)
    small = config.replace(
        root=str(root),
        backbone="default",
        backbone_weights=None,
        device="cpu",
        batch_size=pairs // 2,  # two steps
        grad_accum_steps=1,
        eval_batch_size=16,
        workers=0,
        max_steps=2,
        log_every=1,
        cache_dir=str(tmp_path / "cache"),
        # fp16 autocast needs a GPU; bf16 is the CPU's half precision
        mixed_precision="bf16" if config.mixed_precision == "fp16" else config.mixed_precision,
    )
    if config.method == "dafm":  # members: two runs of the small copy, trained here first
        members = []
        for number, member in enumerate(("combiner", "dwc")):
            run = tmp_path / f"member-{number}"
            train(small.replace(method=member, method_config={}, eval_every=0), run, False)
            members.append(str(run / "last"))
        method_config["members"] = members
    return small.replace(method_config=method_config)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_a_recipe_trains_two_steps_on_circe_tiny(path, tmp_path, fresh_accelerate_state):
    recipe = TrainConfig.from_yaml(path)
    config = _on_small_data(recipe, tmp_path)
    result = train(config, tmp_path / "run", progress=False)
    assert not result.finished  # stopped at max_steps, with a checkpoint to resume
    steps = read_log(tmp_path / "run", "step")
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["loss"] > 0 for s in steps)  # finite, and batches of more than one pair
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    unchanged = (
        "lr_schedule", "lr_milestones", "temperature_learned_as", "weight_decay_on",
        "augment", "selection_metric", "reported", "protocol",
    )  # fmt: skip
    assert {k: saved[k] for k in unchanged} == {k: getattr(recipe, k) for k in unchanged}


@pytest.mark.slow
def test_a_recipe_runs_a_step_on_its_real_architecture_at_random_init(
    tmp_path, fresh_accelerate_state
):
    """DWC on Shoes with the recipe's own architecture, open_clip RN50 (OpenAI's layout, 102M
    parameters), randomly initialised and saved by the test: the recipe's backbone spec, its
    weights file format and its settings work together, offline."""
    from circe.backbones import build_openclip_model

    recipe = TrainConfig.from_yaml(PAPER / "dwc-shoes.yaml")
    arch = recipe.backbone.removeprefix("open_clip:")
    model, _, _ = build_openclip_model(arch)
    weights = tmp_path / "weights" / "RN50-random.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    config = _on_small_data(recipe, tmp_path).replace(
        backbone=recipe.backbone, backbone_weights=str(weights), max_steps=1, eval_every=0
    )
    result = train(config, tmp_path / "run", progress=False)
    assert not result.finished
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()


def _cli(*args) -> tuple[int, str]:
    from typer.testing import CliRunner

    from circe.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())  # undo rich's line wrapping


def test_the_whole_command_names_what_is_missing_before_any_work(
    tmp_path, monkeypatch, fresh_accelerate_state
):
    """`circe train --config RECIPE --root DATA` in a folder without the recipe's weights
    says which file to put where; on a CPU an fp16 recipe says it needs a GPU. One line
    each, exit code 2, nothing trained."""
    monkeypatch.chdir(tmp_path)
    root = write_cirr(tmp_path / "cirr")
    code, text = _cli("train", "--config", PAPER / "far-net-cirr.yaml", "--root", root)
    assert code == 2 and "weights file not found" in text, text
    assert str(tmp_path / "weights" / "ViT-L-14-openai.safetensors") in text
    assert "Traceback" not in text and not (tmp_path / "runs").exists()
    code, text = _cli("train", "--config", PAPER / "dqu-cir-cirr.yaml", "--root", root)
    expected = "weights file not found" if torch.cuda.is_available() else "fp16 needs a GPU"
    assert code == 2 and expected in text, text

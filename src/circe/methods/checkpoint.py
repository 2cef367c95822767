"""Checkpoints: atomic, self-describing, and enough to resume a run exactly.

A checkpoint is a directory `RUN_DIR/ckpt-<step>-<token>/` with
  - `model.safetensors`: the trained weights (the objective's state without a frozen backbone:
    `method.*` keys and the learned temperature),
  - `config.json`: the training config, the method's name and config, the backbone identity,
    the position/metrics at which it was taken, and the sha256 of `model.safetensors`
    (checked on every load: a weights file replaced by, or linked to, another run's weights
    of the same method would otherwise load and evaluate without a word),
  - `state.pt`: optimizer, scheduler, grad scaler, RNG states (python, numpy, torch, cuda; one
    per process), step, epoch, position in the epoch, early-stopping state.
`RUN_DIR/last` and `RUN_DIR/best` are symbolic links to checkpoint directories. A checkpoint
is written into a temporary directory, every file fsynced, renamed to its final name, and
only then is the link swapped with an atomic rename: a crash or a failed write at any point
leaves the previous `last`/`best` whole. Directories no link points to are then removed,
and so is whatever a save killed half-way left (`clean_run_dir`, also run when a run starts
and when it completes).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from circe.atomic import fsync_path
from circe.backbones import WeightsNotFoundError, file_sha256, load_backbone
from circe.backbones.base import Backbone
from circe.methods.adaptation import adapt_text_tower, adaptation_of
from circe.methods.base import CIRMethod, create_method, method_class
from circe.methods.plan import stores_backbone

FORMAT_VERSION = 1
LINKS = ("last", "best")
WEIGHTS_FILE = "model.safetensors"
# The key of config.json that records the weights file's sha256 (absent in checkpoints saved
# before it was recorded: those load unchecked, as they always did).
WEIGHTS_SHA256 = "model_safetensors_sha256"


@dataclass
class Checkpoint:
    path: Path
    info: dict[str, Any]  # config.json
    weights: dict[str, torch.Tensor]

    def training_state(self) -> dict[str, Any]:
        # Our own file (RNG states hold numpy arrays and Python tuples): not weights_only.
        return torch.load(self.path / "state.pt", map_location="cpu", weights_only=False)


def save_checkpoint(
    run_dir: Path,
    links: tuple[str, ...],
    weights: dict[str, torch.Tensor],
    info: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write one checkpoint and point each of `links` ("last", "best") at it, atomically."""
    run_dir = Path(run_dir)
    _remove_leftovers(run_dir)
    token = uuid.uuid4().hex[:8]
    name = f"ckpt-{info['global_step']:07d}-{token}"
    staging = run_dir / f".tmp-{name}"
    staging.mkdir(parents=True)
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in weights.items()},
            staging / WEIGHTS_FILE,
        )
        info = {**info, WEIGHTS_SHA256: file_sha256(staging / WEIGHTS_FILE)}
        (staging / "config.json").write_text(json.dumps(info, indent=2))
        torch.save(state, staging / "state.pt")
        for file in staging.iterdir():
            fsync_path(file)
        fsync_path(staging)
        os.rename(staging, run_dir / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # `last` is where a resume starts, so it moves after `best`: a kill between the two
    # swaps leaves `last` on the previous checkpoint, and the resumed run reaches this very
    # step again and points both links at it.
    for link in sorted(links, key=lambda name: name == "last"):
        temporary = run_dir / f".tmp-{link}-{token}"
        os.symlink(name, temporary)  # relative: the run directory can be moved
        os.replace(temporary, run_dir / link)
    fsync_path(run_dir)
    _remove_unreferenced(run_dir)
    return run_dir / name


def clean_run_dir(run_dir: Path) -> None:
    """Remove what killed saves left in `run_dir`: staging directories and links not yet
    renamed (`.tmp-*`), and checkpoint directories neither `last` nor `best` points to (a
    save killed after its rename and before its link swap, or during the removal of the
    checkpoint it replaced). A run does this when it starts and when it completes, so that
    a run whose last save was killed does not keep them until a save that may never come."""
    if Path(run_dir).is_dir():
        _remove_leftovers(run_dir)
        _remove_unreferenced(run_dir)


def _remove_leftovers(run_dir: Path) -> None:
    """What a save killed half-way leaves: a staging directory, a link not yet renamed."""
    for entry in run_dir.glob(".tmp-*"):
        if entry.is_symlink() or entry.is_file():
            entry.unlink(missing_ok=True)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _remove_unreferenced(run_dir: Path) -> None:
    kept = {os.readlink(run_dir / link) for link in LINKS if (run_dir / link).is_symlink()}
    for entry in run_dir.glob("ckpt-*"):
        if entry.name not in kept:
            shutil.rmtree(entry, ignore_errors=True)


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory a path names: itself, or a run directory's `best`."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).exists() and (path / "best").exists():
        return path / "best"
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read `RUN_DIR/best`, `RUN_DIR/last` or a checkpoint directory; a run directory means
    its `best`. Every way the files can be wrong (missing, not JSON, not safetensors, weights
    other than those saved) is one error naming the file."""
    path = checkpoint_dir(path)
    weights_path = path / WEIGHTS_FILE
    if not (path / "config.json").is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a directory with config.json and "
            f"{WEIGHTS_FILE}, e.g. RUN_DIR/best or RUN_DIR/last of a `circe train` run"
        )
    info = read_checkpoint_info(path / "config.json")
    if info.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is a checkpoint of another format ({info.get('format')})")
    try:
        weights = load_file(str(weights_path))
    except SafetensorError as error:
        raise ValueError(f"{weights_path} is not a safetensors weights file ({error})") from None
    _check_weights_file(weights_path, info.get(WEIGHTS_SHA256))
    return Checkpoint(path.resolve(), info, weights)


def read_checkpoint_info(config_path: Path) -> dict[str, Any]:
    """A checkpoint's config.json; ValueError naming it when it is not a JSON object."""
    try:
        info = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{config_path} is not a checkpoint's config: not JSON ({error})"
        ) from None
    if not isinstance(info, dict):
        # ValueError, not TypeError: what every caller takes for a mistake in a user's file.
        message = f"{config_path} is not a checkpoint's config: not a JSON object"
        raise ValueError(message)  # noqa: TRY004
    return info


def _check_weights_file(weights_path: Path, recorded: str | None) -> None:
    """Refuse a weights file other than the one saved (`recorded`: its sha256; None for a
    checkpoint saved before it was recorded). Hashing costs one read of the file, cached per
    path, size and mtime for the process (`file_sha256`)."""
    if recorded is None:
        return
    found = file_sha256(weights_path)
    if found != recorded:
        raise ValueError(
            f"{weights_path} has sha256 {found}, but its checkpoint was saved with {recorded}: "
            "the weights file was replaced or re-linked; restore it, or train again"
        )


def backbone_sources(info: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Where a checkpoint's backbone is looked for, in order, as (spec, weights): first the
    absolute paths recorded in its identity when it was trained, then the spec and weights
    as its training config gave them (relative ones from the current directory). So a run
    directory can be moved, and evaluated from any directory, while the backbone stays put;
    the weights hash decides whether what is found is the right backbone."""
    identity, config = info["backbone"], info["train_config"]
    recorded = identity["weights"]
    # "builtin:..." (the shipped weights) and a transformers directory are named by the spec.
    if recorded.startswith("builtin:") or Path(recorded).is_dir():
        recorded = None
    sources = [(identity["spec"], recorded), (config["backbone"], config["backbone_weights"])]
    return list(dict.fromkeys(sources))  # in order, without repeats


def _load_its_backbone(checkpoint: Checkpoint, device: str | torch.device) -> Backbone:
    """The first of `backbone_sources` that loads; else one error naming every place tried."""
    tried = []
    for spec, weights in backbone_sources(checkpoint.info):
        try:
            return load_backbone(spec, weights, device=device)
        except (FileNotFoundError, ValueError) as error:  # WeightsNotFoundError included
            tried.append(f"{spec} with weights {weights}: {error}")
    raise WeightsNotFoundError(
        f"the backbone of {checkpoint.path} was not found; tried " + "; ".join(tried)
    )


def load_trained_method(
    path: str | Path, device: str | torch.device = "cpu", shared: Backbone | None = None
) -> CIRMethod:
    """The trained method of a checkpoint, in eval mode, on its own backbone. `shared`: a
    backbone already loaded (on `device`), used instead of loading the same one again when it
    is the very backbone the checkpoint names (the members of a fusion share one so)."""
    checkpoint = load_checkpoint(path)
    info = checkpoint.info
    if shared is not None and asdict(shared.identity) == info["backbone"]:
        backbone = shared
    else:
        backbone = _load_its_backbone(checkpoint, device)
    saved = info["backbone"]["weights_sha256"]
    if backbone.identity.weights_sha256 != saved:
        raise ValueError(
            f"{checkpoint.path} was trained on backbone weights with sha256 {saved[:12]}, but "
            f"{backbone.identity.spec} now loads {backbone.identity.weights_sha256[:12]}: pass "
            "the backbone weights it was trained with"
        )
    older = method_class(info["method"]).settings_before_they_existed
    method = create_method(info["method"], backbone, **{**older, **info["method_config"]})
    adapt_text_tower(method, *adaptation_of(info["train_config"]))  # the adapters it trained
    method_weights = {
        k.removeprefix("method."): v
        for k, v in checkpoint.weights.items()
        if k.startswith("method.")
    }
    missing, unexpected = method.load_state_dict(method_weights, strict=False)
    # A frozen backbone is not in the file: it is the backbone loaded (and checked) above.
    kept_apart = not stores_backbone(method)
    missing = [k for k in missing if not (kept_apart and k.startswith("backbone."))]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint.path} does not fit method {info['method']!r}: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return method.to(device).eval()

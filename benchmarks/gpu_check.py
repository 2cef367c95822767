"""The paper recipes on a CUDA machine: does each train, how fast, in how much memory.

For each recipe of `benchmarks/configs/paper/` whose backbone is not yet measured (one per
architecture: RN50x4, ViT-H-14, RN50, ViT-L-14; DAFM fuses other recipes' runs and is left
out), the recipe's architecture is built at random init on the GPU and saved to a local file
(nothing is downloaded), and the recipe trains `--steps` optimizer steps on the synthetic
benchmark with its own settings (method, batch, optimizer, schedule, logit scale,
augmentation, towers) except: bf16 mixed precision, no validation, and the data set. Each
runs with gradient checkpointing off and on (where the recipe trains a tower that can).

Reported per run: optimizer steps/s (after the first tenth of the steps), training pairs/s
and decoded images/s (two per pair when pixels are fed; none when features are cached),
peak GPU memory, and the ratio of a training step's time to a bare forward + backward of
the same towers, every parameter trained, per pair (what the trainer, data loading and the
method add; below 1 where the recipe caches features or freezes a tower).
With two or more GPUs, the DQU-CIR recipe also runs under `torchrun` on all of them.

    python benchmarks/gpu_check.py                 # ~5 min on one H100/H200-class GPU
    python benchmarks/gpu_check.py --steps 50 --recipe dqu-cir-fashioniq

Writes benchmarks/results/gpu_check.json and gpu_check.md. Without CUDA it refuses to run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "benchmarks" / "configs" / "paper"
RESULTS = REPO / "benchmarks" / "results"
# One recipe per architecture (the others share one of these backbones).
DEFAULT_RECIPES = (
    "combiner-cirr",  # RN50x4, frozen: features cached
    "dqu-cir-fashioniq",  # ViT-H-14, both towers trained, augmented pixels
    "dwc-shoes",  # RN50, text tower trained
    "tmcir-cirr",  # ViT-L-14, text tower trained, token sequences
    "far-net-cirr",  # ViT-L-14, frozen: token sequences cached
)
# The largest global batch measured: the Combiner's 4096 would need 4096 synthetic pairs
# per step for a feature-cached fusion module, which measures the synthetic generator.
MAX_BATCH = 1024
# The bare forward + backward runs at most this many pairs (a frozen recipe's batch of 1024
# through every trained parameter would measure the GPU's memory, not the trainer); the
# ratio is taken per pair.
BARE_BATCH = 64
NO_CUDA = (
    "gpu_check needs a CUDA GPU (torch.cuda.is_available() is False here): it measures "
    "training speed and GPU memory of the paper recipes. On a CPU, the recipes are checked "
    "by tests/test_paper_recipes.py instead."
)


def recipe_config(name: str, weights: Path, root: Path, steps: int, checkpointing: bool):
    """The recipe, with its random-init weights, on the synthetic benchmark, for `steps`."""
    from circe.train.config import TrainConfig

    recipe = TrainConfig.from_yaml(PAPER / f"{name}.yaml")
    method_config = dict(recipe.method_config)
    if recipe.method == "dqu-cir":  # the synthetic scenes carry captions; key words by rule
        method_config.update(captions="dataset", keywords="rules", template="{caption}, but {text}")
    return replace(
        recipe,
        method_config=method_config,
        dataset="synthetic",
        root=str(root),
        protocol=None,
        backbone_weights=str(weights),
        batch_size=min(recipe.batch_size, MAX_BATCH),
        grad_accum_steps=1,
        mixed_precision="bf16",
        gradient_checkpointing=checkpointing,
        eval_every=0,
        selection_metric="r1-r10-r50",
        test_splits=[],
        max_steps=steps,
        log_every=1,
        workers=min(8, os.cpu_count() or 1),
        cache_dir=str(root.parent / "cache"),
    )


def random_weights(arch: str, folder: Path) -> Path:
    """The architecture at random init, saved as a local safetensors file (made once)."""
    from safetensors.torch import save_file

    from circe.backbones import build_openclip_model

    path = folder / f"{arch}-random.safetensors"
    if not path.exists():
        model, _, _ = build_openclip_model(arch, device="cuda")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        del model
        torch.cuda.empty_cache()
    return path


def steps_per_second(run_dir: Path) -> float:
    """Optimizer steps per second over the logged steps, the first tenth left out (start-up,
    cuDNN autotuning, the first batches' loading)."""
    from circe.train.runlog import read_log

    times = [record["time"] for record in read_log(run_dir, "step")]
    skip = max(1, len(times) // 10)
    return (len(times) - 1 - skip) / (times[-1] - times[skip])


def bare_step_seconds(backbone, batch: int, checkpointing: bool, repeats: int = 10) -> float:
    """One forward + backward of both towers, all parameters trained, on `batch` pairs (2 ×
    batch images, batch texts), bf16 autocast: what a training step cannot be faster than."""
    size = backbone.identity.image_size
    pixels = torch.randn(2 * batch, 3, size, size, device="cuda")
    tokens = backbone.tokenize(["a small red circle left of a blue square"] * batch).cuda()
    backbone.requires_grad_(True)
    if checkpointing:
        backbone.enable_gradient_checkpointing(frozenset({"image", "text"}))

    def once() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = backbone.encode_image(pixels).float().sum()
            loss = loss + backbone.encode_text(tokens).float().sum()
        loss.backward()
        backbone.zero_grad(set_to_none=True)

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        once()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def measure(name: str, weights: Path, root: Path, steps: int, checkpointing: bool, work: Path):
    """One training run of the recipe -> its figures (or why it did not run)."""
    from circe.backbones import load_backbone
    from circe.train.trainer import Trainer

    config = recipe_config(name, weights, root, steps, checkpointing)
    run_dir = work / f"{name}-ckpt-{'on' if checkpointing else 'off'}"
    record = {
        "recipe": name,
        "backbone": config.backbone,
        "method": config.method,
        "batch": config.batch_size,
        "gradient_checkpointing": checkpointing,
    }
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        trainer = Trainer(config, run_dir, progress=False)
    except ValueError as error:  # e.g. checkpointing a method that trains no tower
        return {**record, "skipped": str(error)}
    trainer.fit()
    rate = steps_per_second(run_dir)
    pixels = not trainer.cache_report["used"]
    record |= {
        "steps_per_s": round(rate, 3),
        "pairs_per_s": round(rate * config.batch_size, 1),
        "images_per_s": round(2 * rate * config.batch_size, 1) if pixels else None,
        "feature_cache": trainer.cache_report,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    del trainer
    gc.collect()  # the run's model and optimizer state, before the bare measurement
    torch.cuda.empty_cache()
    backbone = load_backbone(config.backbone, weights, "cuda")
    bare_batch = min(config.batch_size, BARE_BATCH)
    try:
        bare = bare_step_seconds(backbone, bare_batch, checkpointing) / bare_batch  # per pair
        step = 1 / rate / config.batch_size  # per pair
        record["step_over_bare_forward_backward"] = round(step / bare, 2)
    except NotImplementedError as error:  # a tower that cannot checkpoint
        record["step_over_bare_forward_backward"] = None
        record["bare_note"] = str(error)
    del backbone
    return record


def torchrun(name: str, weights: Path, root: Path, steps: int, work: Path) -> dict:
    """The recipe under torchrun on as many GPUs as split its batch evenly (DDP through
    accelerate; every process takes an equal share of each batch): its figures."""
    from circe.train.config import TrainConfig

    batch = TrainConfig.from_yaml(PAPER / f"{name}.yaml").batch_size
    gpus = max(n for n in range(1, torch.cuda.device_count() + 1) if batch % n == 0)
    out = work / f"{name}-torchrun.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        __file__,
        "--worker",
        name,
        "--weights",
        str(weights),
        "--root",
        str(root),
        "--steps",
        str(steps),
        "--worker-out",
        str(out),
    ]
    subprocess.run(command, check=True)
    return {**json.loads(out.read_text()), "processes": gpus}


def worker(args: argparse.Namespace) -> None:
    """One process of a torchrun run; rank 0 writes the figures."""
    from circe.train.trainer import Trainer

    config = recipe_config(args.worker, Path(args.weights), Path(args.root), args.steps, False)
    run_dir = Path(args.worker_out).with_suffix("")
    trainer = Trainer(config, run_dir, progress=False)
    trainer.fit()
    if trainer.is_main:
        rate = steps_per_second(run_dir)
        Path(args.worker_out).write_text(
            json.dumps(
                {
                    "recipe": args.worker,
                    "steps_per_s": round(rate, 3),
                    "pairs_per_s": round(rate * config.batch_size, 1),
                }
            )
        )


def table(records: list[dict]) -> str:
    lines = [
        "| recipe | backbone | batch | checkpointing | steps/s | images/s | peak GiB | step / bare fwd+bwd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "skipped" in r:
            lines.append(
                f"| {r['recipe']} | {r['backbone']} | {r['batch']} | "
                f"{'on' if r['gradient_checkpointing'] else 'off'} | refused: "
                f"{r['skipped'][:80]} | | | |"
            )
            continue
        images = r["images_per_s"] if r["images_per_s"] is not None else "cached"
        lines.append(
            f"| {r['recipe']} | {r['backbone']} | {r['batch']} | "
            f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['steps_per_s']} | "
            f"{images} | {r['peak_memory_gib']} | "
            f"{r['step_over_bare_forward_backward']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipe", action="append", help="recipe name(s); default: one per backbone"
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--pairs", type=int, default=4000, help="synthetic training queries")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    # A process of the torchrun run (started by this script itself).
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(NO_CUDA)
    if args.worker:
        worker(args)
        return

    from circe.data.synthetic import SynthConfig, write_synthetic
    from circe.train.config import TrainConfig

    started = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="circe-gpu-check-"))
    root = write_synthetic(work / "synthetic", SynthConfig(train=args.pairs, val=50, test=50))
    records, weights_of = [], {}
    for name in args.recipe or DEFAULT_RECIPES:
        arch = TrainConfig.from_yaml(PAPER / f"{name}.yaml").backbone.removeprefix("open_clip:")
        weights_of[name] = weights = random_weights(arch, work)
        for checkpointing in (False, True):
            records.append(measure(name, weights, root, args.steps, checkpointing, work))
            print(json.dumps(records[-1]), flush=True)
    distributed = None
    if torch.cuda.device_count() >= 2:
        name = "dqu-cir-fashioniq"
        weights = weights_of.get(name) or random_weights("ViT-H-14", work)
        distributed = torchrun(name, weights, root, args.steps, work)
    report = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "steps": args.steps,
        "runs": records,
        "torchrun": distributed,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    markdown = f"# GPU check on {report['gpu']}\n\n{table(records)}"
    if distributed:
        markdown += f"\ntorchrun on {distributed['processes']} GPUs: {distributed}\n"
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()

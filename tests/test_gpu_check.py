"""benchmarks/gpu_check.py: what can be checked without a GPU (it refuses to run there)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_refuses_with_a_clear_message(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine with one
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        check=False, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "gpu_check needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_its_recipes_become_valid_synthetic_runs(tmp_path):
    gpu_check = _module()
    for name in gpu_check.DEFAULT_RECIPES:
        for checkpointing in (False, True):
            config = gpu_check.recipe_config(
                name, tmp_path / "w.safetensors", tmp_path, 200, checkpointing
            )
            assert config.dataset == "synthetic" and config.max_steps == 200
            assert (
                config.mixed_precision == "bf16" and config.gradient_checkpointing is checkpointing
            )
            assert config.batch_size <= gpu_check.MAX_BATCH

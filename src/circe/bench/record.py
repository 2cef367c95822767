"""What every `circe bench` record shares: the splits it scores, the machine it ran on, a
summary over seeds, the JSON + Markdown pair it writes, and the plan file it reads."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from circe.train.config import read_config_yaml

# Wording no generator of ours wrote first, then the generator's held-out families: the
# figures that predict free human language (FashionIQ, CIRR).
TEST_SPLITS = ("test_free", "test_phrasing", "test", "test_unseen")
# Scored too, to choose recipes on held-out wording without looking at the test splits
# (`val_free` shares no text with `test_free`; `val_phrasing`'s families are disjoint from
# `test_phrasing`'s).
REPORT_SPLITS = (*TEST_SPLITS, "val_free", "val_phrasing")
KS = (1, 5, 10, 50)
TABLE_KS = (1, 10, 50)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def over_seeds(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the values themselves, one per seed."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "seeds": values,
    }


def write_record(out_dir: Path, name: str, record: dict, markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def read_plan(path: Path) -> tuple[list[str], dict[str, str]]:
    """(methods, {method: recipe config path}) from a bench plan YAML."""
    if not path.is_file():
        raise FileNotFoundError(f"bench plan not found: {path}")
    plan = read_config_yaml(path) or {}  # the training configs' bounded, alias-free reading
    methods, recipes = plan.get("methods", []), plan.get("recipes", {})
    unknown = set(plan) - {"methods", "recipes"}
    if unknown or not isinstance(methods, list) or not isinstance(recipes, dict):
        raise ValueError(
            f"{path}: a bench plan holds `methods:` (a list of names) and `recipes:` "
            f"(method: config path), got {sorted(plan)}"
        )
    return [str(m) for m in methods], {str(k): str(v) for k, v in recipes.items()}

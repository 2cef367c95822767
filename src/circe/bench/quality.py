"""`circe bench quality`, `label-noise` and `cache-speed`: method quality over seeds, under
label noise, and the feature cache's speed-up.

Each writes a JSON record and a Markdown table generated from it, so every number in the
README comes from a command anyone can run.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from circe.bench.record import (
    KS,
    REPORT_SPLITS,
    TABLE_KS,
    TEST_SPLITS,
    machine,
    over_seeds,
    write_record,
)
from circe.eval.evaluate import evaluate
from circe.train.config import TrainConfig
from circe.train.data import load_split
from circe.train.trainer import Trainer, trained

# ------------------------------------------------------------------------------------- quality


def quality(
    base: TrainConfig,
    out_dir: Path,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] | None = None,
    command: str = "circe bench quality",
    progress: bool = True,
    runs_dir: Path | None = None,
    recipes: Mapping[str, TrainConfig] | None = None,
) -> dict[str, Any]:
    """Every method on `base`'s data set and backbone: zero-shot methods are evaluated once
    (they have no randomness), trainable ones trained once per seed with `base` (seed
    replaced; runs kept in `runs_dir` when given, see `_trained_runs`), or with its own
    config from `recipes` (a recipe chosen on validation for that method). Recall is recorded
    overall and per edit kind (query tag). Writes `quality.json` and `quality.md` in
    `out_dir`; returns the record."""
    from circe.backbones import load_backbone
    from circe.methods import create_method, method_class, standalone_methods

    names = list(methods or standalone_methods())
    record: dict[str, Any] = {
        "command": command,
        "dataset": base.dataset,
        "root": base.root,
        "seeds": list(seeds),
        "train_config": base.to_dict(),
        "machine": machine(),
        "methods": {},
    }
    meta = Path(base.root) / "meta.json"
    if meta.is_file():
        record["benchmark"] = json.loads(meta.read_text())
    backbone = load_backbone(base.backbone, base.backbone_weights)
    record["backbone"] = backbone.identity.short()
    base = replace(base, test_splits=list(REPORT_SPLITS))
    splits = {
        split: load_split(base.dataset, base.root, split, base.protocol) for split in REPORT_SPLITS
    }
    for name in names:
        if not method_class(name).trainable:
            method = create_method(name, backbone)
            results = {split: evaluate(method, data, ks=KS) for split, data in splits.items()}
            entry = {
                "trainable": False,
                **{
                    split: {metric: over_seeds([v]) for metric, v in result.metrics.items()}
                    for split, result in results.items()
                },
                "per_kind": {
                    split: {
                        kind: {metric: over_seeds([v]) for metric, v in values.items()}
                        for kind, values in result.per_tag.items()
                    }
                    for split, result in results.items()
                },
                "train_seconds": over_seeds([0.0]),
                "parameters": {
                    "trainable": 0,
                    "total": sum(p.numel() for p in method.parameters()),
                },
            }
        else:
            config = replace((recipes or {}).get(name, base), method=name)
            config = replace(config, test_splits=base.test_splits)
            runs = _trained_runs(config, seeds, progress, runs_dir)
            entry = {
                "trainable": True,
                # Where this method's recipe differs from the bench's config.
                "recipe": {
                    key: value
                    for key, value in config.to_dict().items()
                    if key not in ("method", "seed") and value != getattr(base, key)
                },
                **{
                    split: {
                        metric: over_seeds([run["test"][split][metric] for run in runs])
                        for metric in runs[0]["test"][split]
                    }
                    for split in REPORT_SPLITS
                },
                "per_kind": {
                    split: {
                        kind: {
                            metric: over_seeds(
                                [run["test_per_kind"][split][kind][metric] for run in runs]
                            )
                            for metric in values
                        }
                        for kind, values in runs[0]["test_per_kind"][split].items()
                    }
                    for split in REPORT_SPLITS
                },
                "train_seconds": over_seeds([run["train_seconds"] for run in runs]),
                "wall_seconds": over_seeds([run["wall_seconds"] for run in runs]),
                "best_epoch": [run["best_epoch"] for run in runs],
                "parameters": runs[0]["parameters"],
            }
        record["methods"][name] = entry
    write_record(Path(out_dir), "quality", record, quality_markdown(record))
    return record


def _trained_runs(
    config: TrainConfig, seeds: Sequence[int], progress: bool, runs_dir: Path | None = None
) -> list[dict]:
    """`results.json` of one training run of `config` per seed, kept in
    `runs_dir/METHOD/seed-N` (finished runs there are reused, interrupted ones continued) or,
    without `runs_dir`, discarded."""
    with tempfile.TemporaryDirectory(prefix="circe-bench-") as scratch:
        where = Path(runs_dir or scratch) / config.method
        return [
            trained(replace(config, seed=seed), where / f"seed-{seed}", progress) for seed in seeds
        ]


def quality_markdown(record: dict[str, Any]) -> str:
    header = ["method"] + [f"{split} R@{k}" for split in TEST_SPLITS for k in TABLE_KS]
    header += ["R@1 lost to test_free", "R@1 lost to test_phrasing"]
    header += ["val_free R@1", "val_phrasing R@1", "train s", "run s"]
    header += ["trainable params"]
    lines = [
        "# Method quality on the synthetic benchmark",
        "",
        (
            f"Generated by `{record['command']}` from `quality.json`; backbone "
            f"`{record['backbone']}`. Recall in percent, mean ± std over seeds "
            f"{record['seeds']} for trained methods (zero-shot methods are deterministic). "
            "Train s: optimizer steps only, on the cached backbone features; run s: the whole "
            "training run (loading, feature cache, validation every epoch, testing). The best "
            "epoch is selected by the mean of R@1, R@10, R@50 on `val`. `test_free`: `test`'s "
            "pairs worded by rules written apart from the generator (`circe.data.free_wording`); "
            "`test_phrasing`: the same pairs worded only with phrasing families no training "
            "text uses; R@1 lost to X = `test` R@1 - X R@1."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, entry in record["methods"].items():
        recipe = ", ".join(f"{k} {v}" for k, v in entry.get("recipe", {}).items())
        cells = [f"`{name}`" + (f" ({recipe})" if recipe else "")]
        for split in TEST_SPLITS:
            for k in TABLE_KS:
                value = entry[split][f"R@{k}"]
                spread = f" ± {value['std']:.1f}" if entry["trainable"] else ""
                cells.append(f"{value['mean']:.1f}{spread}")
        for split in ("test_free", "test_phrasing"):
            lost = entry["test"]["R@1"]["mean"] - entry[split]["R@1"]["mean"]
            cells.append(f"{lost:.1f}")
        for split in ("val_free", "val_phrasing"):
            value = entry.get(split, {}).get("R@1")
            cells.append(f"{value['mean']:.1f}" if value else "—")
        for seconds in ("train_seconds", "wall_seconds"):
            cells.append(f"{entry[seconds]['mean']:.1f}" if entry["trainable"] else "—")
        cells.append(f"{entry['parameters']['trainable']:,}")
        lines.append("| " + " | ".join(cells) + " |")
    for split in TEST_SPLITS[:3]:
        lines += _per_kind_lines(record, split)
    return "\n".join(lines) + "\n"


def _per_kind_lines(record: dict[str, Any], split: str) -> list[str]:
    """R@1 on `split` per edit kind (the queries' tags), one column per kind: which edits a
    method gets right (moves need the region-word alignment that token methods claim)."""
    entries = record["methods"]
    kinds = sorted(
        {k for entry in entries.values() for k in entry.get("per_kind", {}).get(split, {})}
    )
    if not kinds:
        return []
    lines = [
        "",
        f"`{split}` R@1 per edit kind (mean ± std over seeds):",
        "",
        "| method | " + " | ".join(kinds) + " |",
        "|" + "---|" * (len(kinds) + 1),
    ]
    for name, entry in entries.items():
        cells = [f"`{name}`"]
        for kind in kinds:
            value = entry.get("per_kind", {}).get(split, {}).get(kind, {}).get("R@1")
            spread = f" ± {value['std']:.1f}" if value and entry["trainable"] else ""
            cells.append(f"{value['mean']:.1f}{spread}" if value else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------- label noise


def label_noise(
    base: TrainConfig,
    out_dir: Path,
    methods: Sequence[str] = ("dwc", "dwc-hard-labels"),
    rates: Sequence[float] = (0.0, 0.3, 0.6),
    seeds: Sequence[int] = (0, 1),
    command: str = "circe bench label-noise",
    progress: bool = True,
) -> dict[str, Any]:
    """Train each method with a fraction `rate` of its training texts swapped for other
    queries' texts (`TrainConfig.text_noise`), test on the clean test split. Writes
    `label_noise.json`, `label_noise.md` and the curve `label_noise.png`; returns the record."""
    record: dict[str, Any] = {
        "command": command,
        "dataset": base.dataset,
        "seeds": list(seeds),
        "rates": list(rates),
        "train_config": base.to_dict(),
        "machine": machine(),
        "methods": {},
    }
    for name in methods:
        record["methods"][name] = {}
        for rate in rates:
            runs = _trained_runs(replace(base, method=name, text_noise=rate), seeds, progress)
            record["methods"][name][str(rate)] = {
                metric: over_seeds([run["test"]["test"][metric] for run in runs])
                for metric in runs[0]["test"]["test"]
            }
    write_record(Path(out_dir), "label_noise", record, label_noise_markdown(record))
    plot_label_noise(record, Path(out_dir) / "label_noise.png")
    return record


def label_noise_markdown(record: dict[str, Any]) -> str:
    rates = record["rates"]
    lines = [
        "# Robustness to noisy modification texts",
        "",
        (
            f"Generated by `{record['command']}` from `label_noise.json`. A fraction of the "
            "training pairs get the text of another pair; testing is on the clean `test` "
            f"split. R@1 in percent, mean ± std over seeds {record['seeds']}; the last column "
            "is the R@1 lost from no noise to the highest rate."
        ),
        "",
        "| method | " + " | ".join(f"noise {rate:.0%}" for rate in rates) + " | drop |",
        "|" + "---|" * (len(rates) + 2),
    ]
    for name, by_rate in record["methods"].items():
        means = [by_rate[str(rate)]["R@1"]["mean"] for rate in rates]
        cells = [
            f"{by_rate[str(rate)]['R@1']['mean']:.1f} ± {by_rate[str(rate)]['R@1']['std']:.1f}"
            for rate in rates
        ]
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {means[0] - means[-1]:.1f} |")
    return "\n".join(lines) + "\n"


def plot_label_noise(record: dict[str, Any], path: Path) -> None:
    """R@1 against the noise rate, one line per method, with the seeds' spread."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the plot needs matplotlib: pip install 'circe[bench]'") from None
    rates = record["rates"]
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, by_rate in record["methods"].items():
        means = [by_rate[str(rate)]["R@1"]["mean"] for rate in rates]
        stds = [by_rate[str(rate)]["R@1"]["std"] for rate in rates]
        axes.errorbar([100 * r for r in rates], means, yerr=stds, marker="o", capsize=3, label=name)
    axes.set_xlabel("training texts replaced (%)")
    axes.set_ylabel("test R@1 (%)")
    axes.set_title("Label noise on the synthetic benchmark")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# ---------------------------------------------------------------------------------- cache speed


def _one_epoch(config: TrainConfig, run_dir: Path) -> dict[str, float]:
    started = time.time()
    trainer = Trainer(config, run_dir, progress=False)
    setup = time.time() - started
    results = trainer.fit().results
    return {
        "backbone": trainer.method.backbone.identity.short(),
        "epoch_seconds": results["train_seconds"],
        "setup_seconds": round(setup, 3),  # loading, and building the cache on a miss
        "cache_seconds": results["feature_cache"].get("seconds", 0.0),
        "cache_hits": results["feature_cache"].get("hits", 0),
    }


def cache_speed(
    base: TrainConfig, out_dir: Path, command: str = "circe bench cache-speed"
) -> dict[str, Any]:
    """One epoch of `base.method` without the feature cache, then with it (cold: the run that
    builds it; warm: a later run that finds it), in one process. Writes `cache_speed.json`
    and `cache_speed.md`; returns the record."""
    base = replace(base, epochs=1, eval_every=0, test_splits=[], max_steps=None)
    with tempfile.TemporaryDirectory(prefix="circe-cache-speed-") as scratch:
        scratch = Path(scratch)
        cached = replace(base, feature_cache=True, cache_dir=str(scratch / "cache"))
        runs = {
            "no cache": _one_epoch(replace(base, feature_cache=False), scratch / "pixels"),
            "cache, cold": _one_epoch(cached, scratch / "cold"),
            "cache, warm": _one_epoch(cached, scratch / "warm"),
        }
    uncached = runs["no cache"]["epoch_seconds"]
    cold = runs["cache, cold"]
    record = {
        "command": command,
        "method": base.method,
        "train_pairs": len(load_split(base.dataset, base.root, "train").queries),
        "batch_size": base.batch_size,
        "machine": machine(),
        "runs": runs,
        # The target: a cached epoch at least 5x faster than an uncached one.
        "speedup_epoch": uncached / runs["cache, warm"]["epoch_seconds"],
        # Even the first run, which builds the cache, against one uncached epoch.
        "speedup_first_epoch_with_build": uncached
        / (cold["cache_seconds"] + cold["epoch_seconds"]),
    }
    write_record(Path(out_dir), "cache_speed", record, cache_speed_markdown(record))
    return record


def cache_speed_markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Feature cache: one training epoch with and without it",
        "",
        (
            f"Generated by `{record['command']}` from `cache_speed.json`: `{record['method']}`, "
            f"{record['train_pairs']} training pairs, batch {record['batch_size']}, backbone "
            f"`{record['runs']['no cache']['backbone']}`, {record['machine']['torch_threads']} torch "
            "threads."
        ),
        "",
        "| run | epoch s | cache build s | backbone features |",
        "|---|---|---|---|",
    ]
    for name, run in record["runs"].items():
        source = (
            "computed every step"
            if name == "no cache"
            else ("read from the cache" if run["cache_hits"] else "computed once, stored")
        )
        build = f"{run['cache_seconds']:.1f}" if name == "cache, cold" else "—"
        lines.append(f"| {name} | {run['epoch_seconds']:.2f} | {build} | {source} |")
    lines += [
        "",
        (
            f"Cached epoch speed-up: **{record['speedup_epoch']:.1f}x** (target ≥ 5x). "
            f"First run including building the cache: "
            f"{record['speedup_first_epoch_with_build']:.1f}x."
        ),
    ]
    return "\n".join(lines) + "\n"

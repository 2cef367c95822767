"""`circe bench fusion`: DAFM over trained members, against its baselines, and its cost.

Per seed, with one training config (the one of `circe bench quality`, seed replaced): train
each member method, optionally add a member with random weights (DAFM should learn to
distrust it), train `dafm` over the members, and build `dafm-equal` over the same members.
On `test_free`, `test_phrasing`, `test` and `test_unseen`, every member is encoded once as
`circe eval` encodes it, and
both fusions are computed from those member embeddings with their own fusion functions
(`encode_queries_from_features`, exactly what their raw-input encoders do). The best single
member is the member with the best mean R@1 over seeds, per split.

Cost, in the same run: the latency of one query (raw image and text to the top 10 of the
split's gallery, median over queries) and memory (weights in memory, index bytes per
gallery image) of DAFM against each of its members.
"""

from __future__ import annotations

import itertools
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from circe.bench.record import (
    KS,
    REPORT_SPLITS,
    TABLE_KS,
    TEST_SPLITS,
    machine,
    over_seeds,
    write_record,
)
from circe.data.batching import raw_query
from circe.data.types import CIRSplit
from circe.eval.benchmark import cirr_metrics
from circe.eval.evaluate import encode_gallery, encode_queries, masks
from circe.eval.labels import Labels
from circe.eval.metrics import recall_at_k
from circe.methods import CIRMethod, create_method
from circe.methods.checkpoint import load_checkpoint, load_trained_method, save_checkpoint
from circe.methods.dafm import DAFM
from circe.train.config import TrainConfig
from circe.train.data import load_split
from circe.train.trainer import trained

DEFAULT_MEMBERS = ("combiner", "dwc", "dqu-cir")
RANDOM = "random"  # the label of the member with random weights
# The fusions each seed scores; DAFM's rows (gates) are the trained ones.
EQUAL, EQUAL_Z, STATIC_Z = "dafm-equal", "equal weights, z-scored", "static weights, z-scored"
CASCADE, CASCADE_REVERSED = "cascade", "cascade, reversed"
FIRST_DESIGN, DAFM_NAME = "dafm-first-design", "dafm"
FUSIONS = (EQUAL, EQUAL_Z, STATIC_Z, CASCADE, CASCADE_REVERSED, FIRST_DESIGN, DAFM_NAME)
# Cascade: the first member's top 100 go on, each later member keeps the top 50 of what it
# was given, and the last one orders its list.
CASCADE_KEEP = (100, 50)
# Static weights are searched on this grid over the simplex (steps of 0.1).
GRID_STEPS = 10
LATENCY_QUERIES = 50


def write_random_member(source: str | Path, out: Path, seed: int) -> Path:
    """A copy of the trained checkpoint `source` whose method weights are all drawn from
    N(0, 1): a member that knows nothing but still loads and encodes like the original.
    Returns its checkpoint (`out/best`)."""
    checkpoint = load_checkpoint(source)
    generator = torch.Generator().manual_seed(seed)
    weights = {
        key: torch.randn(value.shape, generator=generator)
        if key.startswith("method.") and value.is_floating_point()
        else value
        for key, value in checkpoint.weights.items()
    }
    info = {**checkpoint.info, "random_weights_from": str(checkpoint.path)}
    save_checkpoint(Path(out), ("last", "best"), weights, info, state={})
    return Path(out) / "best"


def _recalls(scores: torch.Tensor, split: CIRSplit, dataset: str = "synthetic") -> dict:
    """R@1/5/10/50; on CIRR also its subset recalls and both readings of "Rmean"."""
    if dataset == "cirr":
        return cirr_metrics(scores, Labels(split))
    target, exclude = masks(split, split.queries)
    return {f"R@{k}": v for k, v in recall_at_k(scores, target, KS, exclude).items()}


def cascade_scores(scores: Sequence[torch.Tensor], exclude: torch.Tensor) -> torch.Tensor:
    """Sequential fusion as a score matrix: member 1 ranks the gallery and passes its top
    `CASCADE_KEEP[0]` on, each next member re-ranks what it was given and passes its top
    `CASCADE_KEEP[1]` on; the last member orders the final list. `scores`: one `[Q, N]`
    cosine matrix per member, in cascade order; `exclude [Q, N]`: images never ranked (the
    reference). Images that went further come first; within a stage, in the order of the
    member that dropped them (cosines lie in [-1, 1], so a step of 10 per stage is enough)."""
    fused = scores[0].masked_fill(exclude, -math.inf)
    alive = ~exclude
    for stage, member in enumerate(scores[1:], 1):
        keep = CASCADE_KEEP[min(stage - 1, len(CASCADE_KEEP) - 1)]
        passed = (
            torch.zeros_like(alive).scatter(
                1, fused.topk(min(keep, fused.shape[1]), dim=-1).indices, True
            )
            & alive
        )
        fused = torch.where(passed, 10.0 * stage + member, fused)
        alive = passed
    return fused


def simplex_grid(members: int, steps: int = GRID_STEPS) -> list[tuple[float, ...]]:
    """Every weight vector with entries in multiples of 1/steps summing to one."""
    return [
        tuple(count / steps for count in counts)
        for counts in itertools.product(range(steps + 1), repeat=members)
        if sum(counts) == steps
    ]


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a model holds in memory (tensors it shares counted once)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def _query_latency_ms(model: CIRMethod, split: CIRSplit, gallery: torch.Tensor) -> float:
    """Median milliseconds from one raw query to the top 10 of `gallery` `[N, D]`."""
    queries = [raw_query(q, split.gallery) for q in split.queries[: LATENCY_QUERIES + 1]]
    model.encode_raw_queries(queries[:1])  # warm-up: lazy initialisation, caches
    times = []
    for query in queries[1:]:  # queries it has not seen (DAFM remembers what it has)
        started = time.perf_counter()
        embedded = model.encode_raw_queries([query]).cpu()  # [1, D]
        (embedded @ gallery.T).topk(min(10, len(gallery)))
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def _labels(dafm: DAFM, random_member: bool) -> list[str]:
    names = list(dafm.member_names)
    return [*names[:-1], RANDOM] if random_member else names


def _seed_run(
    config: TrainConfig,
    runs: Path,
    members: Sequence[str],
    random_member: bool,
    progress: bool,
    gate_split: str = "train",
    splits: Sequence[str] = TEST_SPLITS,
) -> dict[str, Any]:
    """Train the members and DAFM with `config` (DAFM's gate on `gate_split`); score
    everything; measure the cost. Runs go to `runs/NAME/seed-N`, the layout of `circe bench
    quality`, so that the members of a fusion are the very runs of the quality table."""
    seed = f"seed-{config.seed}"
    paths, train_seconds = [], {}
    for name in members:
        results = trained(replace(config, method=name), runs / name / seed, progress)
        paths.append(str(runs / name / seed / "best"))
        train_seconds[name] = results["train_seconds"]
    if random_member:
        paths.append(str(write_random_member(paths[0], runs / RANDOM / seed, config.seed)))
    fused = replace(
        config,
        method="dafm",
        method_config={"members": paths},
        train_split=gate_split,
        test_splits=[],  # the bench scores DAFM itself, from the members' embeddings
        # A gate trained on the validation split is not selected on it too: its last epoch.
        eval_every=0 if gate_split == config.eval_split else config.eval_every,
    )
    # One DAFM run per member set and gate split, beside the members it fuses.
    fused_dir = (
        runs / f"dafm-{'+'.join([*members, *[RANDOM] * random_member])}-gate-{gate_split}" / seed
    )
    results = trained(fused, fused_dir, progress)
    train_seconds["dafm"] = results["train_seconds"]
    # The first design, trained on the same members and split: the ablation of the new one.
    first_dir = fused_dir.parent.with_name(f"{FIRST_DESIGN}{fused_dir.parent.name[4:]}") / seed
    train_seconds[FIRST_DESIGN] = trained(replace(fused, method=FIRST_DESIGN), first_dir, progress)[
        "train_seconds"
    ]
    dafm = load_trained_method(fused_dir / "best")
    first = load_trained_method(first_dir / "best")
    equal = create_method("dafm-equal", dafm.backbone, members=paths)
    labels = _labels(dafm, random_member)
    run: dict[str, Any] = {
        "seed": config.seed,
        "train_seconds": train_seconds,
        "dafm_best_epoch": results["best_epoch"],
        "metrics": {},
        "mean_gate_weights": {},
    }
    batch, workers = config.eval_batch_size, config.workers

    def member_embeddings(split: CIRSplit) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member once, as `circe eval` encodes it: [Q, ΣD] and [N, ΣD], side by side."""
        queries = [encode_queries(m, split.queries, split, batch, workers) for m in dafm.members]
        gallery = [encode_gallery(m, split, batch, workers) for m in dafm.members]
        return torch.cat(queries, -1), torch.cat(gallery, -1)

    tuning = load_split(config.dataset, config.root, config.eval_split)
    static = _static_weights(dafm, tuning, *member_embeddings(tuning), config.dataset)
    run["static_weights"] = dict(zip(labels, static.tolist(), strict=True))
    for split_name in splits:
        split = load_split(config.dataset, config.root, split_name)
        queries, gallery = member_embeddings(split)
        scores = _fusion_scores(dafm, first, equal, static, split, queries, gallery, labels)
        run["metrics"][split_name] = {
            name: _recalls(s, split, config.dataset) for name, s in scores.items()
        }
        with torch.no_grad():
            weights = dafm.member_weights(queries).mean(0).tolist()  # [M]
        run["mean_gate_weights"][split_name] = dict(zip(labels, weights, strict=True))
        if split_name == splits[0]:
            run["cost"] = _cost(dafm, labels, split, gallery)
    return run


def _weighted(member_scores: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_m weights[:, m] · member_scores[m]: `[Q, N]` from M `[Q, N]` and `[Q, M]`."""
    return sum(w[:, None] * s for w, s in zip(weights.T, member_scores, strict=True))


@torch.no_grad()
def _static_weights(
    dafm: DAFM, split: CIRSplit, queries: torch.Tensor, gallery: torch.Tensor, dataset: str
) -> torch.Tensor:
    """The fixed member weights `[M]` (on z-scored cosines, with DAFM's pool) that score
    best on `split` (the training config's validation split, never a test split) by the mean
    of R@1, R@10 and R@50, searched on `simplex_grid`."""
    member_scores = [q @ g.T for q, g in zip(dafm.split(queries), dafm.split(gallery), strict=True)]
    scales = dafm.member_scales(dafm.pool_cosines(queries))  # [Q, M]
    best, best_score = None, -math.inf
    for grid_point in simplex_grid(len(member_scores)):
        weights = torch.tensor(grid_point)
        recalls = _recalls(_weighted(member_scores, scales * weights), split, dataset)
        score = statistics.fmean(recalls[f"R@{k}"] for k in TABLE_KS)
        if score > best_score:
            best, best_score = weights, score
    return best


@torch.no_grad()
def _fusion_scores(
    dafm: DAFM,
    first: DAFM,
    equal: DAFM,
    static: torch.Tensor,
    split: CIRSplit,
    queries: torch.Tensor,
    gallery: torch.Tensor,
    labels: list[str],
) -> dict[str, torch.Tensor]:
    """`[Q, N]` scores of every member and every fusion, from the members' embeddings, each
    fusion through its own functions (the trained ones exactly as their raw-input encoders)."""
    member_scores = [q @ g.T for q, g in zip(dafm.split(queries), dafm.split(gallery), strict=True)]
    scores = dict(zip(labels, member_scores, strict=True))
    _, exclude = masks(split, split.queries)
    scales = dafm.member_scales(dafm.pool_cosines(queries))  # [Q, M] 1/σ_m(q)
    scores[EQUAL] = (
        equal.encode_queries_from_features(queries) @ equal.encode_targets_from_features(gallery).T
    )
    scores[EQUAL_Z] = _weighted(member_scores, scales / len(member_scores))
    scores[STATIC_Z] = _weighted(member_scores, scales * static)
    scores[CASCADE] = cascade_scores(member_scores, exclude)
    scores[CASCADE_REVERSED] = cascade_scores(member_scores[::-1], exclude)
    for name, model in ((FIRST_DESIGN, first), (DAFM_NAME, dafm)):
        fused_queries = model.encode_queries_from_features(queries)
        scores[name] = fused_queries @ model.encode_targets_from_features(gallery).T
    return scores


def _cost(dafm: DAFM, labels: list[str], split: CIRSplit, gallery: torch.Tensor) -> dict:
    """Latency and memory of each member and of DAFM; `gallery`: the members' `[N, ΣD]`."""
    models = dict(zip(labels, dafm.members, strict=True))
    galleries = dict(zip(labels, dafm.split(gallery), strict=True))
    models["dafm"], galleries["dafm"] = dafm, dafm.encode_targets_from_features(gallery)
    return {
        label: {
            "query_ms": _query_latency_ms(model, split, galleries[label]),
            "weight_bytes": _weight_bytes(model),
            "index_bytes_per_image": galleries[label].shape[1] * 4,  # float32 vectors
        }
        for label, model in models.items()
    }


def fusion(
    base: TrainConfig,
    out_dir: Path,
    seeds: Sequence[int] = (0, 1, 2),
    members: Sequence[str] = DEFAULT_MEMBERS,
    random_member: bool = False,
    command: str = "circe bench fusion",
    progress: bool = True,
    runs_dir: Path | None = None,
    gate_split: str = "train",
    splits: Sequence[str] = TEST_SPLITS,
) -> dict[str, Any]:
    """DAFM over `members` (plus a random one) against each member and its baselines (equal
    weights raw and z-scored, static weights searched on the config's `eval_split`, the
    cascade in both orders, DAFM's first design), over seeds, scored on `splits` (CIRR:
    `val`, with both readings of its "Rmean"). DAFM's gate is trained on `gate_split`: `train` (the members' own training pairs)
    or a split the members never saw (`val`: stacking; then trained for the config's epochs,
    without selection). Training runs are kept in `runs_dir/METHOD/seed-N` when given (the
    layout of `circe bench quality`: finished runs reused, interrupted ones continued). Writes `fusion.json` and `fusion.md` in
    `out_dir`; returns the record."""
    if len(members) + random_member < 2:
        raise ValueError("fusion needs at least two members (or one and --random-member)")
    # Members are trained exactly as `circe bench quality` trains them (same splits scored),
    # so a runs directory shared with it serves both.
    base = replace(
        base, test_splits=list(REPORT_SPLITS if tuple(splits) == TEST_SPLITS else splits)
    )
    with tempfile.TemporaryDirectory(prefix="circe-fusion-") as scratch:
        runs = [
            _seed_run(
                replace(base, seed=seed),
                Path(runs_dir or scratch),
                members,
                random_member,
                progress,
                gate_split,
                splits,
            )
            for seed in seeds
        ]
    record: dict[str, Any] = {
        "command": command,
        "dataset": base.dataset,
        "root": base.root,
        "backbone": base.backbone,
        "seeds": list(seeds),
        "members": [*members, *([RANDOM] if random_member else [])],
        "gate_split": gate_split,
        "splits": list(splits),
        "train_config": base.to_dict(),
        "machine": machine(),
        "summary": _summarise(runs, splits),
        "runs": runs,
    }
    write_record(Path(out_dir), "fusion", record, fusion_markdown(record))
    return record


def _summarise(runs: list[dict[str, Any]], splits: Sequence[str]) -> dict[str, Any]:
    """Means and spreads over seeds, the best single member per split, and the verdicts."""
    first = runs[0]
    models = list(first["metrics"][splits[0]])
    members = [m for m in models if m not in FUSIONS]
    summary: dict[str, Any] = {"metrics": {}, "mean_gate_weights": {}, "best_member": {}}
    for split in splits:
        summary["metrics"][split] = {
            model: {
                metric: over_seeds([run["metrics"][split][model][metric] for run in runs])
                for metric in first["metrics"][split][model]
            }
            for model in models
        }
        summary["mean_gate_weights"][split] = {
            member: statistics.fmean(run["mean_gate_weights"][split][member] for run in runs)
            for member in members
        }
        r1 = {m: summary["metrics"][split][m]["R@1"]["mean"] for m in models}
        best = max(members, key=r1.get)
        summary["best_member"][split] = {
            "member": best,
            "dafm_minus_best_member_R@1": r1["dafm"] - r1[best],
            "dafm_minus_equal_R@1": r1["dafm"] - r1[EQUAL],
            "dafm_minus_static_R@1": r1["dafm"] - r1[STATIC_Z],
        }
    summary["static_weights"] = {
        member: statistics.fmean(run["static_weights"][member] for run in runs)
        for member in members
    }
    summary["cost"] = {
        model: {
            key: statistics.fmean(run["cost"][model][key] for run in runs)
            for key in first["cost"][model]
        }
        for model in first["cost"]
    }
    summary["train_seconds"] = {
        name: statistics.fmean(run["train_seconds"][name] for run in runs)
        for name in first["train_seconds"]
    }
    return summary


# CIRR's "Rmean", read both ways: the benchmark's Avg and the mean of all seven recalls.
RMEAN_COLUMNS = {"Avg": "Rmean = (R@5 + Rsubset@1) / 2", "Mean7": "Rmean = mean of the 7"}


def fusion_markdown(record: dict[str, Any]) -> str:
    summary = record["summary"]
    metrics = summary["metrics"]
    splits = record.get("splits", TEST_SPLITS)
    first_row = next(iter(metrics[splits[0]].values()))
    columns = [f"R@{k}" for k in TABLE_KS] + [c for c in RMEAN_COLUMNS if c in first_row]
    header = ["model"] + [f"{split} {RMEAN_COLUMNS.get(c, c)}" for split in splits for c in columns]
    header += [f"mean gate weight ({splits[0]})", "static weight (val)"]
    lines = [
        "# DAFM: dynamic adaptive fusion of trained methods",
        "",
        (
            f"Generated by `{record['command']}` from `fusion.json`; data set "
            f"`{record['dataset']}`, backbone `{record['backbone']}`, members "
            f"{', '.join(f'`{m}`' for m in record['members'])}, each trained with the "
            f"`circe bench quality` config; DAFM trained over them with the same config, its "
            f"gate on the `{record['gate_split']}` split. "
            f"Recall in percent, mean ± std over seeds {record['seeds']}. "
            f"`{EQUAL}`: every member's raw cosines weigh 1/M; z-scored: each member's "
            "cosines divided by their spread over DAFM's pool first; static weights: the "
            f"best fixed weights on the validation split ({GRID_STEPS + 1}-step grid), "
            "z-scored; cascade: each member re-ranks the previous one's top "
            f"{'/'.join(map(str, CASCADE_KEEP))}, in the members' order or reversed; "
            f"`{FIRST_DESIGN}`: raw cosines and gate statistics over 256 fixed training targets."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    gate = summary["mean_gate_weights"][splits[0]]
    static = summary.get("static_weights", {})
    for model in metrics[splits[0]]:
        cells = [f"`{model}`"]
        for split in splits:
            for column in columns:
                value = metrics[split][model][column]
                cells.append(f"{value['mean']:.1f} ± {value['std']:.1f}")
        cells.append(f"{gate[model]:.3f}" if model in gate else "—")
        cells.append(f"{static[model]:.2f}" if model in static else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Best single member (by mean R@1) and DAFM's R@1 against it and `dafm-equal`:",
        "",
    ]
    for split, best in summary["best_member"].items():
        lines.append(
            f"- `{split}`: best member `{best['member']}`; DAFM's R@1 minus its R@1: "
            f"{best['dafm_minus_best_member_R@1']:+.1f} points; minus `{EQUAL}`'s: "
            f"{best['dafm_minus_equal_R@1']:+.1f}; minus the static weights': "
            f"{best.get('dafm_minus_static_R@1', math.nan):+.1f}."
        )
    cost = summary["cost"]
    members = [m for m in cost if m != "dafm"]
    slowest = max(cost[m]["query_ms"] for m in members)
    lines += [
        "",
        (
            f"## Cost (`{splits[0]}`, {record['machine']['torch_threads']} torch threads, "
            "means over seeds)"
        ),
        "",
        (
            "Query: one raw query (image + text) to the top 10 of the gallery, median over "
            f"{LATENCY_QUERIES} queries. Weights: tensors in memory (a backbone that members "
            "share counted once). Index: float32 bytes per gallery image."
        ),
        "",
        "| model | query ms | weights MB | index bytes / image |",
        "|---|---|---|---|",
    ]
    for model, values in cost.items():
        lines.append(
            f"| `{model}` | {values['query_ms']:.2f} | {values['weight_bytes'] / 2**20:.1f} | "
            f"{values['index_bytes_per_image']:.0f} |"
        )
    total_ms = sum(cost[m]["query_ms"] for m in members)
    total_bytes = sum(cost[m]["weight_bytes"] for m in members)
    lines += [
        "",
        (
            f"DAFM's query costs {cost['dafm']['query_ms'] / slowest:.2f}x its slowest member "
            f"and {cost['dafm']['query_ms'] / total_ms:.2f}x all members run one after another; "
            f"its weights are {cost['dafm']['weight_bytes'] / total_bytes:.2f}x the members' "
            "loaded separately."
        ),
        "",
        "Training seconds (optimizer steps, mean over seeds): "
        + ", ".join(f"`{name}` {s:.1f}" for name, s in summary["train_seconds"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"

"""Why are FAR-Net's move queries worse than the Combiner's? A linear probe of the queries.

A move query asks for the reference scene with one object in another cell of the 3x3 grid.
For each trained run given, this encodes the move queries of `train`, `val` and
`test_phrasing` as the method composes them, and fits a ridge probe from the composed query
to the *target's* occupancy (which cells hold an object) on `train`, the ridge strength
chosen on `val`; it reports on `test_phrasing`:

- R@1 on the move queries (the split's own protocol, reference excluded);
- cell accuracy of the probe over all nine cells;
- accuracy on the two cells the move changes (the cell the object leaves and the one it
  enters): what a query must get right to find the target rather than the reference;
- of the misses (top-1 not a target): the share whose top-1 has the target's objects in
  other cells (the move itself missed), the share with the target's layout but other
  objects, and the share that is another edit of the same reference (the target of another
  query on it: the query did not carry which change was asked for).

Two rows frame the runs: the reference image's own embedding (what a query that ignores the
text holds) and the target's (what a perfect query would hold), both from the default
backbone. A run whose queries hold the changed cells as well as the Combiner's but whose
R@1 is lower fails elsewhere; one that holds them worse loses the move in its fusion.
Writes benchmarks/results/move_probe.{json,md}.

    python benchmarks/move_probe.py --run combiner=runs/main/combiner/seed-0 \
        --run far-net=runs/main/far-net/seed-0
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from position_probe import RIDGE, ridge
from probe_runs import parse_runs, publish

from circe.backbones import load_backbone
from circe.data.render import GRID
from circe.eval.evaluate import encode_gallery, encode_queries, masks
from circe.eval.metrics import recall_at_k
from circe.methods.checkpoint import load_trained_method
from circe.train.data import load_split

SPLITS = ("train", "val", "test_phrasing")
KIND = "move"


def occupancy(scenes: dict, image_ids: list[str]) -> torch.Tensor:
    """`[N, 9]` 1 where the image's scene has an object in the cell."""
    cells = torch.zeros(len(image_ids), GRID * GRID)
    for row, image_id in enumerate(image_ids):
        for obj in scenes[image_id]:
            cells[row, obj["cell"]] = 1
    return cells


def objects(scene: list[dict]) -> list[tuple]:
    return sorted((o["shape"], o["colour"], o["size"]) for o in scene)


def cells(scene: list[dict]) -> list[int]:
    return sorted(o["cell"] for o in scene)


def misses(scores: torch.Tensor, exclude, queries, split, scenes: dict) -> dict:
    """Of the queries whose top-1 is not a target, the share (%) whose top-1 holds the
    target's objects in other cells (the move missed), the share whose top-1 holds the
    target's layout with other objects (the scene's content lost), and the share whose
    top-1 is the target of another query on the same reference (another edit of it)."""
    top = scores.masked_fill(exclude, -torch.inf).argmax(dim=-1).tolist()
    wrong = [(q, split.gallery.ids[t]) for q, t in zip(queries, top, strict=True)]
    wrong = [(q, found) for q, found in wrong if found not in q.target_ids]
    if not wrong:
        return {"misses": 0}
    edits: dict[str, set] = {}
    for query in split.queries:
        edits.setdefault(query.reference_id, set()).update(query.target_ids)
    other_edit = sum(found in edits[q.reference_id] for q, found in wrong)
    target = [scenes[q.target_ids[0]] for q, _ in wrong]
    found = [scenes[f] for _, f in wrong]
    pairs = list(zip(target, found, strict=True))
    same_objects = sum(objects(t) == objects(f) for t, f in pairs)
    same_cells = sum(cells(t) == cells(f) and objects(t) != objects(f) for t, f in pairs)
    return {
        "misses": len(wrong),
        "right_objects_wrong_cells": 100 * same_objects / len(wrong),
        "right_cells_wrong_objects": 100 * same_cells / len(wrong),
        "another_edit_of_the_reference": 100 * other_edit / len(wrong),
    }


def probe_scores(weights: torch.Tensor, x: torch.Tensor, target: torch.Tensor, changed) -> dict:
    predicted = (torch.cat([x, torch.ones(len(x), 1)], 1).double() @ weights > 0.5).float()
    right = predicted == target
    return {
        "cell_accuracy": 100 * right.float().mean().item(),
        "changed_cell_accuracy": 100 * right[changed].float().mean().item(),
    }


def fit_probe(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], changed: dict) -> dict:
    """Ridge from standardised `x` to the target occupancy `y`, strength chosen on val."""
    mean, std = x["train"].mean(0), x["train"].std(0) + 1e-6
    standard = {split: (rows - mean) / std for split, rows in x.items()}
    fits = {s: ridge(standard["train"], y["train"], s) for s in RIDGE}

    def on(split: str, strength: float) -> dict:
        return probe_scores(fits[strength], standard[split], y[split], changed[split])

    best = max(RIDGE, key=lambda s: on("val", s)["changed_cell_accuracy"])
    return {"ridge": best, **on("test_phrasing", best)}


def main() -> None:
    args = parse_runs(__doc__.split("\n\n")[0])
    torch.set_num_threads(1)
    scenes = json.loads((Path(args.root) / "annotations.json").read_text())["scenes"]
    splits = {name: load_split("synthetic", args.root, name) for name in SPLITS}
    moves = {name: [q for q in s.queries if KIND in q.tags] for name, s in splits.items()}
    targets = {n: occupancy(scenes, [q.target_ids[0] for q in m]) for n, m in moves.items()}
    references = {n: occupancy(scenes, [q.reference_id for q in m]) for n, m in moves.items()}
    changed = {n: targets[n] != references[n] for n in SPLITS}  # the two cells of each move

    backbone = load_backbone("default")

    @torch.no_grad()
    def image_rows(ids_of) -> dict[str, torch.Tensor]:
        rows = {}
        for name, queries in moves.items():
            gallery = splits[name].gallery
            pixels = [backbone.preprocess(gallery.open(ids_of(q))) for q in queries]
            rows[name] = F.normalize(backbone.encode_image(torch.stack(pixels)), dim=-1)
        return rows

    rows = {
        "reference image (no text)": {
            "probe": fit_probe(image_rows(lambda q: q.reference_id), targets, changed)
        },
        "target image (a perfect query)": {
            "probe": fit_probe(image_rows(lambda q: q.target_ids[0]), targets, changed)
        },
    }
    for label, run in args.runs:
        method = load_trained_method(run / "best")
        queries = {
            name: encode_queries(method, moves[name], splits[name], args.batch_size)
            for name in SPLITS
        }
        test = splits["test_phrasing"]
        gallery = encode_gallery(method, test, args.batch_size)
        target_mask, exclude = masks(test, moves["test_phrasing"])
        scores = queries["test_phrasing"] @ gallery.T
        recall = recall_at_k(scores, target_mask, (1, 10), exclude)
        rows[label] = {
            "run": str(run),
            "move_R@1": recall[1],
            "move_R@10": recall[10],
            **misses(scores, exclude, moves["test_phrasing"], test, scenes),
            "probe": fit_probe(queries, targets, changed),
        }
    record = {
        "command": args.command,
        "move_queries": {name: len(m) for name, m in moves.items()},
        "rows": rows,
    }
    lines = [
        "# Move queries: what the composed query knows of the target's layout",
        "",
        (
            f"Generated by `{record['command']}`. Ridge probe from each query (or image "
            "embedding) to the target's 3x3 occupancy, fit on the `train` move queries "
            f"({record['move_queries']['train']}), strength chosen on `val`, reported on the "
            f"{record['move_queries']['test_phrasing']} `test_phrasing` move queries. "
            "Changed cells: the cell the object leaves and the one it enters (a copy of the "
            "reference's layout gets 0 % there)."
        ),
        "",
        (
            "| query | move R@1 | move R@10 | misses: right objects, wrong cells | misses: right "
            "cells, wrong objects | misses: another edit of the reference | cell accuracy | "
            "changed-cell accuracy |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        recall = (
            f"{row['move_R@1']:.1f} | {row['move_R@10']:.1f} | "
            f"{row['right_objects_wrong_cells']:.0f} % | {row['right_cells_wrong_objects']:.0f} % | "
            f"{row['another_edit_of_the_reference']:.0f} %"
            if "move_R@1" in row
            else "— | — | — | — | —"
        )
        probe = row["probe"]
        lines.append(
            f"| {label} | {recall} | {probe['cell_accuracy']:.1f} | "
            f"{probe['changed_cell_accuracy']:.1f} |"
        )
    publish(args.out, "move_probe", record, lines)


if __name__ == "__main__":
    main()

"""Where does a frozen backbone keep where objects are? A linear probe for FAR-Net's moves.

FAR-Net's ESAM pools image patch tokens by attention; a move query needs the object's cell.
An attention-weighted mean of token *contents* can only say where an object is if the
contents themselves say it (the mean forgets which slot a token sat in). For the gallery
images of the synthetic benchmark, with the backbone alone, this fits a ridge probe from
several image features to the 3x3 grid's occupancy (which cells hold an object) on `train`
images, the ridge strength chosen on `val`, and reports on `test` images:

- pooled: the backbone's pooled image embedding (what the Combiner reads);
- class token: the first of the image tokens;
- mean of patch tokens: what any slot-blind pooling of the patches keeps;
- patch tokens in place: the patches concatenated in grid order (the slots kept).

Metric: per-cell accuracy (chance: predicting each cell's majority) and the share of images
with all nine cells right. One more probe asks whether a single patch token's content says
which slot it sat in (accuracy over the patch slots): if so, an attention that picks an
object's tokens carries its place along; if not, the place is only in the layout. Writes benchmarks/results/position_probe.{json,md}.

    python benchmarks/position_probe.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from circe.backbones import load_backbone
from circe.data.render import GRID
from circe.train.data import load_split

OUT = Path(__file__).resolve().parent / "results"
RIDGE = (0.1, 1.0, 10.0, 100.0, 1000.0)
FEATURES = ("pooled", "class token", "mean of patch tokens", "patch tokens in place")


@torch.no_grad()
def features(
    backbone, split, scenes: dict, batch: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every feature of FEATURES `[N, F]` and the occupancy `[N, cells]` of the split's images."""
    ids = split.gallery.ids
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    for start in range(0, len(ids), batch):
        images = [split.gallery.open(i) for i in ids[start : start + batch]]
        pixels = torch.stack([backbone.preprocess(image) for image in images])
        pooled, tokens, _ = backbone.encode_image(pixels.to(backbone.device), tokens=True)
        patches = tokens[:, 1:].float()
        rows["pooled"].append(pooled.float().cpu())
        rows["class token"].append(tokens[:, 0].float().cpu())
        rows["mean of patch tokens"].append(patches.mean(1).cpu())
        rows["patch tokens in place"].append(patches.flatten(1).cpu())
    occupancy = torch.zeros(len(ids), GRID * GRID)
    for row, image_id in enumerate(ids):
        for obj in scenes[image_id]:
            occupancy[row, obj["cell"]] = 1
    return {name: torch.cat(parts) for name, parts in rows.items()}, occupancy


def ridge(x: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
    """Weights `[F + 1, C]` of min ‖[x 1] W - y‖² + strength ‖W‖², in the dual when N < F."""
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    y = y.double()
    if len(x) < x.shape[1]:
        gram = x @ x.T + strength * torch.eye(len(x), dtype=x.dtype)
        return x.T @ torch.linalg.solve(gram, y)
    gram = x.T @ x + strength * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(gram, x.T @ y)


def scores(weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    predicted = torch.cat([x, torch.ones(len(x), 1)], dim=1).double() @ weights > 0.5
    right = predicted == y.bool()
    return {
        "cell_accuracy": 100 * right.float().mean().item(),
        "all_cells_right": 100 * right.all(dim=1).float().mean().item(),
    }


def slot_accuracy(train: dict, test: dict, slots: int) -> float:
    """% of `test` patch tokens whose slot a ridge probe on `train` tokens names right."""

    def tokens(x: dict) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x["patch tokens in place"]
        per_token = flat.reshape(len(flat) * slots, -1)  # [N * slots, W], slot-major per image
        return per_token, torch.arange(slots).repeat(len(flat))

    x_train, slot_train = tokens(train)
    x_test, slot_test = tokens(test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    weights = ridge((x_train - mean) / std, torch.eye(slots)[slot_train], 1.0)
    x_test = torch.cat([(x_test - mean) / std, torch.ones(len(x_test), 1)], dim=1).double()
    return 100 * ((x_test @ weights).argmax(1) == slot_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    backbone = load_backbone("default")
    # The scene of every image (its objects and their cells) from the benchmark's annotations.
    scenes = json.loads((Path(args.root) / "annotations.json").read_text())["scenes"]
    data = {
        name: features(backbone, load_split("synthetic", args.root, name), scenes, args.batch_size)
        for name in ("train", "val", "test")
    }
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data.values()
    majority = (y_train.mean(0) > 0.5).float().expand_as(y_test)
    chance = 100 * (majority == y_test).float().mean().item()
    results = {}
    for name in FEATURES:
        mean, std = x_train[name].mean(0), x_train[name].std(0) + 1e-6
        standard = {
            split: (x[name] - mean) / std for split, x in zip(data, (x_train, x_val, x_test))
        }
        fits = {s: ridge(standard["train"], y_train, s) for s in RIDGE}
        best = max(RIDGE, key=lambda s: scores(fits[s], standard["val"], y_val)["cell_accuracy"])
        results[name] = {"ridge": best, **scores(fits[best], standard["test"], y_test)}
    slots = x_train["patch tokens in place"].shape[1] // x_train["mean of patch tokens"].shape[1]
    own_slot = slot_accuracy(x_train, x_test, slots)
    record = {
        "token_own_slot_accuracy": own_slot,
        "slots": slots,
        "backbone": backbone.identity.short(),
        "chance_cell_accuracy": chance,
        "probes": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "position_probe.json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Where a frozen backbone keeps object positions (linear probe)",
        "",
        (
            f"Generated by `python benchmarks/position_probe.py`; backbone `{record['backbone']}`. "
            "Ridge probe from each feature to the 3x3 occupancy, fit on `train` gallery images, "
            f"strength chosen on `val`, scored on `test` images. Chance (each cell's majority): "
            f"{chance:.1f} % of cells."
        ),
        "",
        "| feature | cells right (%) | images with all 9 cells right (%) |",
        "|---|---|---|",
    ]
    for name, values in results.items():
        lines.append(
            f"| {name} | {values['cell_accuracy']:.1f} | {values['all_cells_right']:.1f} |"
        )
    lines += [
        "",
        (
            f"A single patch token's own slot, read from its content by a ridge probe over the {slots} "
            f"slots: {own_slot:.1f} % right on `test` images (chance {100 / slots:.1f} %)."
        ),
    ]
    (args.out / "position_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Tiny copies of the real benchmarks, written in each data set's own published layout.

Every writer returns the root it filled. Images are 8x8 solid colours (a different colour per
image, so a backbone tells them apart); records follow the published formats field for field.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def image(path: Path, n: int) -> None:
    """A small solid-colour image, colour `n`, in the format the suffix says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((n * 53) % 256, (n * 97) % 256, (n * 151) % 256)
    Image.new("RGB", (8, 8), colour).save(path)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- FashionIQ

FIQ_CATEGORIES = ("dress", "shirt", "toptee")


def write_fashioniq(root: Path) -> Path:
    """Per category: val images X1..X5 (X5 is in no query), queries X1->X2 and X3->X4;
    one train pair, one test query. X2 is a jpg, the others png."""
    for c, category in enumerate(FIQ_CATEGORIES):
        p = category[0].upper()
        val = [f"{p}{i}" for i in range(1, 6)]
        write_json(root / "image_splits" / f"split.{category}.val.json", val)
        write_json(
            root / "captions" / f"cap.{category}.val.json",
            [
                {"target": f"{p}2", "candidate": f"{p}1", "captions": [" is Red.", "longer,"]},
                {"target": f"{p}4", "candidate": f"{p}3", "captions": ["yello, shiny!", "short"]},
            ],
        )
        write_json(root / "image_splits" / f"split.{category}.train.json", [f"{p}7", f"{p}8"])
        write_json(
            root / "captions" / f"cap.{category}.train.json",
            [{"target": f"{p}8", "candidate": f"{p}7", "captions": ["a", "b"]}],
        )
        write_json(root / "image_splits" / f"split.{category}.test.json", [f"{p}9"])
        write_json(
            root / "captions" / f"cap.{category}.test.json",
            [{"candidate": f"{p}9", "captions": ["c", "d"]}],
        )
        write_json(root / "captions" / f"correction_dict_{category}.json", {"yello": "yellow"})
        for i, asin in enumerate([*val, f"{p}7", f"{p}8", f"{p}9"]):
            suffix = ".jpg" if asin.endswith("2") else ".png"
            image(root / "images" / f"{asin}{suffix}", 10 * c + i)
    return root


# ----------------------------------------------------------------------------- CIRR


def cirr_record(pairid: int, reference: str, target: str | None, members: list[str]) -> dict:
    record = {
        "pairid": pairid,
        "reference": reference,
        "caption": f"caption {pairid}",
        "img_set": {"id": pairid, "members": members, "reference_rank": 0},
    }
    if target is not None:
        record |= {"target_hard": target, "target_soft": {target: 1.0}}
        record["img_set"]["target_rank"] = 1
    return record


def write_cirr(root: Path, test_images: int = 56) -> Path:
    """CLIP4Cir's layout (annotations in cirr/). val: dev-0..dev-7, 3 pairs (dev-7 is in no
    query); test1: `test_images` images, 3 pairs; train: one pair in numbered sub-folders."""
    dev = [f"dev-{i}" for i in range(8)]
    write_json(root / "cirr/image_splits/split.rc2.val.json", {n: f"./dev/{n}.png" for n in dev})
    write_json(
        root / "cirr/captions/cap.rc2.val.json",
        [
            cirr_record(
                10, "dev-0", "dev-1", ["dev-0", "dev-1", "dev-2", "dev-3", "dev-4", "dev-5"]
            ),
            cirr_record(
                11, "dev-2", "dev-3", ["dev-2", "dev-3", "dev-0", "dev-1", "dev-4", "dev-6"]
            ),
            cirr_record(
                12, "dev-4", "dev-6", ["dev-4", "dev-6", "dev-5", "dev-0", "dev-1", "dev-2"]
            ),
        ],
    )
    test = [f"test1-{i}" for i in range(test_images)]
    write_json(
        root / "cirr/image_splits/split.rc2.test1.json", {n: f"./test1/{n}.png" for n in test}
    )
    write_json(
        root / "cirr/captions/cap.rc2.test1.json",
        [cirr_record(100 + q, test[q], None, test[q : q + 6]) for q in range(3)],
    )
    train = {f"train-{i}": f"./train/{i % 2}/train-{i}.png" for i in range(3)}
    write_json(root / "cirr/image_splits/split.rc2.train.json", train)
    write_json(
        root / "cirr/captions/cap.rc2.train.json",
        [cirr_record(1, "train-0", "train-1", ["train-0", "train-1", "train-2"])],
    )
    for n, relative in enumerate(
        [*(f"dev/{i}.png" for i in dev), *(f"test1/{i}.png" for i in test), *train.values()]
    ):
        image(root / relative, n)
    return root


# ----------------------------------------------------------------------------- CIRCO


def write_circo(root: Path, images: int = 55) -> Path:
    """COCO ids 1..`images`; val: 2 queries; test: 3 queries (ids 0, 1, 2)."""
    coco = root / "COCO2017_unlabeled"
    infos = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(1, images + 1)]
    write_json(coco / "annotations" / "image_info_unlabeled2017.json", {"images": infos})
    for info in infos:
        image(coco / "unlabeled2017" / info["file_name"], info["id"])
    write_json(
        root / "annotations" / "val.json",
        [
            {
                "reference_img_id": 1,
                "target_img_id": 2,
                "relative_caption": "has two dogs",
                "shared_concept": "a dog",
                "gt_img_ids": [2, 3, 4],
                "id": 0,
                "semantic_aspects": ["cardinality", "addition"],
            },
            {
                "reference_img_id": 5,
                "target_img_id": 6,
                "relative_caption": "is at night",
                "shared_concept": "a street",
                "gt_img_ids": [6],
                "id": 1,
                "semantic_aspects": ["cardinality"],
            },
        ],
    )
    write_json(
        root / "annotations" / "test.json",
        [
            {"reference_img_id": 7 + q, "relative_caption": "x", "shared_concept": "y", "id": q}
            for q in range(3)
        ],
    )
    return root


# ----------------------------------------------------------------------------- Shoes


def write_shoes(root: Path) -> Path:
    """6 images in two womens_* folders; eval: 1, 2, 3; train: 4, 5, 6 (6 in no pair)."""
    names = [f"img_womens_boots_{i}.jpg" for i in range(1, 4)]
    names += [f"img_womens_clogs_{i}.jpg" for i in range(4, 7)]
    for n, name in enumerate(names):
        kind = name.split("_")[2]
        image(root / f"womens_{kind}" / str(n % 2) / name, n)
    (root / "eval_im_names.txt").write_text("\n".join(names[:3]) + "\n")
    (root / "train_im_names.txt").write_text("\n".join(names[3:]) + "\n")
    write_json(
        root / "relative_captions_shoes.json",
        [
            {"ImageName": names[1], "ReferenceImageName": names[0], "RelativeCaption": " is Blak "},
            {"ImageName": names[4], "ReferenceImageName": names[3], "RelativeCaption": "is taller"},
            {"ImageName": names[0], "ReferenceImageName": names[2], "RelativeCaption": "has laces"},
        ],
    )
    write_json(root / "correction_dict_shoes.json", {"blak": "black"})
    return root


# ----------------------------------------------------------------------------- Fashion200K

F200K_TEST = [  # (path, caption)
    ("women/dresses/casual/1/1_0.jpeg", "black sleeveless dress"),
    ("women/dresses/casual/2/2_0.jpeg", "blue sleeveless dress"),
    ("women/dresses/casual/3/3_0.jpeg", "blue sleeveless dress"),
    ("women/dresses/casual/4/4_0.jpeg", "black midi dress"),
    ("women/skirts/mini/5/5_0.jpeg", "red mini skirt"),
]
F200K_TRAIN = [
    ("women/dresses/casual/6/6_0.jpeg", "red lace dress"),
    ("women/dresses/casual/7/7_0.jpeg", "blue lace dress"),
    ("women/dresses/casual/8/8_0.jpeg", "green maxi gown"),
]


def write_fashion200k(root: Path) -> Path:
    """Two label files per split; test queries 1->2 (image 3 shares 2's caption) and 4->1."""
    for split, rows in (("test", F200K_TEST), ("train", F200K_TRAIN)):
        half = len(rows) // 2
        for part, chunk in (("dress", rows[:half]), ("skirt", rows[half:])):
            lines = [f"{path}\t0.{n + 5}\t{caption}\n" for n, (path, caption) in enumerate(chunk)]
            (root / "labels").mkdir(parents=True, exist_ok=True)
            (root / "labels" / f"{part}_{split}_detect_all.txt").write_text("".join(lines))
    for n, (path, _) in enumerate(F200K_TEST + F200K_TRAIN):
        image(root / path, n)
    (root / "test_queries.txt").write_text(
        f"{F200K_TEST[0][0]} {F200K_TEST[1][0]}\n{F200K_TEST[3][0]} {F200K_TEST[0][0]}\n"
    )
    return root


# ----------------------------------------------------------------------------- own images


def write_folder(root: Path) -> Path:
    """Images a/x.png, a/b/y.jpg, z.webp (and a non-image file); queries.csv and other.jsonl."""
    for n, relative in enumerate(["a/x.png", "a/b/y.jpg", "z.webp"]):
        image(root / relative, n)
    (root / "notes.txt").write_text("not an image")
    (root / "queries.csv").write_text(
        "reference,text,target\na/x.png,make it blue,a/b/y.jpg\nz.webp,make it red,a/x.png\n"
    )
    (root / "other.jsonl").write_text(
        json.dumps({"reference": "a/x.png", "text": "t", "target": ["z.webp", "a/b/y.jpg"]})
        + "\n\n"
        + json.dumps({"id": "q7", "reference": "z.webp", "text": "u", "target": "a/x.png"})
        + "\n"
    )
    return root

"""Shoes (Guo et al., "Dialog-based Interactive Image Retrieval", NeurIPS 2018): relative
captions on pairs of shoe images from Berg et al.'s attribute-discovery data set.

Layout under the root (the files of ``dataset/`` in the XiaoxiaoGuo/fashion-retrieval
repository next to the unpacked ``attributedata`` image folders, as DQU-CIR and DWC read it)::

    relative_captions_shoes.json   [{ImageName (target), ReferenceImageName, RelativeCaption}]
    train_im_names.txt             10,000 image names, one a line
    eval_im_names.txt              4,658 image names
    womens_*/<sub>/img_womens_<type>_<n>.jpg

Splits, as DQU-CIR's loader defines them (`src/datasets.py`, class ``Shoes``): a pair belongs
to ``train`` or ``test`` by its *reference* image's list (8,990 / 1,761 pairs); the ``test``
gallery is the 4,658 images of ``eval_im_names.txt``, the reference is removed from its own
ranking, and the metrics are R@1/10/50. Texts are stripped; ``text_cleanup="dqu-cir"``
applies DQU-CIR's spelling corrections (``correction_dict_shoes.json`` at the root). Train
pairs whose target is outside ``train_im_names.txt`` keep it: it joins the train gallery.
"""

from __future__ import annotations

from pathlib import Path

from circe.data import protocol as params
from circe.data.loading import (
    Problems,
    build_split,
    fields,
    known_queries,
    read_json,
    read_lines,
    scan_images,
)
from circe.data.spelling import correct, load_corrections
from circe.data.types import CIRSplit, Gallery, Query

SPLITS = ("train", "test")
LISTS = {"train": "train_im_names.txt", "test": "eval_im_names.txt"}
CLEANUPS = ("none", "dqu-cir")
PRESETS: dict[str, dict[str, object]] = {
    "default": {"text_cleanup": "none"},
    "dqu-cir": {"text_cleanup": "dqu-cir"},
}


def _image_index(root: Path, problems: Problems) -> dict[str, Path]:
    """Image name -> file, over every ``womens_*`` folder; a name found twice is a problem."""
    folders = sorted(p for p in root.glob("womens_*") if p.is_dir())
    if not folders:
        problems.report(f"no womens_* image folders under {root} (unpack attributedata there)")
    index: dict[str, Path] = {}
    for folder in folders:
        for path in scan_images(folder, recursive=True):
            if path.name in index:
                problems.report(f"image name {path.name!r} is both {index[path.name]} and {path}")
            index.setdefault(path.name, path)
    return index


def load_shoes(
    root: Path,
    split: str = "test",
    *,
    text_cleanup: str = "none",
    problems: Problems | None = None,
) -> CIRSplit:
    """One Shoes split, ``train`` or ``test``."""
    root = Path(root)
    problems = problems or Problems()
    params.choice("Shoes split", split, SPLITS)
    params.choice("text_cleanup", text_cleanup, CLEANUPS)
    list_path = root / LISTS[split]
    listed = read_lines(list_path, problems) or []
    captions_path = root / "relative_captions_shoes.json"
    records = read_json(captions_path, list, problems) or []
    corrections = (
        load_corrections(root / "correction_dict_shoes.json", problems)
        if text_cleanup == "dqu-cir"
        else None
    )
    in_split = set(listed)
    queries = []
    for n, record in enumerate(records):
        values = fields(
            record,
            f"{captions_path}: record #{n}",
            problems,
            {"ImageName": str, "ReferenceImageName": str, "RelativeCaption": str},
        )
        if values is None or values["ReferenceImageName"] not in in_split:
            continue
        text = values["RelativeCaption"].strip()
        queries.append(
            Query(
                query_id=str(n),
                reference_id=values["ReferenceImageName"],
                texts=(correct(text, corrections) if corrections is not None else text,),
                target_ids=(values["ImageName"],),
            )
        )
    names = list(listed)
    if split == "train":
        names += [q.target_ids[0] for q in queries if q.target_ids[0] not in in_split]
    images = _image_index(root, problems)
    paths = {}
    for name in dict.fromkeys(names):
        if name in images:
            paths[name] = images[name]
        else:
            source = list_path if name in in_split else captions_path
            problems.report(f"{source}: image {name!r} has no file in the womens_* folders")
    return build_split(
        split,
        known_queries(queries, paths, captions_path, problems),
        Gallery(paths),
        exclude_reference=True,
        protocol={
            "dataset": "shoes",
            "split": split,
            "gallery": f"{list_path.name}" + (" + train pair targets" if split == "train" else ""),
            "pairs": "by reference image (DQU-CIR)",
            **params.record(text_cleanup=text_cleanup),
            "metrics": "R@1,10,50",
        },
    )

"""CIRR (Liu et al., ICCV 2021): real-life NLVR2 images, one modification text per query.

Layout under the root: the annotations of the ``cirr_dataset`` branch of the CIRR repository
either in ``cirr/`` (CLIP4Cir, SPRC, SEARLE) or at the root itself (a plain clone), and the
NLVR2 images where the split files say, relative to the root or to ``img_raw/`` (the official
README)::

    [cirr/]captions/cap.rc2.{train,val,test1}.json
        [{pairid, reference, target_hard, target_soft, caption, img_set: {members, ...}}]
    [cirr/]image_splits/split.rc2.{train,val,test1}.json   {name: "./dev/<name>.png", ...}
    [img_raw/]train/<k>/*.png, dev/*.png, test1/*.png

Images are always found through the split file (``train/`` has numbered sub-folders). The
split file is the retrieval gallery: 2,297 images for val, 2,315 for test1, including the
images that no query uses as its reference. ``test1`` has no targets; it is scored by the
CIRR server from the files `circe.eval.submission` writes.

Protocol (fixed; there are no variants in use): every query ranks the whole split gallery
with its reference image removed; Recall@1/5/10/50 of ``target_hard``; Recall_subset@1/2/3
ranks only the query's ``img_set.members`` (the reference removed, so 5 candidates); the
headline Avg = (R@5 + Recall_subset@1) / 2. ``target_soft`` is not used by these metrics.
"""

from __future__ import annotations

from pathlib import Path

from circe.data.loading import (
    Kind,
    ListOf,
    Problems,
    build_split,
    existing_images,
    fields,
    known_queries,
    read_json,
)
from circe.data.protocol import choice
from circe.data.types import CIRSplit, Gallery, Query

SPLITS = ("train", "val", "test1")
VERSION = "rc2"
ANNOTATIONS = "git clone -b cirr_dataset https://github.com/Cuberick-Orion/CIRR.git"


def _annotation_folder(root: Path) -> Path:
    return root / "cirr" if (root / "cirr" / "captions").is_dir() else root


def _gallery(root: Path, split: str, problems: Problems) -> tuple[dict[str, Path], Path]:
    """The split's images (name -> file) and the split file they come from."""
    split_path = _annotation_folder(root) / "image_splits" / f"split.{VERSION}.{split}.json"
    names = read_json(split_path, dict, problems, hint=ANNOTATIONS) or {}
    base = root / "img_raw" if (root / "img_raw").is_dir() else root
    paths = {}
    for name, relative in names.items():
        if isinstance(relative, str):
            paths[name] = base / relative
        else:
            problems.report(
                f"{split_path}: image {name!r} has path {relative!r}, expected a string"
            )
    return existing_images(paths, split_path, problems), split_path


def load_cirr(root: Path, split: str = "val", *, problems: Problems | None = None) -> CIRSplit:
    """One CIRR split: ``train``, ``val`` or ``test1`` (hidden targets)."""
    root = Path(root)
    problems = problems or Problems()
    choice("CIRR split", split, SPLITS)
    paths, split_path = _gallery(root, split, problems)
    captions_path = _annotation_folder(root) / "captions" / f"cap.{VERSION}.{split}.json"
    records = read_json(captions_path, list, problems, hint=ANNOTATIONS) or []
    required: dict[str, Kind] = {"pairid": int, "reference": str, "caption": str, "img_set": dict}
    if split != "test1":
        required["target_hard"] = str
    queries: list[Query] = []
    seen: set[int] = set()
    for n, record in enumerate(records):
        where = f"{captions_path}: record #{n}"
        values = fields(record, where, problems, required)
        if values is None:
            continue
        members = fields(values["img_set"], f"{where} img_set", problems, {"members": ListOf(str)})
        if members is None:
            continue
        if values["pairid"] in seen:
            problems.report(f"{where} repeats pairid {values['pairid']}")
            continue
        seen.add(values["pairid"])
        target = values.get("target_hard")
        queries.append(
            Query(
                query_id=str(values["pairid"]),
                reference_id=values["reference"],
                texts=(values["caption"],),
                target_ids=(target,) if target else (),
                subset_ids=tuple(members["members"]),
            )
        )
    return build_split(
        split,
        known_queries(queries, paths, captions_path, problems),
        Gallery(paths),
        exclude_reference=True,
        protocol={
            "dataset": "cirr",
            "split": split,
            "version": VERSION,
            "gallery": f"{split_path.name} (the whole split)",
            "subset": "img_set members, reference removed",
            "metrics": "R@1,5,10,50; Recall_subset@1,2,3; Avg = (R@5 + Recall_subset@1) / 2",
        },
    )

"""CIRCO (Baldrati et al., ICCV 2023): COCO images, several ground truths per query.

Layout under the root (the CIRCO repository's README)::

    annotations/{val,test}.json
        [{id, reference_img_id, relative_caption, shared_concept, target_img_id, gt_img_ids,
          semantic_aspects}, ...]   (test: id, reference_img_id, relative_caption,
                                     shared_concept only)
    COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   {"images": [{id, file_name}]}
    COCO2017_unlabeled/unlabeled2017/<file_name>.jpg

The gallery is every image of COCO 2017 unlabeled (about 123K), ids as the decimal COCO id.
The reference is not masked (it is never a ground truth). Metrics: mAP@5/10/25/50 over
``gt_img_ids`` with AP@K divided by min(K, number of ground truths), and Recall@K of
``target_img_id`` alone (the server's `evaluation.py`); queries are tagged with their
``semantic_aspects``, so the per-tag results hold the per-aspect mAP@10. ``test`` has no
ground truths; the server scores the file `circe.eval.submission` writes.

Protocol parameter ``query_template``: how a query's text is built, from ``{relative_caption}``
and ``{shared_concept}``. SEARLE (the CIRCO authors' method) uses the relative caption alone
and ignores the shared concept; MagicLens and BGE-VL write
"find {shared_concept} but {relative_caption}". Numbers with and without the shared concept
are not comparable.
"""

from __future__ import annotations

from pathlib import Path

from circe.data import protocol as params
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
from circe.data.types import CIRSplit, Gallery, Query

SPLITS = ("val", "test")
TEMPLATE_FIELDS = ("relative_caption", "shared_concept")
PRESETS: dict[str, dict[str, object]] = {
    "searle": {"query_template": "{relative_caption}"},
    "magiclens": {"query_template": "find {shared_concept} but {relative_caption}"},
}


def _gallery(root: Path, problems: Problems) -> dict[str, Path]:
    coco = root / "COCO2017_unlabeled"
    info_path = coco / "annotations" / "image_info_unlabeled2017.json"
    info = read_json(info_path, dict, problems, hint="from the COCO 2017 unlabeled annotations")
    if info is None:
        return {}
    images = info.get("images")
    if not isinstance(images, list):
        problems.report(f"{info_path}: lacks the list 'images'")
        return {}
    paths: dict[str, Path] = {}
    for n, record in enumerate(images):
        values = fields(
            record, f"{info_path}: images[{n}]", problems, {"id": int, "file_name": str}
        )
        if values is not None:
            paths[str(values["id"])] = coco / "unlabeled2017" / values["file_name"]
    return existing_images(paths, info_path, problems)


def load_circo(
    root: Path,
    split: str = "val",
    *,
    query_template: str = "{relative_caption}",
    problems: Problems | None = None,
) -> CIRSplit:
    """One CIRCO split, ``val`` or ``test`` (hidden ground truths)."""
    root = Path(root)
    problems = problems or Problems()
    params.choice("CIRCO split", split, SPLITS)
    params.template("query_template", query_template, TEMPLATE_FIELDS)
    paths = _gallery(root, problems)
    annotations_path = root / "annotations" / f"{split}.json"
    records = read_json(annotations_path, list, problems, hint="github.com/miccunifi/CIRCO") or []
    required: dict[str, Kind] = {
        "id": int,
        "reference_img_id": int,
        "relative_caption": str,
        "shared_concept": str,
    }
    if split == "val":
        required |= {"target_img_id": int, "gt_img_ids": ListOf(int)}
    queries = []
    for n, record in enumerate(records):
        where = f"{annotations_path}: record #{n}"
        values = fields(
            record, where, problems, required, optional={"semantic_aspects": ListOf(str)}
        )
        if values is None:
            continue
        ground_truths = [str(i) for i in values.get("gt_img_ids", [])]
        if split == "val" and ground_truths[:1] != [str(values["target_img_id"])]:
            problems.report(f"{where}: gt_img_ids must start with target_img_id")
            continue
        text = query_template.format(
            relative_caption=values["relative_caption"], shared_concept=values["shared_concept"]
        )
        queries.append(
            Query(
                query_id=str(values["id"]),
                reference_id=str(values["reference_img_id"]),
                texts=(text,),
                target_ids=tuple(ground_truths),
                tags=tuple(values.get("semantic_aspects", ())),
            )
        )
    return build_split(
        split,
        known_queries(queries, paths, annotations_path, problems),
        Gallery(paths),
        exclude_reference=False,
        protocol={
            "dataset": "circo",
            "split": split,
            "gallery": "COCO 2017 unlabeled (all images)",
            **params.record(query_template=query_template),
            "metrics": "mAP@5,10,25,50 (AP@K / min(K, #ground truths)); R@K of target_img_id",
        },
    )

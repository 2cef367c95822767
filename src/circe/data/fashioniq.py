"""FashionIQ (Wu et al., CVPR 2021): fashion images and two relative captions per query.

Layout under the root (as in the fashion-iq repository and CLIP4Cir/SPRC's README)::

    captions/cap.{dress,shirt,toptee}.{train,val,test}.json   [{candidate, target, captions}]
    image_splits/split.{dress,shirt,toptee}.{train,val,test}.json   [asin, ...]
    images/<asin>.png or <asin>.jpg   (whichever the mirror has; png is tried first)

Splits: ``dress.val`` (one category) or ``val`` (all three). Scored, ``val`` is three separate
evaluations, one per category with its own gallery, averaged (see `evaluation_parts`);
loaded as one split (for training), it pools the categories. ``test`` has no targets: its
server (CodaLab) is gone, so everyone reports val.

Protocol parameters, all recorded in `CIRSplit.protocol` (presets in `PRESETS`):

* ``gallery``: ``original-split`` ranks against ``image_splits/split.{cat}.val.json`` (3,817 /
  6,346 / 5,373 images; CLIP4Cir, SPRC, SEARLE); ``val-split`` only against the images that
  occur as candidate or target of a val query (2,628 / 3,089 / 2,902; DQU-CIR's default, DWC's
  ``gallery_all=False``). It applies to val; train and test always use their image split.
* ``mask_reference``: remove the query's own image from its ranking (DQU-CIR, DWC) or not
  (CLIP4Cir, SPRC).
* ``caption_join``: ``clip4cir`` strips the characters ``.?, `` from both ends of each
  caption and writes "<Cap1> and <cap2>", where Python's ``str.capitalize`` also lower-cases
  the rest of the first caption, exactly as CLIP4Cir and SPRC do at evaluation; ``and`` is
  "<c1> and <c2>" (DQU-CIR after its clean-up, MagicLens); ``dwc`` is
  "<BOS> <c1> <AND> <c2> <EOS>" (DWC). The order is always the file's. (At training, CLIP4Cir
  and SPRC draw one of "c1 and c2", "c2 and c1", "c1", "c2" with probability 1/4 each per
  sample; circe's loader gives the fixed evaluation form for every split.)
* ``text_cleanup``: ``none`` or ``dqu-cir`` (`circe.data.spelling`; needs DQU-CIR's
  ``captions/correction_dict_{cat}.json``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from circe.data import protocol as params
from circe.data.errors import DatasetWarning
from circe.data.loading import (
    Kind,
    ListOf,
    Problems,
    build_split,
    fields,
    known_queries,
    read_json,
    string_list,
)
from circe.data.spelling import correct, load_corrections
from circe.data.types import CIRSplit, Gallery, Query

CATEGORIES = ("dress", "shirt", "toptee")
PARTS = ("train", "val", "test")
SPLITS = PARTS + tuple(f"{c}.{p}" for c in CATEGORIES for p in PARTS)
GALLERIES = ("original-split", "val-split")
JOINS = ("clip4cir", "and", "dwc")
CLEANUPS = ("none", "dqu-cir")
SOURCE = "from github.com/XiaoxiaoGuo/fashion-iq"
# Extensions tried for an ASIN, in order: the widely shared mirror has png, CLIP4Cir's jpg.
EXTENSIONS = (".png", ".jpg", ".jpeg")

PRESETS: dict[str, dict[str, object]] = {
    "clip4cir": {
        "gallery": "original-split",
        "mask_reference": False,
        "caption_join": "clip4cir",
        "text_cleanup": "none",
    },
    "dqu-cir": {
        "gallery": "val-split",
        "mask_reference": True,
        "caption_join": "and",
        "text_cleanup": "dqu-cir",
    },
    "dwc": {
        "gallery": "val-split",
        "mask_reference": True,
        "caption_join": "dwc",
        "text_cleanup": "none",
    },
}


@dataclass(frozen=True)
class FashionIQProtocol:
    """The variants that make FashionIQ numbers (non-)comparable; see the module docstring."""

    gallery: str = "original-split"
    mask_reference: bool = False
    caption_join: str = "clip4cir"
    text_cleanup: str = "none"

    def __post_init__(self) -> None:
        params.choice("gallery", self.gallery, GALLERIES)
        params.choice("caption_join", self.caption_join, JOINS)
        params.choice("text_cleanup", self.text_cleanup, CLEANUPS)


def evaluation_parts(split: str) -> tuple[str, ...]:
    """The splits scored separately for `split`: each category's, for an all-category split."""
    if "." in split:
        return (split,)
    return tuple(f"{category}.{split}" for category in CATEGORIES)


def join_captions(first: str, second: str, style: str) -> str:
    """The two relative captions as one modification text, in the named style."""
    if style == "clip4cir":
        return f"{first.strip('.?, ').capitalize()} and {second.strip('.?, ')}"
    if style == "and":
        return f"{first} and {second}"
    return f"<BOS> {first} <AND> {second} <EOS>"


def _image_index(folder: Path, problems: Problems) -> dict[str, Path]:
    """ASIN -> image file, for every image in the flat `images/` folder."""
    if not folder.is_dir():
        problems.report(f"missing folder {folder} (FashionIQ images as images/<asin>.png|jpg)")
        return {}
    index: dict[str, Path] = {}
    rank = {suffix: i for i, suffix in enumerate(EXTENSIONS)}
    for path in sorted(folder.iterdir(), key=lambda p: rank.get(p.suffix.lower(), len(rank))):
        if path.suffix.lower() in rank:
            index.setdefault(path.stem, path)
    return index


def _category(
    root: Path,
    category: str,
    part: str,
    protocol: FashionIQProtocol,
    images: dict[str, Path],
    problems: Problems,
) -> tuple[list[Query], dict[str, Path]]:
    """One category's queries and gallery."""
    captions_path = root / "captions" / f"cap.{category}.{part}.json"
    split_path = root / "image_splits" / f"split.{category}.{part}.json"
    records = read_json(captions_path, list, problems, hint=SOURCE) or []
    image_split = string_list(read_json(split_path, list, problems, SOURCE), split_path, problems)
    corrections = (
        load_corrections(root / "captions" / f"correction_dict_{category}.json", problems)
        if protocol.text_cleanup == "dqu-cir"
        else None
    )
    required: dict[str, Kind] = {"candidate": str, "captions": ListOf(str, 2)}
    if part != "test":  # test records have no target
        required["target"] = str
    queries, empty = [], []
    for n, record in enumerate(records):
        values = fields(record, f"{captions_path}: record #{n}", problems, required)
        if values is None:
            continue
        texts = values["captions"]
        if any(not text.strip() for text in texts):
            empty.append(n)
        if corrections is not None:
            texts = [correct(text, corrections) for text in texts]
        target = values.get("target")
        queries.append(
            Query(
                query_id=f"{category}.{part}.{n}",
                reference_id=values["candidate"],
                texts=(join_captions(*texts, protocol.caption_join),),
                target_ids=(target,) if target else (),
                tags=(category,),
            )
        )
    if empty:  # in the published files (16 records): kept, as every paper's loader keeps them
        shown = ", ".join(f"#{n}" for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
        warnings.warn(
            f"{captions_path}: {len(empty)} record(s) with an empty caption ({shown}); kept, "
            "as the published protocol keeps them",
            DatasetWarning,
            stacklevel=2,
        )
    if part == "val" and protocol.gallery == "val-split":
        listed: Sequence[str] = list(
            dict.fromkeys(i for q in queries for i in (q.reference_id, *q.target_ids))
        )
        source = captions_path
    else:
        listed, source = image_split, split_path
    gallery: dict[str, Path] = {}
    for asin in listed:
        if asin in images:
            gallery[asin] = images[asin]
        else:
            problems.report(
                f"{source}: image {asin!r} has no file images/{asin}"
                f"{{{','.join(EXTENSIONS)}}} under {root}"
            )
    return known_queries(queries, gallery, captions_path, problems), gallery


def load_fashioniq(
    root: Path,
    split: str = "val",
    *,
    gallery: str = "original-split",
    mask_reference: bool = False,
    caption_join: str = "clip4cir",
    text_cleanup: str = "none",
    problems: Problems | None = None,
) -> CIRSplit:
    """One FashionIQ split (``dress.val``, or ``val`` for all categories pooled)."""
    root = Path(root)
    problems = problems or Problems()
    params.choice("FashionIQ split", split, SPLITS)
    protocol = FashionIQProtocol(gallery, mask_reference, caption_join, text_cleanup)
    *named, part = split.split(".")
    categories = tuple(named) or CATEGORIES
    images = _image_index(root / "images", problems)
    queries: list[Query] = []
    paths: dict[str, Path] = {}
    for category in categories:
        category_queries, category_gallery = _category(
            root, category, part, protocol, images, problems
        )
        queries += category_queries
        paths.update(category_gallery)
    # The gallery choice is about val; train and test always rank their image split.
    effective = protocol if part == "val" else replace(protocol, gallery="original-split")
    return build_split(
        split,
        queries,
        Gallery(paths),
        exclude_reference=mask_reference,
        protocol={
            "dataset": "fashioniq",
            "split": split,
            "categories": ",".join(categories),
            **params.record(**asdict(effective)),
            "metrics": "R@10, R@50 per category; their means over categories; Avg = mean",
        },
    )

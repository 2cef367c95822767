"""Fashion200K (Han et al., ICCV 2017) as TIRG (Vo et al., CVPR 2019) turned it into a CIR
benchmark: product photos with attribute captions; a query changes one word of its caption.

Layout under the root (the data set's own files plus TIRG's query list)::

    labels/<category>_{train,test}_detect_all.txt   lines "<image path>\\t<score>\\t<caption>"
    test_queries.txt                                 lines "<source path> <target path>"
    women/<category>/<...>/<id>_<n>.jpeg             the images, at the paths of the labels

Split definitions, from TIRG's loader (`datasets.py`, class ``Fashion200k``, which DQU-CIR and
DWC inherit): a split's images are the lines of every ``labels/*`` file whose name holds the
split's name (``dress_test_detect_all.txt``, ...); the ``test`` queries are the lines of ``test_queries.txt``. The
modification text names the first word of the source caption that the target caption lacks
and the first target word the source lacks ("replace black with blue"), built from
``text_template``. Scoring: the gallery is every test image, the query's own image is removed
from its ranking, and a retrieved image is a hit when its caption equals the target's. That
rule is expressed at load time: a query's targets are its target image followed by every
other test image with the same caption.

``train`` has no fixed queries in TIRG (pairs are drawn per step); circe draws one per image
whose caption has a sibling (a caption that differs by one word: both become the same
"parent" caption when one word is dropped), target caption and image picked with
``random.Random(seed)``.

Differences from TIRG, none of which changes the metrics: label files are read in name order
(TIRG: directory order, which only moves ties), a label line repeated for the same image is
read once (the count is recorded as ``repeated_lines``), and texts use the raw caption words
where TIRG escapes ``. ? & *`` into tokens for its own vocabulary.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from circe.data import protocol as params
from circe.data.loading import (
    Problems,
    build_split,
    known_queries,
    read_lines,
)
from circe.data.types import CIRSplit, Gallery, Query

SPLITS = ("train", "test")
TEMPLATE_FIELDS = ("source_word", "target_word", "source_caption", "target_caption")
PRESETS: dict[str, dict[str, object]] = {
    "tirg": {"text_template": "replace {source_word} with {target_word}"},
    # DWC appends the whole target caption to the text.
    "dwc": {"text_template": "replace {source_word} with {target_word} and get {target_caption}"},
}


def different_words(source: str, target: str) -> tuple[str, str]:
    """(first source word not in the target, first target word not in the source); the last
    word stands in where there is none, as TIRG's loop leaves it."""
    source_words, target_words = source.split(), target.split()
    return (
        next((w for w in source_words if w not in target_words), source_words[-1]),
        next((w for w in target_words if w not in source_words), target_words[-1]),
    )


def _read_labels(root: Path, split: str, problems: Problems) -> tuple[dict[str, str], int]:
    """(image path -> caption over the split's label files, number of repeated lines)."""
    label_files = sorted(p for p in (root / "labels").glob(f"*{split}*") if p.is_file())
    if not label_files:
        problems.report(f"no label files {root / 'labels'}/*{split}*")
    captions: dict[str, str] = {}
    repeated = 0
    for label_path in label_files:
        for n, line in enumerate(read_lines(label_path, problems) or [], 1):
            columns = line.split("\t")
            image = columns[0].strip()
            caption = columns[2].strip() if len(columns) >= 3 else ""
            if not caption:
                what = f"is not '<path>\\t<score>\\t<caption>': {line!r}"
            elif image in captions and captions[image] != caption:
                what = (
                    f"gives {image!r} the caption {caption!r}, an earlier line {captions[image]!r}"
                )
            elif not (root / image).is_file():
                what = f"names image {image!r}, which has no file {root / image}"
            else:
                repeated += image in captions
                captions[image] = caption
                continue
            problems.report(f"{label_path}: line {n} {what}")
    return captions, repeated


def _test_queries(
    root: Path, captions: dict[str, str], text_template: str, problems: Problems
) -> list[Query]:
    queries_path = root / "test_queries.txt"
    by_caption: dict[str, list[str]] = defaultdict(list)
    for image, caption in captions.items():
        by_caption[caption].append(image)
    queries = []
    for n, line in enumerate(read_lines(queries_path, problems, hint="from TIRG") or []):
        pair = line.split()
        missing = [p for p in pair if p not in captions]
        if len(pair) != 2 or missing:
            what = f"names {missing[0]!r}, not a test image" if missing else "is not 2 paths"
            problems.report(f"{queries_path}: line {n + 1} {what}: {line!r}")
            continue
        source, target = pair
        source_word, target_word = different_words(captions[source], captions[target])
        text = text_template.format(
            source_word=source_word,
            target_word=target_word,
            source_caption=captions[source],
            target_caption=captions[target],
        )
        same_caption = [i for i in by_caption[captions[target]] if i != target]
        queries.append(Query(str(n), source, (text,), (target, *same_caption)))
    return queries


def _training_queries(captions: dict[str, str], text_template: str, seed: int) -> list[Query]:
    """One query per image whose caption has a one-word-different sibling caption."""
    by_caption: dict[str, list[str]] = defaultdict(list)
    for image, caption in captions.items():
        by_caption[caption].append(image)
    # Ordered sets (dicts): a caption with a repeated word has the same parent twice.
    children: dict[str, dict[str, None]] = defaultdict(dict)  # parent caption -> its captions
    for caption in by_caption:
        words = caption.split()
        for i in range(len(words)):
            children[" ".join(words[:i] + words[i + 1 :])][caption] = None
    siblings: dict[str, dict[str, None]] = defaultdict(dict)
    for family in children.values():
        for caption in family:
            siblings[caption].update((c, None) for c in family if c != caption)
    rng = random.Random(seed)
    queries = []
    for image, caption in captions.items():
        if not siblings[caption]:
            continue
        target_caption = rng.choice(list(siblings[caption]))
        target = rng.choice(by_caption[target_caption])
        source_word, target_word = different_words(caption, target_caption)
        text = text_template.format(
            source_word=source_word,
            target_word=target_word,
            source_caption=caption,
            target_caption=target_caption,
        )
        queries.append(Query(f"train.{len(queries)}", image, (text,), (target,)))
    return queries


def load_fashion200k(
    root: Path,
    split: str = "test",
    *,
    text_template: str = "replace {source_word} with {target_word}",
    seed: int = 0,
    problems: Problems | None = None,
) -> CIRSplit:
    """One Fashion200K split, ``train`` or ``test``."""
    root = Path(root)
    problems = problems or Problems()
    params.choice("Fashion200K split", split, SPLITS)
    params.template("text_template", text_template, TEMPLATE_FIELDS)
    captions, repeated = _read_labels(root, split, problems)
    paths = {image: root / image for image in captions}
    if split == "test":
        queries = _test_queries(root, captions, text_template, problems)
    else:
        queries = _training_queries(captions, text_template, seed)
    recorded = {"text_template": text_template} | ({"seed": seed} if split == "train" else {})
    return build_split(
        split,
        known_queries(queries, paths, root / "test_queries.txt", problems),
        Gallery(paths, captions=captions),
        exclude_reference=True,
        protocol={
            "dataset": "fashion200k",
            "split": split,
            "gallery": f"labels/*{split}* (all {split} images)",
            "repeated_lines": str(repeated),
            **params.record(**recorded),
            "hit": "a retrieved image whose caption equals the target's",
            "metrics": "R@1,10,50",
        },
    )

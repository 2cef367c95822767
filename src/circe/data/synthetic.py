"""The synthetic CIR benchmark: simple scenes on a 3x3 grid and edits described in words.

In the spirit of CSS (the TIRG paper's data set): a scene holds 1-5 objects (shape, colour,
size, cell); a query is a reference scene plus a modification text for one edit (add,
remove, recolour, resize, reshape, move), worded freely by `circe.data.phrasing` (frames,
synonyms, ways to name the object, typos); the target is the edited scene, so the ground
truth is exact. Every image also has a caption of its scene.

Splits: `train`, `val`, `test` hold disjoint scenes (no scene, reference or target,
appears in two splits). `test_unseen` asks for colour-shape combinations that no
modification text of the other splits ever mentions (`HELD_OUT_COMBINATIONS`), to
measure compositional generalisation. `test_phrasing` (`val_phrasing`) holds `test`'s
(`val`'s) pairs worded with phrasing families that no training text uses: whether a
method learned the words or the wording. `test_free` (`val_free`) holds the same pairs
worded by `circe.data.free_wording`, rules written apart from the generator's (its own
frames, verbs and ways of naming an object): how much of a method's recall on new wording
was only the generator's habits. Only `val_free` may choose a recipe; `test_free` is only
reported.

Everything is a pure function of the seed and sizes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from circe.data.errors import shown
from circe.data.free_wording import word_edit
from circe.data.loading import ListOf, Problems, fields, read_json
from circe.data.phrasing import COMPARATIVES, SIZE_WORDS, SPLIT_POOL, phrase_edit, with_article
from circe.data.render import (
    COLOURS,
    GRID,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    canonical,
    render_scene,
)
from circe.data.types import CIRSplit, DatasetFormatError, Gallery, Query

EDIT_KINDS = ("add", "remove", "recolour", "resize", "reshape", "move")
UNSEEN_KINDS = ("add", "recolour", "reshape")
SPLITS = (
    "train",
    "val",
    "val_phrasing",
    "val_free",
    "test",
    "test_phrasing",
    "test_free",
    "test_unseen",
)
GENERATED_SPLITS = ("train", "val", "test", "test_unseen")  # disjoint scenes
# The others reword a generated split's pairs (same references, targets and edits):
# *_phrasing with held-out phrasing families (`circe.data.phrasing`), *_free by the
# independent rules of `circe.data.free_wording`.
REWORDED = {"val_phrasing": "val", "val_free": "val", "test_phrasing": "test", "test_free": "test"}
# (colour, shape) pairs that no modification text outside `test_unseen` talks about.
HELD_OUT_COMBINATIONS = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("green", "diamond"), ("yellow", "square")}
)
# 2: free phrasing with held-out families, the *_phrasing splits; 3: the *_free splits
FORMAT_VERSION = 3


@dataclass(frozen=True)
class SynthConfig:
    """Sizes are numbers of queries per split; images follow from them."""

    seed: int = 0
    train: int = 3000
    val: int = 400
    test: int = 1000
    test_unseen: int = 400
    image_size: int = 128
    max_objects: int = 5
    edits_per_reference: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.max_objects <= GRID * GRID:
            raise ValueError(
                f"max_objects must be 1 to {GRID * GRID} (one object per cell of the "
                f"{GRID}x{GRID} grid), got {self.max_objects}"
            )
        if self.edits_per_reference < 1 or self.image_size < 16:
            raise ValueError(
                "edits_per_reference must be at least 1 and image_size at least 16, got "
                f"{self.edits_per_reference} and {self.image_size}"
            )
        for split, size in self.split_sizes().items():
            if size < 0:
                raise ValueError(f"the {split} size must not be negative, got {size}")

    def split_sizes(self) -> dict[str, int]:
        """Queries per generated split (the reworded splits mirror val and test)."""
        return {
            "train": self.train,
            "val": self.val,
            "test": self.test,
            "test_unseen": self.test_unseen,
        }


@dataclass
class SyntheticData:
    """The whole benchmark in memory: scenes per split and queries referring to them."""

    config: SynthConfig
    scenes: dict[str, Scene] = field(default_factory=dict)  # image id -> scene
    split_images: dict[str, list[str]] = field(default_factory=dict)
    split_queries: dict[str, list[dict]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- scenes


def random_object(rng: random.Random, cell: int) -> SceneObject:
    return SceneObject(cell, rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES))


def random_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 5) -> Scene:
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(GRID * GRID), count)
    return canonical([random_object(rng, cell) for cell in cells])


def caption(scene: Scene) -> str:
    """'a small red circle in the top left, a large blue square in the center': one of the
    wordings the default backbone's pretraining captions use (`phrasing.varied_caption`)."""
    if not scene:
        return "an empty grid"
    return ", ".join(f"{with_article(o.describe())} in the {POSITIONS[o.cell]}" for o in scene)


# ----------------------------------------------------------------------------- edits


@dataclass(frozen=True)
class Edit:
    """One edit of a reference scene: `before` (None: an addition) becomes `after` (None: a
    removal), giving `target`."""

    kind: str
    target: Scene
    before: SceneObject | None
    after: SceneObject | None

    def to_json(self) -> dict:
        """What the query record keeps: the edit the text states (a perfect reading of it)."""
        side = lambda o: None if o is None else asdict(o)
        return {"before": side(self.before), "after": side(self.after)}


def apply_edit(scene: Scene, kind: str, rng: random.Random, max_objects: int = 5) -> Edit | None:
    """One random edit of `kind`, or None when it is impossible for this scene (e.g. add on
    a full board). Its words come from `circe.data.phrasing.phrase_edit`."""
    empty = [c for c in range(GRID * GRID) if c not in {o.cell for o in scene}]
    if kind == "add":
        if len(scene) >= max_objects or not empty:
            return None
        new = random_object(rng, rng.choice(empty))
        return Edit(kind, canonical([*scene, new]), None, new)
    if not scene:
        return None
    obj = rng.choice(scene)
    rest = [o for o in scene if o != obj]
    if kind == "remove":
        return None if len(scene) == 1 else Edit(kind, canonical(rest), obj, None)
    if kind == "recolour":
        new = replace(obj, colour=rng.choice([c for c in COLOURS if c != obj.colour]))
    elif kind == "resize":
        new = replace(obj, size="small" if obj.size == "large" else "large")
    elif kind == "reshape":
        new = replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    elif kind == "move":
        if not empty:
            return None
        new = replace(obj, cell=rng.choice(empty))
    else:
        raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")
    return Edit(kind, canonical([*rest, new]), obj, new)


def _touches_held_out(*objects: SceneObject | None) -> bool:
    return any(o is not None and (o.colour, o.shape) in HELD_OUT_COMBINATIONS for o in objects)


# ----------------------------------------------------------------------------- generation


def generate(config: SynthConfig = SynthConfig()) -> SyntheticData:
    """Build every split in memory (no images yet)."""
    data = SyntheticData(config)
    owner: dict[Scene, str] = {}  # scene -> image id; scenes are unique across all splits
    for split, size in config.split_sizes().items():
        rng = random.Random(f"circe-synthetic/{config.seed}/{split}")
        prefix = split.replace("-", "")
        ids: dict[Scene, str] = {}
        queries: list[dict] = []

        def image_id(scene: Scene, ids=ids, prefix=prefix) -> str:
            return ids.setdefault(scene, f"{prefix}-{len(ids):05d}")

        # Only edits that create an attribute can be novel.
        kinds = UNSEEN_KINDS if split == "test_unseen" else EDIT_KINDS
        attempts = 0
        while len(queries) < size:
            attempts += 1
            if attempts > 50 * size + 1000:
                raise RuntimeError(f"could not generate {size} {split} queries; lower the size")
            reference = random_scene(rng, 1, config.max_objects)
            if reference in owner:  # scenes of earlier splits stay out: splits are disjoint
                continue
            # Several edits of one reference: its targets are each other's hard
            # negatives, one edit away from the reference, told apart only by the text.
            targets: set[Scene] = set()
            for _ in range(4 * config.edits_per_reference):
                if len(targets) == config.edits_per_reference or len(queries) == size:
                    break
                kind = kinds[len(queries) % len(kinds)]  # balanced edit kinds
                edit = apply_edit(reference, kind, rng, config.max_objects)
                if edit is None:
                    continue
                novel = _touches_held_out(edit.after) and not _touches_held_out(edit.before)
                if split == "test_unseen" and not novel:
                    continue
                if split != "test_unseen" and _touches_held_out(edit.before, edit.after):
                    continue
                if edit.target in owner or edit.target in targets:
                    continue
                targets.add(edit.target)
                phrased = phrase_edit(
                    kind, reference, edit.before, edit.after, rng, avoid=HELD_OUT_COMBINATIONS
                )
                queries.append(
                    {
                        "query_id": f"{prefix}-q{len(queries):05d}",
                        "reference": image_id(reference),
                        "target": image_id(edit.target),
                        "text": phrased.text,
                        "kind": kind,
                        "wording": phrased.frame,
                        "families": list(phrased.families),
                        "edit": edit.to_json(),
                    }
                )
        for scene, scene_id in ids.items():
            owner[scene] = scene_id
            data.scenes[scene_id] = scene
        data.split_images[split] = list(ids.values())
        data.split_queries[split] = queries
    for split, source in REWORDED.items():
        _reword(data, split, source)
    return data


def _reword(data: SyntheticData, split: str, source: str) -> None:
    """`split` = the same pairs as `source` (`test_free` <- `test`), every text worded anew:
    from the held-out families of its phrasing pool (*_phrasing) or by the rules of
    `circe.data.free_wording` (*_free), with a random stream of its own."""
    rng = random.Random(f"circe-synthetic/{data.config.seed}/{split}")
    prefix = split.replace("_", "")
    queries = []
    for n, query in enumerate(data.split_queries[source]):
        before, after = stated_objects(query["edit"])
        edit_args = (query["kind"], data.scenes[query["reference"]], before, after, rng)
        if split in SPLIT_POOL:
            phrased = phrase_edit(*edit_args, SPLIT_POOL[split], avoid=HELD_OUT_COMBINATIONS)
            text, wording, families = phrased.text, phrased.frame, phrased.families
        else:
            free = word_edit(*edit_args, avoid=HELD_OUT_COMBINATIONS)
            text, wording, families = free.text, free.wording, free.families
        queries.append(
            {
                **query,
                "query_id": f"{prefix}-q{n:05d}",
                "text": text,
                "wording": wording,
                "families": list(families),
            }
        )
    data.split_images[split] = list(data.split_images[source])
    data.split_queries[split] = queries


def scene_to_json(scene: Scene) -> list[dict]:
    return [asdict(o) for o in scene]


def stated_objects(record: dict) -> tuple[SceneObject | None, SceneObject | None]:
    """(before, after) of a query's recorded edit (`Edit.to_json`)."""
    side = lambda o: None if o is None else SceneObject(**o)
    return side(record["before"]), side(record["after"])


def scene_from_json(records: list[dict]) -> Scene:
    return canonical([SceneObject(**r) for r in records])


def write_synthetic(
    root: Path,
    config: SynthConfig = SynthConfig(),
    progress: Callable[[Iterator, int, str], Iterator] | None = None,
) -> Path:
    """Write the benchmark under `root` (images/*.png + JSON), atomically.

    If `root` already holds this exact benchmark (same config and format), nothing is
    redone. A different benchmark already there is an error rather than overwritten.
    """
    root = Path(root)
    meta = {"format": FORMAT_VERSION, "config": asdict(config)}
    existing = root / "meta.json"
    if existing.exists():
        if json.loads(existing.read_text()) == meta:
            return root
        raise FileExistsError(
            f"{root} holds a synthetic benchmark with other settings ({existing}); "
            "choose another --out or delete it"
        )
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a circe synthetic benchmark")
    data = generate(config)
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    items: Iterator = iter(data.scenes.items())
    if progress is not None:
        items = progress(items, len(data.scenes), "rendering images")
    for image_id, scene in items:
        render_scene(scene, config.image_size, jitter_seed=image_id).save(
            staging / "images" / f"{image_id}.png"
        )
    annotations = {
        "scenes": {i: scene_to_json(s) for i, s in data.scenes.items()},
        "captions": {i: caption(s) for i, s in data.scenes.items()},
        "splits": {
            split: {"images": data.split_images[split], "queries": data.split_queries[split]}
            for split in SPLITS
        },
    }
    (staging / "annotations.json").write_text(json.dumps(annotations))
    # meta.json last: its presence marks a complete benchmark.
    (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    if root.exists():
        root.rmdir()
    os.replace(staging, root)
    return root


# Words that carry a scene's content, by the slot they fill: the benchmark's own, and the
# other size and place words of `circe.data.phrasing` ("huge", "bigger", "upper", "centre").
CONTENT_WORDS = {
    **dict.fromkeys(COLOURS, "{colour}"),
    **dict.fromkeys(SHAPES, "{shape}"),
    **dict.fromkeys(SIZES, "{size}"),
    **{
        word: "{size}"
        for table in (SIZE_WORDS, COMPARATIVES)
        for options in table.values()
        for _, word in options
        if " " not in word  # "a lot bigger", "less big": their size words occur alone too
    },
    **dict.fromkeys(
        {w for place in POSITIONS for w in place.split()} | {"upper", "lower", "centre"},
        "{place}",
    ),
}


def skeleton(text: str) -> str:
    """A text's wording, read off the text itself: lower case, punctuation and spacing gone,
    content words slotted out ('Remove the small red circle!' -> 'remove the {size} {colour}
    {shape}'). Unlike the recorded `wording` it compares texts of different generators."""
    return " ".join(CONTENT_WORDS.get(w, w) for w in re.findall(r"[a-z']+", text.lower()))


def wording_stats(root: Path) -> dict[str, dict[str, int]]:
    """Per split: distinct texts, distinct wordings (as each generator records them: frames
    with their slots unfilled), how many of its texts and wordings also occur in `train` (0
    for the reworded splits), and how many of its texts have the `skeleton` of a train text
    (the comparison that also holds for the *_free splits, whose wordings are written in
    another notation)."""
    splits = json.loads((Path(root) / "annotations.json").read_text())["splits"]
    train = splits["train"]["queries"]
    train_texts, train_wordings = {q["text"] for q in train}, {q["wording"] for q in train}
    train_skeletons = {skeleton(text) for text in train_texts}
    stats = {}
    for split, part in splits.items():
        texts = {q["text"] for q in part["queries"]}
        wordings = {q["wording"] for q in part["queries"]}
        stats[split] = {
            "texts": len(texts),
            "wordings": len(wordings),
            "texts_in_train": len(texts & train_texts) if split != "train" else len(texts),
            "wordings_in_train": len(wordings & train_wordings),
            "skeletons_in_train": sum(skeleton(t) in train_skeletons for t in texts),
        }
    return stats


# The fields of a query record of annotations.json, all text.
_QUERY_FIELDS = dict.fromkeys(("query_id", "reference", "text", "target", "kind"), str)


def load_synthetic(root: Path, split: str = "test") -> CIRSplit:
    """Read one split back through the common `CIRSplit` interface."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; choose one of {SPLITS}")
    annotations_path = root / "annotations.json"
    if not (root / "meta.json").exists() or not annotations_path.exists():
        raise FileNotFoundError(
            f"no synthetic benchmark at {root}; create it with `circe synth --out {root}`"
        )
    problems = Problems()  # the first problem raises, naming the file and the record
    written = (read_json(root / "meta.json", dict, problems) or {}).get("format")
    if written != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{root} holds a synthetic benchmark of format {written}; this circe reads format "
            f"{FORMAT_VERSION} (free wording, the val_phrasing and test_phrasing splits, and "
            "val_free and test_free worded by independent rules): delete it and run "
            f"`circe synth --out {root}`"
        )
    annotations = fields(
        read_json(annotations_path, dict, problems),
        str(annotations_path),
        problems,
        {"splits": dict, "captions": dict},
    )
    if split not in annotations["splits"]:
        raise DatasetFormatError(
            f"{annotations_path} has no split {split!r} (it has "
            f"{', '.join(map(shown, annotations['splits'])) or 'none'}): delete {root} and run "
            f"`circe synth --out {root}`"
        )
    where = f"{annotations_path}: split {split!r}"
    part = fields(
        annotations["splits"][split], where, problems, {"images": ListOf(str), "queries": list}
    )
    captions = annotations["captions"]
    unnamed = next((i for i in part["images"] if not isinstance(captions.get(i), str)), None)
    if unnamed is not None:
        raise DatasetFormatError(f"{annotations_path}: image {shown(unnamed)} has no caption")
    images = root / "images"
    gallery = Gallery(
        paths={i: images / f"{i}.png" for i in part["images"]},
        captions={i: captions[i] for i in part["images"]},
    )
    queries = []
    for n, record in enumerate(part["queries"]):
        values = fields(record, f"{where} query #{n}", problems, _QUERY_FIELDS)
        queries.append(
            Query(
                query_id=values["query_id"],
                reference_id=values["reference"],
                texts=(values["text"],),
                target_ids=(values["target"],),
                tags=(values["kind"],),
            )
        )
    result = CIRSplit(
        split,
        queries,
        gallery,
        exclude_reference=True,
        protocol={"dataset": "synthetic", "split": split, "reference_excluded": "yes"},
    )
    result.check()
    return result

"""The synthetic CIR benchmark: simple scenes on a 3x3 grid and edits described in words.

In the spirit of CSS (the TIRG paper's data set): a scene holds 1-5 objects (shape, colour,
size, cell); a query is a reference scene plus a modification text for one edit (add,
remove, recolour, resize, reshape, move), each phrased by several templates; the target
is the edited scene, so the ground truth is exact. Every image also has a caption of
its scene.

Splits: `train`, `val`, `test` hold disjoint scenes (no scene, reference or target,
appears in two splits). `test_unseen` asks for colour-shape combinations that no
modification text of the other splits ever mentions (`HELD_OUT_COMBINATIONS`), to
measure compositional generalisation.

Everything is a pure function of the seed and sizes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
SPLITS = ("train", "val", "test", "test_unseen")
# (colour, shape) pairs that no modification text outside `test_unseen` talks about.
HELD_OUT_COMBINATIONS = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("green", "diamond"), ("yellow", "square")}
)
FORMAT_VERSION = 1


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

    def split_sizes(self) -> dict[str, int]:
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


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """'small red circle top left, large blue square center'. With `rng`: a random
    subset of the objects in random order (pretraining augmentation)."""
    objects = list(scene)
    if rng is not None and len(objects) > 1 and rng.random() < 0.5:
        objects = rng.sample(objects, rng.randint(1, len(objects)))
    if not objects:
        return "empty"
    return ", ".join(f"{o.describe()} {POSITIONS[o.cell]}" for o in objects)


# ----------------------------------------------------------------------------- edits


def _referring_expressions(obj: SceneObject, scene: Scene) -> list[str]:
    """Ways to name `obj` that pick it out uniquely in `scene`."""
    others = [o for o in scene if o != obj]
    options = [
        f"{obj.shape} in the {POSITIONS[obj.cell]}",
        (f"{obj.colour} {obj.shape} at the {POSITIONS[obj.cell]}"),
    ]
    if not any(o.shape == obj.shape for o in others):
        options.append(obj.shape)
    if not any((o.colour, o.shape) == (obj.colour, obj.shape) for o in others):
        options.append(f"{obj.colour} {obj.shape}")
    if not any((o.colour, o.shape, o.size) == (obj.colour, obj.shape, obj.size) for o in others):
        options.append(f"{obj.size} {obj.colour} {obj.shape}")
    return options


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "add {new} in the {pos}",
        "put {new} at the {pos}",
        "there should also be {new} in the {pos}",
        "place {new} in the {pos} cell",
        "insert {new} at the {pos}",
    ),
    "remove": (
        "remove the {ref}",
        "take away the {ref}",
        "get rid of the {ref}",
        "delete the {ref}",
        "without the {ref}",
    ),
    "recolour": (
        "make the {ref} {colour}",
        "change the colour of the {ref} to {colour}",
        "paint the {ref} {colour}",
        "the {ref} should be {colour} instead",
        "recolour the {ref} {colour}",
    ),
    "resize": (
        "make the {ref} {bigger}",
        "the {ref} should be {bigger}",
        "{enlarge} the {ref}",
        "change the {ref} to {size}",
    ),
    "reshape": (
        "turn the {ref} into {shape}",
        "replace the {ref} with {shape}",
        "change the {ref} to {shape}",
        "the {ref} should be {shape} instead",
    ),
    "move": (
        "move the {ref} to the {pos}",
        "shift the {ref} to the {pos}",
        "put the {ref} in the {pos} instead",
        "the {ref} should be at the {pos}",
    ),
}


def apply_edit(
    scene: Scene, kind: str, rng: random.Random, max_objects: int = 5
) -> tuple[Scene, str, SceneObject | None, SceneObject | None] | None:
    """One random edit of `kind`: (target scene, text, object before, object after).

    Returns None when the edit is impossible for this scene (e.g. add on a full board).
    """
    empty = [c for c in range(GRID * GRID) if c not in {o.cell for o in scene}]
    template = rng.choice(TEMPLATES[kind])
    if kind == "add":
        if len(scene) >= max_objects or not empty:
            return None
        new = random_object(rng, rng.choice(empty))
        # The size is always said: the benchmark needs one exact target per query.
        text = template.format(new=_article(new.describe()), pos=POSITIONS[new.cell])
        return canonical([*scene, new]), text, None, new
    if not scene:
        return None
    obj = rng.choice(scene)
    ref = rng.choice(_referring_expressions(obj, scene))
    rest = [o for o in scene if o != obj]
    if kind == "remove":
        if len(scene) == 1:
            return None
        return canonical(rest), template.format(ref=ref), obj, None
    if kind == "recolour":
        colour = rng.choice([c for c in COLOURS if c != obj.colour])
        new = SceneObject(obj.cell, obj.shape, colour, obj.size)
        return canonical([*rest, new]), template.format(ref=ref, colour=colour), obj, new
    if kind == "resize":
        size = "small" if obj.size == "large" else "large"
        bigger = "bigger" if size == "large" else "smaller"
        enlarge = "enlarge" if size == "large" else "shrink"
        new = SceneObject(obj.cell, obj.shape, obj.colour, size)
        text = template.format(ref=ref, bigger=bigger, enlarge=enlarge, size=size)
        return canonical([*rest, new]), text, obj, new
    if kind == "reshape":
        shape = rng.choice([s for s in SHAPES if s != obj.shape])
        new = SceneObject(obj.cell, shape, obj.colour, obj.size)
        return canonical([*rest, new]), template.format(ref=ref, shape=_article(shape)), obj, new
    if kind == "move":
        if not empty:
            return None
        cell = rng.choice(empty)
        new = SceneObject(cell, obj.shape, obj.colour, obj.size)
        return canonical([*rest, new]), template.format(ref=ref, pos=POSITIONS[cell]), obj, new
    raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")


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
                target, text, before, after = edit
                novel = _touches_held_out(after) and not _touches_held_out(before)
                if split == "test_unseen" and not novel:
                    continue
                if split != "test_unseen" and _touches_held_out(before, after):
                    continue
                if target in owner or target in targets:
                    continue
                targets.add(target)
                queries.append(
                    {
                        "query_id": f"{prefix}-q{len(queries):05d}",
                        "reference": image_id(reference),
                        "target": image_id(target),
                        "text": text,
                        "kind": kind,
                    }
                )
        for scene, scene_id in ids.items():
            owner[scene] = scene_id
            data.scenes[scene_id] = scene
        data.split_images[split] = list(ids.values())
        data.split_queries[split] = queries
    return data


def scene_to_json(scene: Scene) -> list[dict]:
    return [asdict(o) for o in scene]


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
    annotations = json.loads(annotations_path.read_text())
    part = annotations["splits"][split]
    images = root / "images"
    gallery = Gallery(
        paths={i: images / f"{i}.png" for i in part["images"]},
        captions={i: annotations["captions"][i] for i in part["images"]},
    )
    queries = []
    for n, record in enumerate(part["queries"]):
        try:
            queries.append(
                Query(
                    query_id=record["query_id"],
                    reference_id=record["reference"],
                    texts=(record["text"],),
                    target_ids=(record["target"],),
                    tags=(record["kind"],),
                )
            )
        except KeyError as missing:
            raise DatasetFormatError(
                f"{annotations_path}: split {split!r} query #{n} lacks field {missing}"
            ) from None
    result = CIRSplit(
        split,
        queries,
        gallery,
        exclude_reference=True,
        protocol={"dataset": "synthetic", "split": split, "reference_excluded": "yes"},
    )
    result.check()
    return result

"""The synthetic benchmark's stand-in for a diffusion image editor.

A diffusion editor (InstructPix2Pix) reads the reference image and the modification text and
draws what it understood, imperfectly. On the synthetic benchmark the same thing can be done
without a diffusion model: the editor parses the modification text against the reference
scene (the benchmark's own templates, read backwards; the reference scene's objects come from
the benchmark's annotations), applies the edit, and redraws the whole scene with
`render_scene`. Only the reference scene and the text are read, never the target.

Its imperfection is controlled: a fraction `noise` of the queries (exactly
round(noise * queries), chosen with `seed`) get one of the mistakes an editor makes
    missed     the edit is not applied (the reference scene again)
    position   the new or changed object lands in another empty cell; for a removal, another
               object is removed
    shade      the new or changed object is drawn in a lighter or darker shade of its colour
picked at random among those that apply to the edit. Each mistake changes the scene, so a
perturbed pseudo-target is never the target. Even without a mistake the image is not the
target image: the scene is redrawn with its own jitter of the objects in their cells, as a
diffusion model redraws the whole picture.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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
from circe.data.synthetic import TEMPLATES, scene_from_json, scene_to_json
from circe.data.types import Gallery, Query
from circe.pseudo_targets.generate import Edited, PseudoTargetGenerator

MISTAKES = ("missed", "position", "shade")
# How far a wrong shade is from the palette colour: towards white, or towards black.
LIGHTER, DARKER = 0.5, 0.55


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in words)


# What each template field can hold (the benchmark fills them from these vocabularies).
_FIELDS = {
    "ref": r"(?P<ref>.+?)",
    "new": r"(?P<new>an? .+?)",
    "pos": rf"(?P<pos>{_alternatives(POSITIONS)})",
    "colour": rf"(?P<colour>{_alternatives(COLOURS)})",
    "shape": rf"(?P<shape>an? (?:{_alternatives(SHAPES)}))",
    "bigger": r"(?P<bigger>bigger|smaller)",
    "enlarge": r"(?P<enlarge>enlarge|shrink)",
    "size": rf"(?P<size>{_alternatives(SIZES)})",
}
# A referring expression: "[size] [colour] shape [in|at the position]".
_REFERENCE = re.compile(
    rf"(?:(?P<size>{_alternatives(SIZES)}) )?(?:(?P<colour>{_alternatives(COLOURS)}) )?"
    rf"(?P<shape>{_alternatives(SHAPES)})(?: (?:in|at) the (?P<pos>{_alternatives(POSITIONS)}))?"
)
_NEW_OBJECT = re.compile(
    rf"an? (?P<size>{_alternatives(SIZES)}) (?P<colour>{_alternatives(COLOURS)}) "
    rf"(?P<shape>{_alternatives(SHAPES)})"
)


def _template_pattern(template: str) -> re.Pattern:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(_FIELDS[name])
    return re.compile("".join(parts))


_PATTERNS = [(kind, _template_pattern(t)) for kind, ts in TEMPLATES.items() for t in ts]


@dataclass(frozen=True)
class ParsedEdit:
    """An edit of a scene: `before` (None: an addition) becomes `after` (None: a removal)."""

    kind: str
    before: SceneObject | None
    after: SceneObject | None

    def apply(self, scene: Scene) -> Scene:
        kept = [o for o in scene if o != self.before]
        return canonical(kept if self.after is None else [*kept, self.after])


def _referred(phrase: str, scene: Scene) -> SceneObject | None:
    """The one object of `scene` that `phrase` names, or None."""
    match = _REFERENCE.fullmatch(phrase)
    if match is None:
        return None
    said = match.groupdict()
    cell = None if said["pos"] is None else POSITIONS.index(said["pos"])
    candidates = [
        o
        for o in scene
        if o.shape == said["shape"]
        and said["size"] in (None, o.size)
        and said["colour"] in (None, o.colour)
        and cell in (None, o.cell)
    ]
    return candidates[0] if len(candidates) == 1 else None


def _edit_from_match(kind: str, fields: dict[str, str], scene: Scene) -> ParsedEdit | None:
    if kind == "add":
        new = _NEW_OBJECT.fullmatch(fields["new"])
        if new is None:
            return None
        cell = POSITIONS.index(fields["pos"])
        return ParsedEdit(kind, None, SceneObject(cell, new["shape"], new["colour"], new["size"]))
    obj = _referred(fields["ref"], scene)
    if obj is None:
        return None
    if kind == "remove":
        return ParsedEdit(kind, obj, None)
    if kind == "recolour":
        return ParsedEdit(kind, obj, replace(obj, colour=fields["colour"]))
    if kind == "resize":
        said = fields.get("bigger") or fields.get("enlarge") or fields["size"]
        size = "large" if said in ("bigger", "enlarge", "large") else "small"
        return ParsedEdit(kind, obj, replace(obj, size=size))
    if kind == "reshape":
        return ParsedEdit(kind, obj, replace(obj, shape=fields["shape"].split()[-1]))
    if kind == "move":
        return ParsedEdit(kind, obj, replace(obj, cell=POSITIONS.index(fields["pos"])))
    raise ValueError(f"unknown edit kind {kind!r}")


def parse_edit(text: str, scene: Scene) -> ParsedEdit:
    """The edit a synthetic modification text asks of `scene` (the benchmark's templates
    matched backwards; the object it names looked up in the scene)."""
    for kind, pattern in _PATTERNS:
        match = pattern.fullmatch(text.strip())
        if match is not None:
            edit = _edit_from_match(kind, match.groupdict(), scene)
            if edit is not None:
                return edit
    raise ValueError(
        f"cannot read the edit {text!r} against its reference scene: the scene editor "
        "understands the synthetic benchmark's own modification texts only"
    )


def shade(colour: tuple[int, int, int], direction: str) -> tuple[int, int, int]:
    """A lighter or darker shade of an RGB colour (the same hue)."""
    if direction == "lighter":
        return tuple(round(c + (255 - c) * LIGHTER) for c in colour)
    return tuple(round(c * (1 - DARKER)) for c in colour)


class SceneEditor(PseudoTargetGenerator):
    """Applies the parsed edit to the reference scene, with mistakes at rate `noise`."""

    name = "scene-editor"
    options = ("noise", "seed")
    batch_size = 32

    def __init__(
        self, scenes: dict[str, Scene], image_size: int, noise: float = 0.3, seed: int = 0
    ):
        if not 0 <= noise <= 1:
            raise ValueError(f"noise must be a rate in [0, 1], got {noise}")
        self.scenes, self.image_size, self.noise, self.seed = scenes, image_size, noise, seed
        self.mistaken: set[str] | None = None  # set by `prepare`

    @classmethod
    def create(cls, dataset: str, root: Path, noise: float = 0.3, seed: int = 0) -> SceneEditor:
        if dataset != "synthetic":
            raise ValueError(
                f"the scene editor edits synthetic scenes only, not {dataset!r}: use the "
                "diffusers generator (or a directory of pseudo-targets) for real images"
            )
        annotations, meta = root / "annotations.json", root / "meta.json"
        if not annotations.is_file() or not meta.is_file():
            raise FileNotFoundError(f"no synthetic benchmark at {root} (no {annotations.name})")
        scenes = json.loads(annotations.read_text())["scenes"]
        image_size = json.loads(meta.read_text())["config"]["image_size"]
        return cls({i: scene_from_json(s) for i, s in scenes.items()}, image_size, noise, seed)

    def settings(self) -> dict[str, Any]:
        return {"noise": self.noise, "seed": self.seed, "image_size": self.image_size}

    def prepare(self, queries: Sequence[Query]) -> None:
        ids = sorted(q.query_id for q in queries)
        count = round(self.noise * len(ids))
        self.mistaken = set(random.Random(f"scene-editor/{self.seed}").sample(ids, count))

    def edit(self, queries: Sequence[Query], gallery: Gallery) -> list[Edited]:
        return [self.edit_one(query) for query in queries]

    def edit_one(self, query: Query) -> Edited:
        if self.mistaken is None:
            raise RuntimeError("SceneEditor.prepare must see the queries before edit_one")
        reference = self.scenes[query.reference_id]
        edit = parse_edit(query.text, reference)
        rng = random.Random(f"scene-editor/{self.seed}/{query.query_id}")
        mistake, palette = "none", COLOURS
        if query.query_id in self.mistaken:
            mistake, edit, palette = self._mistaken(edit, reference, rng)
        scene = reference if mistake == "missed" else edit.apply(reference)
        jitter = f"pseudo-target/{self.seed}/{query.query_id}"
        image = render_scene(scene, self.image_size, jitter_seed=jitter, palette=palette)
        details = {"edit": edit.kind, "mistake": mistake, "scene": scene_to_json(scene)}
        return Edited(image, details)

    def _mistaken(
        self, edit: ParsedEdit, scene: Scene, rng: random.Random
    ) -> tuple[str, ParsedEdit, dict[str, tuple[int, int, int]]]:
        """(mistake, the edit as wrongly carried out, the palette to draw it with)."""
        occupied = {o.cell for o in scene if o != edit.before}
        if edit.after is not None:
            occupied |= {edit.after.cell}
        if edit.before is not None:
            occupied |= {edit.before.cell}  # moving back would be a missed edit, not a shift
        free = [c for c in range(GRID * GRID) if c not in occupied]
        others = [o for o in scene if o != edit.before]
        applicable = ["missed"]
        if (free and edit.after is not None) or (edit.after is None and others):
            applicable.append("position")
        if edit.after is not None:
            applicable.append("shade")
        mistake = rng.choice(applicable)
        if mistake == "missed":
            return mistake, edit, COLOURS
        if mistake == "position":
            if edit.after is None:  # a removal: the wrong object goes
                return mistake, replace(edit, before=rng.choice(others)), COLOURS
            return mistake, replace(edit, after=replace(edit.after, cell=rng.choice(free))), COLOURS
        direction = rng.choice(("lighter", "darker"))
        name = f"{edit.after.colour} ({direction})"
        palette = {**COLOURS, name: shade(COLOURS[edit.after.colour], direction)}
        return mistake, replace(edit, after=replace(edit.after, colour=name)), palette

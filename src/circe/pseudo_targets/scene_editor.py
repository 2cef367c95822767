"""The synthetic benchmark's stand-in for a diffusion image editor.

A diffusion editor (InstructPix2Pix) reads the reference image and the modification text and
draws what it understood, imperfectly. On the synthetic benchmark the same thing can be done
without a diffusion model: the editor takes the edit the modification text states, applies
it to the reference scene and redraws the whole scene with `render_scene`. It understands
the free wording of the benchmark's texts perfectly (the benchmark records, for each query,
the edit its text states, which is what a perfect reading of the text against the reference
scene gives: no parser of every phrasing family is needed); its mistakes are only the
controlled ones below. The target image and scene are never read.

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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from circe.data.render import (
    COLOURS,
    GRID,
    Scene,
    SceneObject,
    canonical,
    render_scene,
)
from circe.data.synthetic import scene_from_json, scene_to_json, stated_objects
from circe.data.types import Gallery, Query
from circe.pseudo_targets.generate import Edited, PseudoTargetGenerator

MISTAKES = ("missed", "position", "shade")
# How far a wrong shade is from the palette colour: towards white, or towards black.
LIGHTER, DARKER = 0.5, 0.55


@dataclass(frozen=True)
class ParsedEdit:
    """An edit of a scene: `before` (None: an addition) becomes `after` (None: a removal)."""

    kind: str
    before: SceneObject | None
    after: SceneObject | None

    def apply(self, scene: Scene) -> Scene:
        kept = [o for o in scene if o != self.before]
        return canonical(kept if self.after is None else [*kept, self.after])


def _stated_edit(kind: str, record: dict) -> ParsedEdit:
    """The edit a query's text states, from the benchmark's record of it."""
    return ParsedEdit(kind, *stated_objects(record))


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
        self,
        scenes: dict[str, Scene],
        edits: dict[str, ParsedEdit],
        image_size: int,
        noise: float = 0.3,
        seed: int = 0,
    ):
        if not 0 <= noise <= 1:
            raise ValueError(f"noise must be a rate in [0, 1], got {noise}")
        self.scenes, self.edits, self.image_size = scenes, edits, image_size
        self.noise, self.seed = noise, seed
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
        records = json.loads(annotations.read_text())
        scenes = {i: scene_from_json(s) for i, s in records["scenes"].items()}
        edits = {
            query["query_id"]: _stated_edit(query["kind"], query["edit"])
            for split in records["splits"].values()
            for query in split["queries"]
        }
        image_size = json.loads(meta.read_text())["config"]["image_size"]
        return cls(scenes, edits, image_size, noise, seed)

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
        edit = self.edits[query.query_id]
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

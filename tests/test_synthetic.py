"""The synthetic benchmark: determinism, exact ground truth, disjoint splits, the unseen split."""

import json
import random
import re

import pytest
from PIL import ImageChops

from circe.data.phrasing import (
    ACTIONS,
    COMPARATIVES,
    FAMILIES,
    POOLS,
    RELATIONS,
    SIZE_VERBS,
    SIZE_WORDS,
    SPLIT_POOL,
    STATES,
    WRAPPERS,
    _relations,
    _towards,
    held_out_words,
    phrase_edit,
    typo,
)
from circe.data.render import COLOURS, SHAPES, render_scene, write_words
from circe.data.synthetic import (
    EDIT_KINDS,
    FORMAT_VERSION,
    GENERATED_SPLITS,
    HELD_OUT_COMBINATIONS,
    SPLITS,
    SynthConfig,
    apply_edit,
    caption,
    generate,
    load_synthetic,
    random_scene,
    scene_from_json,
    write_synthetic,
)
from circe.data.types import DatasetFormatError

SMALL = SynthConfig(seed=3, train=60, val=12, test=24, test_unseen=12)


def test_generation_is_deterministic_and_seed_dependent():
    first, again = generate(SMALL), generate(SMALL)
    assert first.split_queries == again.split_queries
    assert first.scenes == again.scenes
    other = generate(SynthConfig(seed=4, train=60, val=12, test=24, test_unseen=12))
    assert other.split_queries != first.split_queries


def test_split_sizes_and_balanced_edit_kinds():
    data = generate(SMALL)
    for split, size in SMALL.split_sizes().items():
        assert len(data.split_queries[split]) == size
    kinds = [q["kind"] for q in data.split_queries["train"]]
    assert {kinds.count(kind) for kind in EDIT_KINDS} == {60 // len(EDIT_KINDS)}


def test_splits_hold_disjoint_scenes():
    data = generate(SMALL)
    seen: dict = {}
    for split in GENERATED_SPLITS:
        for image_id in data.split_images[split]:
            scene = data.scenes[image_id]
            assert scene not in seen, f"{image_id} repeats {seen.get(scene)}"
            seen[scene] = image_id


def test_each_reference_has_several_distinct_targets():
    data = generate(SMALL)
    by_reference: dict[str, list[str]] = {}
    for query in data.split_queries["train"]:
        by_reference.setdefault(query["reference"], []).append(query["target"])
    assert max(len(t) for t in by_reference.values()) == SMALL.edits_per_reference
    for targets in by_reference.values():
        assert len(set(targets)) == len(targets)


@pytest.mark.parametrize("kind", EDIT_KINDS)
@pytest.mark.parametrize("pool", POOLS)
def test_edit_text_describes_the_scene_difference(kind, pool):
    """Whatever the wording, the text names what changes, and the target differs from the
    reference exactly so."""
    rng = random.Random(f"{kind}/{pool}")
    checked = 0
    while checked < 40:
        reference = random_scene(rng, 1, 5)
        edit = apply_edit(reference, kind, rng)
        if edit is None:
            continue
        checked += 1
        before, after = edit.before, edit.after
        text = phrase_edit(kind, reference, before, after, rng, pool).text.lower()
        assert edit.target != reference
        removed, added = set(reference) - set(edit.target), set(edit.target) - set(reference)
        if kind == "add":
            assert not removed and added == {after}
            assert re.search(rf"\b{after.colour} {after.shape}\b", text), text
        elif kind == "remove":
            assert removed == {before} and not added
        else:
            assert removed == {before} and added == {after}
        if kind != "add":  # the edited object is named: its shape is always said
            assert before.shape in text, text
        if kind == "recolour":
            assert after.colour in text and after.colour != before.colour
        if kind == "reshape":
            assert re.search(rf"\ban? {after.shape}\b", text) and after.shape != before.shape
        if kind in ("move", "add"):  # the new place is said: its column word at least
            column = ("left", "middle", "right")[after.cell % 3]
            assert column in text or after.cell == 4, text
        if kind == "resize":
            assert after.size != before.size


def test_held_out_phrasing_families_never_reach_training_texts():
    data = generate(SynthConfig(seed=2, train=600, val=60, test=120, test_unseen=30))
    queries = data.split_queries
    train_wordings = {q["wording"] for q in queries["train"]}
    train_words = {w for q in queries["train"] for w in re.findall(r"[a-z']+", q["text"].lower())}
    for split, pool in SPLIT_POOL.items():
        source = split.removesuffix("_phrasing")
        assert len(queries[split]) == len(queries[source])
        assert data.split_images[split] == data.split_images[source]
        for rephrased, original in zip(queries[split], queries[source]):
            # The same pair and edit, worded anew.
            same = ("reference", "target", "kind", "edit")
            assert {k: rephrased[k] for k in same} == {k: original[k] for k in same}
            assert rephrased["wording"] not in train_wordings
            assert {FAMILIES[f] for f in rephrased["families"]} <= {"seen", pool}
            assert FAMILIES[rephrased["families"][0]] == pool  # the frame is held out
        # Words of held-out families occur in no training text, and the split uses them.
        held_out = held_out_words(pool)
        assert held_out and not held_out & train_words
        used = {w for q in queries[split] for w in re.findall(r"[a-z']+", q["text"].lower())}
        assert len(held_out & used) >= len(held_out) // 2
    for split in ("train", "val", "test", "test_unseen"):
        assert all(FAMILIES[f] == "seen" for q in queries[split] for f in q["families"])


def test_every_family_a_table_names_has_a_pool():
    tables = [*ACTIONS.values(), *STATES.values(), WRAPPERS, *SIZE_WORDS.values()]
    tables += [*SIZE_VERBS.values(), *COMPARATIVES.values()]
    named = {family for table in tables for family, _ in table}
    assert named <= set(FAMILIES) and set(FAMILIES.values()) == set(POOLS)


def test_wording_has_real_variety():
    data = generate(SynthConfig(seed=0, train=600, val=0, test=0, test_unseen=0))
    by_kind: dict[str, set[str]] = {}
    for query in data.split_queries["train"]:
        by_kind.setdefault(query["kind"], set()).add(query["wording"])
    assert all(len(wordings) >= 8 for wordings in by_kind.values()), by_kind
    texts = [q["text"] for q in data.split_queries["train"]]
    assert len(set(texts)) > 0.95 * len(texts)
    assert any(t != t.lower() for t in texts) and any(t.endswith(".") for t in texts)
    relational = [t for t in texts if re.search(r"\b(left of|right of|above|below)\b", t.lower())]
    assert len(relational) > 10


def test_relations_name_one_object_only():
    rng = random.Random(5)
    for _ in range(400):
        scene = random_scene(rng, 3, 5)
        obj = rng.choice(scene)
        for relation, anchor in _relations(obj, scene, frozenset()):
            step = {v: k for k, v in RELATIONS.items()}[relation]
            fits = [
                o
                for o in scene
                if o.shape == obj.shape
                and any(
                    a.shape == anchor.split()[-1]
                    and (len(anchor.split()) == 1 or a.colour == anchor.split()[0])
                    and _towards(o, a, *step)
                    for a in scene
                )
            ]
            assert fits == [obj], (scene, obj, relation, anchor)


def test_typos_spare_the_words_that_carry_the_edit():
    rng = random.Random(0)
    text = "could you paint the small red circle in the top left blue"
    for _ in range(200):
        slipped = typo(text, rng)
        assert slipped != text
        for word in ("small", "red", "circle", "top", "left", "blue"):
            assert word in slipped.split()


def test_held_out_combinations_only_in_the_unseen_split():
    data = generate(SynthConfig(seed=1, train=300, val=30, test=120, test_unseen=60))
    pattern = re.compile(r"\b({}) ({})\b".format("|".join(COLOURS), "|".join(SHAPES)))

    def mentions_held_out(text: str) -> bool:
        return any(tuple(m) in HELD_OUT_COMBINATIONS for m in pattern.findall(text))

    for split in ("train", "val", "test"):
        for query in data.split_queries[split]:
            target = data.scenes[query["target"]]
            reference = data.scenes[query["reference"]]
            changed = set(target) ^ set(reference)
            assert not any((o.colour, o.shape) in HELD_OUT_COMBINATIONS for o in changed)
            assert not mentions_held_out(query["text"])
    for query in data.split_queries["test_unseen"]:
        new = set(data.scenes[query["target"]]) - set(data.scenes[query["reference"]])
        assert any((o.colour, o.shape) in HELD_OUT_COMBINATIONS for o in new)


def test_write_and_load_round_trip(tmp_path):
    root = write_synthetic(tmp_path / "bench", SMALL)
    data = generate(SMALL)
    annotations = json.loads((root / "annotations.json").read_text())
    for split in SPLITS:
        loaded = load_synthetic(root, split)
        assert len(loaded.queries) == len(data.split_queries[split])
        assert set(loaded.gallery.ids) == set(data.split_images[split])
        for query in loaded.queries:
            assert query.target_ids[0] in loaded.gallery.paths
            assert query.tags[0] in EDIT_KINDS
    some_id = data.split_images["val"][0]
    scene = scene_from_json(annotations["scenes"][some_id])
    assert scene == data.scenes[some_id]
    assert annotations["captions"][some_id] == caption(scene)
    on_disk = load_synthetic(root, "val").gallery.open(some_id)
    drawn = render_scene(scene, SMALL.image_size, jitter_seed=some_id)
    assert ImageChops.difference(on_disk, drawn).getbbox() is None


def test_rewriting_the_same_benchmark_is_a_no_op_and_a_different_one_is_refused(tmp_path):
    root = write_synthetic(tmp_path / "bench", SMALL)
    stamp = (root / "annotations.json").stat().st_mtime_ns
    write_synthetic(root, SMALL)
    assert (root / "annotations.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other settings"):
        write_synthetic(root, SynthConfig(seed=99, train=6, val=6, test=6, test_unseen=3))


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="circe synth"):
        load_synthetic(tmp_path / "missing")
    root = write_synthetic(tmp_path / "bench", SMALL)
    with pytest.raises(ValueError, match="unknown synthetic split"):
        load_synthetic(root, "tset")
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(
        DatasetFormatError,
        match=rf"format 1; this circe reads format {FORMAT_VERSION}.*circe synth",
    ):
        load_synthetic(root, "val")
    (root / "meta.json").write_text(json.dumps(meta))
    annotations = json.loads((root / "annotations.json").read_text())
    del annotations["splits"]["val"]["queries"][2]["text"]
    (root / "annotations.json").write_text(json.dumps(annotations))
    with pytest.raises(DatasetFormatError, match=r"query #2 lacks key 'text'"):
        load_synthetic(root, "val")


def test_written_words_change_only_the_lower_band_and_are_deterministic():
    scene = random_scene(random.Random(0), 3, 3)
    image = render_scene(scene, 128)
    written = write_words(image, "large blue square")
    assert written.size == image.size
    box = ImageChops.difference(image, written).getbbox()
    assert box is not None and box[1] >= 128 * 0.6
    assert (
        ImageChops.difference(written, write_words(image, "large  blue square")).getbbox() is None
    )
    longer = write_words(image, "small purple diamond at the bottom right")
    assert ImageChops.difference(longer, written).getbbox() is not None

"""The independent wording of `val_free` / `test_free`: every edit kind worded, names that fit
one object, exact content words, noise that spares them, no verb or frame of the generator's."""

import random
import re
from collections import Counter
from itertools import pairwise

import pytest
from typer.testing import CliRunner

from circe.cli import app
from circe.data import free_wording, phrasing
from circe.data.free_wording import (
    FRAMES,
    KIND_FRAMES,
    NAMES,
    NEW_OBJECT,
    PLACE_WORDS,
    PROTECTED,
    RESULTS,
    VERBS,
    name_object,
    referents,
    roughen,
    typo,
    vocabulary,
    word_edit,
)
from circe.data.render import COLOURS, POSITIONS, SHAPES, SIZES, SceneObject, canonical
from circe.data.synthetic import (
    EDIT_KINDS,
    HELD_OUT_COMBINATIONS,
    REWORDED,
    SPLITS,
    SynthConfig,
    apply_edit,
    generate,
    random_scene,
    skeleton,
    wording_stats,
    write_synthetic,
)

SMALL = SynthConfig(seed=5, train=120, val=30, test=48, test_unseen=6, image_size=16)
FREE_SPLITS = {split: source for split, source in REWORDED.items() if split.endswith("_free")}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def edits(kind: str, count: int, rng: random.Random):
    """`count` random (reference scene, Edit) pairs of `kind`."""
    found = []
    while len(found) < count:
        reference = random_scene(rng, 1, 5)
        edit = apply_edit(reference, kind, rng)
        if edit is not None:
            found.append((reference, edit))
    return found


def test_edit_kinds_are_the_benchmarks():
    assert free_wording.EDIT_KINDS == EDIT_KINDS
    with pytest.raises(ValueError, match="unknown edit kind"):
        word_edit("rotate", (), None, None, random.Random(0))


# ----------------------------------------------------------------------------- naming


def test_every_name_fits_exactly_one_object_of_its_scene():
    rng = random.Random(11)
    styles = Counter()
    for _ in range(2500):
        scene = random_scene(rng, 1, 5)
        for obj in scene:
            style, name = name_object(obj, scene, rng)
            styles[style] += 1
            assert referents(name, scene) == [obj], (name, scene, obj)
    assert set(styles) == set(NAMES), styles  # every way of naming is used


def test_the_reader_sees_ambiguity():
    """`referents` is no rubber stamp: a name that fits several objects reads as several."""
    left, right = SceneObject(0, "circle", "red", "small"), SceneObject(2, "circle", "red", "large")
    square = SceneObject(1, "square", "blue", "small")
    below = SceneObject(4, "circle", "green", "small")  # touches the square, as both others do
    scene = canonical([left, square, right, below])
    assert len(referents("the red circle", scene)) == 2
    assert referents("the leftmost red circle", scene) == [left]
    assert referents("the largest circle", scene) == [right]
    assert referents("the second circle from the left", scene) == [below]
    assert len(referents("the second circle from the top", scene)) == 2  # two share the top row
    assert referents("the second red thing from the left", scene) == [right]
    assert referents("the second red thing from left", scene) == [right]  # article dropped
    assert len(referents("the circle next to the square", scene)) == 3
    assert referents("whatever is in the top right corner", scene) == [right]


def test_neighbours_are_never_named_by_a_held_out_pair():
    held_out = re.compile(r"\b({}) ({})\b".format("|".join(COLOURS), "|".join(SHAPES)))
    rng = random.Random(3)
    for _ in range(1500):
        scene = random_scene(rng, 2, 5)
        for obj in scene:
            if (obj.colour, obj.shape) in HELD_OUT_COMBINATIONS:
                continue
            _, name = name_object(obj, scene, rng, HELD_OUT_COMBINATIONS)
            assert not HELD_OUT_COMBINATIONS & set(held_out.findall(name)), (name, scene)


# ----------------------------------------------------------------------------- texts


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_every_kind_is_worded_in_every_frame_and_states_its_content(kind):
    rng = random.Random(f"free/{kind}")
    frames, verbs = Counter(), Counter()
    for reference, edit in edits(kind, 400, rng):
        worded = word_edit(kind, reference, edit.before, edit.after, rng, noise=False)
        text = " ".join(worded.text.lower().split())
        families = dict(f.split(":", 1) for f in worded.families[1:])
        assert worded.families[0] == "free"
        frames[families["frame"]] += 1
        verbs[families.get("verb")] += 1
        assert ("naming" in families) == (kind != "add")
        assert "{" not in worded.text and worded.text[0].isupper()
        assert worded.text.endswith((".", "?")), worded.text
        after = edit.after
        if kind in ("add", "move"):  # the new place in the grid's own words
            assert re.search(rf"\b{POSITIONS[after.cell]}\b", text), text
        if kind == "add":
            for attribute in (after.colour, after.shape, after.size):
                assert re.search(rf"\b{attribute}\b", text), text
        elif kind == "recolour":
            assert re.search(rf"\b{after.colour}\b", text), text
        elif kind == "resize":
            assert re.search(rf"\b{after.size}\b", text), text
        elif kind == "reshape":
            assert re.search(rf"\ban? {after.shape}\b", text), text
    assert set(frames) == set(FRAMES) | set(KIND_FRAMES[kind]), frames
    assert set(verbs) - {None} == {verb.base for verb in VERBS[kind]}, verbs


def test_noise_never_alters_content_words():
    rng = random.Random(7)
    changed = 0
    for kind in EDIT_KINDS:
        for reference, edit in edits(kind, 150, rng):
            text = word_edit(kind, reference, edit.before, edit.after, rng, noise=False).text
            rough = roughen(text, rng)
            changed += rough != text
            content = [w for w in words(text) if w in PROTECTED]
            assert [w for w in words(rough) if w in PROTECTED] == content, (text, rough)
    assert changed > 0.9 * 150 * len(EDIT_KINDS)


def test_a_typo_changes_one_unprotected_word():
    rng = random.Random(1)
    text = "would you mind shading the second circle from the left in purple?"
    slipped_words = set()
    for _ in range(300):
        slipped = typo(text, rng)
        differing = [(a, b) for a, b in zip(text.split(" "), slipped.split(" ")) if a != b]
        assert len(differing) <= 1
        slipped_words |= {a for a, _ in differing}
    assert slipped_words == {"would", "mind", "shading"}  # every other word is protected


def test_noise_reaches_about_a_third_of_the_texts():
    rough = 0
    for seed, (reference, edit) in enumerate(edits("recolour", 600, random.Random(2))):
        # The noise draws come after the wording's: one seed gives the same sentence twice.
        noisy, clean = (
            word_edit("recolour", reference, edit.before, edit.after, random.Random(seed), noise=n)
            for n in (True, False)
        )
        assert noisy.wording == clean.wording
        rough += noisy.text != clean.text
    assert 0.25 < rough / 600 < 0.42, rough


def test_wording_is_a_function_of_the_seed():
    reference, edit = edits("move", 1, random.Random(0))[0]
    text = lambda seed: word_edit("move", reference, edit.before, edit.after, random.Random(seed))
    assert text(4) == text(4)
    assert len({text(seed).text for seed in range(20)}) > 15


# ----------------------------------------------------------------------------- independence


def template_words(template: str) -> list[list[str]]:
    """The literal runs of a template, as words: what lies between its {fields}."""
    return [words(run) for run in re.split(r"\{\w+\}", template)]


def phrasing_templates() -> list[str]:
    """Every frame, action and phrase of the generator, its held-out families included."""
    templates = [t for options in phrasing.ACTIONS.values() for _, t in options]
    templates += [t for options in phrasing.STATES.values() for _, t in options]
    templates += [t for _, t in phrasing.WRAPPERS]
    templates += [t for _, t in (*phrasing.PLACE_PHRASES, *phrasing.DESTINATIONS)]
    templates += [*phrasing.CAPTION_FRAMES, *phrasing.RELATIONS.values()]
    return templates


def free_templates() -> list[str]:
    templates = [*FRAMES.values(), *(f for kind in KIND_FRAMES.values() for f in kind.values())]
    templates += [r for results in RESULTS.values() for r in results]
    templates += [verb.phrase for verbs in VERBS.values() for verb in verbs]
    return templates + [*NEW_OBJECT, *(n for names in NAMES.values() for n in names)]


def inflections(verb: str) -> set[str]:
    """Regular forms of a verb: 'take' -> take, takes, taking, taked ... (over-generating is
    harmless: only words that occur are compared)."""
    stem = verb.removesuffix("e")
    forms = {verb, verb + "s", verb + "es", verb + "d", verb + "ed", stem + "ing", stem + "ed"}
    return forms | {verb + "ing", verb + verb[-1] + "ing", verb + verb[-1] + "ed"}


def test_no_verb_of_the_generator_is_a_word_of_the_free_rules():
    heads = {verb for options in phrasing.SIZE_VERBS.values() for _, verb in options}
    for options in phrasing.ACTIONS.values():  # "{at}, add {new}", "get rid of the {ref}"
        heads |= {next(w for run in template_words(t) for w in run) for _, t in options}
    assert {"remove", "move", "take", "get", "erase", "slide", "downsize"} <= heads
    forms = set().union(*map(inflections, heads))
    assert not forms & vocabulary()
    free_forms = {form for verbs in VERBS.values() for verb in verbs for form in verb[:3]}
    generator_words = {w for t in phrasing_templates() for run in template_words(t) for w in run}
    assert not free_forms & generator_words


def test_no_two_words_in_a_row_of_the_generator_are_in_a_free_frame():
    def pairs(templates: list[str]) -> set[tuple[str, str]]:
        return {pair for t in templates for run in template_words(t) for pair in pairwise(run)}

    assert pairs(phrasing_templates())  # the comparison is not empty
    assert not pairs(phrasing_templates()) & pairs(free_templates())


def test_no_size_or_place_word_of_the_generator_beyond_the_scenes_own():
    tables = [*phrasing.SIZE_WORDS.values(), *phrasing.COMPARATIVES.values()]
    tables += [*phrasing._ROW_WORDS.values(), phrasing.CENTRE_WORDS]
    generator = {w for table in tables for _, phrase in table for w in words(phrase)}
    scene_words = {*COLOURS, *SHAPES, *SIZES, *PLACE_WORDS, "a"}  # "a": from "a lot bigger"
    assert generator - scene_words  # huge, tiny, upper, centre ...
    assert not (generator - scene_words) & vocabulary()


# ----------------------------------------------------------------------------- splits


def test_free_splits_reword_their_sources_pairs():
    data = generate(SMALL)
    assert set(FREE_SPLITS) == {"val_free", "test_free"} and set(FREE_SPLITS) <= set(SPLITS)
    train_wordings = {q["wording"] for q in data.split_queries["train"]}
    held_out = re.compile(r"\b({}) ({})\b".format("|".join(COLOURS), "|".join(SHAPES)))
    for split, source in FREE_SPLITS.items():
        free, original = data.split_queries[split], data.split_queries[source]
        assert len(free) == len(original) > 0
        assert data.split_images[split] == data.split_images[source]
        same = ("reference", "target", "kind", "edit")
        for n, (worded, query) in enumerate(zip(free, original)):
            assert {k: worded[k] for k in same} == {k: query[k] for k in same}
            assert worded["query_id"] == f"{split.replace('_', '')}-q{n:05d}"
            assert worded["query_id"].startswith(("valfree-", "testfree-"))
            assert worded["families"][0] == "free"
            assert worded["wording"] not in train_wordings
            assert worded["text"] != query["text"]
            assert not HELD_OUT_COMBINATIONS & set(held_out.findall(worded["text"].lower()))


def test_free_splits_follow_the_seed():
    first, again = generate(SMALL), generate(SMALL)
    other = generate(SynthConfig(seed=6, train=120, val=30, test=48, test_unseen=6))
    for split in FREE_SPLITS:
        assert first.split_queries[split] == again.split_queries[split]
        texts = [q["text"] for q in first.split_queries[split]]
        assert texts != [q["text"] for q in other.split_queries[split]]


def test_skeleton_slots_out_the_content_words():
    assert skeleton("Remove the SMALL red  circle!") == "remove the {size} {colour} {shape}"
    assert skeleton("put it in the upper left") == "put it in the {place} {place}"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("free") / "bench", SMALL)


def test_wording_stats_find_the_free_splits_worded_unlike_train(written):
    stats = wording_stats(written)
    assert all("skeletons_in_train" in entry for entry in stats.values())
    for split in FREE_SPLITS:
        assert stats[split]["texts_in_train"] == stats[split]["wordings_in_train"] == 0
        assert stats[split]["skeletons_in_train"] <= 0.02 * stats[split]["texts"]
    # The same measure finds the generator's own habits in its own held-in splits.
    assert stats["test"]["skeletons_in_train"] > 0.1 * stats["test"]["texts"]


def test_synth_reports_the_free_splits(tmp_path):
    args = ["synth", "--out", tmp_path / "bench", "--train", 12, "--val", 6, "--test", 6]
    args += ["--test-unseen", 3, "--image-size", 16]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    for split in FREE_SPLITS:
        assert f"{split}: 6 queries" in result.output
    assert "worded like a train text" in " ".join(result.output.split())

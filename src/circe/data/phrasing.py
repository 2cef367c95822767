"""Modification texts for the synthetic benchmark: free wording, with held-out families.

Real CIR benchmarks (FashionIQ, CIRR) have free human language, so a method that learns the
benchmark's templates instead of the words looks good here and fails there. This generator
phrases one edit of a scene in many ways, built from interchangeable parts:

    frame        how the request is put: "remove the X", "please ...", "the X should be gone",
                 "same but without the X", "I want ...", "could you ...?", "no longer ...",
                 "now without the X" (several per family; wrappers take any action phrase)
    action       the verb phrase of the edit, with its synonyms: remove / delete / take away /
                 erase / drop / get rid of; make / paint / dye ... ; put / move / shift / slide
    object name  the edited object named by its attributes ("small red circle"), by its place
                 ("the circle in the top left"), or by its relation to another object ("the
                 circle left of the square"); always unique in the reference scene
    words        size words (large / big / huge; small / little / tiny) and place words (top
                 left / top-left / upper left)
    surface      casing, end punctuation, and a typo in a share of texts (never in a word
                 that carries the edit: colours, shapes, sizes, places)

Every choice of frame, action and word belongs to a *family*, and every family to one pool:
`seen` (the wording of the train, val, test and test_unseen splits), `val` (held out from
training, used only by `val_phrasing`, for choosing recipes) or `test` (held out from
training and validation, used only by `test_phrasing`). A held-out split takes its frame
from its own pool only, and each word slot from its own pool half of the time (from the
seen words otherwise, or when its pool has no word for that slot): so every held-out text has
a wording no training text has, and the vocabulary it needs is in the backbone's pretraining
captions (`circe pretrain`), as a real CLIP knows words that a CIR training set never uses.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from circe.data.render import COLOURS, GRID, SHAPES, SIZES, Scene, SceneObject

POOLS = ("seen", "val", "test")
# The pool each phrasing split draws its held-out families from.
SPLIT_POOL = {"val_phrasing": "val", "test_phrasing": "test"}

# A family's name, then the pool that may use it.
FAMILIES: dict[str, str] = {
    # frames
    "imperative": "seen",
    "please": "seen",
    "keep-the-rest": "seen",
    "should": "seen",
    "same-but": "seen",
    "wish": "val",
    "request": "test",
    "no-longer": "test",
    "now-with": "test",
    # actions (verb synonyms)
    "verbs-common": "seen",
    "verbs-val": "val",
    "verbs-rare": "test",
    # words
    "words-plain": "seen",
    "words-val": "val",
    "words-rare": "test",
}

# Action phrases per edit kind: (family, template). Fields: {ref} the object's name, {new}
# the added object ("a large red circle"), {at} a place phrase ("in the top left"), {to} a
# destination ("to the top left"), {colour}, {shape} ("a square"), {bigger} a comparative.
ACTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "add": (
        ("verbs-common", "add {new} {at}"),
        ("verbs-common", "put {new} {at}"),
        ("verbs-common", "{at}, add {new}"),
        ("verbs-common", "place {new} {at}"),
        ("verbs-val", "insert {new} {at}"),
        ("verbs-val", "{at}, insert {new}"),
        ("verbs-rare", "include {new} {at}"),
        ("verbs-rare", "draw {new} {at}"),
        ("verbs-rare", "{at}, draw {new}"),
    ),
    "remove": (
        ("verbs-common", "remove the {ref}"),
        ("verbs-common", "delete the {ref}"),
        ("verbs-val", "take away the {ref}"),
        ("verbs-val", "take the {ref} away"),
        ("verbs-rare", "erase the {ref}"),
        ("verbs-rare", "drop the {ref}"),
        ("verbs-rare", "get rid of the {ref}"),
    ),
    "recolour": (
        ("verbs-common", "make the {ref} {colour}"),
        ("verbs-common", "paint the {ref} {colour}"),
        ("verbs-common", "change the colour of the {ref} to {colour}"),
        ("verbs-val", "recolour the {ref} {colour}"),
        ("verbs-val", "colour the {ref} {colour}"),
        ("verbs-rare", "dye the {ref} {colour}"),
        ("verbs-rare", "switch the colour of the {ref} to {colour}"),
        ("verbs-rare", "give the {ref} a {colour} colour"),
    ),
    "resize": (
        ("verbs-common", "make the {ref} {bigger}"),
        ("verbs-common", "change the {ref} to {size}"),
        ("verbs-val", "resize the {ref} to {size}"),
        ("verbs-rare", "scale the {ref} to {size}"),
        ("verbs-rare", "turn the {ref} {size}"),
    ),
    "reshape": (
        ("verbs-common", "turn the {ref} into {shape}"),
        ("verbs-common", "change the {ref} to {shape}"),
        ("verbs-val", "replace the {ref} with {shape}"),
        ("verbs-rare", "swap the {ref} for {shape}"),
        ("verbs-rare", "transform the {ref} into {shape}"),
    ),
    "move": (
        ("verbs-common", "move the {ref} {to}"),
        ("verbs-common", "put the {ref} {at} instead"),
        ("verbs-common", "{at}, put the {ref}"),
        ("verbs-val", "shift the {ref} {to}"),
        ("verbs-rare", "relocate the {ref} {to}"),
        ("verbs-rare", "slide the {ref} over {to}"),
    ),
}
# Resizing verbs that need no size word ("enlarge the X"), by the size the object gets.
SIZE_VERBS: dict[str, tuple[tuple[str, str], ...]] = {
    "large": (("verbs-common", "enlarge"), ("verbs-val", "grow"), ("verbs-rare", "expand")),
    "small": (("verbs-common", "shrink"), ("verbs-val", "reduce"), ("verbs-rare", "downsize")),
}

# Frames that wrap any action phrase.
WRAPPERS: tuple[tuple[str, str], ...] = (
    ("imperative", "{action}"),
    ("please", "please {action}"),
    ("please", "{action}, please"),
    ("keep-the-rest", "{action} and keep the rest the same"),
    ("keep-the-rest", "keep everything else, just {action}"),
    ("wish", "I want you to {action}"),
    ("wish", "I'd like you to {action}"),
    ("request", "could you {action}?"),
    ("request", "can you please {action}"),
)
# Frames that state the result instead of asking for an action, per edit kind. Extra fields:
# {old} the colour / shape / size the object had, {pos} the new place, {new_bare} the added
# object without an article, {cell} the new place as a noun ("top left").
STATES: dict[str, tuple[tuple[str, str], ...]] = {
    "add": (
        ("should", "there should also be {new} {at}"),
        ("same-but", "same but with {new} {at}"),
        ("same-but", "same scene plus {new} {at}"),
        ("wish", "I want {new} {at} as well"),
        ("no-longer", "the {cell} is no longer empty but holds {new}"),
        ("now-with", "now with an extra {new_bare} {at}"),
    ),
    "remove": (
        ("should", "the {ref} should be gone"),
        ("same-but", "same but without the {ref}"),
        ("same-but", "same scene minus the {ref}"),
        ("wish", "I want the {ref} gone"),
        ("no-longer", "the {ref} is no longer there"),
        ("now-with", "now without the {ref}"),
    ),
    "recolour": (
        ("should", "the {ref} should be {colour}"),
        ("same-but", "same but the {ref} is {colour}"),
        ("wish", "I want the {ref} in {colour}"),
        ("no-longer", "the {ref} is no longer {old} but {colour}"),
        ("now-with", "now with the {ref} in {colour}"),
    ),
    "resize": (
        ("should", "the {ref} should be {bigger}"),
        ("same-but", "same but the {ref} is {size}"),
        ("wish", "I want the {ref} {bigger}"),
        ("no-longer", "the {ref} is no longer {old} but {size}"),
        ("now-with", "now with the {ref} {bigger}"),
    ),
    "reshape": (
        ("should", "the {ref} should be {shape} instead"),
        ("same-but", "same but {shape} instead of the {ref}"),
        ("wish", "I want {shape} where the {ref} is"),
        ("no-longer", "the {ref} is no longer {old} but {shape}"),
        ("now-with", "now with {shape} in place of the {ref}"),
    ),
    "move": (
        ("should", "the {ref} should be {at}"),
        ("same-but", "same but the {ref} is {at}"),
        ("wish", "I want the {ref} {at}"),
        ("no-longer", "the {ref} is no longer where it was but {at}"),
        ("now-with", "now with the {ref} {at}"),
    ),
}

# Words: size adjectives and comparatives, by the size they mean.
SIZE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "large": (("words-plain", "large"), ("words-plain", "big"), ("words-rare", "huge")),
    "small": (("words-plain", "small"), ("words-val", "little"), ("words-rare", "tiny")),
}
COMPARATIVES: dict[str, tuple[tuple[str, str], ...]] = {
    "large": (("words-plain", "bigger"), ("words-val", "larger"), ("words-rare", "a lot bigger")),
    "small": (("words-plain", "smaller"), ("words-val", "less big"), ("words-rare", "tinier")),
}
_ROW_WORDS = {
    0: (("words-plain", "top"), ("words-rare", "upper")),
    1: (("words-plain", "middle"),),
    2: (("words-plain", "bottom"), ("words-rare", "lower")),
}
_COLUMN_WORDS = {0: "left", 1: "middle", 2: "right"}
CENTRE_WORDS = (("words-plain", "center"), ("words-val", "centre"), ("words-rare", "very middle"))
PLACE_PHRASES = (
    ("words-plain", "in the {pos}"),
    ("words-plain", "at the {pos}"),
    ("words-val", "in the {pos} cell"),
    ("words-rare", "in the {pos} spot"),
)
DESTINATIONS = (("words-plain", "to the {pos}"), ("words-rare", "over to the {pos} spot"))
RELATIONS = {  # (row step, column step) from the named object to the other one
    (0, 1): "left of",
    (0, -1): "right of",
    (1, 0): "above",
    (-1, 0): "below",
}

TYPO_RATE = 0.08  # share of texts with one typo
# Words a typo never touches: the ground truth must stay exact.
PROTECTED = frozenset(
    {*COLOURS, *SHAPES, *SIZES, "big", "huge", "little", "tiny", "bigger", "smaller", "larger"}
    | {"tinier", "top", "upper", "middle", "bottom", "lower", "left", "right", "center"}
    | {"centre", "no", "not", "without", "minus", "instead", "longer"}
)


@dataclass(frozen=True)
class Phrased:
    """A modification text and the families its wording drew from."""

    text: str
    frame: str  # the frame template, fields unfilled: what "a wording" is
    families: tuple[str, ...]


class _Chooser:
    """Picks options from the families a split may use.

    Frames come from the split's pool only; a word slot from the split's pool half of the
    time when that pool has options for it (held-out splits), else from the seen pool.
    Pool `any` (pretraining text, the backbone's "web") picks among every family.
    """

    def __init__(self, rng: random.Random, pool: str):
        if pool not in (*POOLS, "any"):
            raise ValueError(f"unknown phrasing pool {pool!r}; choose one of {POOLS}")
        self.rng, self.pool, self.used = rng, pool, []

    def options(self, options: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        if self.pool == "any":
            return list(options)
        own = [o for o in options if FAMILIES[o[0]] == self.pool]
        if self.pool == "seen" or not own or self.rng.random() < 0.5:
            own = [o for o in options if FAMILIES[o[0]] == "seen"]
        return own

    def word(self, options: tuple[tuple[str, str], ...]) -> str:
        family, value = self.rng.choice(self.options(options))
        self.used.append(family)
        return value


def place_name(cell: int, choose: _Chooser) -> str:
    """The name of a grid cell: 'top left', 'upper right', 'centre', 'middle left'."""
    row, column = divmod(cell, GRID)
    if (row, column) == (1, 1):
        return choose.word(CENTRE_WORDS)
    return f"{choose.word(_ROW_WORDS[row])} {_COLUMN_WORDS[column]}"


def object_words(obj: SceneObject, choose: _Chooser, parts=("size", "colour", "shape")) -> str:
    words = {"size": choose.word(SIZE_WORDS[obj.size]), "colour": obj.colour, "shape": obj.shape}
    return " ".join(words[p] for p in parts)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _unique_by(obj: SceneObject, others: list[SceneObject], parts: tuple[str, ...]) -> bool:
    key = lambda o: tuple(getattr(o, p) for p in parts)
    return all(key(o) != key(obj) for o in others)


def referring_expression(
    obj: SceneObject, scene: Scene, choose: _Chooser, avoid: frozenset = frozenset()
) -> str:
    """A name for `obj` that picks it out uniquely in `scene`: by attributes, by its place,
    or by its relation to another object that is itself named uniquely (never by a
    (colour, shape) pair in `avoid`)."""
    others = [o for o in scene if o != obj]
    options: list[tuple[str, ...] | str] = []
    for parts in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")):
        if _unique_by(obj, others, parts):
            options.append(parts)
    options += ["place", "place"]  # always unique: one object per cell
    relations = _relations(obj, scene, avoid)
    if relations:
        options.append("relation")
    style = choose.rng.choice(options)
    if style == "place":
        parts = choose.rng.choice((("shape",), ("colour", "shape"), ("size", "colour", "shape")))
        preposition = choose.rng.choice(("in the", "at the"))
        return f"{object_words(obj, choose, parts)} {preposition} {place_name(obj.cell, choose)}"
    if style == "relation":
        relation, anchor = choose.rng.choice(relations)
        return f"{obj.shape} {relation} the {anchor}"
    return object_words(obj, choose, style)


def _relations(obj: SceneObject, scene: Scene, avoid: frozenset) -> list[tuple[str, str]]:
    """(relation, anchor name) pairs that name `obj` uniquely among same-shaped objects: the
    anchor is an adjacent object with a unique shape or colour+shape."""
    row, column = divmod(obj.cell, GRID)
    found = []
    for (d_row, d_column), relation in RELATIONS.items():
        cell = (row + d_row) * GRID + column + d_column
        if not (0 <= row + d_row < GRID and 0 <= column + d_column < GRID):
            continue
        anchor = next((o for o in scene if o.cell == cell), None)
        if anchor is None:
            continue
        rest = [o for o in scene if o != anchor]
        if _unique_by(anchor, rest, ("shape",)):
            anchor_name = anchor.shape
        elif (
            _unique_by(anchor, rest, ("colour", "shape"))
            and (anchor.colour, anchor.shape) not in avoid
        ):
            anchor_name = f"{anchor.colour} {anchor.shape}"
        else:
            continue
        # Unique: no other object of obj's shape has an object of the anchor's name beside it
        # in the same direction.
        same_shape = [o for o in scene if o.shape == obj.shape and o != obj]
        if not any(_towards(o, anchor, d_row, d_column) for o in same_shape):
            found.append((relation, anchor_name))
    return found


def _towards(obj: SceneObject, anchor: SceneObject, d_row: int, d_column: int) -> bool:
    """Whether `anchor` lies from `obj` in the direction (d_row, d_column), at any distance
    along the same row or column: "left of the square" must not fit two circles."""
    (row, column), (anchor_row, anchor_column) = divmod(obj.cell, GRID), divmod(anchor.cell, GRID)
    if d_row == 0:
        return row == anchor_row and (anchor_column - column) * d_column > 0
    return column == anchor_column and (anchor_row - row) * d_row > 0


def phrase_edit(
    kind: str,
    scene: Scene,
    before: SceneObject | None,
    after: SceneObject | None,
    rng: random.Random,
    pool: str = "seen",
    avoid: frozenset = frozenset(),
) -> Phrased:
    """One wording of the edit that turns `before` in `scene` into `after` (None: added /
    removed), drawn from `pool`'s families. No other object is named by a (colour, shape)
    pair in `avoid` (the benchmark's held-out combinations)."""
    choose = _Chooser(rng, pool)
    fields = _fields(kind, scene, before, after, choose, avoid)
    frames = [(f, t, "state") for f, t in STATES[kind] if pool in (FAMILIES[f], "any")]
    frames += [(f, t, "wrapper") for f, t in WRAPPERS if pool in (FAMILIES[f], "any")]
    if not frames:
        raise ValueError(f"pool {pool!r} has no frame for {kind!r}")
    family, frame, form = rng.choice(frames)
    families = [family]
    if form == "wrapper":
        action_family, action = _action(kind, after, choose)
        families.append(action_family)
        frame = frame.replace("{action}", action)
    text = frame.format(**fields)
    families += choose.used
    return Phrased(_surface(text, rng), frame, tuple(dict.fromkeys(families)))


def _fields(kind, scene, before, after, choose: _Chooser, avoid: frozenset) -> dict[str, str]:
    fields: dict[str, str] = {}
    if before is not None:
        fields["ref"] = referring_expression(before, scene, choose, avoid)
    if after is None:
        return fields
    if kind in ("add", "move"):
        name = place_name(after.cell, choose)
        fields["cell"] = name
        fields["at"] = choose.word(PLACE_PHRASES).format(pos=name)
        fields["to"] = choose.word(DESTINATIONS).format(pos=name)
    if kind == "add":
        fields["new_bare"] = object_words(after, choose)
        fields["new"] = with_article(fields["new_bare"])
    elif kind == "recolour":
        fields["colour"], fields["old"] = after.colour, before.colour
    elif kind == "resize":
        fields["size"] = choose.word(SIZE_WORDS[after.size])
        fields["bigger"] = choose.word(COMPARATIVES[after.size])
        fields["old"] = choose.word(SIZE_WORDS[before.size])
    elif kind == "reshape":
        fields["shape"], fields["old"] = with_article(after.shape), with_article(before.shape)
    return fields


def _action(kind: str, after: SceneObject | None, choose: _Chooser) -> tuple[str, str]:
    """(family, template) of an action phrase: a verb of the split's pool."""
    options = [*ACTIONS[kind]]
    if kind == "resize":
        options += [(f, verb + " the {ref}") for f, verb in SIZE_VERBS[after.size]]
    return choose.rng.choice(choose.options(tuple(options)))


def _surface(text: str, rng: random.Random) -> str:
    """Casing, end punctuation and the occasional typo, as people type."""
    if rng.random() < TYPO_RATE:
        text = typo(text, rng)
    roll = rng.random()
    if roll < 0.3:
        text = text[0].upper() + text[1:]
    elif roll < 0.33:
        text = text.upper()
    if not text.endswith("?"):
        text += rng.choice(("", "", "", ".", ".", "!"))
    return text


def typo(text: str, rng: random.Random) -> str:
    """One slip of the fingers in a word that does not carry the edit: two letters swapped,
    one dropped or one doubled."""
    words = text.split(" ")
    candidates = [
        i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha() and w not in PROTECTED
    ]
    if not candidates:
        return text
    i = rng.choice(candidates)
    word, at = words[i], rng.randrange(1, len(words[i]) - 1)
    slip = rng.choice(("swap", "drop", "double"))
    if slip == "swap":
        word = word[:at] + word[at + 1] + word[at] + word[at + 2 :]
    elif slip == "drop":
        word = word[:at] + word[at + 1 :]
    else:
        word = word[:at] + word[at] + word[at:]
    words[i] = word
    return " ".join(words)


def held_out_words(pool: str) -> set[str]:
    """Words that only `pool`'s families use (none of the seen families has them)."""

    def words_of(families: set[str]) -> set[str]:
        texts = [t for options in ACTIONS.values() for f, t in options if f in families]
        texts += [t for f, t in WRAPPERS if f in families]
        texts += [t for options in STATES.values() for f, t in options if f in families]
        for table in (SIZE_WORDS, COMPARATIVES, SIZE_VERBS, _ROW_WORDS):
            texts += [t for options in table.values() for f, t in options if f in families]
        for options in (CENTRE_WORDS, PLACE_PHRASES, DESTINATIONS):
            texts += [t for f, t in options if f in families]
        return set(re.findall(r"[a-z']+", " ".join(re.sub(r"\{\w+\}", " ", t) for t in texts)))

    own = {f for f, p in FAMILIES.items() if p == pool}
    seen = {f for f, p in FAMILIES.items() if p == "seen"}
    # Words the filled fields bring to any text: articles, relations, the attribute words.
    fields = {"a", "an", "the", "of", *" ".join(RELATIONS.values()).split()}
    return words_of(own) - words_of(seen) - fields


# ----------------------------------------------------------------------------- captions

CAPTION_FRAMES = ("{objects}", "{objects}", "there is {objects}", "a picture of {objects}")


def varied_caption(scene: Scene, rng: random.Random, subset: bool = True) -> str:
    """A caption of `scene` in free wording, for pretraining the backbone: any subset of the
    objects (all of them without `subset`) in any order, each named with any family's words ('a huge red circle in the upper
    left') or by its relation to a neighbour ('a blue square above a red circle'), attributes
    sometimes reordered. The whole vocabulary of every pool is used: this is the backbone's
    "web text", which knows words that no CIR training text uses."""
    choose = _Chooser(rng, "any")
    objects = list(scene)
    rng.shuffle(objects)
    if subset and len(objects) > 1 and rng.random() < 0.5:  # a partial caption, half the time
        objects = objects[: rng.randint(1, len(objects))]
    if not objects:
        return "an empty grid"
    phrases = []
    for obj in objects:
        parts = rng.choice((("size", "colour", "shape"), ("colour", "size", "shape")))
        name = with_article(object_words(obj, choose, parts))
        neighbour = _neighbour(obj, scene, rng)
        if neighbour is not None:
            relation, other = neighbour
            phrases.append(f"{name} {relation} {with_article(object_words(other, choose))}")
        else:
            place = choose.word(PLACE_PHRASES).format(pos=place_name(obj.cell, choose))
            phrases.append(f"{name} {place}")
    joiner = rng.choice((", ", " and ", ", ", "; "))
    return rng.choice(CAPTION_FRAMES).format(objects=joiner.join(phrases))


def _neighbour(obj: SceneObject, scene: Scene, rng: random.Random):
    """(relation, adjacent object) for a third of the objects that have a neighbour."""
    row, column = divmod(obj.cell, GRID)
    around = [
        (relation, other)
        for (d_row, d_column), relation in RELATIONS.items()
        for other in scene
        if other.cell == (row + d_row) * GRID + column + d_column and 0 <= column + d_column < GRID
    ]
    return rng.choice(around) if around and rng.random() < 0.33 else None

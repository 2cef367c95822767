"""Modification texts worded by rules of their own: the `val_free` and `test_free` splits.

Every other text of the synthetic benchmark comes from `circe.data.phrasing`, its held-out
families included, so `test_phrasing` is new wording from the same hand: a method that learned
that hand's habits (its sentence shapes, its way of naming objects, its word order) keeps most
of its recall there and still loses it on language written by anyone else. This module is a
second, independent hand. It takes nothing from phrasing.py; it shares with it only the
scene's own words (colours, shapes, sizes and the grid's place names, from `circe.data.render`),
which carry the edit and so stay exact. The rest is written here:

    frames   sentence types the generator never makes: the wanted result described ("a scene
             like this one where the red one has vanished"), questions ("would you mind
             tinting ...?", "what if ...?"), passives ("... ought to be discarded"), a wish
             with a participle ("I'd prefer ... stuck in ..."), two clauses ("...; leave the
             other objects alone", "... In other words, ..."), a conditional ("if ... were
             ..., ..."), and frames of one edit kind ("I'd sooner see ... there than ...",
             "... is too small; it has to be large"). No two words in a row of a frame are
             two words in a row of the generator's frames and actions (tests check it)
    verbs    a small thesaurus per edit kind (discard, eliminate, omit, scrap ...; tint,
             shade, stain ...; carry, transfer, shove ...), with the forms a frame needs (base,
             -ing, participle). No head word is one the generator uses: tests/test_free_wording
             checks that against phrasing.py's own tables, not against a list kept by hand, and
             that no form of a generator's verb is a word of this module
    naming   the edited object by what sets it apart in the reference scene: its colour
             ("the red one"), shape ("the lone circle"), size ("the largest shape"), colour
             and shape ("the circle that is red"), an extreme or a rank ("the leftmost circle",
             "the second circle from the top"), a neighbour ("the circle next to the blue
             square") or its place ("whatever is in the top left corner"). `referents` reads
             a name back word by word, without knowing how it was chosen; the tests check, over
             many random scenes, that every name fits exactly one object
    places   a cell with a noun of its own: "the top left corner", "the middle right slot",
             "the bottom middle position", "the center of the grid"
    noise    about a third of the texts: casing, end punctuation, a doubled space, a dropped
             article, a typo (never in a colour, shape, size, place or naming word)

Every choice is drawn from the `random.Random` passed in: a split is a function of its seed.

What these splits are for: telling how a method copes with wording that nobody tuned it on.
Nothing of this module may feed training, pretraining captions or the choice of a recipe,
epoch or threshold, with one exception: recipes may be compared on `val_free`. `test_free` is
only ever reported; a choice made by looking at it would make it one more training signal.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import NamedTuple

from circe.data.render import COLOURS, GRID, POSITIONS, SHAPES, SIZES, Scene, SceneObject

NOISE_RATE = 1 / 3


class Verb(NamedTuple):
    """One thesaurus entry: its forms, and the verb phrase it makes. `{v}` takes a form; the
    phrase starts with `{v} {ref}` (`{v} {new}` for additions), so that dropping the object
    gives the passive ("cleared away"). `size`: the only new size it fits (resizing)."""

    base: str
    ing: str
    done: str
    phrase: str
    size: str | None = None


VERBS: dict[str, tuple[Verb, ...]] = {
    "add": (
        Verb("introduce", "introducing", "introduced", "{v} {new} in {place}"),
        Verb("stick", "sticking", "stuck", "{v} {new} in {place}"),
        Verb("throw", "throwing", "thrown", "{v} {new} into {place}"),
        Verb("pop", "popping", "popped", "{v} {new} into {place}"),
        Verb("plant", "planting", "planted", "{v} {new} in {place}"),
        Verb("set", "setting", "set", "{v} {new} down in {place}"),
        Verb("squeeze", "squeezing", "squeezed", "{v} {new} into {place}"),
    ),
    "remove": (
        Verb("discard", "discarding", "discarded", "{v} {ref}"),
        Verb("eliminate", "eliminating", "eliminated", "{v} {ref}"),
        Verb("omit", "omitting", "omitted", "{v} {ref}"),
        Verb("cut", "cutting", "cut", "{v} {ref} out"),
        Verb("lose", "losing", "lost", "{v} {ref}"),
        Verb("clear", "clearing", "cleared", "{v} {ref} away"),
        Verb("strip", "stripping", "stripped", "{v} {ref} out"),
        Verb("scrap", "scrapping", "scrapped", "{v} {ref}"),
        Verb("ditch", "ditching", "ditched", "{v} {ref}"),
        Verb("wipe", "wiping", "wiped", "{v} {ref} out"),
    ),
    "recolour": (
        # Never "{v} {ref} {colour}": after "the circle that is small" the colour would
        # read as a second adjective.
        Verb("tint", "tinting", "tinted", "{v} {ref} so that it's {colour}"),
        Verb("shade", "shading", "shaded", "{v} {ref} in {colour}"),
        Verb("stain", "staining", "stained", "{v} {ref} until it's {colour}"),
        Verb("tinge", "tingeing", "tinged", "{v} {ref} with {colour}"),
        Verb("coat", "coating", "coated", "{v} {ref} in {colour}"),
        Verb("render", "rendering", "rendered", "{v} {ref} in {colour}"),
        Verb("fill", "filling", "filled", "{v} {ref} with {colour}"),
    ),
    "resize": (
        Verb("blow", "blowing", "blown", "{v} {ref} up until it's {size}", "large"),
        Verb("inflate", "inflating", "inflated", "{v} {ref} until it's {size}", "large"),
        Verb("magnify", "magnifying", "magnified", "{v} {ref} so it's {size}", "large"),
        Verb("pump", "pumping", "pumped", "{v} {ref} up so that it's {size}", "large"),
        Verb("compress", "compressing", "compressed", "{v} {ref} until it's {size}", "small"),
        Verb("squash", "squashing", "squashed", "{v} {ref} down so it's {size}", "small"),
        Verb("trim", "trimming", "trimmed", "{v} {ref} down until it's {size}", "small"),
        Verb("adjust", "adjusting", "adjusted", "{v} {ref} so that it's {size}"),
        Verb("alter", "altering", "altered", "{v} {ref} so that it ends up {size}"),
    ),
    "reshape": (
        Verb("trade", "trading", "traded", "{v} {ref} for {a_shape}"),
        Verb("convert", "converting", "converted", "{v} {ref} into {a_shape}"),
        Verb("morph", "morphing", "morphed", "{v} {ref} into {a_shape}"),
        Verb("reshape", "reshaping", "reshaped", "{v} {ref} into {a_shape}"),
        Verb("rework", "reworking", "reworked", "{v} {ref} as {a_shape}"),
        Verb("remodel", "remodelling", "remodelled", "{v} {ref} as {a_shape}"),
        Verb("recast", "recasting", "recast", "{v} {ref} as {a_shape}"),
    ),
    "move": (
        Verb("carry", "carrying", "carried", "{v} {ref} off to {place}"),
        Verb("transfer", "transferring", "transferred", "{v} {ref} to {place}"),
        Verb("reposition", "repositioning", "repositioned", "{v} {ref} in {place}"),
        Verb("bring", "bringing", "brought", "{v} {ref} to {place}"),
        Verb("shove", "shoving", "shoved", "{v} {ref} into {place}"),
        Verb("push", "pushing", "pushed", "{v} {ref} into {place}"),
        Verb("drag", "dragging", "dragged", "{v} {ref} across to {place}"),
        Verb("park", "parking", "parked", "{v} {ref} in {place}"),
    ),
}
EDIT_KINDS = tuple(VERBS)  # the synthetic benchmark's, in its order

# The wanted result as a clause, per edit kind: what the target shows, no verb of editing.
RESULTS: dict[str, tuple[str, ...]] = {
    "add": (
        "{new} sits in {place} too",
        "{place} has gained {new}",
        "{new} has appeared in {place}",
        "{place} is occupied by {new}",
    ),
    "remove": (
        "{ref} is missing",
        "{ref} has vanished",
        "{ref} is absent",
        "{ref} has disappeared",
    ),
    "recolour": (
        "{ref} shows up in {colour}",
        "{ref} appears in {colour}",
        "{ref} comes out {colour}",
    ),
    "resize": ("{ref} has become {size}", "{ref} appears {size}", "{ref} comes out {size}"),
    "reshape": (
        "{ref} has become {a_shape}",
        "{ref} appears as {a_shape}",
        "{ref} has morphed into {a_shape}",
    ),
    "move": (
        "{ref} sits in {place}",
        "{ref} has ended up in {place}",
        "{ref} is found in {place}",
        "{ref} occupies {place}",
    ),
}

# Frames, by name. Their fields: {act} the verb phrase, {ing} its -ing form, {done} its
# passive ("cleared away"), {subj} the object it acts on, {result} a clause of RESULTS.
FRAMES: dict[str, str] = {
    "go-ahead": "go ahead and {act}",
    "lets": "let's {act}",
    "would-you-mind": "would you mind {ing}?",
    "how-about": "how about {ing}?",
    "kindly": "kindly {act}",
    "for-me": "{act} for me",
    "ought": "{subj} ought to be {done}",
    "needs": "{subj} needs to be {done}",
    "id-prefer": "I'd prefer {subj} {done}",
    "one-tweak": "one tweak only: {act}",
    "leave-alone": "{act}; leave the other objects alone",
    "in-other-words": "{act}. In other words, {result}",
    "if-were": "if {subj} were {done}, it would match what I have in mind",
    "wondering": "I was wondering whether you could {act}",
    "try": "try {ing}",
    "like-this": "a scene like this one where {result}",
    "except": "this exact layout, except that {result}",
    "what-if": "what if {result}?",
    "after": "I'm after a version in which {result}",
    "looking-for": "looking for one where {result}",
    "goal": "goal: {result}",
}
# Frames that only one kind of edit has; fields as in VERBS and RESULTS.
KIND_FRAMES: dict[str, dict[str, str]] = {
    "add": {
        "fill-empty": "{place} is empty; fill it with {new}",
        "what-it-needs": "what this needs is {new} in {place}",
    },
    "remove": {
        "no-business": "{ref} has no business being there",
        "do-without": "I can do without {ref}",
    },
    "recolour": {
        "rather-than": "{ref}, but {colour} rather than {old_colour}",
        "this-time": "{ref} again, but {colour} this time",
    },
    "resize": {
        "too": "{ref} is too {old_size}; it has to be {size}",
        "rather-than": "{ref}, {size} rather than {old_size}",
    },
    "reshape": {
        "sooner": "I'd sooner see {a_shape} there than {ref}",
        "stand-in": "{a_shape} ought to stand in for {ref}",
    },
    "move": {
        "belongs": "{ref} belongs in {place}",
        "look-better": "{ref} would look better in {place}",
    },
}
# How an added object is described (its three attributes, in other orders), before its article.
NEW_OBJECT = (
    "{size} {colour} {shape}",
    "{size} {shape} in {colour}",
    "{colour} {shape} that is {size}",
    "{size}, {colour} {shape}",
)

# ----------------------------------------------------------------------------- naming

# Ways to name an object, by what makes it unique. Fields: {colour} {shape} {size} its own,
# {noun} a head that says no shape, {superlative} "largest" / "smallest" for its size, and
# the fields each style adds: {extreme} / {ordinal} {side} with {head} the group counted
# ("circle", "shape", "red thing"), {anchor} a unique neighbour, {place} its cell.
NAMES: dict[str, tuple[str, ...]] = {
    "colour": ("the only {colour} {noun}", "the {colour} one", "the {colour} {noun}"),
    "shape": ("the only {shape}", "the lone {shape}", "the single {shape}"),
    "size": ("the only {size} {noun}", "the {superlative} {noun}", "the {superlative} one"),
    "colour-shape": (
        "the {shape} that is {colour}",
        "the {shape} which is {colour}",
        "the {colour} {shape}",
    ),
    "size-shape": ("the {shape} that is {size}", "the {superlative} {shape}"),
    "extreme": ("the {extreme} {head}",),
    "rank": ("the {ordinal} {head} from the {side}",),
    "neighbour": ("the {shape} next to {anchor}", "the {shape} beside {anchor}"),
    "place": (
        "the {shape} in {place}",
        "the {noun} in {place}",
        "whatever is in {place}",
        "the {colour} {shape} in {place}",
    ),
}
NOUNS = ("thing", "shape", "object", "piece")
SIZE_ORDER = ("small", "large")
SUPERLATIVE = {"small": "smallest", "large": "largest"}
# Words that pick the object at one end of its group: (attribute, whether the largest value).
EXTREMES = {
    "leftmost": ("column", False),
    "rightmost": ("column", True),
    "topmost": ("row", False),
    "highest": ("row", False),
    "lowest": ("row", True),
    "bottommost": ("row", True),
    "largest": ("size", True),
    "smallest": ("size", False),
}
ORDINALS = ("first", "second", "third", "fourth", "fifth")
# "... from the SIDE": the attribute counted along, and whether counting starts at its end.
SIDES = {"left": ("column", False), "right": ("column", True), "top": ("row", False)}
SIDES["bottom"] = ("row", True)
NEIGHBOURING = ("next to", "beside")
PLACE_WORDS = frozenset(word for place in POSITIONS for word in place.split())
# Words no typo touches: the edit's content, and every word a name is read by.
PROTECTED = frozenset(
    {*COLOURS, *SHAPES, *SIZES, *PLACE_WORDS, *EXTREMES, *ORDINALS, *SIDES}
    | {"only", "lone", "single", "one", "next", "beside", "whatever", "from", "corner", "grid"}
    | {"no", "nothing", "not", "rather", "instead", "too", "without"}
)


def _value(obj: SceneObject, attribute: str) -> int:
    row, column = divmod(obj.cell, GRID)
    return {"row": row, "column": column, "size": SIZE_ORDER.index(obj.size)}[attribute]


def _touching(a: SceneObject, b: SceneObject) -> bool:
    """Neighbours in the widest sense a reader might take "next to" in: diagonals count."""
    (row_a, column_a), (row_b, column_b) = divmod(a.cell, GRID), divmod(b.cell, GRID)
    return a != b and max(abs(row_a - row_b), abs(column_a - column_b)) == 1


def _beside(a: SceneObject, b: SceneObject) -> bool:
    """Neighbours in the narrow sense: one step apart along a row or a column."""
    (row_a, column_a), (row_b, column_b) = divmod(a.cell, GRID), divmod(b.cell, GRID)
    return abs(row_a - row_b) + abs(column_a - column_b) == 1


def place_phrase(cell: int, rng: random.Random) -> str:
    """A cell as a noun phrase in the grid's own words, always with a noun of this module
    ('the top left corner', 'the middle right slot', 'the center of the grid'): the
    generator says 'in the top left' or 'in the center'."""
    row, column = divmod(cell, GRID)
    if row == column == GRID // 2:
        return rng.choice(("the center of the grid", "the center of the board"))
    if row in (0, GRID - 1) and column in (0, GRID - 1):
        return f"the {POSITIONS[cell]} corner"
    return rng.choice((f"the {POSITIONS[cell]} slot", f"the {POSITIONS[cell]} position"))


def name_object(
    obj: SceneObject, scene: Scene, rng: random.Random, avoid: frozenset = frozenset()
) -> tuple[str, str]:
    """(style, name): a noun phrase, article included, that fits `obj` and no other object
    of `scene`. A neighbour is never named by a (colour, shape) pair in `avoid`."""
    others = [o for o in scene if o != obj]
    noun = rng.choice(NOUNS)

    def alone(*attributes: str) -> bool:
        return all(any(getattr(o, a) != getattr(obj, a) for a in attributes) for o in others)

    # style -> the extra fields of each way that style can name `obj` uniquely
    options: dict[str, list[dict[str, str]]] = {}
    for style, attributes in (
        ("colour", ("colour",)),
        ("shape", ("shape",)),
        ("size", ("size",)),
        ("colour-shape", ("colour", "shape")),
        ("size-shape", ("size", "shape")),
    ):
        if alone(*attributes):
            options[style] = [{}]
    groups = (  # (head, members): the objects an extreme or a rank counts among
        (noun, list(scene)),
        (obj.shape, [o for o in scene if o.shape == obj.shape]),
        (f"{obj.colour} {noun}", [o for o in scene if o.colour == obj.colour]),
    )
    groups = tuple((head, members) for head, members in groups if len(members) > 1)
    options["extreme"] = [
        {"extreme": word, "head": head}
        for head, members in groups
        for word, (attribute, high) in EXTREMES.items()
        if attribute != "size" and _at_end(obj, members, attribute, high)
    ]
    options["rank"] = [
        {"ordinal": ORDINALS[rank], "side": side, "head": head}
        for head, members in groups
        for side, (attribute, down) in SIDES.items()
        if (rank := _rank(obj, members, attribute, down)) is not None
    ]
    options["neighbour"] = [{"anchor": anchor} for anchor in _anchors(obj, scene, avoid)]
    options["place"] = [{}]  # one object per cell: a place is always unique
    style = rng.choice([style for style, ways in options.items() if ways])
    template = rng.choice(NAMES[style])
    fields = {
        "colour": obj.colour,
        "shape": obj.shape,
        "size": obj.size,
        "noun": noun,
        "superlative": SUPERLATIVE[obj.size],
        **rng.choice(options[style]),
    }
    if "{place}" in template:
        fields["place"] = place_phrase(obj.cell, rng)
    return style, template.format(**fields)


def _at_end(obj: SceneObject, members: list[SceneObject], attribute: str, high: bool) -> bool:
    """Whether `obj` alone holds the highest (lowest) value of `attribute` in `members`."""
    sign = 1 if high else -1
    return all(
        sign * (_value(obj, attribute) - _value(o, attribute)) > 0 for o in members if o != obj
    )


def _rank(obj: SceneObject, members: list[SceneObject], attribute: str, down: bool) -> int | None:
    """`obj`'s place (0: first) counting `members` along `attribute`, or None when two of
    them tie there (then no count is certain)."""
    values = sorted({_value(o, attribute) for o in members}, reverse=down)
    if len(values) != len(members) or len(values) > len(ORDINALS):
        return None
    return values.index(_value(obj, attribute))


def _anchors(obj: SceneObject, scene: Scene, avoid: frozenset) -> list[str]:
    """Names of the objects beside `obj` (same row or column) that make "the SHAPE next to
    ANCHOR" unique: the anchor named by its shape or colour and shape, unique either way, and
    no other object of `obj`'s shape touching it, diagonals included."""
    found = []
    for anchor in scene:
        if not _beside(anchor, obj):
            continue
        rest = [o for o in scene if o != anchor]
        if all(o.shape != anchor.shape for o in rest):
            name = f"the {anchor.shape}"
        elif all((o.colour, o.shape) != (anchor.colour, anchor.shape) for o in rest) and (
            (anchor.colour, anchor.shape) not in avoid
        ):
            name = f"the {anchor.colour} {anchor.shape}"
        else:
            continue
        rivals = [o for o in scene if o.shape == obj.shape and o not in (obj, anchor)]
        if not any(_touching(o, anchor) for o in rivals):
            found.append(name)
    return found


def referents(name: str, scene: Scene) -> list[SceneObject]:
    """The objects of `scene` that `name` could mean, read word by word the way a reader
    would, knowing nothing of how the name was chosen: each attribute or place word narrows
    the candidates, an extreme or a count picks among what is left (a tie keeps every tied
    object), "next to X" keeps what touches any object X could mean. One object back: the
    name is unambiguous."""
    text = " ".join(re.findall(r"[a-z]+", name.lower()))
    for joint in NEIGHBOURING:
        head, found, anchor = text.partition(f" {joint} ")
        if found:
            anchors = referents(anchor, scene)
            return [o for o in referents(head, scene) if any(_touching(o, a) for a in anchors)]
    words = text.split()
    candidates = [
        o
        for o in scene
        if all(o.colour == w for w in words if w in COLOURS)
        and all(o.shape == w for w in words if w in SHAPES)
        and all(o.size == w for w in words if w in SIZES)
        and all(
            o.cell == cell
            for cell, place in enumerate(POSITIONS)
            if re.search(rf"\b{place}\b", text)
        )
    ]
    for word in words:
        if word in EXTREMES and candidates:
            attribute, high = EXTREMES[word]
            best = (max if high else min)(_value(o, attribute) for o in candidates)
            candidates = [o for o in candidates if _value(o, attribute) == best]
    # "from top": the noise may drop the article
    count = re.search(rf"\b({'|'.join(ORDINALS)}) .*?from (?:the )?({'|'.join(SIDES)})\b", text)
    if count:
        attribute, down = SIDES[count[2]]
        values = sorted((_value(o, attribute) for o in candidates), reverse=down)
        n = ORDINALS.index(count[1])
        candidates = [
            o for o in candidates if n < len(values) and _value(o, attribute) == values[n]
        ]
    return candidates


# ----------------------------------------------------------------------------- texts


@dataclass(frozen=True)
class FreeText:
    """A modification text and how it was made."""

    text: str
    wording: str  # the sentence with its fields unfilled: frame, verb and result clause chosen
    families: tuple[str, ...]  # "free", then "frame:NAME", "verb:BASE", "naming:STYLE"


def word_edit(
    kind: str,
    scene: Scene,
    before: SceneObject | None,
    after: SceneObject | None,
    rng: random.Random,
    avoid: frozenset = frozenset(),
    noise: bool = True,
) -> FreeText:
    """The edit that turns `before` in `scene` into `after` (None: added / removed), in a
    frame and words of this module; a neighbour is never named by a (colour, shape) pair in
    `avoid`. `noise=False` leaves out the surface noise (and its draws from `rng`)."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")
    fields: dict[str, str] = {}
    families = ["free"]
    if before is not None:
        style, fields["ref"] = name_object(before, scene, rng, avoid)
        families.append(f"naming:{style}")
    if after is not None:
        fields |= {"colour": after.colour, "size": after.size, "shape": after.shape}
        fields["a_shape"] = _a(after.shape)
        if kind in ("add", "move"):
            fields["place"] = place_phrase(after.cell, rng)
        if kind == "add":
            fields["new"] = _a(rng.choice(NEW_OBJECT).format(**fields))
    if before is not None and after is not None:
        fields |= {"old_colour": before.colour, "old_size": before.size}
    name, frame = rng.choice([*FRAMES.items(), *KIND_FRAMES[kind].items()])
    families.insert(1, f"frame:{name}")
    patient = "{new}" if kind == "add" else "{ref}"
    parts = {"{subj}": patient}
    if any(slot in frame for slot in ("{act}", "{ing}", "{done}")):
        verb = rng.choice([v for v in VERBS[kind] if v.size in (None, fields.get("size"))])
        families.insert(2, f"verb:{verb.base}")
        passive = verb.phrase.replace(f" {patient}", "", 1)
        parts |= {
            "{act}": verb.phrase.replace("{v}", verb.base),
            "{ing}": verb.phrase.replace("{v}", verb.ing),
            "{done}": passive.replace("{v}", verb.done),
        }
    if "{result}" in frame:
        parts["{result}"] = rng.choice(RESULTS[kind])
    wording = frame
    for slot, part in parts.items():
        wording = wording.replace(slot, part)
    text = wording.format(**fields)
    text = text[0].upper() + text[1:] + ("" if text.endswith("?") else ".")
    if noise and rng.random() < NOISE_RATE:
        text = roughen(text, rng)
    return FreeText(text, wording, tuple(families))


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# ----------------------------------------------------------------------------- noise

_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def typo(text: str, rng: random.Random) -> str:
    """One slip in a word of four letters or more that no name or edit is read by: two
    letters swapped, one dropped, one doubled, or one hit by a neighbouring key."""
    words = text.split(" ")
    candidates = [
        i
        for i, word in enumerate(words)
        if len(core := word.strip(".,;:?!")) >= 4
        and core.isalpha()
        and core.lower() not in PROTECTED
    ]
    if not candidates:
        return text
    i = rng.choice(candidates)
    word = words[i]
    at = rng.randrange(1, len(word.rstrip(".,;:?!")) - 1)
    slip = rng.choice(("swap", "drop", "double", "key"))
    if slip == "swap":
        slipped = word[:at] + word[at + 1] + word[at] + word[at + 2 :]
    elif slip == "drop":
        slipped = word[:at] + word[at + 1 :]
    elif slip == "double":
        slipped = word[:at] + word[at] + word[at:]
    else:
        row = next((r for r in _KEYBOARD_ROWS if word[at].lower() in r), None)
        if row is None:
            return text
        j = row.index(word[at].lower())
        key = rng.choice([row[k] for k in (j - 1, j + 1) if 0 <= k < len(row)])
        slipped = word[:at] + key + word[at + 1 :]
    if slipped.strip(".,;:?!").lower() in PROTECTED:  # a slip must not make a content word
        return text
    words[i] = slipped
    return " ".join(words)


def _drop_article(text: str, rng: random.Random) -> str:
    articles = list(re.finditer(r"\b(the|an?) ", text, re.IGNORECASE))
    if not articles:
        return text
    match = rng.choice(articles)
    return text[: match.start()] + text[match.end() :]


def _double_space(text: str, rng: random.Random) -> str:
    spaces = [i for i, c in enumerate(text) if c == " "]
    if not spaces:
        return text
    i = rng.choice(spaces)
    return text[:i] + " " + text[i:]


def _punctuation(text: str, rng: random.Random) -> str:
    return text.rstrip(".?!") + rng.choice(("", "", "!!", "..."))


def _casing(text: str, rng: random.Random) -> str:
    return text.lower() if rng.random() < 0.75 else text.upper()


# In the order they apply: casing last, so that it also covers what the others wrote.
SLIPS = (typo, _drop_article, _double_space, _punctuation, _casing)


def roughen(text: str, rng: random.Random) -> str:
    """One or two of the slips of quick typing; the words that carry the edit stay whole."""
    chosen = set(rng.sample(range(len(SLIPS)), rng.choice((1, 1, 2))))
    for n, slip in enumerate(SLIPS):
        if n in chosen:
            text = slip(text, rng)
    return text


def vocabulary() -> set[str]:
    """Every word this module writes of its own (frames, verbs, results, names), that is
    without the scene's words: what the tests compare with the generator's verbs and words."""
    templates = [*FRAMES.values(), *NEW_OBJECT, *(n for names in NAMES.values() for n in names)]
    templates += [*(f for frames in KIND_FRAMES.values() for f in frames.values())]
    templates += [*(r for results in RESULTS.values() for r in results)]
    templates += [" ".join(v[:4]) for verbs in VERBS.values() for v in verbs]
    templates += [*NOUNS, *EXTREMES, *ORDINALS, *SIDES, *NEIGHBOURING, "corner slot position"]
    templates += ["the center of the grid board"]
    words = set(
        re.findall(r"[a-z']+", " ".join(re.sub(r"\{\w+\}", " ", t) for t in templates).lower())
    )
    return words - set(COLOURS) - set(SHAPES) - set(SIZES) - PLACE_WORDS

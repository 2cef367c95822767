"""Key words of a modification text: what the TARGET image should show (DQU-CIR's visual query).

DQU-CIR extracts them offline with an LLM (Gemini) and ships the result as files; its prompt
asks for "the distinct features of the target image mentioned in the text, comma-separated"
(e.g. "change from red to blue" -> "blue"; "has long heels and is black instead of white" ->
"long heels, black"). Two extractors share one interface, `extract(text, query_id)`:

- `RuleKeywords` (the default, no network): clause-wise rules that keep the words describing
  the target and drop the rest: commands ("make", "change", "move"), function words, what the
  target no longer has ("instead of white", "from red"), and the referring expression of the
  object being changed when the text says what it becomes ("turn the circle INTO a square").
- `KeywordFile`: a JSON file of precomputed key words (an LLM's, or the paper's released
  `keywords_in_mods_*.json`), keyed by query id or by the modification text itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

from circe.data.types import DatasetFormatError

# The paper's word when a modification asks for no change.
NOTHING = "same"

_ARTICLES = {"a", "an", "the"}


def _words(*lines: str) -> set[str]:
    return set(" ".join(lines).split())


# Words that carry no attribute of the target: function words, auxiliaries, pronouns, and the
# verbs of instructions. Everything else (attributes, objects, places) is kept.
_STOPWORDS = _ARTICLES | _words(
    "is are was were be been being has have had should would could must can will it its",
    "this that these those there also so very please just more less one some",
    "of in on at to into with from for by as and or but than then",
    "make makes change changes turn turns replace put place insert add move shift",
    "paint recolour recolor colour color dye set get let",
    "instead now same image picture photo target reference",
    "i you me we like want wish keep everything else rest scene well",
    "draw include give switch swap relocate slide transform scale resize spot cell extra holds",
)
# Request frames around the instruction itself: "could you ...", "I'd like you to ...", "same
# but ...", "keep everything else, just ..." (dropped from the start of a clause).
_FRAMES = re.compile(
    r"^ (?:(?:could|can|would|will) you (?:please )?|please |i want you to |i d like you to |"
    r"i want |i d like |i wish |same (?:scene |image |picture )?(?:but )?(?:with )?|"
    r"just |now (?:with )?|there should (?:also )?be )+"
)
# "what it becomes" markers: the target is described after them ("change X to Y", "turn X into
# Y", "X should be Y"). The earliest one in the clause wins. " with " marks it only after
# "replace" ("replace X with Y"); elsewhere it adds an attribute ("silver with short sleeves").
_BECOMES = (" should also be ", " should be ", " into ", " to ", " is ", " for ")
# Instructions whose object is the new attribute, said last: "make / paint the X green".
_ATTRIBUTE_LAST = {"make", "paint", "recolour", "recolor", "colour", "color", "dye"}
# Removals: the target shows the object no more.
_REMOVE = (
    "remove ",
    "delete ",
    "take away ",
    "take out ",
    "get rid of ",
    "without ",
    "erase ",
    "drop ",
    "minus ",
)
# Removals said of the object: "the X should be gone", "the X is no longer there".
_GONE = re.compile(r" (?:should be gone|is no longer there|gone|away) $")
# Resizing verbs and comparatives -> the attribute the target then has.
_SIZE_WORDS = {
    "enlarge": "large",
    "grow": "large",
    "expand": "large",
    "shrink": "small",
    "reduce": "small",
    "bigger": "large",
    "larger": "large",
    "smaller": "small",
    "downsize": "small",
    "tinier": "small",
}
# Moving an object that is already there ("put THE circle in the center"): only where it goes.
_MOVE = {"put", "place", "move", "shift"}
_PLACE_PREPOSITIONS = (" in the ", " at the ", " to the ", " on the ")


class KeywordExtractor(Protocol):
    def extract(self, text: str, query_id: str | None = None) -> str:
        """The key words of `text`, comma-separated phrases (never empty)."""


def _normalise(text: str) -> str:
    # Lower case, punctuation to spaces (as DQU-CIR does before looking words up).
    return " " + " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split()) + " "


def _content(words: str) -> str:
    """`words` without stop words; comparatives mapped to the attribute they give."""
    kept = [_SIZE_WORDS.get(w, w) for w in words.split() if w not in _STOPWORDS]
    return " ".join(kept)


def _clause_keywords(clause: str) -> str:
    """Key words of one clause (a normalised string with a space at each end)."""
    clause = _FRAMES.sub(" ", clause)
    # What the target no longer has: "... instead of white", "from red to blue", "no longer
    # red but blue", "a square in place of the circle".
    clause = re.sub(r" is no longer (?!there )(\w+ )+?but ", " is ", clause)
    clause = re.sub(r" (?:instead of|in place of|where) .*$", " ", clause)
    clause = re.sub(r" from (\w+ )+?to ", " to ", clause)
    words = clause.split()
    if not words:
        return ""
    if _GONE.search(clause):
        rest = _content(_GONE.sub(" ", clause))
        return f"no {rest}" if rest else ""
    stripped = clause.strip() + " "
    for verb in _REMOVE:
        if stripped.startswith(verb):
            rest = _content(stripped[len(verb) :])
            return f"no {rest}" if rest else ""
    verb = words[0]
    if verb in _SIZE_WORDS:  # "enlarge the X" -> "large"
        return _SIZE_WORDS[verb]
    if verb in _MOVE and len(words) > 1 and words[1] == "the":
        # An existing object changes place: only the place it goes to, named last ("move the
        # square at the top left to the center"), describes the target.
        at, preposition = max((clause.rfind(p), p) for p in _PLACE_PREPOSITIONS)
        if at > 0:
            return _content(clause[at + len(preposition) :])
    markers = (*_BECOMES, " with ") if verb == "replace" else _BECOMES
    becomes = [(clause.find(m), m) for m in markers if clause.find(m) > 0]
    if becomes:
        at, marker = min(becomes)
        return _content(clause[at + len(marker) :])
    if verb in _ATTRIBUTE_LAST and len(words) > 2:
        return _content(words[-1])  # "make the small yellow circle green" -> "green"
    return _content(clause)


class RuleKeywords:
    """Rule-based key-word extraction (no model, no network); see the module doc."""

    def extract(self, text: str, query_id: str | None = None) -> str:
        if not text or not text.strip():
            raise ValueError("a modification text is empty: describe how the target differs")
        # Clauses: several requested changes ("is red and has a belt", "red, sleeveless").
        clauses = re.split(r" and |,|;", " " + text.lower() + " ")
        phrases = [_clause_keywords(_normalise(c)) for c in clauses]
        phrases = [p for p in dict.fromkeys(phrases) if p]  # drop empty and repeated
        return ", ".join(phrases) or NOTHING


class KeywordFile:
    """Precomputed key words: JSON {query id or modification text: key words}.

    A value is a string, or a list whose last element is the key-word string (the layout of
    DQU-CIR's released `keywords_in_mods_*.json`, whose earlier elements are the source text).
    A query is looked up by its id first, then by its text; a miss is an error naming both.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"key-word file not found: {self.path}")
        try:
            records = json.loads(self.path.read_text())
        except json.JSONDecodeError as error:
            raise DatasetFormatError(f"{self.path} is not valid JSON: {error}") from None
        if not isinstance(records, dict):
            raise DatasetFormatError(f"{self.path} must hold a JSON object {{key: key words}}")
        self.words: dict[str, str] = {}
        for key, value in records.items():
            if isinstance(value, list) and value and isinstance(value[-1], str):
                value = value[-1]
            if not isinstance(value, str) or not value.strip():
                raise DatasetFormatError(
                    f"{self.path}: entry {key!r} must be a non-empty string (or a list ending "
                    f"in one), got {value!r}"
                )
            self.words[key] = value.strip()

    def extract(self, text: str, query_id: str | None = None) -> str:
        if query_id is not None and query_id in self.words:
            return self.words[query_id]
        if text in self.words:
            return self.words[text]
        raise KeyError(
            f"{self.path} has no key words for query {query_id!r} (text {text!r}); add an "
            "entry keyed by the query id or the text, or use the rule-based extractor"
        )


def keyword_extractor(source: str) -> KeywordExtractor:
    """`"rules"` -> `RuleKeywords`; anything else is the path of a `KeywordFile`."""
    return RuleKeywords() if source == "rules" else KeywordFile(source)

"""DQU-CIR's text clean-up of crowd-written modification texts (FashionIQ, Shoes).

DQU-CIR (Wen et al., SIGIR 2024) lower-cases a text, turns every ASCII punctuation character
into a space, splits it on white space and replaces each word found in a spelling-correction
dictionary ("yello" -> "yellow"). The dictionaries were built with pyspellchecker and ship in
the DQU-CIR repository: `data/FashionIQ/captions/correction_dict_{dress,shirt,toptee}.json`
and `data/Shoes/correction_dict_shoes.json`. Numbers reported with this clean-up are not
comparable with numbers on the raw texts.
"""

from __future__ import annotations

import string
from pathlib import Path

from circe.data.loading import Problems, read_json

_PUNCTUATION_TO_SPACE = str.maketrans({character: " " for character in string.punctuation})
SOURCE = "DQU-CIR's spelling corrections, from its repository's data/ folder"


def load_corrections(path: Path, problems: Problems) -> dict[str, str]:
    """A correction dictionary {misspelt word: correction}; {} after reporting a problem."""
    corrections = read_json(path, dict, problems, hint=SOURCE)
    if corrections is None:
        return {}
    bad = [key for key, value in corrections.items() if not isinstance(value, str)]
    if bad:
        problems.report(f"{path}: entry {bad[0]!r} is not a string -> string correction")
        return {}
    return corrections


def correct(text: str, corrections: dict[str, str]) -> str:
    """The cleaned text: lower case, punctuation as spaces, words corrected, single spaces."""
    words = text.lower().translate(_PUNCTUATION_TO_SPACE).split()
    return " ".join(corrections.get(word, word) for word in words)

"""The error every data problem is: a malformed data set file, or an image that cannot be used."""

import reprlib


class DatasetFormatError(ValueError):
    """A data set file is malformed; the message names the file and the record."""


class DatasetWarning(UserWarning):
    """Something odd in a data set's files that its published protocol keeps as it is."""


def _bounded_repr() -> reprlib.Repr:
    shortened = reprlib.Repr()
    shortened.maxstring = shortened.maxother = 60
    shortened.maxlist = shortened.maxtuple = shortened.maxdict = shortened.maxset = 4
    shortened.maxlevel = 2
    return shortened


_BOUNDED_REPR = _bounded_repr()
SHOWN_CHARACTERS = 120


def shown(value: object) -> str:
    """`repr(value)` cut to about `SHOWN_CHARACTERS`, for an error message about a value a
    user file holds: in full, a hostile one (a YAML alias bomb, a megabyte of text) would
    take minutes and gigabytes to format. `reprlib` bounds the work, the cut the length."""
    text = _BOUNDED_REPR.repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else text[: SHOWN_CHARACTERS - 3] + "..."

"""The error every data problem is: a malformed data set file, or an image that cannot be used."""


class DatasetFormatError(ValueError):
    """A data set file is malformed; the message names the file and the record."""


class DatasetWarning(UserWarning):
    """Something odd in a data set's files that its published protocol keeps as it is."""

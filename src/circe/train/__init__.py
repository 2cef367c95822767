"""Training: one trainer for every trainable method (`circe train`).

The names below load on first use: method modules import `circe.train.losses`, and the
trainer imports the methods, so an eager import here would be circular.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TrainConfig": "circe.train.config",
    "TrainResult": "circe.train.trainer",
    "resume": "circe.train.trainer",
    "train": "circe.train.trainer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)

"""Progress bars for long work (rich), one helper so every command looks the same."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

T = TypeVar("T")

# What long-running library functions accept for progress: `(items, total, description) ->
# items`. `track` below is the CLI's; `no_progress` is the silent default.
Progress = Callable[[Iterable, int, str], Iterable]


def no_progress(items: Iterable[T], total: int, description: str) -> Iterable[T]:
    return items


def track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Yield from `items` while showing a bar (rich hides it when output is not a terminal)."""
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with RichProgress(*columns, transient=False) as progress:
        yield from progress.track(items, total=total, description=description)

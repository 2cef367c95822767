"""One interface for every pseudo-target generator, and the resumable loop that drives it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from circe.data.types import CIRSplit, Gallery, Query
from circe.progress import Progress, no_progress
from circe.pseudo_targets.manifest import ManifestWriter


@dataclass
class Edited:
    """A generator's pseudo-target for one query, and what it says about how it was made
    (recorded in the manifest)."""

    image: Image.Image
    details: dict[str, Any] = field(default_factory=dict)


class PseudoTargetGenerator(ABC):
    """Makes an image of what a query asks for, from its reference image and text."""

    name: ClassVar[str]
    # The `circe pseudo-targets` options this generator takes (others are an error).
    options: ClassVar[tuple[str, ...]] = ()
    batch_size: int = 1  # queries per `edit` call

    @classmethod
    @abstractmethod
    def create(cls, dataset: str, root: Path, **options) -> PseudoTargetGenerator:
        """The generator for data set `dataset` at `root`, from the command's options."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes its output (recorded; a resumed run must match it)."""

    def prepare(self, queries: Sequence[Query]) -> None:
        """See every query of the run before any image is made (and whatever a resumed run
        already holds), so a choice over the whole split, such as which queries get noise,
        does not depend on where a run was interrupted. Default: nothing."""

    @abstractmethod
    def edit(self, queries: Sequence[Query], gallery: Gallery) -> list[Edited]:
        """One pseudo-target per query, in order."""


def _generators() -> dict[str, type[PseudoTargetGenerator]]:
    # Imported here: each module imports this one for the base class.
    from circe.pseudo_targets.diffusion import DiffusionEditor
    from circe.pseudo_targets.directory import DirectoryImport
    from circe.pseudo_targets.scene_editor import SceneEditor

    return {cls.name: cls for cls in (SceneEditor, DiffusionEditor, DirectoryImport)}


def create_generator(name: str, dataset: str, root: Path, **options: Any) -> PseudoTargetGenerator:
    """The generator called `name`; `options` are the command's, None where not given."""
    generators = _generators()
    if name not in generators:
        raise ValueError(f"unknown generator {name!r}; choose one of: {', '.join(generators)}")
    cls = generators[name]
    given = {k: v for k, v in options.items() if v is not None}
    stray = sorted(set(given) - set(cls.options))
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        takes = ", ".join("--" + k.replace("_", "-") for k in cls.options) or "none"
        raise ValueError(f"{flags} does not apply to generator {name!r} (its options: {takes})")
    return cls.create(dataset, Path(root), **given)


@dataclass
class GenerationReport:
    out: Path
    queries: int  # queries of the run (after --limit)
    made: int  # images made by this run
    kept: int  # images a previous run had already made


def generate_pseudo_targets(
    split: CIRSplit,
    generator: PseudoTargetGenerator,
    out: Path,
    dataset: str,
    limit: int | None = None,
    progress: Progress = no_progress,
) -> GenerationReport:
    """Make the pseudo-targets of `split`'s queries (the first `limit`) in `out`, skipping
    those a previous run over `out` already made."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    header = {
        "dataset": dataset,
        "split": split.name,
        "protocol": split.protocol.get("preset"),  # how the texts were read (FashionIQ's joins)
        "generator": generator.name,
        "settings": generator.settings(),
    }
    writer = ManifestWriter(out, header)
    generator.prepare(split.queries)
    queries = split.queries[:limit]
    todo = [q for q in queries if q.query_id not in writer.done]
    step = generator.batch_size
    batches = [todo[i : i + step] for i in range(0, len(todo), step)]
    for batch in progress(batches, len(batches), f"pseudo-targets ({generator.name})"):
        for query, edited in zip(batch, generator.edit(batch, split.gallery), strict=True):
            writer.add(query.query_id, edited.image, edited.details)
    return GenerationReport(Path(out), len(queries), len(todo), len(queries) - len(todo))

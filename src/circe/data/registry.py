"""The data sets circe knows by name: how each is loaded, with which protocol, how it is scored.

This is the one registry the CLI, the trainer and the benchmarks use. A data set is a
`DatasetSpec`: a loader ``(root, split, *, problems=None, **protocol) -> CIRSplit``, its
splits, its protocol presets (named sets of the loader's keyword arguments; the first is the
default), the metric set that scores it (`circe.eval.benchmark`), the submission format of
its test server if it has one (`circe.eval.submission`), and how an evaluation split breaks
into parts scored separately (FashionIQ's three categories).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from circe.data import circo, fashion200k, fashioniq, shoes
from circe.data.cirr import SPLITS as CIRR_SPLITS
from circe.data.cirr import load_cirr
from circe.data.folder import load_folder
from circe.data.loading import Problems
from circe.data.synthetic import SPLITS as SYNTHETIC_SPLITS
from circe.data.synthetic import load_synthetic
from circe.data.types import CIRSplit, DatasetFormatError

Loader = Callable[..., CIRSplit]


def _whole(split: str) -> tuple[str, ...]:
    return (split,)


@dataclass(frozen=True)
class DatasetSpec:
    load: Loader
    splits: tuple[str, ...]  # empty: any name (the folder data set: a queries file's name)
    default_split: str
    presets: Mapping[str, Mapping[str, object]] = field(default_factory=lambda: {"default": {}})
    metrics: str = "recall"  # a key of circe.eval.benchmark.METRIC_SETS
    submission: str | None = None  # a key of circe.eval.submission.WRITERS
    parts: Callable[[str], tuple[str, ...]] = _whole

    @property
    def default_preset(self) -> str:
        return next(iter(self.presets))


def _synthetic(root: Path, split: str, *, problems: Problems | None = None) -> CIRSplit:
    """The synthetic benchmark is generated, not published: it has no record-level checks."""
    return load_synthetic(root, split)


DATASETS: dict[str, DatasetSpec] = {
    "synthetic": DatasetSpec(_synthetic, SYNTHETIC_SPLITS, "test"),
    "fashioniq": DatasetSpec(
        fashioniq.load_fashioniq,
        fashioniq.SPLITS,
        "val",
        presets=fashioniq.PRESETS,
        metrics="fashioniq",
        parts=fashioniq.evaluation_parts,
    ),
    "cirr": DatasetSpec(load_cirr, CIRR_SPLITS, "val", metrics="cirr", submission="cirr"),
    "circo": DatasetSpec(
        circo.load_circo,
        circo.SPLITS,
        "val",
        presets=circo.PRESETS,
        metrics="circo",
        submission="circo",
    ),
    "shoes": DatasetSpec(shoes.load_shoes, shoes.SPLITS, "test", presets=shoes.PRESETS),
    "fashion200k": DatasetSpec(
        fashion200k.load_fashion200k, fashion200k.SPLITS, "test", presets=fashion200k.PRESETS
    ),
    "folder": DatasetSpec(load_folder, (), "queries"),
}


def dataset_spec(dataset: str) -> DatasetSpec:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(
            f"unknown dataset {dataset!r}; available: {', '.join(sorted(DATASETS))}"
        ) from None


def _protocol(spec: DatasetSpec, dataset: str, preset: str | None) -> tuple[str, Mapping]:
    name = preset or spec.default_preset
    if name not in spec.presets:
        raise ValueError(
            f"{dataset} has no protocol preset {name!r}; available: {', '.join(spec.presets)}"
        )
    return name, spec.presets[name]


def load_split(
    dataset: str,
    root: str | Path,
    split: str,
    protocol: str | None = None,
    *,
    problems: Problems | None = None,
) -> CIRSplit:
    """One split of a data set under protocol preset `protocol` (default: the data set's)."""
    spec = dataset_spec(dataset)
    if spec.splits and split not in spec.splits:
        raise ValueError(f"{dataset} has no split {split!r}; available: {', '.join(spec.splits)}")
    name, parameters = _protocol(spec, dataset, protocol)
    loaded = spec.load(Path(root), split, problems=problems, **parameters)
    loaded.protocol["preset"] = name
    return loaded


@dataclass
class Benchmark:
    """What one evaluation scores: a split, or its parts scored separately and averaged."""

    dataset: str
    split: str
    parts: list[CIRSplit]
    metrics: str
    submission: str | None

    @property
    def labelled(self) -> bool:
        """Whether every query has a target (hidden test labels cannot be scored here)."""
        return all(q.target_ids for part in self.parts for q in part.queries)

    @property
    def protocol(self) -> dict[str, str]:
        """The parts' protocol: a value shared by all parts once, others listed per part."""
        merged = {}
        for key in self.parts[0].protocol:
            values = [part.protocol.get(key, "") for part in self.parts]
            same = all(v == values[0] for v in values)
            merged[key] = (
                values[0]
                if same
                else "; ".join(
                    f"{part.name}: {v}" for part, v in zip(self.parts, values, strict=True)
                )
            )
        merged["split"] = self.split
        return merged


def load_benchmark(
    dataset: str, root: str | Path, split: str | None = None, protocol: str | None = None
) -> Benchmark:
    """A data set's evaluation split (default: the one papers report), ready to score."""
    spec = dataset_spec(dataset)
    split = split or spec.default_split
    parts = [load_split(dataset, root, part, protocol) for part in spec.parts(split)]
    return Benchmark(dataset, split, parts, spec.metrics, spec.submission)


@dataclass
class DatasetCheck:
    """Everything `circe check-dataset` found: per part (queries, gallery images), problems."""

    counts: dict[str, tuple[int, int]]
    problems: list[str]


def _every_split(spec: DatasetSpec, root: Path) -> list[str]:
    """The splits of a data set, each once: a split that is a part of another (FashionIQ's
    `dress.val` of `val`) is checked with it. The folder data set's splits are its query
    files."""
    if not spec.splits:
        found = sorted({p.stem for p in root.glob("*") if p.suffix in (".csv", ".jsonl")})
        return found or [spec.default_split]
    return [
        name
        for name in spec.splits
        if not any(name != other and name in spec.parts(other) for other in spec.splits)
    ]


def check_dataset(
    dataset: str, root: str | Path, split: str | None = None, protocol: str | None = None
) -> DatasetCheck:
    """Load a split (default: every split the data set has) collecting every problem instead
    of stopping at the first."""
    spec = dataset_spec(dataset)
    counts: dict[str, tuple[int, int]] = {}
    found: list[str] = []
    names = [split] if split else _every_split(spec, Path(root))
    for part in (part for name in names for part in spec.parts(name)):
        problems = Problems(collect=True)
        try:
            loaded = load_split(dataset, root, part, protocol, problems=problems)
            counts[part] = (len(loaded.queries), len(loaded.gallery))
        except (DatasetFormatError, FileNotFoundError) as error:
            problems.found.append(str(error))
        found += problems.found
    return DatasetCheck(counts, found)

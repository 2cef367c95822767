"""Comparing methods on one benchmark (`circe eval`): each method named, or trained and saved
as a checkpoint, is loaded in turn, scores every part of the benchmark, and gets the
benchmark's own metrics, or the test server's files where the labels are hidden."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circe.backbones import load_backbone
from circe.data.registry import Benchmark, load_benchmark
from circe.eval.benchmark import BenchmarkResult, score_benchmark
from circe.eval.evaluate import score_matrix
from circe.eval.submission import write_submission
from circe.methods import CIRMethod, create_method
from circe.methods.checkpoint import load_trained_method
from circe.progress import Progress, no_progress


@dataclass
class Scored:
    """One method's evaluation."""

    name: str  # the method's name, or its checkpoint's path
    seconds: float  # scoring it (after loading), its submission files included
    written: list[Path]  # the submission's files, if one was asked for
    result: BenchmarkResult | None  # None where the labels are hidden


@dataclass
class Comparison:
    """Every method's evaluation on one benchmark."""

    benchmark: Benchmark
    backbone: str  # the backbone the named methods were built on
    scored: list[Scored]

    @property
    def results(self) -> dict[str, dict[str, float]]:
        """The benchmark's metrics per method (none where the labels are hidden)."""
        return {s.name: s.result.metrics for s in self.scored if s.result is not None}

    @property
    def per_part(self) -> dict[str, dict[str, dict[str, float]]]:
        return {s.name: s.result.per_part for s in self.scored if s.result is not None}

    @property
    def per_kind(self) -> dict[str, dict[str, dict[str, float]]]:
        return {s.name: s.result.per_tag for s in self.scored if s.result is not None}

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.benchmark.dataset,
            "split": self.benchmark.split,
            "backbone": self.backbone,
            "protocol": self.benchmark.protocol,
            "results": self.results,
            "per_part": self.per_part,
            "per_kind": self.per_kind,
            # The test server's files, per method (empty without --submission).
            "submission_files": {s.name: [str(p) for p in s.written] for s in self.scored},
        }


def check_candidates(
    methods: Sequence[str], checkpoints: Sequence[Path], submission: Path | None = None
) -> None:
    """Raise ValueError for a comparison that cannot run: nothing to evaluate, or several
    methods for one submission (it holds one method's rankings). `compare` checks this
    itself; a caller that must prepare the data first checks it before."""
    if not methods and not checkpoints:
        raise ValueError("name a --method or a trained --checkpoint RUN_DIR/best to evaluate")
    if submission is not None and len(methods) + len(checkpoints) != 1:
        raise ValueError(
            "--submission writes one method's rankings: give one --method or --checkpoint"
        )


def compare(
    dataset: str,
    root: Path,
    split: str | None = None,
    protocol: str | None = None,
    *,
    methods: Sequence[str] = (),
    checkpoints: Sequence[Path] = (),
    backbone: str = "default",
    weights: Path | None = None,
    batch_size: int = 128,
    workers: int = 0,
    submission: Path | None = None,
    progress: Progress = no_progress,
    on_scored: Callable[[Scored], None] | None = None,
) -> Comparison:
    """Evaluate `methods` (registered names, each on `backbone`) and then `checkpoints`
    (trained methods, each on its own backbone) on `dataset`'s `split` (default: the one
    papers report), under its `protocol` preset (default: its own). With `submission`, the
    one method's rankings are written there in the test server's format too. Methods are
    loaded one at a time, so only one is in memory; `on_scored` hears of each as soon as it is
    done. Raises FileNotFoundError or ValueError for what the caller can fix."""
    check_candidates(methods, checkpoints, submission)
    data = load_benchmark(dataset, root, split, protocol)
    if submission is not None and data.submission is None:  # before minutes of encoding
        raise ValueError(
            f"{dataset} has no test server, so there are no submission files to write: "
            "score it without --submission"
        )
    if not data.labelled and submission is None:
        hint = "; write the test server's files with --submission DIR" if data.submission else ""
        raise ValueError(
            f"{dataset} {data.split} has hidden test labels: it cannot be scored{hint}"
        )
    loaders: list[tuple[str, Callable[[], CIRMethod]]] = [
        (name, lambda name=name: create_method(name, load_backbone(backbone, weights)))
        for name in methods
    ]
    loaders += [(str(path), lambda path=path: load_trained_method(path)) for path in checkpoints]
    scored = []
    for name, load in loaders:
        model = load()
        started = time.time()
        scores = [score_matrix(model, part, batch_size, workers, progress) for part in data.parts]
        written = [] if submission is None else write_submission(data, scores, submission)
        result = score_benchmark(data, scores) if data.labelled else None
        scored.append(Scored(name, time.time() - started, written, result))
        if on_scored is not None:
            on_scored(scored[-1])
    return Comparison(data, backbone, scored)

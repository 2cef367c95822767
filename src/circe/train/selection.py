"""Model selection: the score that picks a run's `best` checkpoint (`selection_metric`).

Papers select on their data set's own numbers, scored as the benchmark defines them
(`circe.eval.benchmark`): CIRR's Avg, FashionIQ's mean over its three categories, or a sum of
recalls (DQU-CIR's code: R@10 + R@50 on FashionIQ and Shoes, R@1 + R@10 + R@50 on
Fashion200K, all seven CIRR recalls). circe's own default, for the synthetic benchmark, is
the mean of R@1, R@10 and R@50 over the whole validation split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from circe.data.registry import load_benchmark, load_split
from circe.eval.benchmark import METRIC_SETS, score_benchmark
from circe.eval.evaluate import evaluate, score_matrix
from circe.eval.labels import Labels
from circe.methods.base import CIRMethod

DEFAULT = "r1-r10-r50"
DEFAULT_KS = (1, 10, 50)
_SUM = re.compile(r"sum:((?:R|Rsubset|mAP)@\d+(?:,(?:R|Rsubset|mAP)@\d+)*)")


def check_selection_metric(text: str) -> None:
    """Refuse a `selection_metric` that is none of the forms (its names are checked against
    the data set's metric set when the run starts, `Selection`)."""
    if text in (DEFAULT, "avg") or _SUM.fullmatch(text.replace(" ", "")):
        return
    raise ValueError(
        f"selection_metric must be {DEFAULT!r}, 'avg' or 'sum:METRIC,...' (e.g. "
        f"'sum:R@10,R@50'), got {text!r}"
    )


def describe(text: str) -> str:
    """The selection metric in words (results.json records it)."""
    if text == DEFAULT:
        return "mean of R@1, R@10, R@50 on the validation split"
    if text == "avg":
        return "the data set's Avg on the validation split, scored as the benchmark defines it"
    return f"sum of {', '.join(_summed(text))} on the validation split, as the benchmark scores it"


def _summed(text: str) -> list[str]:
    return text.replace(" ", "").removeprefix("sum:").split(",")


@dataclass
class Selection:
    """Scores a method on a data set's validation split for `selection_metric`."""

    metric: str
    dataset: str
    root: str | Path
    split: str
    protocol: str | None

    def __post_init__(self) -> None:
        check_selection_metric(self.metric)
        if self.metric == DEFAULT:
            self.parts = [load_split(self.dataset, self.root, self.split, self.protocol)]
            return
        self.benchmark = load_benchmark(self.dataset, self.root, self.split, self.protocol)
        self.parts = self.benchmark.parts
        # The names this data set's metric set gives (read off an all-zero score matrix of
        # one query), so that a wrong name stops the run before any training.
        first = self.parts[0]
        probe = first.queries[:1]
        names = set(
            METRIC_SETS[self.benchmark.metrics](
                torch.zeros(len(probe), len(first.gallery)), Labels(first, probe)
            )
        )
        wanted = ["Avg"] if self.metric == "avg" else _summed(self.metric)
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise ValueError(
                f"selection_metric {self.metric!r}: {self.dataset} is scored with "
                f"{', '.join(sorted(names))}, not {', '.join(unknown)}"
            )

    def score(self, method: CIRMethod, batch_size: int, workers: int) -> dict[str, float]:
        """The validation metrics and their `score`."""
        if self.metric == DEFAULT:
            metrics = evaluate(
                method, self.parts[0], ks=DEFAULT_KS, batch_size=batch_size, workers=workers
            ).metrics
            score = sum(metrics[f"R@{k}"] for k in DEFAULT_KS) / len(DEFAULT_KS)
            return {**metrics, "score": score}
        scores = [score_matrix(method, part, batch_size, workers) for part in self.parts]
        metrics = score_benchmark(self.benchmark, scores).metrics
        if self.metric == "avg":
            score = metrics["Avg"]
        else:
            score = sum(metrics[name] for name in _summed(self.metric))
        return {**metrics, "score": score}

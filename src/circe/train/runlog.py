"""Run metrics: `metrics.jsonl` in the run directory (one JSON object a line), and TensorBoard
event files next to it when the `tensorboard` package is installed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from circe.atomic import write_text_atomic


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        # Only the main process logs; the others get a log that writes nothing.
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: metrics.jsonl is the record
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Append a `kind` ("step", "epoch") record; numbers also go to TensorBoard."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def forget_after(self, step: int) -> None:
        """Drop the records past `step`: a run resumed from the checkpoint at `step` writes
        them again, and must not leave two of each."""
        if not (self.enabled and self.path.is_file()):
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if _step(line) is not None and _step(line) <= step]
        if len(kept) != len(lines):
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _step(line: str) -> int | None:
    """The step of a record line; None for a line cut short by a kill."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def read_log(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]

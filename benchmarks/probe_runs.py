"""What the probes of trained runs share (`move_probe.py`, `arm_uncertainty.py`): their
command line and how they write their results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"


def parse_runs(description: str) -> argparse.Namespace:
    """`--run LABEL=RUN_DIR` (repeated), `--root`, `--out`, `--batch-size`; `args.runs` is
    the list of (label, run directory) and `args.command` the command line as run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (repeat)")
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    args.runs = [(label, Path(run)) for label, run in (item.split("=", 1) for item in args.run)]
    script = Path(parser.prog).name
    args.command = f"python benchmarks/{script} " + " ".join(f"--run {i}" for i in args.run)
    return args


def publish(out: Path, name: str, record: dict, lines: list[str]) -> None:
    """`out/NAME.json` (the record) and `out/NAME.md` (the lines), then print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

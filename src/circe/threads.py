"""Torch CPU threads: one setter for every command that takes `--threads`."""

from __future__ import annotations

import torch


def set_torch_threads(threads: int | None) -> None:
    """Run torch's CPU work on `threads` threads; 0 or None keeps torch's default. On a busy
    machine, 1 avoids thread oversubscription, which slows small matrix products tenfold."""
    if threads:
        torch.set_num_threads(threads)

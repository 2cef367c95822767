"""`python -m circe.cli` (what `torchrun -m circe.cli train` runs in every process)."""

from circe.cli import app

app()

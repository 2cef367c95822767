"""`circe bench quality`: every standalone method (`circe methods`; variants and DAFM when
named) on the synthetic benchmark over seeds.

Writes benchmarks/results/quality.json and quality.md; options are passed through.
"""

import sys

from circe.cli import app

if __name__ == "__main__":
    # Recorded in the results as the equivalent `circe` command.
    sys.argv = ["circe", "bench", "quality", *sys.argv[1:]]
    app()

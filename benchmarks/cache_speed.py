"""One epoch of combiner training with and without the feature cache, in one process.

Writes benchmarks/results/cache_speed.json and cache_speed.md. The same as
`circe bench cache-speed`; options are passed through (`--threads 1`, `--weights FILE`, ...).
"""

import sys

from circe.cli import app

if __name__ == "__main__":
    # Recorded in the results as the equivalent `circe` command.
    sys.argv = ["circe", "bench", "cache-speed", *sys.argv[1:]]
    app()

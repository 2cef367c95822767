"""The benchmarks behind `circe bench`: `quality` (method quality over seeds, label noise,
the feature cache's speed-up) and `fusion` (DAFM over trained members), each writing a JSON
record and a Markdown table made from it (`record`), so that every number in the README
comes from a command anyone can run."""

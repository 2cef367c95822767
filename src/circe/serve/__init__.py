"""`circe serve`: the HTTP API and the web page over an index (needs the `serve` extra)."""

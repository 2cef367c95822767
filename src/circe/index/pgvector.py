"""The scale-out search engine: PostgreSQL with the pgvector extension.

The in-process FAISS engine holds a space's vectors in one process's memory. For galleries
beyond one machine, or for several servers answering from one copy, the vectors live in
PostgreSQL instead (a single server, a managed service, or a sharded/replicated cluster
such as Citus): `PgVectorEngine` is the same `SearchEngine` as `FaissEngine`, answering
from a table `(row integer, embedding vector(D))`, where `row` is the row of the space's
`rows.jsonl`.

The choice follows the embedded engine's rules (`circe.index.engine`): below `exact_below`
vectors an exact scan (no index: `ORDER BY embedding <#> q` reads every row); above it an
HNSW index on inner product, with `hnsw.ef_search` tuned to the smallest value reaching
the target recall@10 against exact search on sample queries, and the exact scan kept when
none does.

Every build writes a new table, named with a fresh token, and fills it in one transaction:
until the space's new generation (whose `engine.json` names the table) is committed, no
reader knows it exists, so an interrupted build leaves the searched table untouched, as the
embedded engine's atomic generations do. `prune_tables` drops a space's older tables.

Needs `psycopg` (pip install 'circe[pgvector]') and a server with pgvector >= 0.5 (HNSW).
The connection string is never written to the index (it may hold a password): `circe`
reads it from --pgvector or $CIRCE_PGVECTOR_DSN.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from dataclasses import replace
from typing import Any

import numpy as np

from circe.index.engine import (
    EngineChoice,
    EngineOptions,
    SearchEngine,
    exact_top_k,
    recall_at_k,
    sample_queries,
)

DSN_VARIABLE = "CIRCE_PGVECTOR_DSN"
KINDS = ("pgvector-exact", "pgvector-hnsw")
_EF_SEARCH = (16, 32, 64, 128, 256, 512, 1000)  # pgvector accepts at most 1000
_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PgVectorError(OSError):
    """pgvector cannot be used: no driver, no server, no extension, or no table."""


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise PgVectorError(
            "the pgvector engine needs psycopg: pip install 'circe[pgvector]'"
        ) from None
    return psycopg


def connect(dsn: str | None = None):
    """A connection (autocommit) to the server of `dsn`, default $CIRCE_PGVECTOR_DSN."""
    dsn = dsn or os.environ.get(DSN_VARIABLE)
    if not dsn:
        raise PgVectorError(
            f"no PostgreSQL server named: pass a connection string (--pgvector "
            f"'postgresql://USER@HOST/DB') or set ${DSN_VARIABLE}"
        )
    psycopg = _psycopg()
    try:
        connection = psycopg.connect(dsn, autocommit=True)
    except psycopg.OperationalError as error:
        raise PgVectorError(f"cannot connect to PostgreSQL ({error})".strip()) from None
    try:
        connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except psycopg.Error as error:
        connection.close()
        raise PgVectorError(
            "the PostgreSQL server has no pgvector extension (install it on the server, e.g. "
            f"Debian's postgresql-NN-pgvector): {error}".strip()
        ) from None
    return connection


def table_prefix(space: str) -> str:
    """Tables of one space start with this (PostgreSQL folds names to lower case)."""
    # Short enough that "<prefix><12-hex token>_hnsw" fits PostgreSQL's 63-byte names.
    return "circe_" + re.sub(r"[^a-z0-9_]", "_", space.lower())[:24] + "_"


def _literal(vector: np.ndarray) -> str:
    """A pgvector text literal: '[x1,x2,...]' (9 significant digits keep float32 exact)."""
    return "[" + ",".join(f"{x:.9g}" for x in vector.tolist()) + "]"


class PgVectorEngine(SearchEngine):
    """Top-k inner product over one table of a PostgreSQL server with pgvector."""

    def __init__(self, connection, table: str, count: int, choice: EngineChoice):
        if not _TABLE.match(table):
            raise PgVectorError(f"invalid pgvector table name {table!r}")
        self.connection, self.table, self.count, self.choice = connection, table, count, choice
        self.ef_search = int(choice.params.get("ef_search", 0))
        # One connection, one transaction at a time: the server's request threads take turns.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.count)
        scores = np.full((len(queries), max(k, 0)), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), max(k, 0)), -1, dtype=np.int64)
        if k <= 0:
            return scores, rows
        # `<#>` is the negative inner product, the order pgvector's indexes serve. An HNSW
        # scan yields at most ef_search rows, so it must be at least k.
        statement = (
            f"SELECT row, -(embedding <#> %s::vector) FROM {self.table} "
            "ORDER BY embedding <#> %s::vector LIMIT %s"
        )
        with self._lock, self.connection.transaction(), self.connection.cursor() as cursor:
            if self.ef_search:
                cursor.execute(f"SET LOCAL hnsw.ef_search = {max(self.ef_search, min(k, 1000))}")
            for i, query in enumerate(np.asarray(queries, dtype=np.float32)):
                literal = _literal(query)
                found = cursor.execute(statement, (literal, literal, k)).fetchall()
                for j, (row, score) in enumerate(found):
                    rows[i, j], scores[i, j] = row, score
        return scores, rows

    def save(self, directory) -> dict[str, Any]:
        """The record for `engine.json` (the vectors stay on the server)."""
        return {
            "kind": self.choice.kind,
            "params": self.choice.params,
            "reason": self.choice.reason,
            "recall_at_10": self.choice.recall_at_10,
        }

    @classmethod
    def load(cls, record: dict[str, Any], count: int, dsn: str | None = None) -> PgVectorEngine:
        """The engine an `engine.json` record names, on the server of `dsn`."""
        connection = connect(dsn)
        table = record["params"]["table"]
        found = connection.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]
        if found is None:
            connection.close()
            raise PgVectorError(
                f"the pgvector table {table} of this index is not on the server: was the index "
                "built against another database? Re-run `circe index` with --pgvector"
            )
        return cls(connection, table, count, EngineChoice(**record))


def _create_table(connection, table: str, vectors: np.ndarray, options: EngineOptions, hnsw):
    """Create and fill `table` (and its HNSW index) in one transaction."""
    count, dim = vectors.shape
    with connection.transaction(), connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {table} (row integer PRIMARY KEY, embedding vector({dim}))")
        with cursor.copy(f"COPY {table} (row, embedding) FROM STDIN") as copy:
            for row in range(count):
                copy.write_row((row, _literal(vectors[row])))
        if hnsw:
            cursor.execute(
                f"CREATE INDEX {table}_hnsw ON {table} USING hnsw (embedding vector_ip_ops) "
                f"WITH (m = {options.hnsw_m}, ef_construction = {options.ef_construction})"
            )
        cursor.execute(f"ANALYZE {table}")


def build_pgvector_engine(
    vectors: np.ndarray,
    space: str,
    dsn: str | None = None,
    options: EngineOptions | None = None,
) -> PgVectorEngine:
    """Load `vectors` (`[N, D]` unit vectors) into a new table for `space`, chosen and tuned
    as the embedded engine is; returns the engine searching it."""
    options = options or EngineOptions()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count = len(vectors)
    connection = connect(dsn)
    table = table_prefix(space) + uuid.uuid4().hex[:12]
    size = f"{count:,} vectors {'<' if count < options.exact_below else '>='} exact_below="
    size += f"{options.exact_below:,}"
    exact = EngineChoice("pgvector-exact", {"table": table})
    if count < options.exact_below:
        _create_table(connection, table, vectors, options, hnsw=False)
        reason = (
            f"{size}: pgvector exact scan of table {table} (no index; at this size a scan is "
            "fast and an approximate index would only lose recall)"
        )
        return PgVectorEngine(connection, table, count, replace(exact, reason=reason))
    _create_table(connection, table, vectors, options, hnsw=True)
    queries = sample_queries(vectors, options.tune_queries, options.seed)
    truth = exact_top_k(queries, vectors, 10)
    recall, ef_search = 0.0, _EF_SEARCH[0]
    for ef_search in _EF_SEARCH:
        params = {"table": table, "m": options.hnsw_m, "ef_construction": options.ef_construction}
        trial = EngineChoice("pgvector-hnsw", {**params, "ef_search": ef_search})
        found = PgVectorEngine(connection, table, count, trial).search(queries, 10)[1]
        recall = recall_at_k(found, truth)
        if recall >= options.target_recall:
            break
    measured = (
        f"recall@10 {recall:.3f} against exact search on {options.tune_queries} sample queries"
    )
    words = f"pgvector HNSW (m={options.hnsw_m}, ef_construction={options.ef_construction})"
    if recall < options.target_recall and options.exact_if_missed:
        connection.execute(f"DROP INDEX {table}_hnsw")
        reason = (
            f"{size}, but {words} reached only {measured} at ef_search={ef_search}, below the "
            f"target {options.target_recall}: exact scan of table {table} kept"
        )
        return PgVectorEngine(connection, table, count, replace(exact, reason=reason))
    reason = f"{size}: {words} on table {table}; ef_search={ef_search} ({measured})"
    choice = EngineChoice("pgvector-hnsw", trial.params, reason, recall)
    return PgVectorEngine(connection, table, count, choice)


def prune_tables(space: str, keep: str, dsn: str | None = None) -> list[str]:
    """Drop the tables of `space` other than `keep` (older builds); returns their names."""
    connection = connect(dsn)
    try:
        names = connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND starts_with(tablename, %s)",
            (table_prefix(space),),
        ).fetchall()
        stale = [name for (name,) in names if name != keep and _TABLE.match(name)]
        for name in stale:
            connection.execute(f"DROP TABLE IF EXISTS {name}")
        return stale
    finally:
        connection.close()

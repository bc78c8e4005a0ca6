"""Read-only SQL over a zoo root, safe on a zoo someone else made.

Two locks: only SELECT-type statements (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, VALUES,
EXPLAIN) are accepted, so CREATE, DROP, INSERT, COPY ... TO, ATTACH, INSTALL, LOAD, SET and
PRAGMA are refused before anything runs; and the connection is an in-memory DuckDB whose file
access is limited to the root (`allowed_directories`) with external access off and the
configuration locked, so no query reads or writes anything outside the zoo.
"""

from __future__ import annotations

import contextlib

import duckdb
import pandas as pd

from .errors import ZooError
from .storage import Store

READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with one view per table of `store`, locked to the root."""
    con = duckdb.connect(":memory:")
    store.recover()  # (packs a killed packer left half-finished)
    with store.reading():
        store.create_views(con)
    root = str(store.root).replace("'", "''")
    con.execute(f"SET allowed_directories = ['{root}']")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    # Zoo queries join per-model rows (metrics, curves) to `models` and group by model fields.
    # DuckDB 2's partial aggregate pushdown then pre-groups by model_id below the join, which
    # reduces nothing when a model has one row per group: the phase aggregation over 1e6
    # metric rows took 200-250 ms with it and 50 ms without (perf/storage_read.py).
    with contextlib.suppress(duckdb.Error):  # (an older DuckDB has no such optimizer)
        con.execute("SET disabled_optimizers = 'partial_aggregate_pushdown'")
    con.execute("SET lock_configuration = true")
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise ZooError(f"SQL error: {_first_line(e)}") from None
    if not statements:
        raise ZooError("empty query")
    for statement in statements:
        if statement.type not in READ_ONLY:
            kind = statement.type.name
            hint = " (a PIVOT needs an explicit list: ON col IN (v1, v2, ...))" if kind == "MULTI" else ""
            raise ZooError(f"refused: zoo sql is read-only ({kind} statements are not allowed){hint}")


def run_query(con: duckdb.DuckDBPyConnection, query: str, params: list | dict | None = None) -> pd.DataFrame:
    """Run a read-only query (several statements: the last one's result)."""
    check_read_only(con, query)
    try:
        return con.execute(query, params or []).df()
    except duckdb.Error as e:
        message = _first_line(e)
        if isinstance(e, (duckdb.IOException, duckdb.InvalidInputException, duckdb.PermissionException)) and ".parquet" in message:
            message += " (a damaged file, or a link out of the root: `zoo verify` finds it and moves it to quarantine/)"
        raise ZooError(f"SQL error: {message}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

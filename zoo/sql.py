"""Read-only SQL over a zoo root, safe on a zoo someone else made.

Read-only by construction, behind two walls:

1. Only statements that cannot change anything run: SELECT-type statements (SELECT, WITH, FROM,
   VALUES, DESCRIBE, SHOW, SUMMARIZE, PIVOT with its list) and EXPLAIN of one of those, without
   ANALYZE (EXPLAIN ANALYZE executes its statement). Anything else is refused before it runs.
2. The connection cannot write anywhere even if a statement slipped through. It is an in-memory
   DuckDB whose own local file system is disabled; the root is reachable only as `zoo://...`
   through `zoo.rootfs.RootFileSystem`, which opens regular files inside the root for reading and
   refuses every write, delete, rename and new folder, every link and every path out of the root.
   External access is off, extensions can be neither installed nor loaded, and the configuration
   is locked. Nor does DuckDB spill to a temporary folder (by default `.tmp/` in the working
   folder, which queries could then read and write): a query needs to fit in the memory limit.

Limits: every query has a time limit (`ZOO_SQL_TIMEOUT_S`, default 300 s) and the connection a
memory limit (`ZOO_SQL_MEMORY`, default a quarter of the machine's memory, at most 4 GB); a query
past either, or interrupted (Ctrl-C), stops with one line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings

import duckdb
import pandas as pd

from .errors import ZooError, ZooWarning, one_line
from .rootfs import PROTOCOL
from .storage import Store

TIMEOUT_S = 300.0
MEMORY_CAP = 4 << 30


def default_timeout() -> float:
    return _positive("ZOO_SQL_TIMEOUT_S", os.environ.get("ZOO_SQL_TIMEOUT_S"), TIMEOUT_S)


def default_memory_limit() -> str:
    value = os.environ.get("ZOO_SQL_MEMORY")
    if value:
        return value
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{min(MEMORY_CAP, total // 4) >> 20}MiB"


def _positive(name: str, value, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise ZooError(f"{name} must be a positive number of seconds, not {value!r}")
    return number


class Connection:
    """One read-only DuckDB connection over a root's tables (see the module docstring)."""

    def __init__(self, store: Store, timeout: float | None = None, memory_limit: str | None = None, recover: bool = False):
        self.timeout = default_timeout() if timeout is None else _positive("timeout", timeout, TIMEOUT_S)
        self.con = duckdb.connect(":memory:")
        try:
            with _interrupts_deferred():
                self._set_up(store, memory_limit, recover)
        except BaseException:
            self.close()
            raise

    def _set_up(self, store: Store, memory_limit: str | None, recover: bool) -> None:
        con = self.con
        con.execute("SET temp_directory = ''")
        try:
            con.execute("SET memory_limit = ?", [memory_limit or default_memory_limit()])
        except duckdb.Error as e:
            raise ZooError(f"invalid memory limit {memory_limit!r}: {one_line(e)}") from None
        con.register_filesystem(store.filesystem())
        if recover:  # (packs a killed packer left half-finished: the only write a reader may ask for)
            store.recover()
        elif pending := store.pending_zoos():
            warnings.warn(ZooWarning(
                f"{store.root}: zoo(s) {', '.join(pending)} have packs a killed packer left pending, whose rows "
                f"queries may miss: open with zoo.open(root, recover=True), or run `zoo verify --root {store.root}`"),
                stacklevel=5)
        with store.reading():
            store.create_views(con, base=f"{PROTOCOL}://")
        con.execute(f"SET allowed_directories = ['{PROTOCOL}://']")
        con.execute("SET enable_external_access = false")
        con.execute("SET disabled_filesystems = 'LocalFileSystem'")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        # Zoo queries join per-model rows (metrics, curves) to `models` and group by model
        # fields. DuckDB 2's partial aggregate pushdown then pre-groups by model_id below the
        # join, which reduces nothing when a model has one row per group: the phase
        # aggregation over 1e6 metric rows took 200-250 ms with it and 50 ms without
        # (perf/storage_read.py).
        with contextlib.suppress(duckdb.Error):  # (an older DuckDB has no such optimizer)
            con.execute("SET disabled_optimizers = 'partial_aggregate_pushdown'")
        con.execute("SET lock_configuration = true")

    def close(self) -> None:
        with contextlib.suppress(duckdb.Error):
            self.con.close()

    def __del__(self):
        try:  # (at interpreter exit the modules this needs may be gone already)
            self.con.close()
        except Exception:
            pass

    def query(self, query: str, params: list | dict | None = None, timeout: float | None = None) -> pd.DataFrame:
        """Run a read-only query (several statements: the last one's result) within the time
        limit; Ctrl-C interrupts it (KeyboardInterrupt, after DuckDB has stopped)."""
        check_read_only(self.con, query)
        limit = self.timeout if timeout is None else timeout
        result: dict = {}

        def work():
            try:
                result["frame"] = self.con.execute(query, params or []).df()
            except BaseException as e:  # (handed to the calling thread)
                result["error"] = e

        # DuckDB runs in a worker thread so that this one stays free to hear Ctrl-C and the clock
        worker = threading.Thread(target=work, name="zoo-sql", daemon=True)
        worker.start()
        try:
            worker.join(limit)
        except KeyboardInterrupt:
            self.con.interrupt()
            worker.join()
            raise
        if worker.is_alive():
            self.con.interrupt()
            worker.join()
            if "frame" not in result:
                raise ZooError(f"query stopped after its time limit of {limit:g} s "
                               "(--timeout S, or env ZOO_SQL_TIMEOUT_S)")
        if "error" in result:
            raise _query_error(result["error"]) from None
        return result["frame"]


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold Ctrl-C off while this thread is inside DuckDB: DuckDB calls back into Python (the
    root's file system), and a KeyboardInterrupt raised in such a callback aborts the process.
    The interrupt is delivered as soon as DuckDB has returned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse, in one line, any statement that is not a query (module docstring, wall 1)."""
    try:
        statements = _statements(con, query)
    except duckdb.Error as e:
        raise ZooError(f"SQL error: {one_line(e)}") from None
    if not statements:
        raise ZooError("empty query")
    for kind, text in statements:
        if kind == "EXPLAIN":
            inner = _explained(text)
            try:
                inner_kinds = [k for k, _ in _statements(con, inner)] if inner is not None else []
            except duckdb.Error:
                inner_kinds = []
            if inner_kinds != ["SELECT"]:
                raise ZooError("refused: zoo sql is read-only (EXPLAIN is allowed only as `EXPLAIN <query>`, "
                               "without ANALYZE or options)")
        elif kind != "SELECT":
            hint = " (a PIVOT needs an explicit list: ON col IN (v1, v2, ...))" if kind == "MULTI" else ""
            raise ZooError(f"refused: zoo sql is read-only ({kind} statements are not allowed){hint}")


def _statements(con: duckdb.DuckDBPyConnection, text: str) -> list[tuple[str, str]]:
    """(type name, text) of each statement; a type the Python client cannot name (it raises
    ValueError for UPDATE EXTENSIONS) is "UNKNOWN"."""
    out = []
    for statement in con.extract_statements(text):
        try:
            kind = statement.type.name
        except ValueError:
            kind = "UNKNOWN"
        out.append((kind, statement.query))
    return out


def _explained(text: str) -> str | None:
    """What follows the EXPLAIN keyword of an EXPLAIN statement (comments skipped), or None."""
    tokens = [(offset, kind) for offset, kind in duckdb.tokenize(text) if kind != duckdb.token_type.comment]
    if len(tokens) < 2 or text[tokens[0][0]:tokens[1][0]].strip().upper() != "EXPLAIN":
        return None
    return text[tokens[1][0]:]


def _query_error(e: BaseException) -> Exception:
    if isinstance(e, (ZooError, KeyboardInterrupt)):
        return e
    if isinstance(e, duckdb.InterruptException):
        return ZooError("query interrupted")
    if isinstance(e, MemoryError):
        return ZooError("SQL error: out of memory (a memory limit: env ZOO_SQL_MEMORY or --memory-limit)")
    message = one_line(e)
    if isinstance(e, duckdb.OutOfMemoryException):
        message += " (the memory limit: env ZOO_SQL_MEMORY or --memory-limit)"
    elif isinstance(e, (duckdb.IOException, duckdb.InvalidInputException, duckdb.PermissionException)) and ".parquet" in message:
        message += " (a damaged file, or a link out of the root: `zoo verify` finds it and moves it to quarantine/)"
    if not isinstance(e, duckdb.Error):
        return e  # (a bug of ours: its traceback helps)
    return ZooError(f"SQL error: {message}")


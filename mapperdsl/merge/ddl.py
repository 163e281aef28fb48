"""Creating the target table when it is missing: typed columns and the index the merge uses."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import polars as pl
import sqlalchemy as sa

from mapperdsl.connect import ddl_lock, execute
from mapperdsl.dialects import POSTGRES, key_expr, quote, quote_column, sql_type
from mapperdsl.dsl.parts import Scd2
from mapperdsl.dsl.url import redact_text
from mapperdsl.errors import PlanError
from mapperdsl.plan.plan import Plan

log = logging.getLogger("mapperdsl")


def target_ddl(plan: Plan) -> list[str]:
    """CREATE statements for the target: mapped columns, history columns, and last a unique
    index on the key (SCD2: of the current versions only, so one current version per key
    is enforced)."""
    m = plan.mapping
    assert m.target_def and m.key_columns
    dialect, scd = m.target_def.url.dialect, m.scd
    aware = sql_type(pl.Datetime("us", "UTC"), dialect)
    cols = [f"{quote_column(n)} {sql_type(t, dialect)}" + (" NOT NULL" if n in m.key_columns else "")
            for n, t in plan.target_schema().items()]
    if isinstance(scd, Scd2):
        cols += [f"{quote_column(scd.valid_from)} {aware} NOT NULL",
                 f"{quote_column(scd.valid_to)} {aware}",
                 f"{quote_column(scd.is_current)} BOOLEAN NOT NULL"]
    elif scd.deletes == "close":
        cols.append(f"{quote_column(scd.deleted_flag)} BOOLEAN NOT NULL DEFAULT FALSE")
    cols.append(f"{quote_column(scd.hash_column)} BIGINT NOT NULL")
    table = m.target_def.table
    types = plan.target_schema()
    keys = ", ".join(key_expr(k, types[k], dialect, source=False) for k in m.key_columns)
    where = f" WHERE {quote_column(scd.is_current)}" if isinstance(scd, Scd2) else ""
    index = quote_column(key_index(plan))
    stmts = [f"CREATE TABLE IF NOT EXISTS {quote(table)} ({', '.join(cols)})",
             f"CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {quote(table)} ({keys}){where}"]
    if dialect == POSTGRES and "." in table:
        schema = table.rpartition(".")[0]
        stmts.insert(0, f"CREATE SCHEMA IF NOT EXISTS {quote(schema)}")
    return stmts


def key_index(plan: Plan) -> str:
    """The name of the target's unique key index (unquoted, without a schema)."""
    assert plan.mapping.target_def
    bare = plan.mapping.target_def.table.rpartition(".")[2]
    return f"{bare}_{'current_' if isinstance(plan.mapping.scd, Scd2) else ''}key"


def ensure_target(conn: sa.Connection, plan: Plan) -> None:
    """Create the target table if it is missing (idempotent); its index comes separately.
    On PostgreSQL, an index of the key index's name on another table (a renamed old
    dimension keeps its index's name) is an error: the target would never get its own,
    and its key lookups would scan it whole."""
    assert plan.mapping.target_def
    with conn.begin():
        ddl_lock(conn)
        for stmt in target_ddl(plan)[:-1]:
            execute(conn, stmt)
        if conn.dialect.name != POSTGRES:
            return
        table = plan.mapping.target_def.table
        schema = table.rpartition(".")[0]  # an index lives in its table's schema
        index = ".".join([quote(schema)] * bool(schema) + [quote_column(key_index(plan))])
        other = conn.execute(sa.text("SELECT indrelid::regclass::text FROM pg_index WHERE "
                                     "indexrelid = to_regclass(:i) AND indrelid <> "
                                     "CAST(:t AS regclass)"),
                             {"i": index, "t": quote(table)}).scalar()
        if other is not None:
            raise PlanError(f"index {index} belongs to table {other}, not to the target "
                            f"{table}: rename or drop it, so that mapperdsl can create the "
                            "target's key index")


def is_empty(conn: sa.Connection, plan: Plan) -> bool:
    """Whether the target table holds no row (the transaction read in is rolled back)."""
    assert plan.mapping.target_def
    empty = not has_rows(conn, plan.mapping.target_def.table)
    conn.rollback()
    return empty


def has_rows(conn: sa.Connection, table: str) -> bool:
    """Whether ``table`` holds a row, read in the caller's transaction."""
    return execute(conn, f"SELECT 1 FROM {quote(table)} LIMIT 1").first() is not None


def ensure_index(conn: sa.Connection, plan: Plan) -> None:
    """Create the target's unique key index if it is missing (idempotent)."""
    with conn.begin():
        ddl_lock(conn)
        execute(conn, target_ddl(plan)[-1])


GIVE_WAY_SECONDS = 0.5  # how often a first load's hold looks for a session waiting on it
HOLD_WAIT_SECONDS = 5.0  # the longest the job waits on the hold's watcher (a dead connection)


@contextlib.contextmanager
def first_load(connect: Callable[[], AbstractContextManager[sa.Connection]], plan: Plan,
               empty: bool) -> Iterator[Callable[[], None]]:
    """Yields ``index()``, which builds the key index once the chunks of a first load
    (``empty``: the target was empty when the job started) are done; otherwise the index is
    there already and ``index()`` does nothing.

    On PostgreSQL a first load holds its target from autovacuum (:class:`_Hold`) and builds
    the index in the hold's transaction; a hold given up or lost, on a connection of its own.
    """
    m = plan.mapping
    assert m.target_def
    table = m.target_def.table
    hold = _Hold(connect, table, m.policy.lease_seconds) \
        if empty and m.target_def.url.dialect == POSTGRES else None
    built = not empty

    def index() -> None:
        nonlocal built
        if built:
            return
        conn = hold.take() if hold is not None else None
        if conn is not None:
            try:  # (no ddl_lock: the hold keeps any other CREATE INDEX on the target waiting)
                execute(conn, target_ddl(plan)[-1])
                conn.commit()
                built = True
                return
            except sa.exc.DBAPIError as exc:  # built below, or its error raised there
                log.info("building the key index of %s on another connection: %s", table,
                         redact_text(str(exc.orig)))
                with contextlib.suppress(Exception):
                    conn.close()  # the failed transaction still holds the lock: let it go
        with connect() as conn:
            ensure_index(conn, plan)
        built = True

    try:
        yield index
    finally:
        if hold is not None:
            hold.release()


class _Hold:
    """SHARE UPDATE EXCLUSIVE on a first load's target, in a session of its own, taken with
    NOWAIT. Autovacuum skips a table it cannot lock at once: without the hold it started on
    the new rows as soon as the first chunks committed, took a core from the load, and the
    index's CREATE INDEX then waited a second (``deadlock_timeout``) for it to give way.

    The chunks' writes do not conflict with the hold, but a lock that does (an ALTER TABLE,
    a VACUUM of the user's) would wait for it, and the next chunk's write behind that lock:
    a thread gives the hold up, as autovacuum gives way, as soon as a session waits for a
    lock on the target. Its queries keep the session busy; a coordinator that stops (frozen,
    then replaced) leaves it idle, and the server ends it once the lease would have run out
    (``idle_in_transaction_session_timeout``). A hold not taken (such a lock is held), given
    up or lost only leaves autovacuum free.
    """

    def __init__(self, connect: Callable[[], AbstractContextManager[sa.Connection]],
                 table: str, lease_seconds: float) -> None:
        self.table, self._stack = table, contextlib.ExitStack()
        self._conn: sa.Connection | None = None
        self._mutex, self._done = threading.Lock(), threading.Event()
        idle_ms = int(max(lease_seconds, 10 * GIVE_WAY_SECONDS) * 1000)
        try:  # read committed whatever the server's default: no snapshot kept for the load
            conn = self._stack.enter_context(connect()).execution_options(
                isolation_level="READ COMMITTED")
            execute(conn, f"SET idle_in_transaction_session_timeout = {idle_ms}")
            execute(conn, f"LOCK TABLE {quote(table)} IN SHARE UPDATE EXCLUSIVE MODE NOWAIT")
        except Exception as exc:  # the load goes on; autovacuum may join it
            self._let_go(f"the first load of {table} goes on without holding autovacuum off: "
                         f"{exc}")
            return
        self._conn = conn
        threading.Thread(target=self._watch, daemon=True, name="mapperdsl-hold").start()

    def _watch(self) -> None:
        waiting = sa.text("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'relation' "
                          "AND database = (SELECT oid FROM pg_database WHERE datname = "
                          "current_database()) AND relation = CAST(:t AS regclass) "
                          "AND NOT granted)")
        while not self._done.wait(GIVE_WAY_SECONDS):
            with self._mutex:
                if self._conn is None:
                    return
                try:
                    if not self._conn.execute(waiting, {"t": quote(self.table)}).scalar():
                        continue
                    why = "a session waits for a lock on it"
                except Exception as exc:  # lost: nothing to give up
                    why = f"the hold was lost: {exc}"
                self._let_go(f"the first load of {self.table} lets autovacuum in: {why}")
                return

    def _let_go(self, why: str) -> None:
        # (under the mutex, or before the watcher starts)
        log.info("%s", redact_text(why))
        self._close()

    def _close(self) -> None:
        self._conn = None
        with contextlib.suppress(Exception):
            self._stack.close()  # rolls the hold back: the lock is released

    def take(self) -> sa.Connection | None:
        """The held connection, its transaction open, for the index; None if let go, or if
        the watcher's query does not come back (a dead connection). The watcher stops: the
        caller owns the connection from here."""
        self._done.set()
        if not self._mutex.acquire(timeout=HOLD_WAIT_SECONDS):
            log.info("the first load of %s lost its hold: its connection does not answer",
                     self.table)
            return None
        try:
            conn, self._conn = self._conn, None
        finally:
            self._mutex.release()
        return conn

    def release(self) -> None:
        """Stop watching and close the hold's connection (its transaction rolled back if
        :meth:`take` was not called or its caller did not commit). A connection that does
        not answer is left to the server, which ends the idle session."""
        self._done.set()
        if not self._mutex.acquire(timeout=HOLD_WAIT_SECONDS):
            return
        try:
            self._close()
        finally:
            self._mutex.release()

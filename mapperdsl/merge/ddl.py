"""Creating the target table when it is missing: typed columns and the index the merge uses."""

from __future__ import annotations

import contextlib
import logging
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
    """Whether the target table holds no row."""
    assert plan.mapping.target_def
    row = execute(conn, f"SELECT 1 FROM {quote(plan.mapping.target_def.table)} LIMIT 1").first()
    conn.rollback()
    return row is None


def ensure_index(conn: sa.Connection, plan: Plan) -> None:
    """Create the target's unique key index if it is missing (idempotent)."""
    with conn.begin():
        ddl_lock(conn)
        execute(conn, target_ddl(plan)[-1])


@contextlib.contextmanager
def first_load(connect: Callable[[], AbstractContextManager[sa.Connection]], plan: Plan,
               empty: bool) -> Iterator[Callable[[], None]]:
    """Yields ``index()``, which builds the key index once the chunks of a first load
    (``empty``: the target was empty when the job started) are done; otherwise the index is
    there already and ``index()`` does nothing.

    On PostgreSQL a first load holds its target in SHARE UPDATE EXCLUSIVE mode, in a session
    of its own, until the index is built in the same transaction. Autovacuum skips a table
    it cannot lock at once: without the hold it started on the new rows as soon as the first
    chunks committed, took a core from the load, and the index's CREATE INDEX then waited a
    second (``deadlock_timeout``) for it to give way. The chunks' writes do not conflict
    with the hold. A hold that cannot be taken at once (another session holds such a lock:
    a VACUUM of the user's) or is lost (a restart, a server's
    ``idle_in_transaction_session_timeout``) only leaves autovacuum free: the index is then
    built on a connection of its own.
    """
    assert plan.mapping.target_def
    table = plan.mapping.target_def.table
    with contextlib.ExitStack() as stack:
        held: sa.Connection | None = None
        if empty and plan.mapping.target_def.url.dialect == POSTGRES:
            try:
                held = stack.enter_context(connect())
                execute(held, f"LOCK TABLE {quote(table)} IN SHARE UPDATE EXCLUSIVE MODE NOWAIT")
            except Exception as exc:  # the load goes on; autovacuum may join it
                log.info("the first load of %s goes on without holding autovacuum off: %s",
                         table, redact_text(str(exc)))
                stack.close()
                held = None
        built = not empty

        def index() -> None:
            nonlocal held, built
            if built:
                return
            if held is not None:
                try:
                    ddl_lock(held)
                    execute(held, target_ddl(plan)[-1])
                    held.commit()
                    built = True
                    return
                except sa.exc.DBAPIError as exc:  # built below, or its error raised there
                    log.info("building the key index of %s on another connection: %s", table,
                             redact_text(str(exc.orig)))
                finally:
                    held = None  # closed with the stack
            with connect() as conn:
                ensure_index(conn, plan)
            built = True

        yield index

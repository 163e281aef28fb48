"""Writing one chunk's diff in one transaction, with set-based SQL.

Order inside the transaction: the keys (SCD2, deletes) or rows (SCD1 updates)
go to a temporary staging table by bulk load; one UPDATE closes (SQLite moves
the closed versions, see :func:`_close`) or overwrites,
one DELETE removes, new rows are bulk-loaded straight into the target; then the
caller's ``finish`` writes the rejects and the chunk's ledger row on the same
connection, and everything commits together. On PostgreSQL every bulk load is a
binary COPY (:mod:`mapperdsl.merge.pgcopy`); on SQLite an INSERT of thousands of rows
per statement inside ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl
import sqlalchemy as sa

from mapperdsl.connect import execute
from mapperdsl.dialects import POSTGRES, SQLITE, key_expr, literal, quote, quote_column, to_storage
from mapperdsl.dsl.parts import Scd1, Scd2
from mapperdsl.errors import MergeError
from mapperdsl.merge import pgcopy
from mapperdsl.merge.ddl import key_index
from mapperdsl.merge.diff import Diff
from mapperdsl.plan.plan import Plan

STAGE = "mapperdsl_stage"
SQLITE_PARAMETERS = 32_766  # at most this many parameters in one INSERT (SQLite's own default)


@dataclass(frozen=True)
class MergeCounts:
    inserted: int = 0
    updated: int = 0
    closed: int = 0
    deleted: int = 0
    unchanged: int = 0


def bulk_load(conn: sa.Connection, table: str, frame: pl.DataFrame, dialect: str,
              constants: dict[str, pl.Expr] | None = None) -> None:
    """Append ``frame`` to ``table`` in bulk: COPY on PostgreSQL, multi-row INSERTs on SQLite.

    ``constants``: columns with one value for every row (typed literals); SQLite gets
    them as SQL literals, which spares binding them on every row.
    """
    if frame.height == 0:
        return
    constants = constants or {}
    if dialect == POSTGRES:
        frame = frame.with_columns(**constants)
    names = frame.columns
    raw = conn.connection.driver_connection
    if dialect == POSTGRES:
        types = pgcopy.column_types(conn, quote(table))
        if pgcopy.encodable(frame.schema, types):
            names, pieces = pgcopy.copy_data(frame, types)
            options = "FORMAT binary"
        else:  # a type without a binary encoder: CSV, every text quoted (an unquoted
            # empty field is NULL, and a bare \. line ends COPY)
            buffer = io.BytesIO()
            to_storage(frame, dialect).write_csv(buffer, include_header=False,
                                                 quote_style="non_numeric")
            pieces, options = iter([buffer.getbuffer()]), "FORMAT csv"
        cols = ", ".join(quote_column(c) for c in names)
        with raw.cursor() as cur:  # type: ignore[union-attr]
            with cur.copy(f"COPY {quote(table)} ({cols}) FROM STDIN ({options})") as copy:
                for piece in pieces:
                    copy.write(piece)
            written = cur.rowcount
    else:
        written = _sqlite_insert(raw, table, to_storage(frame, dialect), constants)
    if written != frame.height:
        raise MergeError(f"loading {table} wrote {written} rows, expected {frame.height}")


def _sqlite_insert(raw: Any, table: str, stored: pl.DataFrame,
                   constants: dict[str, pl.Expr]) -> int:
    """INSERT ``stored`` (and the ``constants``, as SQL literals) with as many rows per
    statement as SQLite takes parameters: a third faster than one row per statement."""
    fixed = to_storage(pl.select([e.alias(c) for c, e in constants.items()]), "sqlite").row(0) \
        if constants else ()
    cols = ", ".join(quote_column(c) for c in [*stored.columns, *constants])
    row = f"({', '.join(['?'] * stored.width + [literal(v, 'sqlite') for v in fixed])})"
    # what this SQLite build takes (a compile-time option; Python 3.10 cannot ask: 999, the
    # least any build takes)
    which = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)
    limit = raw.getlimit(which) if which is not None else 999
    per = max(1, min(limit, SQLITE_PARAMETERS) // stored.width)
    insert = f"INSERT INTO {quote(table)} ({cols}) VALUES "
    many, written = insert + ", ".join([row] * per), 0
    values: list[Any] = [None] * (per * stored.width)
    for part in stored.iter_slices(per):
        if part.height == per:  # the values row by row, put in place column by column
            for i, column in enumerate(part.iter_columns()):
                values[i::stored.width] = column.to_list()
            written += raw.execute(many, values).rowcount
        else:  # the rest, one prepared row at a time
            written += raw.executemany(insert + row, part.iter_rows()).rowcount
    return written


def _stage(conn: sa.Connection, plan: Plan, frame: pl.DataFrame) -> str:
    """A temporary table shaped like the target's ``frame`` columns, loaded with ``frame``."""
    m = plan.mapping
    assert m.target_def
    dialect = m.target_def.url.dialect
    cols = ", ".join(quote_column(c) for c in frame.columns)
    suffix = " ON COMMIT DROP" if dialect == POSTGRES else ""
    execute(conn, f"DROP TABLE IF EXISTS {'pg_temp' if dialect == POSTGRES else 'temp'}.{STAGE}")
    execute(conn, f"CREATE TEMP TABLE {STAGE}{suffix} AS SELECT {cols} "
                         f"FROM {quote(m.target_def.table)} WHERE 1 = 0")
    bulk_load(conn, STAGE, frame, dialect)
    if dialect == POSTGRES:  # row counts for the planner: an index lookup per staged key
        execute(conn, f"ANALYZE {STAGE}")
    return STAGE


def _match(plan: Plan, table: str) -> str:
    keys = plan.mapping.key_columns or ()
    return " AND ".join(f"s.{quote_column(k)} = {table}.{quote_column(k)}" for k in keys)


def _staged_keys(plan: Plan) -> str:
    """``key IN (SELECT key FROM stage)``, the key written as the target's index has it, so
    the staged keys are looked up through that index (a correlated EXISTS made SQLite scan
    the stage once per target row). PostgreSQL gets one key as ``key = ANY(ARRAY(...))``:
    an index scan whatever the statistics say (for 10,000 keys of 1M rows they chose a
    hash join over the whole table, 8x slower)."""
    m = plan.mapping
    assert m.target_def
    types, dialect = plan.target_schema(), m.target_def.url.dialect
    keys = [key_expr(k, types[k], dialect, source=False) for k in m.key_columns or ()]
    if dialect == POSTGRES and len(keys) == 1:
        return f"{keys[0]} = ANY(ARRAY(SELECT {keys[0]} FROM {STAGE}))"
    lhs = keys[0] if len(keys) == 1 else f"({', '.join(keys)})"
    return f"{lhs} IN (SELECT {', '.join(keys)} FROM {STAGE})"


def _close(conn: sa.Connection, plan: Plan) -> None:
    """Close the current versions of the staged keys: ``valid_to`` = the job's effective
    time, ``is_current`` = false.

    SQLite moves them instead of updating them in place, when the table allows: a
    current version's ``valid_to`` is NULL, which takes no room, so setting it grows the
    row by a timestamp, and SQLite's full pages split (closing 10,000 of 1M rows: 1.3 s;
    copied as closed versions to the table's end and deleted: 0.5 s). Kept in place
    when the table's row ids mean something (an INTEGER PRIMARY KEY, WITHOUT ROWID), a
    unique index of the user's would see the copy beside its original, or triggers
    would see a move as an insert and a delete."""
    m = plan.mapping
    assert m.target_def and isinstance(m.scd, Scd2)
    dialect, table, scd = m.target_def.url.dialect, quote(m.target_def.table), m.scd
    current = f"{quote_column(scd.is_current)} AND {_staged_keys(plan)}"
    history = {scd.valid_to: literal(plan.effective_time, dialect),
               scd.is_current: literal(False, dialect)}
    copied = _movable(conn, plan) if dialect == SQLITE else None
    if copied is None:  # no parameters: a column name may hold a colon
        sets = ", ".join(f"{quote_column(c)} = {v}" for c, v in history.items())
        execute(conn, f"UPDATE {table} SET {sets} WHERE {current}")
        return
    cols = [c for c in copied if c not in history]
    into = ", ".join(quote_column(c) for c in [*cols, *history])
    select = ", ".join([*(quote_column(c) for c in cols), *history.values()])
    moved = execute(conn, f"INSERT INTO {table} ({into}) SELECT {select} FROM {table} "
                          f"WHERE {current}").rowcount
    gone = execute(conn, f"DELETE FROM {table} WHERE {current}").rowcount
    if moved != gone:  # cannot happen under the write lock; never commit half a move
        raise MergeError(f"closing in {m.target_def.table} copied {moved} current versions "
                         f"but deleted {gone}")


def _movable(conn: sa.Connection, plan: Plan) -> list[str] | None:
    """The columns to copy when moving rows of the SQLite target (generated columns left
    out), or None when its rows must stay where they are (see :func:`_close`)."""
    assert plan.mapping.target_def
    schema, _, bare = plan.mapping.target_def.table.rpartition(".")
    prefix = f"{quote_column(schema)}." if schema else ""
    info = execute(conn, f"PRAGMA {prefix}table_xinfo({quote_column(bare)})").all()
    indexes = execute(conn, f"PRAGMA {prefix}index_list({quote_column(bare)})").all()
    triggers = conn.execute(sa.text(  # names are case-blind in SQLite, as NOCASE compares
        f"SELECT 1 FROM {prefix}sqlite_master WHERE type = 'trigger' AND tbl_name = :t "
        "COLLATE NOCASE"), {"t": bare}).first()
    # index_list rows: (seq, name, unique, ...); table_xinfo rows: (cid, name, type,
    # notnull, default, pk, hidden), hidden > 0 for generated columns
    unique = [row[1] for row in indexes if row[2] and row[1] != key_index(plan)]
    if triggers is not None or unique or any(row[5] for row in info):
        return None
    return [row[1] for row in info if row[6] == 0]


def write_chunk(conn: sa.Connection, plan: Plan, change: Diff,
                finish: Callable[[sa.Connection, MergeCounts], None]) -> MergeCounts:
    """Apply ``change`` to the target and call ``finish`` before the single commit."""
    m = plan.mapping
    assert m.target_def and m.key_columns
    dialect, table = m.target_def.url.dialect, quote(m.target_def.table)
    keys, scd = list(m.key_columns), m.scd
    counts = MergeCounts(inserted=change.new.height, updated=change.changed.height,
                         unchanged=change.unchanged)
    with conn.begin():
        if isinstance(scd, Scd2):
            closing = pl.concat([change.changed.select(keys), change.gone])
            if closing.height:
                _stage(conn, plan, closing)
                _close(conn, plan)
            history = {scd.valid_from: pl.lit(plan.effective_time),
                       scd.valid_to: pl.lit(None, dtype=pl.Datetime("us", "UTC")),
                       scd.is_current: pl.lit(True)}
            bulk_load(conn, m.target_def.table, pl.concat([change.new, change.changed]),
                      dialect, history)
            counts = MergeCounts(counts.inserted, counts.updated, change.gone.height, 0,
                                 counts.unchanged)
        else:
            assert isinstance(scd, Scd1)
            soft = scd.deletes == "close"
            flag = {scd.deleted_flag: pl.lit(False)} if soft else {}
            if change.changed.height:
                staged = change.changed.with_columns(**flag)
                _stage(conn, plan, staged)
                sets = ", ".join(f"{quote_column(c)} = s.{quote_column(c)}"
                                 for c in staged.columns if c not in keys)
                execute(conn, f"UPDATE {table} SET {sets} FROM {STAGE} s "
                                     f"WHERE {_match(plan, table)}")
            if change.gone.height:
                _stage(conn, plan, change.gone)
                staged_keys = _staged_keys(plan)
                if soft:
                    execute(conn, f"UPDATE {table} SET {quote_column(scd.deleted_flag)} = "
                                  f"{literal(True, dialect)} WHERE {staged_keys}")
                else:
                    execute(conn, f"DELETE FROM {table} WHERE {staged_keys}")
            bulk_load(conn, m.target_def.table, change.new, dialect, flag)
            gone = change.gone.height
            counts = MergeCounts(counts.inserted, counts.updated, gone if soft else 0,
                                 0 if soft else gone, counts.unchanged)
        if dialect != POSTGRES:
            execute(conn, f"DROP TABLE IF EXISTS temp.{STAGE}")
        finish(conn, counts)
    return counts

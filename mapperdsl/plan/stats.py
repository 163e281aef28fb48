"""The source's statistics that a plan cuts its chunks from: the rows in the window, the
rows with a NULL key, the key's quantiles (the same tiles as ``NTILE``) and the width of a
row. Read only: a cursor walk, counts and a sample, never a write.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timezone
from itertools import accumulate
from typing import Any

import polars as pl
import sqlalchemy as sa

from mapperdsl.connect import execute
from mapperdsl.dialects import (
    MYSQL,
    POSTGRES,
    SQLITE,
    as_text,
    key_expr,
    literal,
    quote,
    quote_column,
    typed_bound,
)
from mapperdsl.dsl.parts import Source


def relation(source: Source) -> str:
    """The FROM clause of the source: a quoted table or the query as a sub-select."""
    return (quote(source.table, source.url.dialect) if source.table else
            f"({source.query}) AS src")


INDEX_WALK = 4  # SQLite walks an index for the tiles while that is at most 4 full passes
EVERY_ROW = "1 = 1"  # the window predicate of a run that reads every row


def mixed_key(conn: sa.Connection, source: Source, key: str, dtype: pl.DataType) -> bool:
    """Whether a SQLite text or bytes key holds values of other types (an untyped column, a
    BLOB in a TEXT column, a query's UNION), which SQLite orders apart (numbers, then text,
    then bytes): such a key is chunked by the text or bytes it is read as (key_expr
    ``as_text``). Its smallest and largest values tell, each found by an index when there
    is one (one MIN or MAX a query)."""
    k, rel = quote_column(key, SQLITE), relation(source)
    low, high = execute(conn, f"SELECT (SELECT typeof(MIN({k})) FROM {rel}), "
                              f"(SELECT typeof(MAX({k})) FROM {rel})").one()
    want = "text" if dtype == pl.String() else "blob"
    return low not in (want, "null") or high not in (want, "null")


def read_key_stats(conn: sa.Connection, source: Source, key: str, dtype: pl.DataType, where: str,
                   chunk_count: Callable[[int], int], *, as_text: bool = False,
                   not_null: bool = False) -> tuple[tuple[tuple[Any, int], ...], int]:
    """Key quantiles for the chunks, and the rows with a NULL key.

    The same tiles as ``NTILE(n) OVER (ORDER BY key)``, from the sorted keys and no window
    over the rows (about 3x faster): a PostgreSQL cursor moves to each tile's first row;
    SQLite walks the key's index to each tile's first row when an index gives the order;
    else (and on MySQL) the sorted keys stream past.

    A PostgreSQL table of at least ``ESTIMATE_ROWS`` rows whose key is ``not_null`` (as
    declared) and that is read whole is not counted first: the walk is cut from the
    planner's estimate and counts the rows as it goes on to the end (:func:`_walk_counting`).
    """
    dialect = source.url.dialect
    k, rel = key_expr(key, dtype, dialect, source=True, as_text=as_text), relation(source)
    text_bytes = dialect == SQLITE and dtype == pl.String()  # (its text may not be UTF-8)
    query = (f"SELECT {f'CAST({k} AS BLOB)' if text_bytes else k} FROM {rel} "
             f"WHERE {k} IS NOT NULL AND {where} ORDER BY {k}")
    estimate = (_estimated_rows(conn, source) if dialect == POSTGRES and not_null
                and where == EVERY_ROW else None)
    if estimate is not None:
        tiles = _walk_counting(conn, query, estimate, chunk_count)
        if tiles is not None:
            return tuple((typed_bound(lo, dtype, dialect), count) for lo, count in tiles), 0
    rows, null_rows = execute(conn,
        f"SELECT COUNT({k}), COUNT(*) - COUNT({k}) FROM {rel} WHERE {where}").one()
    rows, n = int(rows), chunk_count(int(rows))
    if rows == 0:
        return (), int(null_rows)
    sizes = _ntile(rows, n)
    firsts = list(accumulate(sizes[:-1], initial=1))  # the row each tile starts at
    if dialect == POSTGRES:
        lows = _walk(conn, query, firsts)
        if not lows:  # every row went between the count and the walk
            return (), int(null_rows)
    elif dialect == SQLITE and where == EVERY_ROW and sum(firsts) <= INDEX_WALK * rows \
            and _ordered_by_index(conn, query):
        # An index gives the order: walk it to each tile's first row (no sort, no rows
        # through Python), each walk from the start, so only when there are few tiles.
        # Not under a window: each step would read and test its row (5x slower).
        lows = [execute(conn, f"{query} LIMIT 1 OFFSET {first - 1}").scalar()
                for first in firsts]
    else:  # the sorted keys streamed past, keeping the first of each tile; on SQLite
        # from sqlite3's own cursor (no Row objects: twice as fast; MySQL's streamed
        # result has read ahead of its cursor)
        keys = execute(conn, query, stream=dialect == MYSQL)
        lows = _rows_at(keys.cursor if dialect == SQLITE else keys, firsts)
    if text_bytes:
        lows = _utf8_bounds(lows)
    return (tuple((typed_bound(lo, dtype, dialect), count) for lo, count in zip(lows, sizes, strict=True)),
            int(null_rows))


ESTIMATE_ROWS = 100_000  # a smaller table is counted first: it takes a few milliseconds
ESTIMATE_TOLERANCE = 0.1  # of a tile: fewer rows than estimated by more is counted, cut again


def _ntile(rows: int, n: int) -> list[int]:
    return [rows // n + (i < rows % n) for i in range(n)]  # as NTILE cuts them


def _estimated_rows(conn: sa.Connection, source: Source) -> int | None:
    """The rows the planner expects in the source table (its statistics scaled to the pages
    the table has now, as the planner does), when it has statistics and at least
    ``ESTIMATE_ROWS``; else None."""
    if not source.table:
        return None
    row = execute(conn,
        "SELECT c.reltuples, c.relpages, pg_relation_size(c.oid) / "
        "current_setting('block_size')::int FROM pg_class c WHERE c.relkind = 'r' AND "
        "NOT c.relhassubclass AND "  # (the statistics of its own rows only)
        f"c.oid = to_regclass({literal(quote(source.table), POSTGRES)})").one_or_none()
    if row is None or row[0] < 0 or not row[1]:  # (never analysed, or no pages then)
        return None
    estimate = round(row[0] / row[1] * row[2])
    return estimate if estimate >= ESTIMATE_ROWS else None


def _walk_counting(conn: sa.Connection, query: str, estimate: int,
                   chunk_count: Callable[[int], int]) -> list[tuple[Any, int]] | None:
    """Tiles of ``query``'s rows cut as NTILE would cut ``estimate`` rows, in one walk of
    the cursor that goes on to the end and so counts the rows: each tile's first value and
    its rows. Exactly NTILE's when the estimate is right. The last tile takes the
    difference: None (count, then cut) when that makes it larger than NTILE's largest
    (a chunk over the rows it may have), or smaller by more than ``ESTIMATE_TOLERANCE``
    of a tile, or the rows need another number of tiles.
    """
    n = chunk_count(estimate)
    firsts = list(accumulate(_ntile(estimate, n)[:-1], initial=1))
    lows, rows = _walk(conn, query, firsts, count=True)
    if firsts[-1] > rows or rows - firsts[-1] + 1 > -(-rows // n) \
            or estimate - rows > ESTIMATE_TOLERANCE * estimate / n or chunk_count(rows) != n:
        return None
    sizes = [b - a for a, b in zip(firsts, [*firsts[1:], rows + 1], strict=True)]
    return list(zip(lows, sizes, strict=True))


def _utf8_bounds(lows: list[bytes]) -> list[str]:
    """Tile bounds as text from the bytes of SQLite text that may not be UTF-8 (such a key
    is a reject): its UTF-8 part before the first bad byte, which sorts no later, and never
    before the bound before it."""
    out: list[str] = []
    for low in lows:
        try:
            text = low.decode()
        except UnicodeDecodeError as bad:
            text = low[:bad.start].decode()
        out.append(max(text, out[-1]) if out else text)  # (str order: the UTF-8 bytes')
    return out


def _walk(conn: sa.Connection, query: str, firsts: list[int],
          count: bool = False) -> Any:
    """The rows of ``query`` at positions ``firsts`` (ascending, from 1), from a PostgreSQL
    cursor that moves past the rows in between without sending them: with an index on
    the key, one walk through it and no sort (a third of the time of ``percentile_disc``,
    which sorts every key). Planned for reading every row, not the first tenth. Rows gone
    since they were counted shorten the walk: the tiles past its end start where the last
    one found does, so they merge into it. ``count``: also the rows of ``query``, the
    cursor moved on to the end for them, as ``(values, rows)``.
    """
    name, at, lows = "mapperdsl_tiles", 0, []
    execute(conn, "SET LOCAL cursor_tuple_fraction = 1")
    execute(conn, f"DECLARE {name} NO SCROLL CURSOR FOR {query}")
    fetch = _endless_cursor(conn)
    for first in firsts:
        at += _move(conn, name, first - 1 - at)
        row = fetch.execute(f"FETCH NEXT FROM {name}").fetchone()
        if row is None:
            break
        lows.append(row[0])
        at = first
    if count and len(lows) == len(firsts):
        at += _move(conn, name, None)
    fetch.close()
    execute(conn, f"CLOSE {name}")
    lows += lows[-1:] * (len(firsts) - len(lows))
    return (lows, at) if count else lows


def _move(conn: sa.Connection, cursor: str, rows: int | None) -> int:
    """Move ``cursor`` forward ``rows`` rows (None: to its end) without sending them; the
    rows it moved past. (A MOVE takes a 32-bit count.)"""
    moved = 0
    while rows is None or moved < rows:
        step = 2**31 - 1 if rows is None else min(rows - moved, 2**31 - 1)
        done = execute(conn, f"MOVE FORWARD {step} IN {cursor}").rowcount
        moved += done
        if done < step:
            break
    return moved


def _endless_cursor(conn: sa.Connection) -> Any:
    """A psycopg cursor of ``conn`` that loads a date or time key's infinity as the last (or
    first) value Python has, as a chunk bound: the chunks' ranges still hold every key (the
    rows of an infinite key are rejected when read, execute/transform.py)."""
    from psycopg.types.datetime import DateLoader, TimestampLoader, TimestamptzLoader

    def endless(loader: type, last: Any, first: Any) -> type:
        class Endless(loader):  # type: ignore[valid-type, misc]
            def load(self, data: Any) -> Any:
                text = bytes(data)
                return last if text == b"infinity" else first if text == b"-infinity" \
                    else super().load(data)
        return Endless

    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    utc = timezone.utc
    for typname, loader, last, first in (
            ("date", DateLoader, date.max, date.min),
            ("timestamp", TimestampLoader, datetime.max, datetime.min),
            ("timestamptz", TimestamptzLoader, datetime.max.replace(tzinfo=utc),
             datetime.min.replace(tzinfo=utc))):
        cursor.adapters.register_loader(typname, endless(loader, last, first))
    return cursor


def _ordered_by_index(conn: sa.Connection, query: str) -> bool:
    """Whether SQLite reads ``query``'s rows in order from an index (no sort of its own)."""
    steps = execute(conn, f"EXPLAIN QUERY PLAN {query}").all()
    return not any("TEMP B-TREE" in str(step[-1]) for step in steps)


def _rows_at(cursor: Any, positions: list[int]) -> list[Any]:
    """The first value of the rows at the 1-based ``positions`` (ascending) of ``cursor``."""
    values, at, last = [], 0, None
    for position in positions:
        while at < position:
            batch = cursor.fetchmany(min(position - at, 100_000))
            if not batch:
                break
            at, last = at + len(batch), batch[-1][0]
        values.append(last)
    cursor.close()  # (an unbuffered MySQL cursor reads the rest of its rows first)
    return values


_FIXED_BYTES = {pl.Int8(): 1, pl.Int16(): 2, pl.Int32(): 4, pl.Int64(): 8, pl.UInt8(): 1,
                pl.UInt16(): 2, pl.UInt32(): 4, pl.UInt64(): 8, pl.Float32(): 4, pl.Float64(): 8,
                pl.Boolean(): 1, pl.Date(): 4, pl.Time(): 8}


def read_row_bytes(conn: sa.Connection, source: Source,
                   columns: list[tuple[str, pl.DataType]]) -> int:
    """About how many bytes a row of ``columns`` takes in memory: fixed widths from the
    types, text and bytes from the average length in the first 1,000 rows. On PostgreSQL
    a table's sample starts at its first row, not where another scan of it happens to be
    (a synchronized scan would start there): the same table gets the same chunks."""
    width, sampled, dialect = 0, [], source.url.dialect
    for name, dtype in columns:
        if isinstance(dtype, (pl.Datetime, pl.Decimal)):
            width += 8 if isinstance(dtype, pl.Datetime) else 16
        elif dtype in _FIXED_BYTES:
            width += _FIXED_BYTES[dtype]
        else:  # text or bytes: the characters plus an offset
            width += 8
            sampled.append(f"AVG(LENGTH({as_text(quote_column(name, dialect), dialect)}))")
    if sampled:
        cols = ", ".join(quote_column(name, dialect) for name, _ in columns)
        sample = conn.begin_nested()  # rolled back: takes the setting back with it
        try:
            if dialect == POSTGRES:  # outside the guess: a server without it says so
                execute(conn, "SET LOCAL synchronize_seqscans = off")
            try:
                averages = execute(conn, f"SELECT {', '.join(sampled)} FROM (SELECT {cols} "
                                         f"FROM {relation(source)} LIMIT 1000) sample").one()
            except sa.exc.DBAPIError:  # a computed column failed on these rows: the chunk
                averages = (32,) * len(sampled)  # that holds them will say so; guess here
        finally:
            sample.rollback()
        width += sum(int(a or 0) for a in averages)
    return max(width, 1)

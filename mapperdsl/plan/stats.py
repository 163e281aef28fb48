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
from mapperdsl.dialects import MYSQL, POSTGRES, SQLITE, as_text, key_expr, quote, quote_column, typed_bound
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
                   chunk_count: Callable[[int], int], *,
                   as_text: bool = False) -> tuple[tuple[tuple[Any, int], ...], int]:
    """Key quantiles for the chunks, and the rows with a NULL key.

    The same tiles as ``NTILE(n) OVER (ORDER BY key)``, from the sorted keys and no window
    over the rows (about 3x faster): a PostgreSQL cursor moves to each tile's first row;
    SQLite walks the key's index to each tile's first row when an index gives the order;
    else (and on MySQL) the sorted keys stream past.
    """
    dialect = source.url.dialect
    k, rel = key_expr(key, dtype, dialect, source=True, as_text=as_text), relation(source)
    rows, null_rows = execute(conn,
        f"SELECT COUNT({k}), COUNT(*) - COUNT({k}) FROM {rel} WHERE {where}").one()
    rows, n = int(rows), chunk_count(int(rows))
    if rows == 0:
        return (), int(null_rows)
    sizes = [rows // n + (i < rows % n) for i in range(n)]  # as NTILE cuts them
    firsts = list(accumulate(sizes[:-1], initial=1))  # the row each tile starts at
    text_bytes = dialect == SQLITE and dtype == pl.String()  # (its text may not be UTF-8)
    query = (f"SELECT {f'CAST({k} AS BLOB)' if text_bytes else k} FROM {rel} "
             f"WHERE {k} IS NOT NULL AND {where} ORDER BY {k}")
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


def _walk(conn: sa.Connection, query: str, firsts: list[int]) -> list[Any]:
    """The rows of ``query`` at positions ``firsts`` (ascending, from 1), from a PostgreSQL
    cursor that moves past the rows in between without sending them: with an index on
    the key, one walk through it and no sort (a third of the time of ``percentile_disc``,
    which sorts every key). Planned for reading every row, not the first tenth. Rows gone
    since they were counted shorten the walk: the tiles past its end start where the last
    one found does, so they merge into it.
    """
    name, at, lows = "mapperdsl_tiles", 0, []
    execute(conn, "SET LOCAL cursor_tuple_fraction = 1")
    execute(conn, f"DECLARE {name} NO SCROLL CURSOR FOR {query}")
    fetch = _endless_cursor(conn)
    for first in firsts:
        while first - 1 > at:  # MOVE takes a 32-bit count
            step = min(first - 1 - at, 2**31 - 1)
            execute(conn, f"MOVE FORWARD {step} IN {name}")
            at += step
        row = fetch.execute(f"FETCH NEXT FROM {name}").fetchone()
        if row is None:
            break
        lows.append(row[0])
        at = first
    fetch.close()
    execute(conn, f"CLOSE {name}")
    return lows + lows[-1:] * (len(firsts) - len(lows))


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

"""Reading the facts a plan is made from: metadata and statistics only, never a write.

Source: its columns and declared types, the checkpoint's high-water mark, and
the statistics of :mod:`mapperdsl.plan.stats` (rows, NULL keys and the key's
quantiles inside the window, a row's width). Target: whether the table
exists, its columns, the stored checkpoint and the fingerprint of the mapping
that last succeeded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, TypeGuard, cast

import polars as pl
import sqlalchemy as sa

from mapperdsl import names
from mapperdsl.connect import connection, execute, read_arrow, sqlite_path
from mapperdsl.dialects import (
    MYSQL,
    PG_TYPES,
    POSTGRES,
    SQLITE,
    dtype_of_declared,
    dtype_to_text,
    literal,
    mark_of,
    quote,
    quote_column,
    sqlite_mark,
    sqlite_moment,
)
from mapperdsl.dsl.mapping import Mapping
from mapperdsl.dsl.parts import Incremental, Source, Target
from mapperdsl.dsl.url import redact_text
from mapperdsl.errors import PlanError
from mapperdsl.plan.stats import mixed_key, read_key_stats, read_row_bytes, relation
from mapperdsl.plan.values import from_jsonable, to_jsonable


@dataclass(frozen=True)
class Facts:
    """Everything a plan is compiled from, read in one go."""

    source_columns: tuple[tuple[str, pl.DataType], ...]
    target_exists: bool
    target_columns: dict[str, pl.DataType] | None
    stored_checkpoint: Any  # KEY: a tuple of values; PYTHON: the function's JSON state
    last_fingerprint: str | None
    high: tuple[Any, ...] | None
    tiles: tuple[tuple[Any, int], ...]  # (lowest key of the tile, rows) in key order
    null_rows: int
    last_read_columns: dict[str, str] | None = None  # of the last successful job
    row_bytes: int | None = None  # estimated width of a source row as read (sizes chunks)
    key_not_null: bool = False  # the source declares the chunking key NOT NULL: no NULL chunk
    text_columns: frozenset[str] = frozenset()  # read as text (pg_columns, sqlite_columns)
    target_text_limits: dict[str, int] | None = None  # characters at most (_target_columns)
    key_as_text: bool = False  # a SQLite key holding values of several types (mixed_key)


def window_predicate(columns: tuple[str, ...], low: tuple[Any, ...] | None,
                     high: tuple[Any, ...] | None, dialect: str,
                     types: dict[str, pl.DataType] | None = None) -> str:
    """``low < columns <= high`` as SQL; tuples compare as row values. A SQLite column of
    times with a zone (``types``) compares as the moments its text says (:func:`sqlite_mark`),
    inside a range of its text that an index can give: the days around the window's."""
    if high is None:
        return "1 = 0"
    types = types or {}
    zoned = {c: t for c in columns if dialect == SQLITE and _with_zone(t := types.get(c))}
    # A PostgreSQL real compares with a number as a double: the real 1.1 is 1.10000002 > 1.1
    single = {c for c in columns if dialect == POSTGRES and types.get(c) == pl.Float32()}
    cols = [sqlite_mark(quote_column(c, dialect), zoned[c]) if c in zoned
            else quote_column(c, dialect) for c in columns]
    lhs = cols[0] if len(cols) == 1 else "(" + ", ".join(cols) + ")"

    def value(v: tuple[Any, ...]) -> str:
        parts = [literal(mark_of(x, zoned[c]), dialect) if c in zoned
                 else f"CAST({literal(x, dialect)} AS real)" if c in single
                 else literal(x, dialect) for c, x in zip(columns, v, strict=True)]
        return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"

    parts = [f"{lhs} <= {value(high)}"]
    if low is not None:
        parts.insert(0, f"{lhs} > {value(low)}")
    first = quote_column(columns[0], dialect)
    if columns[0] in zoned:  # (in any ISO form, a moment's text starts with its day, and
        # an offset moves it a day at most)
        parts.extend(f"{first} {op} {literal(day, dialect)}" for op, day in (
            (">=", _day_of(low[0] if low else None, -3)), ("<", _day_of(high[0], 3))) if day)
    return " AND ".join(parts)


def _with_zone(dtype: pl.DataType | None) -> TypeGuard[pl.Datetime]:
    """Whether a SQLite column of ``dtype`` compares as moments: a time with a zone (its text
    holds offsets, so text order is not time order). A date or a time without one compares
    as its text, which an index serves exactly (its values with an offset are rejects)."""
    return isinstance(dtype, pl.Datetime) and dtype.time_zone is not None


def _timed(dtype: pl.DataType | None) -> bool:
    return dtype == pl.Date() or isinstance(dtype, pl.Datetime)


def _day_of(value: Any, days: int) -> str | None:
    """The day ``days`` after the one that text ``value`` starts with ('2024-01-31 ...'), or
    None (not such text: a number, say, which sorts before any text in SQLite)."""
    if not isinstance(value, str) or not re.match(r"\d{4}-\d{2}-\d{2}", value):
        return None
    try:
        return (date.fromisoformat(value[:10]) + timedelta(days=days)).isoformat()
    except (ValueError, OverflowError):
        return None


def read_source_columns(conn: sa.Connection, source: Source, *,
                        sample: bool = True) -> tuple[tuple[str, pl.DataType | None], ...]:
    """The source's columns with the Polars type each is read as, from the declared types.

    A SQLite query column without a declared type gets the type of its values
    (``sample``), or None without sampling.
    """
    if source.url.dialect == POSTGRES:
        return pg_columns(conn, source)[0]
    if source.url.dialect == MYSQL:
        return _mysql_columns(conn, source)
    return sqlite_columns(conn, source, sample=sample)[0]


def sqlite_columns(conn: sa.Connection, source: Source, *, sample: bool = True) -> tuple[
        tuple[tuple[str, pl.DataType | None], ...], frozenset[str]]:
    """A SQLite source's columns as :func:`read_source_columns` gives them, and those read
    as text that have no declared type: they may hold numbers too, which are read as
    SQLite's text of them (dialects.sqlite_text), so a value has one text whatever the
    rows around it."""
    if source.table:
        rows = execute(conn, f"PRAGMA table_info({quote(source.table)})").all()
        if not rows:
            raise PlanError(f"source table {source.table!r} does not exist in {source.url}")
    else:
        execute(conn, f"CREATE TEMP VIEW mapperdsl_probe AS {source.query}")
        rows = execute(conn, "PRAGMA table_info(mapperdsl_probe)").all()
        execute(conn, "DROP VIEW temp.mapperdsl_probe")
    columns = tuple((row[1], dtype_of_declared(row[2] or "") or (
        _sampled_dtype(conn, source, row[1]) if sample else None)) for row in rows)
    loose = frozenset(name for (name, dtype), row in zip(columns, rows, strict=True)
                      if not row[2] and dtype == pl.String())
    return columns, loose


def pg_columns(conn: sa.Connection, source: Source) -> tuple[tuple[tuple[str, pl.DataType], ...],
                                                            frozenset[str]]:
    """A PostgreSQL source's columns with the Polars type each is read as, and those read
    as text: every type ConnectorX does not read as that type. It reads an enum from
    ``COPY ... BINARY`` only, not from the plain query's rows mapperdsl reads
    (connect.py read_arrow); interval, money, xml, point and the like not at all (it
    panics); arrays and oid as other types."""
    out, text = [], set()
    cursor = execute(conn, f"SELECT * FROM {relation(source)} LIMIT 0").cursor
    for col in cast(Any, cursor.description):  # psycopg columns carry typmods
        if col.type_code == 1700:
            dtype: pl.DataType = (source_decimal(col.name, col.precision, col.scale)
                                  if col.precision else pl.Decimal(38, 10))
        elif col.type_code in PG_TYPES:
            dtype = PG_TYPES[col.type_code]
        else:
            dtype = pl.String()
            text.add(col.name)
        out.append((col.name, dtype))
    return tuple(out), frozenset(text)


def _mysql_columns(conn: sa.Connection, source: Source) -> tuple[tuple[str, pl.DataType], ...]:
    # The types ConnectorX reads (unsigned integers, TINYINT as Int8, ...); decimals are read
    # as text, typed as declared: a table's from information_schema, a query's from the
    # driver's display size (room for a sign and a point: never too few digits).
    probe = f"SELECT * FROM {relation(source)} LIMIT 0"
    described = execute(conn, probe).cursor.description
    try:
        read = read_arrow(source.url, probe).schema
    except Exception as exc:  # ConnectorX raises plain RuntimeErrors
        hint = ("; ConnectorX cannot read a column of that type: read it through a query that "
                "turns it into text (ST_AsText(c) for a geometry, CAST(c AS CHAR) for others)"
                if "not implemented" in str(exc) else "")
        raise PlanError(f"reading the source {source.url} failed: {redact_text(str(exc))}"
                        + hint) from None
    declared: dict[str, tuple[int, int]] = {}
    if source.table:
        schema, _, table = source.table.rpartition(".")
        declared = {name: (int(p), int(s)) for name, p, s in execute(conn,
            "SELECT COLUMN_NAME, NUMERIC_PRECISION, NUMERIC_SCALE FROM information_schema.COLUMNS "
            f"WHERE TABLE_SCHEMA = {literal(schema, MYSQL) if schema else 'DATABASE()'} AND "
            f"TABLE_NAME = {literal(table, MYSQL)} AND DATA_TYPE = 'decimal'").all()}
    read_types = pl.from_arrow(read.empty_table()).schema  # type: ignore[union-attr]
    out: list[tuple[str, pl.DataType]] = []
    for name, code, _, size, _, scale, _ in cast(Any, described):
        if code in _MYSQL_DECIMALS:
            precision, scale = declared.get(name, (min(38, size - (1 if scale else 0)), scale))
            out.append((name, source_decimal(name, precision, scale)))
        else:
            out.append((name, read_types[name]))
    return tuple(out)


_MYSQL_DECIMALS = (0, 246)  # DECIMAL, NEWDECIMAL


def source_decimal(column: str, precision: int, scale: int | None) -> pl.Decimal:
    """The Polars type of a source ``DECIMAL(precision, scale)`` column."""
    if precision > 38:
        raise PlanError(f"source column {column!r} is a decimal of {precision} digits; "
                        "mapperdsl holds decimals of up to 38 digits: read it through a query "
                        "that casts it to fewer digits (or to text)")
    return pl.Decimal(precision, scale or 0)


def _sampled_dtype(conn: sa.Connection, source: Source, column: str) -> pl.DataType:
    # A query column without a declared type (an expression): use the type its values have.
    values = execute(conn,
        f"SELECT {quote_column(column)} FROM {relation(source)} "
        f"WHERE {quote_column(column)} IS NOT NULL LIMIT 100").scalars().all()
    kinds = {type(v) for v in values}
    if kinds <= {int}:
        return pl.Int64() if values else pl.String()
    if kinds <= {int, float}:
        return pl.Float64()
    return pl.Binary() if kinds == {bytes} else pl.String()


@dataclass(frozen=True)
class TargetState:
    exists: bool = False
    columns: dict[str, pl.DataType] | None = None
    stored: Any = None
    fingerprint: str | None = None
    last_read_columns: dict[str, str] | None = None
    text_limits: dict[str, int] | None = None  # (see _target_columns)


def read_target_state(target: Target, mapping_name: str) -> TargetState:
    """The target table's columns, the stored checkpoint and what the last success read."""
    if target.url.dialect == "sqlite" and not os.path.exists(sqlite_path(target.url)):
        return TargetState()
    with connection(target.url, readonly=True) as conn:
        inspector = sa.inspect(conn)
        schema, _, table = target.table.rpartition(".")
        exists = inspector.has_table(table, schema=schema or None)
        columns, limits = _target_columns(conn, target, schema or None, table) if exists \
            else (None, None)
        stored, fingerprint = None, None
        if inspector.has_table(names.CHECKPOINTS):
            row = conn.execute(sa.text(
                f"SELECT value, fingerprint FROM {names.CHECKPOINTS} WHERE mapping = :m "
                "AND target_table = :t"), {"m": mapping_name, "t": target.table}).first()
            if row is not None:
                stored = decode_checkpoint(row[0])
                fingerprint = row[1]
        last = None
        if inspector.has_table(names.JOBS):
            plan_json = conn.execute(sa.text(
                f"SELECT plan_json FROM {names.JOBS} WHERE mapping = :m AND target_table = :t "
                "AND status = 'SUCCEEDED' ORDER BY finished_at DESC LIMIT 1"),
                {"m": mapping_name, "t": target.table}).scalar()
            if plan_json:
                last = {n: t for n, t in json.loads(plan_json)["read_columns"]}
        conn.rollback()
    return TargetState(exists, columns, stored, fingerprint, last, limits)


def encode_checkpoint(value: Any, *, python: bool) -> str | None:
    """The text a checkpoint is stored as: typed values (KEY) or the function's state."""
    if python:
        return json.dumps({"python": value})
    return None if value is None else json.dumps(to_jsonable(value))


def decode_checkpoint(text: str | None) -> Any:
    if text is None:
        return None
    data = json.loads(text)
    if isinstance(data, dict) and set(data) == {"python"}:
        return data["python"]
    return from_jsonable(data)


def _target_columns(conn: sa.Connection, target: Target, schema: str | None,
                    table: str) -> tuple[dict[str, pl.DataType], dict[str, int]]:
    """The target's column types, and the most characters each text column of a limited
    length holds (PostgreSQL's ``varchar(n)`` and ``char(n)``; SQLite enforces none)."""
    if target.url.dialect == POSTGRES:
        rows = conn.execute(sa.text(
            "SELECT column_name, data_type, numeric_precision, numeric_scale, "
            "character_maximum_length FROM information_schema.columns WHERE table_name = :t "
            "AND table_schema = COALESCE(:s, current_schema()) ORDER BY ordinal_position"),
            {"t": table, "s": schema}).all()
        return ({r[0]: _pg_named_type(r[1], r[2], r[3]) for r in rows},
                {r[0]: r[4] for r in rows if r[4] is not None})
    rows = execute(conn, f"PRAGMA table_info({quote(target.table)})").all()
    return {r[1]: dtype_of_declared(r[2] or "") or pl.String() for r in rows}, {}


_PG_NAMED = {
    "smallint": pl.Int16(), "integer": pl.Int32(), "bigint": pl.Int64(), "real": pl.Float32(),
    "double precision": pl.Float64(), "text": pl.String(), "character varying": pl.String(),
    "character": pl.String(), "boolean": pl.Boolean(), "date": pl.Date(),
    "timestamp without time zone": pl.Datetime("us"),
    "timestamp with time zone": pl.Datetime("us", "UTC"), "time without time zone": pl.Time(),
    "bytea": pl.Binary(), "uuid": pl.String(), "json": pl.String(), "jsonb": pl.String(),
}


def _pg_named_type(name: str, precision: int | None, scale: int | None) -> pl.DataType:
    if name == "numeric":
        return pl.Decimal(precision, scale or 0) if precision else pl.Decimal(38, 10)
    return _PG_NAMED.get(name, pl.String())


def read_high(conn: sa.Connection, source: Source, columns: tuple[str, ...],
              types: dict[str, pl.DataType] | None = None) -> tuple[Any, ...] | None:
    """The high-water mark: the largest value (a tuple for several columns) in the source now.
    ``types``: the columns' types as read. A value that is a reject when read is no mark:
    a MySQL date with zeros in it; in SQLite, a value unlike its column's type (text in an
    INTEGER column, which SQLite sorts after every number; text in a date or time column
    that does not start with a digit), and a time with a zone is the moment its text says,
    whatever its ISO form (:func:`_sqlite_marks`)."""
    types = types or {}
    timed = {c for c in columns if _timed(types.get(c))}
    names = [quote_column(c, source.url.dialect) for c in columns]
    not_null = " AND ".join(f"{c} IS NOT NULL" for c in names)
    if source.url.dialect == MYSQL:  # a MySQL date with zeros in it is a reject, no mark
        not_null += "".join(f" AND MONTH({q}) <> 0 AND DAYOFMONTH({q}) <> 0"
                            for c, q in zip(columns, names, strict=True) if c in timed)
    if source.url.dialect == SQLITE:
        names, fits = _sqlite_marks(conn, source, columns, names, types)
        not_null += "".join(f" AND {fit}" for fit in fits)
    cols = ", ".join(names)
    order = ", ".join(f"{c} DESC" for c in names)
    try:
        row = execute(conn, f"SELECT {cols} FROM {relation(source)} WHERE {not_null} "
                            f"ORDER BY {order} LIMIT 1").first()
    except sa.exc.DataError as exc:  # psycopg loads no infinity
        if "infinity" not in str(exc.orig):
            raise
        said = "-infinity" if "-infinity" in str(exc.orig) else "infinity"
    else:  # SQLite holds it as text (as mapperdsl writes a PostgreSQL infinity there), which
        # is no moment: asked apart (an index answers)
        said = "infinity" if source.url.dialect == SQLITE and any(execute(
            conn, f"SELECT 1 FROM {relation(source)} WHERE {quote_column(c, SQLITE)} = "
                  "'infinity' LIMIT 1").first() for c in columns if c in timed) else ""
        if not said:
            return tuple(row) if row is not None else None
    why = ("-infinity as their largest value, which a checkpoint cannot hold"
           if said == "-infinity" else "infinity: no row would ever be later")
    raise PlanError(f"the incremental checkpoint column(s) {', '.join(columns)} of the "
                    f"source {source.label!r} hold {why}. Leave those rows out in a source "
                    f"query, or checkpoint on another column")


_SQLITE_KINDS = {"integer": "'integer', 'real'", "float": "'integer', 'real'",
                 "text": "'text'", "bytes": "'blob'"}


def _sqlite_marks(conn: sa.Connection, source: Source, columns: tuple[str, ...], names: list[str],
                  types: dict[str, pl.DataType]) -> tuple[list[str], list[str]]:
    """What SQLite's mark is of each checkpoint column (for a time with a zone
    :func:`sqlite_mark`), and the conditions of the values that can be one (a date or time:
    a number or text that starts with a digit). A first column of a time with a zone is
    first asked for its largest text that starts with a digit (an index gives it): when
    that is a moment, the latest is within days of it (an offset moves a moment's day by
    one at most), so only those days are read, not the whole table."""
    marks, fits = [], []
    for column, name in zip(columns, names, strict=True):
        dtype = types.get(column)
        if _timed(dtype):
            marks.append(sqlite_mark(name, dtype) if _with_zone(dtype) else name)
            fits.append(f"(typeof({name}) IN ('integer', 'real') OR ({name} >= '0' AND "
                        f"{name} < ':'))")
            continue
        marks.append(name)
        kind = ("integer" if dtype.is_integer() or dtype == pl.Boolean() else "float"
                if dtype.is_numeric() else "bytes" if dtype == pl.Binary() else "text") \
            if dtype is not None else ""
        if kind:
            fits.append(f"typeof({name}) IN ({_SQLITE_KINDS[kind]})")
    first = types.get(columns[0])
    if _with_zone(first):
        latest = execute(conn, f"SELECT {names[0]}, {sqlite_moment(names[0], first)} FROM "
                               f"{relation(source)} WHERE {names[0]} >= '0' AND {names[0]} < ':' "
                               f"ORDER BY {names[0]} DESC LIMIT 1").first()
        day = _day_of(latest[0], -3) if latest is not None and latest[1] is not None else None
        if day:
            fits.append(f"{names[0]} >= {literal(day, SQLITE)}")
    return marks, fits


def declared_not_null(conn: sa.Connection, source: Source, column: str) -> bool:
    """Whether the source table enforces ``column`` NOT NULL (a primary key's column, or
    SQLite's ``INTEGER PRIMARY KEY``, the row id). A query's columns never do, nor a
    view's, a foreign table's or a constraint not yet validated, nor a PostgreSQL table
    with inheritance children (its rows include theirs, and up to PostgreSQL 17 a child
    may drop the NOT NULL it inherits; a partition may not)."""
    if not source.table:
        return False
    dialect = source.url.dialect
    if dialect == POSTGRES:
        return bool(execute(conn,
            "SELECT a.attnotnull FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            f"WHERE a.attrelid = to_regclass({literal(quote(source.table), POSTGRES)}) "
            f"AND a.attname = {literal(column, POSTGRES)} AND NOT a.attisdropped "
            "AND (c.relkind = 'p' OR c.relkind = 'r' AND NOT c.relhassubclass) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint n "
            "WHERE n.conrelid = a.attrelid AND n.contype = 'n' AND NOT n.convalidated "
            "AND a.attnum = ANY(n.conkey))").scalar())  # (NOT NULL constraints: PG 18)
    if dialect == MYSQL:
        schema, _, table = source.table.rpartition(".")
        return execute(conn,
            "SELECT c.IS_NULLABLE FROM information_schema.COLUMNS c JOIN "
            "information_schema.TABLES t ON t.TABLE_SCHEMA = c.TABLE_SCHEMA AND "
            "t.TABLE_NAME = c.TABLE_NAME AND t.TABLE_TYPE = 'BASE TABLE' WHERE "
            f"c.TABLE_SCHEMA = {literal(schema, MYSQL) if schema else 'DATABASE()'} "
            f"AND c.TABLE_NAME = {literal(table, MYSQL)} "
            f"AND c.COLUMN_NAME = {literal(column, MYSQL)}").scalar() == "NO"
    rows = execute(conn, f"PRAGMA table_info({quote(source.table)})").all()
    info = next((r for r in rows if r[1] == column), None)  # (cid, name, type, notnull, _, pk)
    if info is None:
        return False
    if info[3]:
        return True
    # The row id's alias: the only primary key column, declared INTEGER, and no index of its
    # own (``INTEGER PRIMARY KEY DESC`` is not an alias, gets an index, and may hold NULL).
    alone = info[5] == 1 and sum(r[5] > 0 for r in rows) == 1
    return alone and str(info[2]).upper() == "INTEGER" and not any(
        r[3] == "pk" for r in execute(conn, f"PRAGMA index_list({quote(source.table)})").all())


def read_facts(mapping: Mapping, *, needed_columns: Callable[[tuple[str, ...]], list[str]],
               chunk_count: Callable[[int, int], int],
               window: Callable[[tuple[Any, ...] | None, tuple[Any, ...] | None,
                                 dict[str, pl.DataType]], str]) -> Facts:
    """Read every fact of ``mapping``; ``needed_columns`` returns the problems found in the
    source columns, so statistics are only queried on a source that fits."""
    src, dst = mapping.source_def, mapping.target_def
    assert src is not None and dst is not None and mapping.key_columns
    state = read_target_state(dst, mapping.name)
    stored = state.stored
    with connection(src.url, readonly=True) as conn:
        try:
            columns, text = cast(tuple[tuple[tuple[str, pl.DataType], ...], frozenset[str]],
                                 pg_columns(conn, src) if src.url.dialect == POSTGRES
                                 else sqlite_columns(conn, src) if src.url.dialect == SQLITE
                                 else (_mysql_columns(conn, src), frozenset[str]()))
            problems = needed_columns(tuple(name for name, _ in columns))
            if problems:
                raise PlanError(problems)
            ck = mapping.checkpoint
            types = dict(columns)
            high = read_high(conn, src, ck.columns, types) if isinstance(ck, Incremental) else None
            key = (mapping.column_map.plain_source(mapping.key_columns[0])
                   if mapping.column_map and mapping.key_columns[0] in mapping.column_map
                   else None) or mapping.key_columns[0]
            needed = ({r for _, e in mapping.column_map for r in e.meta.root_names()}
                      if mapping.column_map else {name for name, _ in columns})
            row_bytes = read_row_bytes(conn, src, [(n, t) for n, t in columns
                                                   if n in needed | {key}])
            key_type = dict(columns)[key]
            as_text = src.url.dialect == SQLITE and key_type in (pl.String(), pl.Binary()) \
                and mixed_key(conn, src, key, key_type)
            text |= {key} if as_text else set()  # (read as it compares)
            not_null = declared_not_null(conn, src, key)
            tiles, null_rows = read_key_stats(conn, src, key, key_type,
                                              window(stored, high, types),
                                              lambda rows: chunk_count(rows, row_bytes),
                                              as_text=as_text, not_null=not_null)
        except sa.exc.DBAPIError as exc:
            raise _source_failed(src, exc) from None
        finally:
            conn.rollback()
    return Facts(columns, state.exists, state.columns, stored, state.fingerprint, high, tiles,
                 null_rows, state.last_read_columns, row_bytes, not_null, text,
                 state.text_limits, as_text)


def drift(plan_source: Source, plan_target: Target, read_columns: dict[str, str],
          target_columns: list[str], not_null: str | None = None) -> list[str]:
    """How the databases no longer fit a plan: source columns gone or retyped, the key
    column ``not_null`` (a plan without a chunk for NULL keys) no longer NOT NULL, target
    columns gone. Empty when the plan still fits."""
    problems = []
    with connection(plan_source.url, readonly=True) as conn:
        try:
            found = read_source_columns(conn, plan_source, sample=False)
            if not_null and not declared_not_null(conn, plan_source, not_null):
                problems.append(f"source column {not_null!r} may be NULL now; the plan has no "
                                "chunk for rows whose key is NULL")
        except sa.exc.DBAPIError as exc:
            raise _source_failed(plan_source, exc) from None
        now = {n: t and dtype_to_text(t) for n, t in found}
        conn.rollback()
    for name, planned in read_columns.items():
        if name not in now:
            problems.append(f"source column {name!r} is gone (planned as {planned})")
        elif now[name] is not None and now[name] != planned:
            problems.append(f"source column {name!r} is {now[name]} now, planned as {planned}")
    state = read_target_state(plan_target, "")
    if state.exists and state.columns is not None:
        gone = [name for name in target_columns if name not in state.columns]
        if gone:
            problems.append(f"target table {plan_target.table!r} has lost the columns {gone!r}")
    return problems


def _source_failed(source: Source, exc: sa.exc.DBAPIError) -> PlanError:
    return PlanError(f"reading the source {source.url} failed: {redact_text(str(exc.orig))}")

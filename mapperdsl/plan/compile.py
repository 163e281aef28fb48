"""Compiling a mapping into a plan: a pure function of the mapping and the facts.

:func:`compile_mapping` reads the facts (:mod:`mapperdsl.plan.facts`) and calls
:func:`compile_plan`, which decides everything else without touching a
database, so every decision can be tested with made-up facts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import polars as pl

from mapperdsl.connect import same_database
from mapperdsl.dialects import (
    SQLITE,
    as_text,
    dtype_to_text,
    key_expr,
    key_literal,
    quote_column,
    sql_type,
    sqlite3_rounds_times,
    sqlite_text,
)
from mapperdsl.dsl.mapping import Mapping
from mapperdsl.dsl.parts import ColumnMap, Incremental, PythonCheckpoint
from mapperdsl.errors import DeclarationError, PlanError
from mapperdsl.plan.facts import Facts, read_facts, window_predicate
from mapperdsl.plan.plan import Chunk, KeyRange, Plan, Window
from mapperdsl.plan.stats import EVERY_ROW, relation
from mapperdsl.plan.values import show


def compile_mapping(mapping: Mapping, *, effective_time: datetime | None = None,
                    allow_source_changes: bool = False,
                    on_ranges: Callable[[int], object] | None = None) -> Plan:
    """Read the facts ``mapping`` needs and compile its plan. Writes nothing.

    A source column whose type differs from the last successful run's is an error
    unless ``allow_source_changes``. ``on_ranges`` is told how many key ranges the plan
    will have as soon as the rows are counted (or estimated, for a walk that counts them:
    told again when the estimate was too far off), before the key is walked for them.
    """

    def ranges(rows: int, row_bytes: int) -> int:
        n = chunk_count(rows, mapping, row_bytes)
        if on_ranges is not None:
            on_ranges(n)
        return n

    missing = mapping.missing()
    if missing:
        raise DeclarationError(missing)
    if effective_time is not None and (not isinstance(effective_time, datetime)
                                       or effective_time.tzinfo is None):
        raise DeclarationError(f"`effective_time` must be a timezone-aware datetime "
                               f"(datetime(2026, 1, 1, tzinfo=timezone.utc)), got {effective_time!r}")
    facts = read_facts(
        mapping,
        needed_columns=lambda columns: missing_columns(mapping, columns),
        chunk_count=ranges,
        window=lambda stored, high, types: _window_sql(mapping, stored, high, types),
    )
    now = datetime.now(timezone.utc)
    return compile_plan(mapping, facts, effective_time=effective_time or now, planned_at=now,
                        allow_source_changes=allow_source_changes)


def chunk_count(rows: int, mapping: Mapping, row_bytes: int) -> int:
    """How many key ranges: exactly ``count``, or enough for the rows per chunk (at least one)."""
    if mapping.chunking.count is not None:
        return max(1, min(mapping.chunking.count, rows or 1))
    return max(1, math.ceil(rows / mapping.chunking.rows_for(row_bytes)))


def missing_columns(mapping: Mapping, columns: tuple[str, ...]) -> list[str]:
    """Every column the mapping names that the source does not have, each with the choices."""
    have = set(columns)
    label = mapping.source_def.label if mapping.source_def else "?"
    listing = ", ".join(columns)
    needed: dict[str, str] = {}
    cols = mapping.column_map
    for name, expr in cols or ():
        for root in expr.meta.root_names():
            needed.setdefault(root, f"column map `{name}`")
    for key in mapping.key_columns or ():
        if cols is None or key not in cols:
            needed.setdefault(key, "key")
    for c in mapping.checkpoint.columns if isinstance(mapping.checkpoint, Incremental) else ():
        needed.setdefault(c, "incremental(...)")
    return [f"Column {c!r} (used by {why}) is not in source {label!r}. Columns: {listing}."
            for c, why in needed.items() if c not in have]


def resolve_columns(mapping: Mapping, source_columns: tuple[str, ...]) -> ColumnMap:
    """The column map with every default filled in: all source columns when none was given,
    and key columns that were left out copied from the source, first."""
    cols = mapping.column_map or ColumnMap((c, pl.col(c)) for c in source_columns)
    for key in reversed(mapping.key_columns or ()):
        if key not in cols:
            cols = cols.with_first(key, pl.col(key))
    return cols


def resolved(mapping: Mapping, source_columns: tuple[str, ...]) -> Mapping:
    """``mapping`` as its plans hold it, whose fingerprint is theirs: the column map's
    defaults filled in (:func:`resolve_columns`) and the URLs absolute."""
    assert mapping.source_def and mapping.target_def
    return Mapping(**{**mapping.__dict__, "column_map": resolve_columns(mapping, source_columns),
                      "source_def": _absolute(mapping.source_def),
                      "target_def": _absolute(mapping.target_def)})


def compile_plan(mapping: Mapping, facts: Facts, *, effective_time: datetime,
                 planned_at: datetime, allow_source_changes: bool = False) -> Plan:
    """The plan of ``mapping`` given ``facts``; raises PlanError listing every problem."""
    assert mapping.source_def and mapping.target_def and mapping.key_columns
    src_dialect = mapping.source_def.url.dialect
    tgt_dialect = mapping.target_def.url.dialect
    source_types = dict(facts.source_columns)
    mapping = resolved(mapping, tuple(source_types))
    cols = mapping.column_map
    assert mapping.source_def and mapping.target_def and mapping.key_columns and cols
    problems = mapping._problems()
    decisions: list[str] = []

    read = {c: source_types[c] for c in cols.source_columns() if c in source_types}
    if facts.last_read_columns and not allow_source_changes:
        gone = [n for n in facts.last_read_columns if n not in source_types]
        if gone:
            problems.append(f"source columns {gone!r} were read by the last successful run and "
                            "are gone now; if that is intended, plan with "
                            "plan(allow_source_changes=True)")
        for name, dtype in read.items():
            before = facts.last_read_columns.get(name)
            if before is not None and before != dtype_to_text(dtype):
                problems.append(
                    f"source column {name!r} is {dtype_to_text(dtype)} now but was {before} at "
                    "the last successful run; if that is intended, plan with "
                    "plan(allow_source_changes=True)")
    mapped = _mapped_types(cols, read, problems)
    target_types = _target_types(mapping, mapped, facts, problems, decisions)
    for name, dtype in target_types.items():
        try:
            sql_type(dtype, tgt_dialect)
        except PlanError as exc:
            problems.append(f"column {name!r}: {exc}")
    if problems:
        raise PlanError(problems)

    window = _window(mapping.checkpoint, facts, decisions)
    python_state = (facts.stored_checkpoint if isinstance(mapping.checkpoint, PythonCheckpoint)
                    else None)
    key = cols.plain_source(mapping.key_columns[0]) or mapping.key_columns[0]
    where = (window_predicate(window.columns, window.low, window.high, src_dialect, source_types)
             if window else None)
    select = ", ".join(_read_expr(name, dtype, src_dialect, name in facts.text_columns)
                       for name, dtype in read.items())
    rel = relation(mapping.source_def)

    key_type = source_types[key]
    # (a source in the target's SQLite file is read with Python's sqlite3: module read)
    key_sql = key_expr(key, key_type, src_dialect, source=True, cut=sqlite3_rounds_times()
                       and same_database(mapping.source_def.url, mapping.target_def.url),
                       as_text=facts.key_as_text)

    def sql(r: KeyRange) -> str:
        cond = r.predicate(key_sql, lambda v: key_literal(v, key_type, src_dialect, source=True,
                                                            bound=True))
        return f"SELECT {select} FROM {rel} WHERE {cond}" + (f" AND {where}" if where else "")

    ranges = key_ranges(facts.tiles)
    chunks = [Chunk(i + 1, r, sql(r), rows) for i, (r, rows) in enumerate(ranges)]
    # A key declared NOT NULL has no rows for a NULL chunk, unless the key's expression
    # can be NULL all the same: SQLite's date() of a text it cannot read.
    no_nulls = (facts.key_not_null and facts.null_rows == 0
                and not (src_dialect == SQLITE and key_type.is_temporal()))
    if not no_nulls:  # its rows are in no range: they are read to be rejected
        null_range = KeyRange(nulls=True)
        chunks.append(Chunk(len(chunks) + 1, null_range, sql(null_range), facts.null_rows))

    decisions += _decisions(mapping, facts, len(ranges), key, no_nulls)
    return Plan(
        mapping=mapping,
        fingerprint=mapping.fingerprint(),
        effective_time=effective_time.astimezone(timezone.utc),
        read_columns=tuple((n, dtype_to_text(t)) for n, t in read.items()),
        target_columns=tuple((n, dtype_to_text(t)) for n, t in target_types.items()),
        target_exists=facts.target_exists,
        window=window,
        python_state=python_state,
        chunks=tuple(chunks),
        decisions=tuple(decisions),
        planned_at=planned_at,
        text_limits=tuple((n, k) for n, k in (facts.target_text_limits or {}).items()
                          if n in target_types),
    )


def key_ranges(tiles: tuple[tuple[Any, int], ...]) -> list[tuple[KeyRange, int]]:
    """Contiguous ranges from the lowest key of each tile; the first and last are open,
    so together they hold every non-NULL key, also ones inserted after planning."""
    bounds: list[Any] = []
    counts: list[int] = []
    for lo, rows in tiles:
        if counts and lo == bounds[-1]:
            counts[-1] += rows  # a key value spanning tiles stays in one chunk
            continue
        bounds.append(lo)
        counts.append(rows)
    if not bounds:
        return [(KeyRange(), 0)]
    los: list[Any] = [None, *bounds[1:]]
    his: list[Any] = [*bounds[1:], None]
    return [(KeyRange(lo, hi), n) for lo, hi, n in zip(los, his, counts, strict=True)]


def _absolute(part: Any) -> Any:
    return type(part)(**{**part.__dict__, "url": part.url.absolute()})


def _read_expr(name: str, dtype: pl.DataType, dialect: str, text: bool = False) -> str:
    # Exact decimals and SQLite's text-stored dates travel as text; Polars parses them.
    # ``text``: the column is read as text anyway (Facts.text_columns: a PostgreSQL enum,
    # interval, array, ...; a SQLite column with no declared type read as text).
    col = quote_column(name, dialect)
    if text and dialect == SQLITE and dtype in (pl.String(), pl.Binary()):  # see key_expr
        return (f"{sqlite_text(col)} AS {col}" if dtype == pl.String()
                else f"CAST({sqlite_text(col)} AS BLOB) AS {col}")
    text = text or isinstance(dtype, pl.Decimal) or (
        dialect == SQLITE and (dtype in (pl.Date(), pl.Time()) or isinstance(dtype, pl.Datetime)))
    return f"{as_text(col, dialect)} AS {col}" if text else col


def _mapped_types(cols: ColumnMap, read: dict[str, pl.DataType],
                  problems: list[str]) -> dict[str, pl.DataType]:
    empty = pl.DataFrame(schema=read)
    out: dict[str, pl.DataType] = {}
    for name, expr in cols:
        try:
            out[name] = empty.select(expr.alias(name)).schema[name]
        except Exception as exc:  # Polars says why the expression does not fit the types
            first = str(exc).strip().splitlines()[0]
            problems.append(f"column map `{name}`: {type(exc).__name__}: {first}")
    for name, dtype in out.items():
        if dtype == pl.Null():
            problems.append(f"column map `{name}` has no type (a bare None literal); cast it, "
                            f"e.g. pl.lit(None, dtype=pl.String())")
    return out


def _target_types(mapping: Mapping, mapped: dict[str, pl.DataType], facts: Facts,
                  problems: list[str], decisions: list[str]) -> dict[str, pl.DataType]:
    if not facts.target_exists or facts.target_columns is None:
        return mapped
    have = facts.target_columns
    table = mapping.target_def.table if mapping.target_def else "?"
    needed = [*mapped, *mapping.scd.system_columns]
    lacking = [c for c in needed if c not in have]
    if lacking:
        problems.append(f"target table {table!r} lacks the columns {lacking!r}; it has "
                        f"{', '.join(have)}. Add them or load into a new table.")
        return mapped
    out = {}
    for name, dtype in mapped.items():
        out[name] = have[name]
        if have[name] != dtype:
            decisions.append(f"column {name}: {dtype_to_text(dtype)} is cast to the target's "
                             f"{dtype_to_text(have[name])}; values that do not fit are rejected")
    return out


def _window_sql(mapping: Mapping, stored: tuple[Any, ...] | None,
                high: tuple[Any, ...] | None, types: dict[str, pl.DataType]) -> str:
    if not isinstance(mapping.checkpoint, Incremental):
        return EVERY_ROW
    low = _lagged(stored, mapping.checkpoint)
    assert mapping.source_def is not None
    return window_predicate(mapping.checkpoint.columns, low, high, mapping.source_def.url.dialect,
                            types)


def _window(ck: Incremental | PythonCheckpoint | None, facts: Facts,
            decisions: list[str]) -> Window | None:
    if not isinstance(ck, Incremental):
        return None
    stored = facts.stored_checkpoint
    if stored is not None and len(stored) != len(ck.columns):
        raise PlanError(f"the stored checkpoint {show(stored)} has {len(stored)} values but "
                        f"incremental(...) names {len(ck.columns)} columns {list(ck.columns)!r}; "
                        "reset the checkpoint explicitly to change the checkpoint columns")
    return Window(ck.columns, stored, _lagged(stored, ck), facts.high)


def _lagged(stored: tuple[Any, ...] | None, ck: Incremental) -> tuple[Any, ...] | None:
    if stored is None or ck.lag is None:
        return stored
    value, lag = stored[0], ck.lag
    if isinstance(value, str) and isinstance(lag, timedelta):
        return (_lag_text(value, lag),)
    if isinstance(value, (datetime, date)) and isinstance(lag, timedelta):
        return (value - lag,)
    if isinstance(value, Decimal) and not isinstance(lag, timedelta):
        return (value - Decimal(str(lag)),)
    if isinstance(value, (int, float)) and not isinstance(lag, timedelta):
        return (value - lag,)
    raise PlanError(f"`incremental(lag={lag!r})` does not fit the checkpoint value {show(value)} "
                    "(use a timedelta for dates and times, a number for numbers)")


def _lag_text(value: str, lag: timedelta) -> str:
    """SQLite keeps times as text: subtract ``lag`` and write the result in the same style."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise PlanError(f"`incremental(lag=...)` needs a date or time checkpoint, got the text "
                        f"{value!r}") from None
    if len(value) == 10:
        return (moment - lag).date().isoformat()
    sep = "T" if "T" in value else " "
    return (moment - lag).isoformat(sep=sep, timespec="microseconds" if "." in value else "seconds")


def _decisions(mapping: Mapping, facts: Facts, ranges: int, key: str,
               no_nulls: bool) -> list[str]:
    out = []
    how = mapping.chunking.describe(facts.row_bytes)
    out.append((f"{ranges} key ranges on {key} from its quantiles ({how}), the first and last "
                "open-ended" if ranges > 1 else f"one key range on {key} ({how}): every value")
               + (f"; {key} is declared NOT NULL, so no chunk for NULL keys" if no_nulls
                  else f", plus one chunk for rows whose {key} is NULL (they are rejected)"))
    if ranges == 1 and not isinstance(mapping.checkpoint, PythonCheckpoint):
        out.append("one key range: the job runs in this process, no worker pool is started")
    if facts.key_as_text:
        out.append(f"{key} holds values of several types (SQLite sorts numbers before text, "
                   "text before bytes): chunks compare it as the text or bytes it is read "
                   "as, as the target's key does, which no index on it serves")
    if not facts.target_exists:
        out.append(f"target table {mapping.target_def.table if mapping.target_def else '?'} "
                   "does not exist: it is created on the first run, with an index on the key")
    if isinstance(mapping.checkpoint, PythonCheckpoint):
        out.append(f"python checkpoint {mapping.checkpoint.reference}: chunks run one after "
                   "another in key order, in this process, because the function needs the "
                   "whole ordered stream and its state; n_jobs is not used")
        if mapping.scd.deletes != "ignore":
            out.append(f"deletes={mapping.scd.deletes!r} applies on full runs only (.full())")
        out.append("python checkpoint: deletes cannot be seen; the state is stored only if "
                   "every chunk succeeds" + ("" if facts.stored_checkpoint is not None
                                             else "; no stored state: the function starts with None"))
    elif mapping.checkpoint is None:
        out.append("full mode: every row is read and compared; "
                   + {"ignore": "keys missing from the source are left as they are",
                      "close": "keys missing from the source are closed",
                      "delete": "keys missing from the source are deleted"}[mapping.scd.deletes])
    else:
        if mapping.scd.deletes != "ignore":
            out.append(f"deletes={mapping.scd.deletes!r} applies on full runs only: an incremental "
                       "run reads changed rows and cannot see deletes; run the mapping with "
                       ".full() from time to time to apply them")
        out.append("incremental mode: deletes cannot be seen; rows whose checkpoint column is "
                   "NULL are never read")
        if facts.stored_checkpoint is None:
            out.append("no stored checkpoint: the window starts at the beginning")
        out.append("the checkpoint advances to the high-water mark only if every chunk succeeds")
    if facts.last_fingerprint and facts.last_fingerprint != mapping.fingerprint():
        out.append("the mapping changed since its last successful run (fingerprint "
                   f"{facts.last_fingerprint} -> {mapping.fingerprint()}): rows whose tracked "
                   "values now hash differently get a new version")
    scd = mapping.scd
    out.append(f"scd{scd.type}: a change in {', '.join(mapping.tracked) or 'no column'} "
               + ("closes the current version and adds a new one" if scd.type == 2
                  else "is written over the row"))
    return out

"""What differs between SQLite, PostgreSQL and MySQL/MariaDB (a source only), in one place.

Identifier quoting, SQL literals for key bounds and checkpoints (values reach
ConnectorX as SQL text, so they are rendered here and nowhere else), the SQL
type of a Polars dtype, the Polars dtype of a declared SQL type, and the text a
value is stored as.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import Any

import polars as pl

from mapperdsl.errors import PlanError

SQLITE, POSTGRES, MYSQL = "sqlite", "postgresql", "mysql"


def quote(name: str, dialect: str = POSTGRES) -> str:
    """A quoted identifier; ``schema.table`` quotes each part."""
    return ".".join(quote_column(part, dialect) for part in name.split("."))


def quote_column(name: str, dialect: str = POSTGRES) -> str:
    q = "`" if dialect == MYSQL else '"'  # MySQL reads "x" as a string (without ANSI_QUOTES)
    return q + name.replace(q, q + q) + q


def as_text(expr: str, dialect: str) -> str:
    """``expr`` cast to text."""
    return f"CAST({expr} AS {'CHAR' if dialect == MYSQL else 'TEXT'})"


def sqlite_text(col: str) -> str:
    """SQLite's text of a value of any type, a float's such that it reads back exactly: its
    15 digits where they do (0.1), else 17 (0.30000000000000004), so no two floats share
    a text."""
    short = f"CAST({col} AS TEXT)"
    return (f"CASE WHEN typeof({col}) = 'real' AND CAST({short} AS REAL) <> {col} "
            f"THEN printf('%!.17g', {col}) ELSE {short} END")


def literal(value: Any, dialect: str) -> str:
    """A SQL literal for a key bound or checkpoint value: typed, escaped, never raw text."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return ("1" if value else "0") if dialect == SQLITE else ("TRUE" if value else "FALSE")
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise PlanError(f"cannot use the float {value!r} as a key bound or checkpoint")
        return repr(float(value))
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise PlanError(f"cannot use the decimal {value!r} as a key bound or checkpoint")
        return format(value, "f")
    if isinstance(value, datetime):
        if dialect == MYSQL:  # it has no time zones: its timestamps are read as naive
            naive = value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value
            return f"TIMESTAMP {_string(storage_datetime(naive))}"
        text = _string(storage_datetime(value))
        if dialect == SQLITE:
            return text
        return ("TIMESTAMPTZ " if value.tzinfo else "TIMESTAMP ") + text
    if isinstance(value, date):
        return _string(value.isoformat()) if dialect == SQLITE else f"DATE {_string(value.isoformat())}"
    if isinstance(value, (bytes, bytearray, memoryview)):  # a binary key: its bytes in hex
        raw = bytes(value).hex()
        return f"'\\x{raw}'::bytea" if dialect == POSTGRES else f"X'{raw}'"
    if isinstance(value, str) and dialect == MYSQL:  # hex: a backslash escapes in MySQL text;
        return f"_utf8mb4 X'{_utf8(value).hex()}'"   # a literal takes the column's collation
    if isinstance(value, str):
        return _string(value, dialect)
    raise PlanError(f"cannot use a {type(value).__name__} value as a key bound or checkpoint; "
                    "allowed: integer, decimal, float, text, bytes, date, timestamp, boolean")


def key_expr(column: str, dtype: pl.DataType, dialect: str, *, source: bool,
             cut: bool = False, as_text: bool = False) -> str:
    """The chunk key as SQL that orders the same way in every database.

    Text compares byte-wise (``COLLATE "C"`` / ``BINARY``), whatever the column's
    collation, so a key falls in the same chunk in the source and in the target.
    SQLite source dates and times are text in the user's format: ``date()`` and
    ``strftime()`` bring them to one form (the target's text is mapperdsl's own), with
    milliseconds cut, never rounded, as a bound compares with the target's microseconds:
    ``cut`` when the SQL runs in a SQLite that rounds (:func:`sqlite3_rounds_times`).
    ``as_text``: a SQLite source key holding values of more than one type (SQLite orders
    numbers before any text, text before any bytes) compares as the text (or bytes) it is
    read as (:func:`sqlite_text`), as the target's key does.
    """
    col = quote_column(column, dialect)
    if dtype == pl.String() and dialect == POSTGRES:  # a source uuid compares as its text
        return f'CAST({col} AS TEXT) COLLATE "C"' if source else f'{col} COLLATE "C"'
    if dtype == pl.String() and dialect == MYSQL:  # its _bin collations pad trailing spaces
        return f"CAST(CONVERT({col} USING utf8mb4) AS BINARY)"
    if dtype == pl.String():
        return f"{sqlite_text(col)} COLLATE BINARY" if as_text else f"{col} COLLATE BINARY"
    if dtype == pl.Binary() and as_text:
        return f"CAST({sqlite_text(col)} AS BLOB)"
    if dialect == SQLITE and source and dtype == pl.Date():
        return f"date({col})"
    if dialect == SQLITE and source and isinstance(dtype, pl.Datetime):
        return f"strftime('%Y-%m-%d %H:%M:%f', {_cut_fractions(col) if cut else col})"
    return col


def sqlite_moment(value: str, dtype: pl.DataType) -> str:
    """A SQLite date or time, text in any ISO form (a 'T' or a blank, an offset or 'Z'), as
    one form that sorts as the moments do: ``date()``'s for a date, else UTC to the
    microsecond, with no trailing zeros ('2024-01-01 08:00:00', '2024-01-01 08:00:00.25');
    NULL for text that is no date or time."""
    if dtype == pl.Date():
        return f"date({value})"
    micros = f"CAST(CAST(substr({value}, 20) AS REAL) * 1000000 + 0.000001 AS INTEGER)"  # (cut)
    return (f"(strftime('%Y-%m-%d %H:%M:%S', {value}) || CASE WHEN substr({value}, 20, 1) = '.' "
            f"THEN rtrim(rtrim('.' || printf('%06d', {micros}), '0'), '.') ELSE '' END)")


def sqlite_mark(value: str, dtype: pl.DataType) -> str:
    """A SQLite date or time as a checkpoint compares it: its moment (:func:`sqlite_moment`),
    or the value itself where SQLite reads none in it (a Unix time, '+0200'), which then
    compares as before moments: as it is kept."""
    return f"COALESCE({sqlite_moment(value, dtype)}, {value})"


def mark_of(value: Any, dtype: pl.DataType) -> Any:
    """What :func:`sqlite_mark` makes of ``value``, asked of this process's SQLite (so that a
    window's bound is a short literal, and exactly what SQLite makes of it)."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        return conn.execute(f"SELECT {sqlite_mark('?1', dtype)}", (value,)).fetchone()[0]


def _cut_fractions(col: str) -> str:
    """SQLite time text with its fractions of a second past milliseconds cut off, an offset
    or 'Z' after them kept (for a SQLite that rounds them in ``strftime``)."""
    fraction = f"substr({col}, 21)"
    after = f"ltrim({fraction}, '0123456789')"
    return (f"CASE WHEN substr({col}, 20, 1) = '.' AND length({fraction}) - length({after}) > 3 "
            f"THEN substr({col}, 1, 23) || {after} ELSE {col} END")


@functools.cache
def sqlite3_rounds_times() -> bool:
    """Whether Python's own SQLite rounds fractions of a second to milliseconds in
    ``strftime`` (3.40 does: '00.9996' is '01.000'), where ConnectorX's cuts them."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        return conn.execute("SELECT strftime('%f', '2000-01-01 00:00:00.9996')").fetchone()[0] \
            != "00.999"


def key_literal(value: Any, dtype: pl.DataType, dialect: str, *, source: bool,
                bound: bool = False) -> str:
    """A key as a literal comparable with :func:`key_expr`. ``bound``: a chunk's bound, only
    ever compared with ``>=`` and ``<``, so that PostgreSQL's text, which holds no NUL
    character, can stand in for one that does: the first text after the part before the NUL
    ('a\\x00c' is 'a\\x01'), which splits every text PostgreSQL holds as the bound does."""
    if bound and dialect == POSTGRES and isinstance(value, str) and "\x00" in value:
        value = value[:value.index("\x00")] + "\x01"
    if bound and dialect == POSTGRES and isinstance(value, (str, bytes)) and (
            dtype.is_numeric()):  # a SQLite source's text in a number column, which SQLite
        # orders after every number, as PostgreSQL orders NaN (such rows are rejects)
        return "'NaN'::float8" if dtype.is_float() else "'NaN'::numeric"
    if dialect == MYSQL and isinstance(value, str):  # the UTF-8 bytes, as key_expr compares
        return f"X'{_utf8(value).hex()}'"
    if dialect == SQLITE and source and isinstance(value, datetime):
        utc = value.astimezone(timezone.utc) if value.tzinfo else value
        return _string(utc.strftime("%Y-%m-%d %H:%M:%S.") + f"{utc.microsecond // 1000:03d}")
    return literal(value, dialect)


def typed_bound(value: Any, dtype: pl.DataType, dialect: str) -> Any:
    """A bound read through :func:`key_expr` as a typed value (SQLite gives dates as text,
    MySQL text keys as their bytes)."""
    if dialect == MYSQL and isinstance(value, (bytes, bytearray)) and dtype == pl.String():
        return bytes(value).decode("utf-8")
    if dialect == MYSQL and isinstance(value, str) and (dtype == pl.Date()
                                                        or isinstance(dtype, pl.Datetime)):
        return _after_zero_date(value, dtype)
    if dialect == SQLITE and isinstance(value, str):
        if dtype == pl.Date():
            return date.fromisoformat(value)
        if isinstance(dtype, pl.Datetime):
            moment = datetime.strptime(value, "%Y-%m-%d %H:%M:%S.%f")
            return moment.replace(tzinfo=timezone.utc) if dtype.time_zone else moment
    return value


def _after_zero_date(text: str, dtype: pl.DataType) -> date | datetime:
    """The first real date (or midnight of it) not before a MySQL date with zeros in it
    ('2024-05-00', '2024-00-00', '0000-00-00': the driver gives those as text): as a bound
    it cuts between the same real dates, and the dates with zeros, every one a reject, are
    in no target."""
    year, month, day = (int(part) for part in text[:10].split("-"))
    first = (date(max(year, 1), 1, 1) if year == 0 or month == 0 else date(year, month, 1))
    if day and month and year:  # (a real date with a time the driver could not read)
        first = date(year, month, day)
    return datetime(first.year, first.month, first.day) if isinstance(dtype, pl.Datetime) \
        else first


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


def _string(text: str, dialect: str = POSTGRES) -> str:
    """Quoted text; with a NUL character, SQLite's text of its bytes (PostgreSQL's text holds
    none, and a NUL would end SQLite's quoted text)."""
    if "\x00" not in text:
        return "'" + text.replace("'", "''") + "'"
    if dialect == SQLITE:
        return f"CAST(X'{_utf8(text).hex()}' AS TEXT)"
    raise PlanError(f"cannot use the text {text!r} as a key or checkpoint value: it holds a NUL "
                    "character, which PostgreSQL text cannot")


def storage_datetime(value: datetime) -> str:
    """ISO text with microseconds; aware values in UTC with ``+00:00``."""
    if value.tzinfo is not None:
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f") + "+00:00"
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def sql_type(dtype: pl.DataType, dialect: str) -> str:
    """The column type mapperdsl creates for a Polars dtype."""
    pg = dialect == POSTGRES
    if dtype in (pl.Int8(), pl.Int16(), pl.UInt8()):
        return "SMALLINT"
    if dtype in (pl.Int32(), pl.UInt16()):
        return "INTEGER"
    if dtype in (pl.Int64(), pl.UInt32(), pl.UInt64()):
        return "BIGINT"
    if dtype == pl.Float32():
        return "REAL"
    if dtype == pl.Float64():
        return "DOUBLE PRECISION" if pg else "DOUBLE"
    if isinstance(dtype, pl.Decimal):
        return f"NUMERIC({dtype.precision or 38},{dtype.scale or 0})"
    if dtype in (pl.String(), pl.Categorical()) or isinstance(dtype, pl.Enum):
        return "TEXT"
    if dtype == pl.Boolean():
        return "BOOLEAN"
    if dtype == pl.Date():
        return "DATE"
    if isinstance(dtype, pl.Datetime):
        return "TIMESTAMPTZ" if dtype.time_zone else "TIMESTAMP"
    if dtype == pl.Time():
        return "TIME"
    if dtype == pl.Binary():
        return "BYTEA" if pg else "BLOB"
    raise PlanError(f"cannot store the Polars type {dtype} in a {dialect} column; allowed: "
                    "integers, floats, Decimal, String, Boolean, Date, Datetime, Time, Binary")


_NUMERIC = re.compile(r"(?:NUMERIC|DECIMAL)\s*\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)")


def dtype_of_declared(declared: str) -> pl.DataType | None:
    """The Polars dtype of a declared SQLite column type (its affinity rules, plus dates)."""
    d = declared.upper().strip()
    if not d:
        return None
    if m := _NUMERIC.search(d):
        return pl.Decimal(int(m[1]), int(m[2] or 0))
    if "BOOL" in d:
        return pl.Boolean()
    if "TIMESTAMPTZ" in d or "WITH TIME ZONE" in d:
        return pl.Datetime("us", "UTC")
    if "DATETIME" in d or "TIMESTAMP" in d:
        return pl.Datetime("us")
    if d == "DATE":
        return pl.Date()
    if d == "TIME":
        return pl.Time()
    if "INT" in d:
        return pl.Int64()
    if any(t in d for t in ("CHAR", "CLOB", "TEXT")):
        return pl.String()
    if "BLOB" in d:
        return pl.Binary()
    if any(t in d for t in ("REAL", "FLOA", "DOUB")):
        return pl.Float64()
    return pl.Float64()  # NUMERIC affinity without a scale: SQLite keeps it as a float


# PostgreSQL type OIDs -> Polars dtype; numeric is handled with its precision and scale.
PG_TYPES: dict[int, pl.DataType] = {
    16: pl.Boolean(), 20: pl.Int64(), 21: pl.Int16(), 23: pl.Int32(), 25: pl.String(), 1043: pl.String(),
    1042: pl.String(), 19: pl.String(), 700: pl.Float32(), 701: pl.Float64(), 1082: pl.Date(),
    1114: pl.Datetime("us"), 1184: pl.Datetime("us", "UTC"), 1083: pl.Time(), 17: pl.Binary(),
    2950: pl.String(), 114: pl.String(), 3802: pl.String(),
    869: pl.String(),  # inet, as its output function writes it (CAST(... AS TEXT) adds a /32)
}

# ConnectorX reads PostgreSQL's 'infinity' and '-infinity' as chrono's last and first day
# (days since 1970), or their last and first microsecond. Anything on or after that last
# day, or on or before that first one, whatever its unit, is written back as infinity
# (``to_infinity_text``, merge/pgcopy.py), not as the years +262142 and -262143.
INFINITY_DAYS, MINUS_INFINITY_DAYS = 95_026_236, -96_465_292
INFINITY_US, MINUS_INFINITY_US = INFINITY_DAYS * 86_400_000_000, MINUS_INFINITY_DAYS * 86_400_000_000


def infinity_sign(column: str, dtype: pl.DataType) -> pl.Expr:
    """1 where a date or time column holds infinity, -1 for -infinity, else 0."""
    col = pl.col(column)
    days = dtype == pl.Date()
    at = col.to_physical() if days else col.dt.cast_time_unit("us").to_physical()
    return (pl.when(at >= (INFINITY_DAYS if days else INFINITY_US)).then(1)
            .when(at <= (MINUS_INFINITY_DAYS if days else MINUS_INFINITY_US)).then(-1)
            .otherwise(0))


def to_infinity_text(column: str, dtype: pl.DataType, finite: pl.Expr) -> pl.Expr:
    """``finite``, or 'infinity' / '-infinity' where a date or time column holds one."""
    sign = infinity_sign(column, dtype)
    return (pl.when(sign == 1).then(pl.lit("infinity"))
            .when(sign == -1).then(pl.lit("-infinity")).otherwise(finite))


def infinity_value(sign: int, dtype: pl.DataType) -> pl.Expr:
    """The value ConnectorX reads PostgreSQL's infinity (``sign`` 1) or -infinity (-1) as,
    in ``dtype`` (a nanosecond time cannot hold it: NULL)."""
    if dtype == pl.Date():
        return pl.lit(INFINITY_DAYS if sign > 0 else MINUS_INFINITY_DAYS, pl.Int32).cast(pl.Date)
    assert isinstance(dtype, pl.Datetime)
    per_us = {"us": 1, "ms": 1000}.get(dtype.time_unit)
    if per_us is None:
        return pl.lit(None, dtype)
    micros = (INFINITY_US + 86_400_000_000 - 1) if sign > 0 else MINUS_INFINITY_US
    return pl.lit(micros // per_us, pl.Int64).cast(pl.Datetime(dtype.time_unit, dtype.time_zone))


def dtype_to_text(dtype: pl.DataType) -> str:
    """A stable text for a dtype, for plans and JSON (``Decimal(12,2)``, ``Datetime(us,UTC)``)."""
    if isinstance(dtype, pl.Decimal):
        return f"Decimal({dtype.precision},{dtype.scale})"
    if isinstance(dtype, pl.Datetime):
        return f"Datetime({dtype.time_unit},{dtype.time_zone})" if dtype.time_zone else \
            f"Datetime({dtype.time_unit})"
    return str(dtype.base_type().__name__) if hasattr(dtype, "base_type") else str(dtype)


def dtype_from_text(text: str) -> pl.DataType:
    m = re.fullmatch(r"(\w+)(?:\((.*)\))?", text)
    if not m:
        raise ValueError(f"not a dtype text: {text!r}")
    name, args = m[1], (m[2] or "")
    if name == "Decimal":
        p, s = args.split(",")
        return pl.Decimal(int(p), int(s))
    if name == "Datetime":
        parts = args.split(",")
        return pl.Datetime(parts[0], parts[1] if len(parts) > 1 else None)  # type: ignore[arg-type]
    return getattr(pl, name)()  # type: ignore[no-any-return]


def to_storage(frame: pl.DataFrame, dialect: str) -> pl.DataFrame:
    """The frame as the values the target stores: dates and times as ISO text on SQLite,
    aware times in UTC, PostgreSQL's infinities as 'infinity'; decimals as exact text where
    the driver has no decimal type."""
    out = []
    for name, dtype in frame.schema.items():
        col = pl.col(name)
        if isinstance(dtype, pl.Datetime):
            fmt = "%Y-%m-%d %H:%M:%S%.6f"
            if dtype.time_zone:
                col = col.dt.convert_time_zone("UTC").dt.strftime(fmt + "+00:00")
            else:
                col = col.dt.strftime(fmt)
            col = to_infinity_text(name, dtype, col)
        elif dtype == pl.Date():
            col = to_infinity_text(name, dtype, col.dt.strftime("%Y-%m-%d"))
        elif dtype == pl.Time():
            col = col.dt.strftime("%H:%M:%S%.6f")
        elif dialect == SQLITE and isinstance(dtype, pl.Decimal):
            col = col.cast(pl.String())
        elif dialect == SQLITE and dtype == pl.Boolean():
            col = col.cast(pl.Int8())
        elif dialect == POSTGRES and dtype == pl.Binary():  # bytea's hex input form
            col = pl.lit("\\x") + col.bin.encode("hex")
        out.append(col.alias(name))
    return frame.select(out)


def to_storage_value(value: Any, dialect: str) -> Any:
    """A Python value as the target driver should bind it."""
    if isinstance(value, datetime):
        return storage_datetime(value) if dialect == SQLITE else value
    if isinstance(value, (date, time)) and dialect == SQLITE:
        return value.isoformat()
    if isinstance(value, Decimal) and dialect == SQLITE:
        return format(value, "f")
    return value

"""Reading rows: ConnectorX (Arrow straight into Polars) for chunks, sqlite3 where it must.

Two SQLite libraries in one process break each other's file locks (closing a
file in one drops the POSIX locks the other holds), which corrupts a database
written while it is read. So a SQLite file that this process also writes — the
target, or a source that is the target's own file — is read with Python's
sqlite3, the library that writes it; every other read goes through ConnectorX.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

import polars as pl

from mapperdsl.connect import SQLITE_BUSY_SECONDS, read_arrow, sqlite_path
from mapperdsl.dialects import MYSQL, SQLITE, quote_column, sqlite_text
from mapperdsl.dsl.url import Url, redact_text
from mapperdsl.errors import ExecutionError, TransientError
from mapperdsl.execute.retry import is_transient


def read_sql(url: Url, sql: str, *, written_here: bool = False,
             schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    """Rows of ``sql`` from the database at ``url`` as a Polars frame.

    ``written_here``: this process also writes that database (see the module doc);
    ``schema``: the types its columns are read as, which such a read of a SQLite file
    needs to keep values unlike them apart (:func:`_sqlite_column`).
    """
    try:
        if written_here and url.dialect == SQLITE:
            return _read_sqlite(url, sql, schema)
        return _read_mixed(url, sql)
    except Exception as exc:  # ConnectorX raises plain RuntimeErrors
        kind = TransientError if is_transient(exc) else ExecutionError
        raise kind(f"reading {url} failed: {redact_text(str(exc))}") from None


_MIXED = re.compile(r"Invalid column type (?P<kind>\w+) at index: \d+, name: (?P<name>.+)$")
_NULL_FIRST = "Cannot infer type from null"
_NOT_UTF8 = re.compile(r"Conversion error from type Text at index: (?P<index>\d+), \w+ utf-8")
_NOT_A_TIME = re.compile(r"Couldn't convert the value `(Date|Time)\(")  # (MySQL's)


def _read_mixed(url: Url, sql: str) -> pl.DataFrame:
    if url.dialect == MYSQL:
        return _read_mysql(url, sql)
    if url.dialect == SQLITE:
        return _read_sqlite_mixed(url, sql)
    return _frame(read_arrow(url, sql))


def _read_mysql(url: Url, sql: str) -> pl.DataFrame:
    """ConnectorX's rows of ``sql`` from MySQL, which keeps dates and times it cannot read
    ('0000-00-00', '2024-00-00', a TIME of '-838:59:59'): then its dates and times are
    read as their text, which the typing checks parse or reject."""
    try:
        return _frame(read_arrow(url, sql))
    except RuntimeError as exc:
        if not _NOT_A_TIME.search(str(exc)):
            raise
    names = _no_rows(url, sql)
    cols = [f"CAST(q.{quote_column(c, MYSQL)} AS CHAR) AS {quote_column(c, MYSQL)}"
            if t.is_temporal() else f"q.{quote_column(c, MYSQL)}" for c, t in names.items()]
    return _frame(read_arrow(url, f"SELECT {', '.join(cols)} FROM ({sql}) AS q"))


def _read_sqlite_mixed(url: Url, sql: str) -> pl.DataFrame:
    """ConnectorX's rows of ``sql``, where SQLite keeps what ConnectorX cannot read:

    - It types a column with no declared type (an expression, such as the text of a
      date, or an untyped column) by the first row, and fails where that row holds
      NULL: such columns are read as marked text ('v' and the text; '' for NULL).
    - It refuses a value unlike its column's declared type (text in an INTEGER column):
      the rows holding such values are read apart, those columns as marked text (which
      the typing checks then reject), the other rows as they are, their values of those
      columns then as text too (Polars writes a float so that it reads back exactly), or
      in a BLOB column the text as bytes, as SQLite casts it.
    - Bytes that are not UTF-8 in a column read as text: that column is read as bytes
      (in hex), which the typing checks turn into text or reject.
    """
    odd: dict[str, set[str]] = {}  # column: the storage classes (typeof) ConnectorX refuses
    marked: dict[str, str] = {}  # column: how the base query reads it ("text" or "hex")
    while True:
        query = base = _as_marked(_no_rows(url, sql).names(), sql, marked) if marked else sql
        try:
            if not odd:
                return _unmarked(_frame(read_arrow(url, query)), marked)
            unlike = " OR ".join(f"typeof(q.{quote_column(c)}) IN ({', '.join(map(repr, kinds))})"
                                 for c, kinds in odd.items())
            query = f"SELECT q.* FROM ({base}) AS q WHERE NOT ({unlike})"
            typed = _frame(read_arrow(url, query))
            query = _as_marked(typed.columns, base, dict.fromkeys(odd, "text"), unlike)
            rest = _frame(read_arrow(url, query))
            break
        except RuntimeError as exc:
            message = str(exc).strip()
            found_odd, not_utf8 = _MIXED.search(message), _NOT_UTF8.search(message)
            if _NULL_FIRST in message:
                found = dict.fromkeys((c for c in _null_first(url, query) if c not in marked),
                                      "text")
            elif not_utf8:
                found = {_no_rows(url, query).names()[int(not_utf8["index"])]: "hex"}
            elif found_odd and found_odd["kind"].lower() not in odd.get(found_odd["name"], ()):
                odd.setdefault(found_odd["name"], set()).add(found_odd["kind"].lower())
                continue
            else:
                raise
            if not found or marked.keys() & {c for c, how in found.items() if how == "text"} \
                    or any(marked.get(c) == how for c, how in found.items()):
                raise
            marked |= found  # (marked: no value of theirs is refused any more)
            odd = {c: kinds for c, kinds in odd.items() if c not in marked}
    binary = {c for c in odd if typed.schema[c] == pl.Binary()}
    typed = typed.with_columns(pl.col(c).cast(pl.String()) for c in odd if c not in binary)
    rest = _unmarked(rest, dict.fromkeys(odd, "text")).with_columns(
        pl.col(c).cast(pl.Binary()) for c in binary)
    return _unmarked(pl.concat([typed, rest], how="vertical_relaxed"), marked)


def _no_rows(url: Url, sql: str) -> pl.Schema:
    return _frame(read_arrow(url, f"SELECT * FROM ({sql}) AS q WHERE 1 = 0")).schema


def _null_first(url: Url, sql: str) -> list[str]:
    """The columns of ``sql`` ConnectorX types by its first row (no declared type: text
    when there are no rows) where that row holds NULL."""
    untyped = [c for c, t in _no_rows(url, sql).items() if t == pl.String()]
    if not untyped:
        return []
    nulls = ", ".join(f"q.{quote_column(c)} IS NULL AS {quote_column(c)}" for c in untyped)
    first = _frame(read_arrow(url, f"SELECT * FROM (SELECT {nulls} FROM ({sql}) AS q LIMIT 1)"))
    return [c for c in untyped if first.height and first.get_column(c)[0]]


def _as_marked(names: list[str], sql: str, marked: dict[str, str], where: str = "1") -> str:
    """The rows of ``sql`` that ``where`` picks, the ``marked`` columns as text: ConnectorX
    cannot type an expression's NULL, so each value comes marked ('v' and the value; ''
    for NULL). The value: its text ("text", dialects.sqlite_text: a float's reads back
    exactly), or the hex of its bytes ("hex")."""
    def text(c: str) -> str:
        col = f"q.{quote_column(c)}"
        value = sqlite_text(col)
        if marked[c] == "hex":
            value = (f"CASE WHEN {col} IS NOT NULL THEN hex(CASE typeof({col}) WHEN 'blob' "
                     f"THEN {col} ELSE {value} END) END")  # (hex(NULL) is '')
        return f"COALESCE('v' || {value}, '') AS {quote_column(c)}"

    cols = [text(c) if c in marked else f"q.{quote_column(c)}" for c in names]
    return f"SELECT {', '.join(cols)} FROM ({sql}) AS q WHERE {where}"


def _unmarked(frame: pl.DataFrame, marked: dict[str, str]) -> pl.DataFrame:
    def value(c: str, how: str) -> pl.Expr:
        text = pl.col(c).str.slice(1)
        return pl.when(pl.col(c) != "").then(text.str.decode("hex") if how == "hex" else text)

    return frame.with_columns(value(c, how).alias(c) for c, how in marked.items())


def _frame(table: Any) -> pl.DataFrame:
    return pl.from_arrow(table, rechunk=False)  # type: ignore[return-value]


def read_sqlite_columns(url: Url, sql: str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Rows of ``sql`` (whose columns are ``schema``'s) from a SQLite file this process
    writes, as SQLite keeps them: the caller converts them to ``schema``'s types.

    Integer, boolean and text columns come back as one JSON array each, which Polars
    decodes: no Python object per row (about a third faster for a chunk's key + hash).
    Any other type goes row by row.
    """
    kept = {c: _json_type(t) for c, t in schema.items()}
    if not all(kept.values()):
        return _read_sqlite(url, sql)
    arrays = ", ".join(f"json_group_array({quote_column(c)})" for c in schema)
    try:
        row = _sqlite_rows(url, f"SELECT COUNT(*), {arrays} FROM ({sql}) rows")[1][0]
    except sqlite3.DataError:  # an array past SQLite's longest string (1 GB): row by row
        return _read_sqlite(url, sql)
    if row[0] == 0:  # (an empty array would decode to one null row)
        return pl.DataFrame(schema=kept)
    frame = pl.DataFrame({c: [text] for c, text in zip(schema, row[1:], strict=True)})
    return frame.select(pl.col(c).str.json_decode(pl.List(t)).explode()  # type: ignore[arg-type]
                        for c, t in kept.items())


def _json_type(dtype: pl.DataType) -> pl.DataType | None:
    # What SQLite keeps a column of ``dtype`` as, when JSON carries it exactly.
    if dtype.is_integer() or dtype == pl.Boolean():
        return pl.Int64()
    return pl.String() if dtype == pl.String() else None


def _read_sqlite(url: Url, sql: str, schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    names, rows = _sqlite_rows(url, sql)
    types = [schema.get(name) for name in names] if schema and rows else []
    columns = list(zip(*rows, strict=True)) if types else []
    unlike = [_kinds(values) - _FITS.get(_kind(want), set())
              for values, want in zip(columns, types, strict=True)]
    if not any(unlike):
        return pl.DataFrame(rows, schema=names, orient="row", infer_schema_length=None)
    return pl.DataFrame([_sqlite_column(*column) for column in
                         zip(names, columns, types, unlike, strict=True)])


_FITS: dict[str, set[type]] = {"integer": {int}, "float": {int, float}, "bytes": {bytes}, "text": {str}}


def _kind(dtype: pl.DataType | None) -> str:
    # What SQLite keeps a value read as ``dtype`` as (dates, times, decimals: read as text).
    if dtype is None:
        return ""
    if dtype.is_integer() or dtype == pl.Boolean():
        return "integer"
    return "float" if dtype.is_float() else "bytes" if dtype == pl.Binary() else "text"


def _kinds(values: tuple[Any, ...]) -> set[type]:
    return {type(v) for v in values if v is not None}


def _sqlite_column(name: str, values: tuple[Any, ...], want: pl.DataType | None,
                   odd: set[type]) -> pl.Series:
    """A column of the values SQLite keeps. One holding values unlike its type (text in an
    INTEGER column, a BLOB beside numbers, a REAL in an INTEGER key) comes whole as text,
    or as bytes where it is read as text or bytes and holds bytes, which the typing checks
    then read as ``want`` or reject, row by row: as a read through ConnectorX does
    (:func:`_read_sqlite_mixed`), so that no value is cut (2.5 to 2) or lost with its
    column's type (every integer of a column with a BLOB in it read as NULL)."""
    if not odd:
        return pl.Series(name, values, strict=False)
    if want == pl.Binary() or (want == pl.String() and bytes in odd | _kinds(values)):
        return pl.Series(name, [v if v is None or isinstance(v, bytes) else _text(v).encode()
                                for v in values], pl.Binary())
    return pl.Series(name, [None if v is None else _text(v) for v in values], pl.String())


def _text(value: Any) -> str:
    """A SQLite value's text: a float's reads back exactly, bytes as UTF-8 (or not at all)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")  # (then no value of the column's type)
    return repr(value) if isinstance(value, float) else str(value)


def _sqlite_rows(url: Url, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    con = sqlite3.connect(f"file:{sqlite_path(url)}?mode=ro", uri=True,
                          timeout=SQLITE_BUSY_SECONDS)
    try:
        cursor = con.execute(sql)
        return [d[0] for d in cursor.description], cursor.fetchall()
    finally:
        con.close()

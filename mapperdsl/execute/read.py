"""Reading rows: ConnectorX (Arrow straight into Polars) for chunks, sqlite3 where it must.

Two SQLite libraries in one process break each other's file locks (closing a
file in one drops the POSIX locks the other holds), which corrupts a database
written while it is read. So a SQLite file that this process also writes — the
target, or a source that is the target's own file — is read with Python's
sqlite3, the library that writes it; every other read goes through ConnectorX.
"""

from __future__ import annotations

import sqlite3

import connectorx as cx
import polars as pl

from mapperdsl.connect import SQLITE_BUSY_SECONDS, sqlite_path
from mapperdsl.dsl.url import Url, redact_text
from mapperdsl.errors import ExecutionError, TransientError
from mapperdsl.execute.retry import is_transient


def read_sql(url: Url, sql: str, *, written_here: bool = False) -> pl.DataFrame:
    """Rows of ``sql`` from the database at ``url`` as a Polars frame.

    ``written_here``: this process also writes that database (see the module doc).
    """
    try:
        if written_here and url.dialect == "sqlite":
            return _read_sqlite(url, sql)
        table = cx.read_sql(url.connectorx_url(), sql, return_type="arrow")
    except Exception as exc:  # ConnectorX raises plain RuntimeError/PanicException
        kind = TransientError if is_transient(exc) else ExecutionError
        raise kind(f"reading {url} failed: {redact_text(str(exc))}") from None
    return pl.from_arrow(table, rechunk=False)  # type: ignore[return-value]


def _read_sqlite(url: Url, sql: str) -> pl.DataFrame:
    con = sqlite3.connect(f"file:{sqlite_path(url)}?mode=ro", uri=True,
                          timeout=SQLITE_BUSY_SECONDS)
    try:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    finally:
        con.close()
    return pl.DataFrame(rows, schema=names, orient="row", infer_schema_length=None)

"""Opening connections: every process opens its own, from a URL, and closes it after use.

No connection is ever shared between workers (the old executor's fault). SQLite
writers take the write lock at ``BEGIN IMMEDIATE`` and wait for it up to
``SQLITE_BUSY_SECONDS``, so parallel chunks queue instead of failing with
"database is locked".
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import connectorx as cx
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import NullPool

from mapperdsl.dialects import POSTGRES
from mapperdsl.dsl.url import Url, redact_text
from mapperdsl.errors import MapperError, PlanError

SQLITE_BUSY_SECONDS = 600.0
SQLITE_CACHE_KIB = 65_536  # the page cache of a connection that writes: at most 64 MiB
CONNECT_SECONDS = 30  # a server that does not answer is a transient error, not a hang


def sqlite_path(url: Url) -> str:
    return url.resolved().split(":///", 1)[1].split("?", 1)[0]


def same_database(source: Url, target: Url) -> bool:
    """Whether two URLs reach one database: for SQLite, one file however they spell it
    (links and relative paths resolved)."""
    if source.dialect == target.dialect == "sqlite":
        return os.path.realpath(sqlite_path(source)) == os.path.realpath(sqlite_path(target))
    return source.written == target.written


def engine(url: Url, *, readonly: bool = False) -> sa.Engine:
    """A SQLAlchemy engine without a pool: connections live as long as one unit of work.
    One engine per URL and process, made on first use (it learns the server's dialect
    details once, not on every connection); it holds no connection between uses. A relative
    SQLite path is the file in today's working folder (the engine fixes its path when made)."""
    url = url.absolute()
    if readonly and url.dialect == "sqlite" and not os.path.exists(sqlite_path(url)):
        raise PlanError(f"SQLite database file {sqlite_path(url)!r} of {url} does not exist")
    key = (url.resolved(), readonly)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = _engine(url, readonly)
        return _ENGINES[key]


_ENGINES: dict[tuple[str, bool], sa.Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _forget_engines() -> None:  # a forked child starts afresh (the lock may have been held)
    global _ENGINES_LOCK
    _ENGINES.clear()
    _ENGINES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_engines)


def _engine(url: Url, readonly: bool) -> sa.Engine:
    if url.dialect == "sqlite":
        path = sqlite_path(url)
        target = f"sqlite:///file:{path}?mode=ro&uri=true" if readonly else url.sqlalchemy_url()
        eng = sa.create_engine(target, poolclass=NullPool,
                               connect_args={"timeout": SQLITE_BUSY_SECONDS})

        @event.listens_for(eng, "connect")
        def _connect(dbapi_connection: Any, _: Any) -> None:
            dbapi_connection.isolation_level = None  # we say BEGIN ourselves
            if not readonly:  # readers never wait for the writer, writers queue on the lock
                dbapi_connection.execute("PRAGMA journal_mode=WAL")
                # WAL commits reach the disk in order: a power cut can lose only the last
                # ones, each chunk whole with its ledger row, so the log stays true to the data.
                dbapi_connection.execute("PRAGMA synchronous=NORMAL")
                # room for the pages a chunk's scattered closes touch (the default, 2 MiB,
                # rereads them: closing 10,000 of 1M rows took 5x as long)
                dbapi_connection.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")

        @event.listens_for(eng, "begin")
        def _begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return eng
    return sa.create_engine(url.sqlalchemy_url(), poolclass=NullPool,
                            connect_args={"connect_timeout": CONNECT_SECONDS})


@contextmanager
def connection(url: Url, *, readonly: bool = False,
               error: type[MapperError] = PlanError) -> Iterator[sa.Connection]:
    """A connection, closed on exit; connect errors come back without the password."""
    try:
        conn = engine(url, readonly=readonly).connect()
    except sa.exc.DBAPIError as exc:
        raise error(f"cannot connect to {url}: {redact_text(str(exc.orig))}") from None
    with conn:
        yield conn


def execute(conn: sa.Connection, sql: str, *, stream: bool = False) -> Any:  # a CursorResult
    """Run SQL text that has no parameters; a ``%`` in it (``LIKE 'a%'``) stays a ``%``.
    ``stream``: rows come as they are fetched, not all at once (MySQL buffers otherwise)."""
    if conn.dialect.paramstyle in ("format", "pyformat"):
        sql = sql.replace("%", "%%")
    return conn.exec_driver_sql(sql, execution_options={"stream_results": True} if stream else None)


def ddl_lock(conn: sa.Connection) -> None:
    """Serialise table creation on PostgreSQL, inside the caller's transaction (two first
    runs at once must not collide); SQLite's ``BEGIN IMMEDIATE`` already does."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('mapperdsl ddl'))"))


def read_arrow(url: Url, sql: str) -> Any:
    """ConnectorX's Arrow table of ``sql`` at ``url``, each call on connections of its own.

    PostgreSQL rows come as a plain query's binary rows ("cursor": not a server-side cursor),
    not as ``COPY (...) TO STDOUT BINARY``, ConnectorX's default: it decodes them with 6 to 9%
    less CPU, and the server spends the same (benchmarks/stages.py). It decodes an enum from
    COPY only, so an enum is read as text (plan/facts.py pg_columns). A ConnectorX panic (a
    BaseException, e.g. "not implemented: interval" for a type it cannot read, though the plan
    reads every such type as text) comes back as a RuntimeError, as its other failures do, so
    that callers catch ``Exception``.
    """
    protocol: Literal["cursor"] | None = "cursor" if url.dialect == POSTGRES else None
    try:
        return cx.read_sql(url.connectorx_url(), sql, return_type="arrow", protocol=protocol)
    except BaseException as exc:
        if isinstance(exc, (Exception, KeyboardInterrupt, SystemExit)):
            raise
        raise RuntimeError(str(exc)) from None

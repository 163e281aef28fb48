"""Which errors are worth a retry: lost connections, deadlocks, serialisation failures,
an administrator's shutdown, a locked SQLite database. Everything else is final."""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa

from mapperdsl.errors import TransientError

# serialization_failure, deadlock_detected, admin/crash shutdown, cannot_connect_now
TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03"}
_PHRASES = ("database is locked", "database table is locked", "connection refused",
            "connection reset", "server closed the connection", "terminating connection",
            "connection timed out", "broken pipe", "the database system is shutting down",
            "the database system is starting up", "could not connect", "connection is closed",
            "consuming input failed", "no connection to the server", "eof detected")


def is_transient(exc: BaseException) -> bool:
    """True for an error a retry of the whole chunk may cure."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        return is_transient(exc.orig) if exc.orig is not None else False
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate in TRANSIENT_SQLSTATES or sqlstate.startswith("08")
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc)
    text = str(exc).lower()
    return any(p in text for p in _PHRASES)

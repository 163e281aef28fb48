"""Which errors are worth a retry: lost connections, deadlocks, serialisation failures,
an administrator's shutdown, a locked SQLite database. Everything else is final."""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa

from mapperdsl.dsl.parts import Policy
from mapperdsl.dsl.url import redact_text
from mapperdsl.errors import TransientError

T = TypeVar("T")
log = logging.getLogger("mapperdsl")

# serialization_failure, deadlock_detected, admin/crash shutdown, cannot_connect_now
TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03"}
_PHRASES = ("database is locked", "database table is locked", "connection refused",
            "connection reset", "server closed the connection", "terminating connection",
            "connection timed out", "broken pipe", "the database system is shutting down",
            "the database system is starting up", "could not connect", "connection is closed",
            "consuming input failed", "no connection to the server", "eof detected",
            "connection closed")  # ConnectorX's, when the server ends it without a word


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


def retrying(fn: Callable[[], T], policy: Policy, what: str) -> T:
    """``fn()``, tried again on transient errors as ``policy`` says (for job-log writes)."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == policy.attempts:
                raise
            wait = policy.delay(attempt, random.random())
            log.warning("%s: attempt %d of %d failed, retrying in %.2fs: %s", what, attempt,
                        policy.attempts, wait, redact_text(str(exc)))
            time.sleep(wait)
    raise AssertionError("unreachable: the last attempt returns or raises")

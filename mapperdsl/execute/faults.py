"""Failpoints for fault-injection tests: die at a named point of a chunk, for real.

``MAPPERDSL_FAILPOINT=before_commit:2`` makes the process running chunk 2 kill
itself with SIGKILL inside its write transaction, just before the commit
(``read`` and ``after_commit`` are the other points; ``:raise`` raises instead).
Unset — always, outside tests — a failpoint is one environment lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("read", "before_commit", "after_commit")


class InjectedFault(Exception):
    """Raised by a failpoint set to ``raise``."""


def failpoint(point: str, chunk: int) -> None:
    spec = os.environ.get("MAPPERDSL_FAILPOINT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    number, _, action = rest.partition(":")
    if name != point or number != str(chunk):
        return
    if action == "raise":
        raise InjectedFault(f"failpoint {point} of chunk {chunk}")
    os.kill(os.getpid(), signal.SIGKILL)

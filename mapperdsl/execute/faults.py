"""Failpoints for fault-injection tests: fail at a named point of a chunk, for real.

``MAPPERDSL_FAILPOINT=POINT:CHUNK[:ACTION]``, with POINT one of ``read`` (the
source was read), ``before_commit`` (inside the write transaction, all written)
and ``after_commit``; ACTION one of

- ``kill`` (default): the process kills itself with SIGKILL;
- ``exit``: raise SystemExit, as a process dying under Python would (no cleanup
  of the job row, the lease stays with this process);
- ``raise``: raise a terminal error; ``transient`` / ``transient-N``: raise a
  transient error (every time / the first N times for a job, in this process);
- ``sleep-S``: sleep S seconds (to hold a chunk open);
- ``hold``: wait until the test deletes the failpoint's mark file (below), so a
  test holds a chunk open exactly as long as it needs to; not deleted within
  120 s, the chunk fails (a test that forgets to let go fails, not slowly passes).

Several failpoints are separated by commas. ``MAPPERDSL_FAILPOINT_MARKS=DIR``: each
failpoint reached first leaves an empty file ``DIR/POINT-CHUNK``, so a test knows
the chunk got there. Unset — always, outside tests — a failpoint is one
environment lookup.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

from mapperdsl.errors import TerminalError, TransientError

_hits: Counter[str] = Counter()
HOLD_SECONDS = 120  # the longest a ``hold`` failpoint waits for its mark to go


class InjectedFault(TerminalError):
    """Raised by a failpoint set to ``raise``."""


def failpoint(point: str, chunk: int, job_id: str) -> None:
    spec = os.environ.get("MAPPERDSL_FAILPOINT")
    if not spec:
        return
    for one in spec.split(","):
        name, _, rest = one.strip().partition(":")
        number, _, action = rest.partition(":")
        if name == point and number == str(chunk):
            marks = os.environ.get("MAPPERDSL_FAILPOINT_MARKS")
            mark = os.path.join(marks, f"{point}-{chunk}") if marks else None
            if mark:
                open(mark, "w").close()
            _act(one, action or "kill", job_id, mark)


def _act(spec: str, action: str, job_id: str, mark: str | None) -> None:
    _hits[f"{job_id} {spec}"] += 1
    kind, _, arg = action.partition("-")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit":
        raise SystemExit(f"failpoint {spec}")
    elif kind == "raise":
        raise InjectedFault(f"failpoint {spec}")
    elif kind == "transient" and (not arg or _hits[f"{job_id} {spec}"] <= int(arg)):
        raise TransientError(f"failpoint {spec}: connection reset (injected)")
    elif kind == "sleep":
        time.sleep(float(arg))
    elif kind == "hold":
        if mark is None:
            raise ValueError(f"failpoint {spec}: hold needs MAPPERDSL_FAILPOINT_MARKS")
        deadline = time.monotonic() + HOLD_SECONDS
        while os.path.exists(mark):
            if time.monotonic() > deadline:
                raise InjectedFault(f"failpoint {spec}: held {HOLD_SECONDS} s and never let go "
                                    f"(the test did not delete {mark})")
            time.sleep(0.02)

"""The run lease: one job per mapping writes at a time, and a dead holder is taken over.

A lease row per mapping and target table names the job that holds it, its host and process, and
a heartbeat the holder refreshes every third of ``lease_seconds``. A new run
finds the row and is refused while the heartbeat is fresh; a heartbeat older
than ``lease_seconds`` — or a holder on this host whose process is gone — means
the holder died, and the lease is taken over (and that is logged).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa

from mapperdsl import names
from mapperdsl.errors import LeaseHeldError
from mapperdsl.record.joblog import _when, metadata

log = logging.getLogger("mapperdsl")

leases = sa.Table(
    names.PREFIX + "leases", metadata,
    sa.Column("lease", sa.Text, primary_key=True),  # "mapping -> target table"
    sa.Column("job_id", sa.String(40), nullable=False),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", _when, nullable=False),
    sa.Column("heartbeat_at", _when, nullable=False),
)


@dataclass(frozen=True)
class Holder:
    job_id: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime

    def alive(self, lease_seconds: float, now: datetime) -> bool:
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return False
        return (now - _aware(self.heartbeat_at)).total_seconds() < lease_seconds


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lease_key(mapping: str, target_table: str) -> str:
    """What a lease is taken on: one mapping writing one target table."""
    return f"{mapping} -> {target_table}"


def holder(conn: sa.Connection, mapping: str, *, lock: bool = False) -> Holder | None:
    query = sa.select(leases.c.job_id, leases.c.host, leases.c.pid, leases.c.started_at,
                      leases.c.heartbeat_at).where(leases.c.lease == mapping)
    row = conn.execute(query.with_for_update() if lock else query).first()
    return Holder(*row) if row else None


def acquire(conn: sa.Connection, mapping: str, job_id: str, lease_seconds: float) -> str | None:
    """Take the lease for ``job_id`` inside the caller's transaction.

    Returns the job id whose dead lease was taken over, or None. Raises
    LeaseHeldError naming the running job, its host and start time.
    """
    now = datetime.now(timezone.utc)
    current = holder(conn, mapping, lock=True)
    values = {"job_id": job_id, "host": socket.gethostname(), "pid": os.getpid(),
              "started_at": now, "heartbeat_at": now}
    if current is None:
        try:
            with conn.begin_nested():
                conn.execute(leases.insert().values(lease=mapping, **values))
        except sa.exc.IntegrityError:  # another run inserted it just now
            current = holder(conn, mapping, lock=True)
            assert current is not None
            raise held(mapping, current) from None
        return None
    if current.job_id != job_id and current.alive(lease_seconds, now):
        raise held(mapping, current)
    conn.execute(leases.update().where(leases.c.lease == mapping,
                                       leases.c.job_id == current.job_id).values(**values))
    if current.job_id != job_id or current.pid != os.getpid():
        log.warning("%s: took over the lease of job %s (host %s, pid %d, last heartbeat "
                    "%s): its holder stopped beating", mapping, current.job_id, current.host,
                    current.pid, _aware(current.heartbeat_at).isoformat(timespec="seconds"))
        return current.job_id
    return None


def held(mapping: str, current: Holder) -> LeaseHeldError:
    return LeaseHeldError(
        f"{mapping} is already running as job {current.job_id} on host {current.host} "
        f"(pid {current.pid}), started {_aware(current.started_at).isoformat(timespec='seconds')}"
        f", last heartbeat {_aware(current.heartbeat_at).isoformat(timespec='seconds')}; wait "
        f"for it, or stop it with md.request_stop({current.job_id!r}, target_url)")


def beat(conn: sa.Connection, mapping: str, job_id: str) -> bool:
    """Refresh the heartbeat; False when the lease is no longer this job's (taken over)."""
    with conn.begin():
        updated = conn.execute(leases.update().where(
            leases.c.lease == mapping, leases.c.job_id == job_id).values(
            heartbeat_at=datetime.now(timezone.utc))).rowcount
    return bool(updated)


def release(conn: sa.Connection, mapping: str, job_id: str) -> None:
    conn.execute(leases.delete().where(leases.c.lease == mapping, leases.c.job_id == job_id))


class Heartbeat:
    """A daemon thread refreshing the lease until stopped; ``lost`` is set if it was taken."""

    def __init__(self, beat_once: Callable[[], bool], every: float) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._every = every
        self._beat = beat_once
        self._thread = threading.Thread(target=self._run, name="mapperdsl-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if not self._beat():
                    self.lost.set()
                    return
            except Exception as exc:  # a missed beat is not fatal; the next one may pass
                log.warning("lease heartbeat failed: %s", exc)

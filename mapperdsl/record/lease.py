"""The run lease: one job per mapping writes at a time, and a dead holder is taken over.

A lease row per mapping and target table names the job that holds it, the
coordinator that owns it (a token of its own), its host and process, and a
heartbeat the holder refreshes every third of ``lease_seconds``. A new run (or
a resume of the same job) is refused while the holder lives: on this host, while
its process exists; elsewhere, while its heartbeat is fresh. A dead holder's
lease is taken over, and that is logged.

The lease also fences: every chunk checks, inside its own write transaction,
that its coordinator still owns the lease, and the job's end writes nothing if
it does not — so a coordinator that was frozen, presumed dead and replaced can
never write again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa

from mapperdsl import names
from mapperdsl.errors import LeaseHeldError
from mapperdsl.record.joblog import _when, aware, metadata

log = logging.getLogger("mapperdsl")

leases = sa.Table(
    names.PREFIX + "leases", metadata,
    sa.Column("lease", sa.Text, primary_key=True),  # "mapping -> target table"
    sa.Column("job_id", sa.String(40), nullable=False),
    sa.Column("owner", sa.String(40), nullable=False),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", _when, nullable=False),
    sa.Column("heartbeat_at", _when, nullable=False),
)


@dataclass(frozen=True)
class Holder:
    job_id: str
    owner: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime

    def alive(self, lease_seconds: float, now: datetime) -> bool:
        # On this host the process table knows (a SQLite heartbeat can wait behind writers);
        # elsewhere only the heartbeat can tell.
        if self.host == socket.gethostname():
            return _pid_alive(self.pid)
        return (now - aware(self.heartbeat_at)).total_seconds() < lease_seconds


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
    query = sa.select(leases.c.job_id, leases.c.owner, leases.c.host, leases.c.pid,
                      leases.c.started_at, leases.c.heartbeat_at).where(leases.c.lease == mapping)
    row = conn.execute(query.with_for_update() if lock else query).first()
    return Holder(*row) if row else None


def new_owner() -> str:
    """A token naming one coordinator's hold on a lease."""
    return uuid.uuid4().hex


def acquire(conn: sa.Connection, mapping: str, job_id: str, lease_seconds: float,
            owner: str) -> str | None:
    """Take the lease for ``job_id`` as ``owner`` inside the caller's transaction.

    Returns the job id whose dead holder's lease was taken over, or None. Raises
    LeaseHeldError naming the running job, its host and start time.
    """
    now = datetime.now(timezone.utc)
    current = holder(conn, mapping, lock=True)
    values = {"job_id": job_id, "owner": owner, "host": socket.gethostname(),
              "pid": os.getpid(), "started_at": now, "heartbeat_at": now}
    if current is None:
        try:
            with conn.begin_nested():
                conn.execute(leases.insert().values(lease=mapping, **values))
        except sa.exc.IntegrityError:  # another run inserted it just now
            current = holder(conn, mapping, lock=True)
            assert current is not None
            raise held(mapping, current) from None
        return None
    if current.owner != owner and current.alive(lease_seconds, now):
        raise held(mapping, current)
    conn.execute(leases.update().where(leases.c.lease == mapping,
                                       leases.c.owner == current.owner).values(**values))
    if current.owner == owner:
        return None
    log.warning("%s: took over the lease of job %s (host %s, pid %d, last heartbeat %s): its "
                "holder is gone", mapping, current.job_id, current.host, current.pid,
                aware(current.heartbeat_at).isoformat(timespec="seconds"))
    return current.job_id


def owns(conn: sa.Connection, mapping: str, owner: str, *, exclusive: bool = False) -> bool:
    """Whether ``owner`` still holds the lease; locks the row until the caller's transaction
    ends (shared for a chunk, so chunks commit side by side), so a takeover waits for it."""
    query = sa.select(leases.c.owner).where(leases.c.lease == mapping)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(read=not exclusive)
    return conn.execute(query).scalar() == owner


def held(mapping: str, current: Holder) -> LeaseHeldError:
    return LeaseHeldError(
        f"{mapping} is already running as job {current.job_id} on host {current.host} "
        f"(pid {current.pid}), started {aware(current.started_at).isoformat(timespec='seconds')}"
        f", last heartbeat {aware(current.heartbeat_at).isoformat(timespec='seconds')}; wait "
        f"for it, or stop it with md.request_stop({current.job_id!r}, target_url)")


def beat(conn: sa.Connection, mapping: str, owner: str) -> bool:
    """Refresh the heartbeat; False when ``owner`` no longer holds the lease."""
    with conn.begin():
        updated = conn.execute(leases.update().where(
            leases.c.lease == mapping, leases.c.owner == owner).values(
            heartbeat_at=datetime.now(timezone.utc))).rowcount
    return bool(updated)


def release(conn: sa.Connection, mapping: str, owner: str) -> None:
    conn.execute(leases.delete().where(leases.c.lease == mapping, leases.c.owner == owner))


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
        self._thread.join(timeout=self._every)  # a beat stuck on the network is left behind

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if not self._beat():
                    self.lost.set()
                    return
            except Exception as exc:  # a missed beat is not fatal; the next one may pass
                log.warning("lease heartbeat failed: %s", exc)

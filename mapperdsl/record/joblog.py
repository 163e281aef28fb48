"""The job log and checkpoint store: four tables in the target database.

Keeping them beside the target is what lets a chunk's rows and its ledger row
commit in one transaction: a chunk is applied exactly when its ledger row says
SUCCEEDED. Rows never hold a password: URLs and messages are redacted first.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import polars as pl
import sqlalchemy as sa

from mapperdsl import names
from mapperdsl.connect import ddl_lock
from mapperdsl.dsl.url import redact_text
from mapperdsl.plan.facts import encode_checkpoint
from mapperdsl.plan.plan import Plan
from mapperdsl.record.results import (
    COUNTS,
    RUNNING,
    SUCCEEDED,
    UNFINISHED,
    ChunkResult,
    JobResult,
)

metadata = sa.MetaData()
_when = sa.DateTime(timezone=True)


def _count_columns() -> list[sa.Column[Any]]:
    return [sa.Column(c, sa.BigInteger, nullable=False, default=0) for c in COUNTS]


jobs = sa.Table(
    names.JOBS, metadata,
    sa.Column("job_id", sa.String(40), primary_key=True),
    sa.Column("mapping", sa.Text, nullable=False),
    sa.Column("target_table", sa.Text, nullable=False),
    sa.Column("status", sa.String(12), nullable=False),
    sa.Column("fingerprint", sa.String(32), nullable=False),
    sa.Column("effective_time", _when, nullable=False),
    sa.Column("started_at", _when, nullable=False),
    sa.Column("finished_at", _when),
    sa.Column("host", sa.Text),
    *_count_columns(),
    sa.Column("chunks_total", sa.Integer, nullable=False),
    sa.Column("chunks_done", sa.Integer, nullable=False, default=0),
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("message", sa.Text),
    sa.Column("stop_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("checkpoint", sa.Text),
    sa.Column("plan_json", sa.Text, nullable=False),
)

chunks = sa.Table(
    names.CHUNKS, metadata,
    sa.Column("job_id", sa.String(40), primary_key=True),
    sa.Column("chunk", sa.Integer, primary_key=True),
    sa.Column("key_range", sa.Text, nullable=False),
    sa.Column("status", sa.String(12), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=1),
    *_count_columns(),
    sa.Column("seconds", sa.Float),
    sa.Column("error", sa.Text),
    sa.Column("retries", sa.Text),
    sa.Column("state", sa.Text),
    sa.Column("finished_at", _when),
)

checkpoints = sa.Table(
    names.CHECKPOINTS, metadata,
    sa.Column("mapping", sa.Text, primary_key=True),
    sa.Column("target_table", sa.Text, primary_key=True),
    sa.Column("value", sa.Text),
    sa.Column("fingerprint", sa.String(32), nullable=False),
    sa.Column("job_id", sa.String(40), nullable=False),
    sa.Column("updated_at", _when, nullable=False),
)

rejects = sa.Table(
    names.REJECTS, metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(40), nullable=False, index=True),
    sa.Column("chunk", sa.Integer, nullable=False),
    sa.Column("key", sa.Text),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("row", sa.Text, nullable=False),
)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def ensure_tables(conn: sa.Connection) -> None:
    """Create the job-log tables when missing (idempotent)."""
    with conn.begin():
        ddl_lock(conn)
        metadata.create_all(conn, checkfirst=True)


def start_job(conn: sa.Connection, plan: Plan, job_id: str) -> datetime:
    """Write the job's row, RUNNING, with the plan (no passwords) it runs; caller's transaction."""
    started = _now()
    assert plan.mapping.target_def
    conn.execute(jobs.insert().values(
        job_id=job_id, mapping=plan.name, target_table=plan.mapping.target_def.table,
        status=RUNNING, fingerprint=plan.fingerprint, effective_time=plan.effective_time,
        started_at=started, host=socket.gethostname(), chunks_total=len(plan.chunks),
        plan_json=redact_text(plan.to_json(indent=None)),
        **{c: 0 for c in COUNTS}))
    return started


def restart_job(conn: sa.Connection, job_id: str) -> datetime:
    """Mark a resumed job RUNNING again; returns its original start time."""
    conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(
        status=RUNNING, stop_requested=False, message=None, finished_at=None,
        host=socket.gethostname()))
    return aware(conn.execute(sa.select(jobs.c.started_at).where(jobs.c.job_id == job_id))
                 .scalar_one())


def aware(value: datetime) -> datetime:
    """A time read back from the log: SQLite gives it without its zone, which is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class JobRow:
    """A job as the log keeps it."""

    job_id: str
    mapping: str
    target_table: str
    status: str
    started_at: datetime
    plan_json: str
    message: str | None


def job(conn: sa.Connection, job_id: str) -> JobRow | None:
    row = conn.execute(sa.select(jobs.c.job_id, jobs.c.mapping, jobs.c.target_table,
                                 jobs.c.status, jobs.c.started_at,
                                 jobs.c.plan_json, jobs.c.message)
                       .where(jobs.c.job_id == job_id)).first()
    return JobRow(*row) if row else None


def latest_unfinished(conn: sa.Connection, mapping: str, target_table: str) -> JobRow | None:
    """The newest job of ``mapping`` into ``target_table`` that is RUNNING, FAILED or STOPPED."""
    row = conn.execute(sa.select(jobs.c.job_id).where(
        jobs.c.mapping == mapping, jobs.c.target_table == target_table,
        jobs.c.status.in_(UNFINISHED))
        .order_by(jobs.c.started_at.desc()).limit(1)).first()
    return job(conn, row[0]) if row else None


def latest_applied(conn: sa.Connection, mapping: str,
                   target_table: str) -> tuple[str, datetime] | None:
    """The latest job of ``mapping`` into ``target_table`` to apply a chunk (whatever its
    status now), and its effective time."""
    applied = sa.exists().where(chunks.c.job_id == jobs.c.job_id, chunks.c.status == SUCCEEDED)
    row = conn.execute(sa.select(jobs.c.job_id, jobs.c.effective_time).where(
        jobs.c.mapping == mapping, jobs.c.target_table == target_table, applied)
        .order_by(jobs.c.started_at.desc()).limit(1)).first()
    return None if row is None else (row[0], aware(row[1]))


def set_status(conn: sa.Connection, job_id: str, status: str, message: str | None) -> None:
    conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(
        status=status, message=message, finished_at=_now()))


def ledger(conn: sa.Connection, job_id: str, number: int | None = None) -> list[ChunkResult]:
    """The chunks of ``job_id`` (or just chunk ``number``) the log holds a row for."""
    cols = [chunks.c.job_id, chunks.c.chunk, chunks.c.status, *(chunks.c[c] for c in COUNTS),
            chunks.c.seconds, chunks.c.error, chunks.c.attempts, chunks.c.retries, chunks.c.state]
    out = []
    query = sa.select(*cols).where(chunks.c.job_id == job_id).order_by(chunks.c.chunk)
    if number is not None:
        query = query.where(chunks.c.chunk == number)
    for row in conn.execute(query):
        job_id_, number, status, *counts, seconds, error, attempts, retries, state = row
        out.append(ChunkResult(job_id_, number, status, **dict(zip(COUNTS, counts, strict=True)),
                               seconds=seconds or 0.0, error=error, attempts=attempts,
                               retries=retries, state=json.loads(state) if state else None))
    return out


def applied_chunk(conn: sa.Connection, job_id: str, number: int) -> ChunkResult | None:
    """The recorded result of chunk ``number`` if it was applied, else None."""
    found = [r for r in ledger(conn, job_id, number) if r.status == SUCCEEDED]
    return found[0] if found else None


def record_chunk(conn: sa.Connection, result: ChunkResult, key_range: str) -> None:
    """The chunk's ledger row, replacing an earlier try's; a SUCCEEDED row is written inside
    the chunk's own transaction, so it exists exactly when the chunk's rows do, and nothing
    replaces it."""
    mine = (chunks.c.job_id == result.job_id) & (chunks.c.chunk == result.number)
    if result.status != SUCCEEDED and conn.execute(
            sa.select(chunks.c.status).where(mine, chunks.c.status == SUCCEEDED)).first():
        return
    # A SUCCEEDED row is never deleted: applying a chunk twice fails on the primary key.
    conn.execute(chunks.delete().where(mine, chunks.c.status != SUCCEEDED))
    conn.execute(chunks.insert().values(
        job_id=result.job_id, chunk=result.number, key_range=key_range, status=result.status,
        attempts=result.attempts, seconds=result.seconds, finished_at=_now(),
        error=redact_text(result.error) if result.error else None,
        retries=redact_text(result.retries) if result.retries else None,
        state=json.dumps(result.state) if result.state is not None else None,
        **result.counts()))


def committed_rejects(conn: sa.Connection, job_id: str) -> tuple[int, int]:
    """(rejected, read) over the job's applied chunks; locks the job row on PostgreSQL so
    chunks checking a reject limit take turns."""
    conn.execute(sa.select(jobs.c.job_id).where(jobs.c.job_id == job_id).with_for_update())
    row = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(chunks.c.rejected), 0),
                                 sa.func.coalesce(sa.func.sum(chunks.c.read), 0))
                       .where(chunks.c.job_id == job_id, chunks.c.status == SUCCEEDED)).one()
    return int(row[0]), int(row[1])


def record_rejects(conn: sa.Connection, job_id: str, chunk: int, frame: pl.DataFrame) -> None:
    """The rejected rows with their key, reason and the row as JSON (an earlier try's go)."""
    conn.execute(rejects.delete().where(rejects.c.job_id == job_id, rejects.c.chunk == chunk))
    if frame.height:
        conn.execute(rejects.insert(), [{"job_id": job_id, "chunk": chunk, **row}
                                        for row in frame.iter_rows(named=True)])


def record_progress(conn: sa.Connection, job_id: str, done: list[ChunkResult],
                    total: int) -> None:
    """Keep the job row's counts and progress current as chunks finish (caller's transaction)."""
    applied = [r for r in done if r.status == SUCCEEDED]
    conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(
        chunks_done=len(applied), progress=len(applied) / total if total else 1.0,
        **{c: sum(getattr(r, c) for r in applied) for c in COUNTS}))


def request_stop(conn: sa.Connection, job_id: str) -> bool:
    """Ask a RUNNING job to stop between chunks; False when it is not running."""
    with conn.begin():
        return bool(conn.execute(jobs.update().where(
            jobs.c.job_id == job_id, jobs.c.status == RUNNING).values(
            stop_requested=True)).rowcount)


def stop_requested(conn: sa.Connection, job_id: str) -> bool:
    return bool(conn.execute(sa.select(jobs.c.stop_requested)
                             .where(jobs.c.job_id == job_id)).scalar())


def finish_job(conn: sa.Connection, plan: Plan, result: JobResult) -> None:
    """Close the job row; when it succeeded, move the checkpoint in the same transaction."""
    python = plan.mode == "python"
    value = encode_checkpoint(result.checkpoint, python=python) if result.ok else None
    conn.execute(jobs.update().where(jobs.c.job_id == result.job_id,
                                     jobs.c.status == RUNNING).values(
        status=result.status, finished_at=result.finished_at,
        message=redact_text(result.message) if result.message else None,
        checkpoint=value, chunks_done=sum(c.status == SUCCEEDED for c in result.chunks),
        progress=1.0 if result.ok else jobs.c.progress, **result.counts()))
    if result.ok and (plan.mode == "full" or value is not None or python):
        assert plan.mapping.target_def
        table = plan.mapping.target_def.table
        row = {"value": value, "fingerprint": plan.fingerprint, "job_id": result.job_id,
               "updated_at": result.finished_at}
        if plan.mode == "full":  # a full run keeps an incremental mapping's stored checkpoint
            del row["value"]
        updated = conn.execute(checkpoints.update().where(
            checkpoints.c.mapping == plan.name, checkpoints.c.target_table == table)
            .values(**row)).rowcount
        if not updated:
            conn.execute(checkpoints.insert().values(mapping=plan.name, target_table=table, **row))

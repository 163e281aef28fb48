"""The job log and checkpoint store: four tables in the target database.

Keeping them beside the target is what lets a chunk's rows and its ledger row
commit in one transaction: a chunk is applied exactly when its ledger row says
SUCCEEDED. Rows never hold a password: URLs and messages are redacted first.
"""

from __future__ import annotations

import json
import socket
from datetime import datetime, timezone
from typing import Any

import polars as pl
import sqlalchemy as sa

from mapperdsl import names
from mapperdsl.dsl.url import redact_text
from mapperdsl.plan.plan import Plan
from mapperdsl.plan.values import to_jsonable
from mapperdsl.record.results import COUNTS, RUNNING, SUCCEEDED, ChunkResult, JobResult

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
    sa.Column("finished_at", _when),
)

checkpoints = sa.Table(
    names.CHECKPOINTS, metadata,
    sa.Column("mapping", sa.Text, primary_key=True),
    sa.Column("target_table", sa.Text, nullable=False),
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
        metadata.create_all(conn, checkfirst=True)


def start_job(conn: sa.Connection, plan: Plan, job_id: str) -> datetime:
    """Write the job's row, RUNNING, with the plan (no passwords) it runs."""
    started = _now()
    assert plan.mapping.target_def
    with conn.begin():
        conn.execute(jobs.insert().values(
            job_id=job_id, mapping=plan.name, target_table=plan.mapping.target_def.table,
            status=RUNNING, fingerprint=plan.fingerprint, effective_time=plan.effective_time,
            started_at=started, host=socket.gethostname(), chunks_total=len(plan.chunks),
            plan_json=redact_text(plan.to_json(indent=None)),
            **{c: 0 for c in COUNTS}))
    return started


def record_chunk(conn: sa.Connection, result: ChunkResult, key_range: str) -> None:
    """The chunk's ledger row; called inside the chunk's own transaction when it succeeds."""
    conn.execute(chunks.insert().values(
        job_id=result.job_id, chunk=result.number, key_range=key_range, status=result.status,
        attempts=result.attempts, seconds=result.seconds, finished_at=_now(),
        error=redact_text(result.error) if result.error else None, **result.counts()))


def record_rejects(conn: sa.Connection, job_id: str, chunk: int, frame: pl.DataFrame) -> None:
    """The rejected rows with their key, reason and the row as JSON."""
    if frame.height:
        conn.execute(rejects.insert(), [{"job_id": job_id, "chunk": chunk, **row}
                                        for row in frame.iter_rows(named=True)])


def record_progress(conn: sa.Connection, job_id: str, done: list[ChunkResult],
                    total: int) -> None:
    """Keep the job row's counts and progress current as chunks finish."""
    with conn.begin():
        conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(
            chunks_done=len(done), progress=len(done) / total if total else 1.0,
            **{c: sum(getattr(r, c) for r in done) for c in COUNTS}))


def finish_job(conn: sa.Connection, plan: Plan, result: JobResult) -> None:
    """Close the job row; when it succeeded, move the checkpoint in the same transaction."""
    value = json.dumps(to_jsonable(result.checkpoint)) if result.checkpoint is not None else None
    with conn.begin():
        conn.execute(jobs.update().where(jobs.c.job_id == result.job_id).values(
            status=result.status, finished_at=result.finished_at,
            message=redact_text(result.message) if result.message else None,
            checkpoint=value, chunks_done=sum(c.status == SUCCEEDED for c in result.chunks),
            progress=1.0 if result.ok else jobs.c.progress,
            **result.counts()))
        if result.ok:
            assert plan.mapping.target_def
            row = {"target_table": plan.mapping.target_def.table, "value": value,
                   "fingerprint": plan.fingerprint, "job_id": result.job_id,
                   "updated_at": result.finished_at}
            updated = conn.execute(checkpoints.update().where(
                checkpoints.c.mapping == plan.name).values(**row)).rowcount
            if not updated:
                conn.execute(checkpoints.insert().values(mapping=plan.name, **row))

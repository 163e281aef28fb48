"""Reading the job log back as Polars frames: jobs, one job's chunks, one job's rejects."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import polars as pl
import sqlalchemy as sa

from mapperdsl.connect import connection
from mapperdsl.dsl.url import Url
from mapperdsl.errors import CheckpointError, DeclarationError, ExecutionError, NoSuchJobError
from mapperdsl.record import joblog
from mapperdsl.record.results import COUNTS

_JOB_COLUMNS = ("job_id", "mapping", "target_table", "status", "started_at", "finished_at",
                *COUNTS, "chunks_total", "chunks_done", "progress", "host", "message")
_CHUNK_COLUMNS = ("chunk", "key_range", "status", "attempts", *COUNTS, "seconds", "error",
                  "retries", "finished_at")
_REJECT_COLUMNS = ("chunk", "key", "reason", "row")


def _frame(conn: sa.Connection, query: sa.Select[Any], names: tuple[str, ...]) -> pl.DataFrame:
    rows = [tuple(r) for r in conn.execute(query)]
    frame = pl.DataFrame(rows, schema=list(names), orient="row", infer_schema_length=None)
    return frame.with_columns(_utc(frame, c) for c in names if c.endswith("_at"))


def _utc(frame: pl.DataFrame, name: str) -> pl.Expr:
    # Times in UTC whatever the engine gave (SQLite: naive, PostgreSQL: aware, none: null).
    dtype = frame.schema[name]
    if isinstance(dtype, pl.Datetime) and dtype.time_zone:
        return pl.col(name).dt.convert_time_zone("UTC")
    if isinstance(dtype, pl.Datetime):
        return pl.col(name).dt.replace_time_zone("UTC")
    return pl.col(name).cast(pl.Datetime("us", "UTC"))


def _read(target_url: str | Url, read: Any, job_id: str | None = None) -> pl.DataFrame:
    """``read(conn)`` of the target's job log; ``job_id``: of that job, which must be there."""
    target = Url.parse(target_url, argument="target_url")
    with connection(target, readonly=True, error=ExecutionError) as conn:
        if not sa.inspect(conn).has_table(joblog.jobs.name):
            raise CheckpointError(f"{target} has no job log yet (no mapping has run there)")
        if job_id is not None and joblog.job(conn, job_id) is None:
            raise NoSuchJobError(job_id, target)
        frame: pl.DataFrame = read(conn)
        conn.rollback()
    return frame


def history(target_url: str | Url, mapping: str | None = None, *,
            limit: int = 50) -> pl.DataFrame:
    """The newest jobs in the target's job log, newest first; ``seconds`` is how long each
    took, or for a job still running, how long it has run so far.

    Examples
    --------
    >>> md.history("sqlite:///dw.db", "dim_customer", limit=5)   # doctest: +SKIP
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise DeclarationError(f"`limit` must be a whole number >= 1, got {limit!r}")
    jobs = joblog.jobs
    query = sa.select(*(jobs.c[c] for c in _JOB_COLUMNS)).order_by(
        jobs.c.started_at.desc()).limit(limit)
    if mapping is not None:
        query = query.where(jobs.c.mapping == mapping)
    ended = pl.coalesce("finished_at", pl.lit(datetime.now(timezone.utc)).dt.cast_time_unit("us"))
    return _read(target_url, lambda conn: _frame(conn, query, _JOB_COLUMNS).with_columns(
        seconds=(ended - pl.col("started_at")).dt.total_milliseconds() / 1000))


def chunks(job_id: str, target_url: str | Url) -> pl.DataFrame:
    """The chunks of job ``job_id``: range, status, attempts, counts, time and error.
    A job id the job log does not hold is a :class:`~mapperdsl.errors.NoSuchJobError`."""
    table = joblog.chunks
    query = sa.select(*(table.c[c] for c in _CHUNK_COLUMNS)).where(
        table.c.job_id == job_id).order_by(table.c.chunk)
    return _read(target_url, lambda conn: _frame(conn, query, _CHUNK_COLUMNS), job_id)


def rejects(job_id: str, target_url: str | Url) -> pl.DataFrame:
    """The rows job ``job_id`` rejected, with their chunk, key, reason and the row as JSON.
    A job id the job log does not hold is a :class:`~mapperdsl.errors.NoSuchJobError`."""
    table = joblog.rejects
    query = sa.select(*(table.c[c] for c in _REJECT_COLUMNS)).where(
        table.c.job_id == job_id).order_by(table.c.chunk, table.c.id)
    return _read(target_url, lambda conn: _frame(conn, query, _REJECT_COLUMNS), job_id)

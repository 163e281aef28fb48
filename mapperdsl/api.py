"""The wiring: mapping -> plan -> chunk tasks -> chunk results -> job result.

Each stage lives in its own package and only knows the one before it; this
module is the one place that calls them in order.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from datetime import datetime, timezone

from tqdm.auto import tqdm

from mapperdsl.connect import connection
from mapperdsl.dsl.url import redact_text
from mapperdsl.errors import ExecutionError, TransientError
from mapperdsl.execute.read import read_sql
from mapperdsl.execute.runner import run_tasks
from mapperdsl.execute.transform import prepare
from mapperdsl.merge.ddl import ensure_target
from mapperdsl.merge.diff import diff, read_current
from mapperdsl.merge.write import MergeCounts, write_chunk
from mapperdsl.plan.compile import compile_mapping
from mapperdsl.plan.plan import Chunk, Plan
from mapperdsl.record import joblog
from mapperdsl.record.results import FAILED, SUCCEEDED, ChunkResult, JobResult

log = logging.getLogger("mapperdsl")

__all__ = ["compile_mapping", "process_chunk", "run"]


def process_chunk(plan: Plan, job_id: str, chunk: Chunk) -> ChunkResult:
    """Read, transform, diff and write one chunk in its own connections and transaction.

    Runs in a worker. Never raises: a failure comes back as a FAILED result whose
    error names the cause (without a password); nothing of the chunk is written then.
    """
    m = plan.mapping
    assert m.source_def and m.target_def and m.key_columns and m.column_map
    started = time.perf_counter()
    try:
        frame = read_sql(m.source_def.url, chunk.sql, written_here=plan.same_database)
        prepared = prepare(
            frame, read_schema=plan.read_schema(), columns=list(m.column_map),
            target_schema=plan.target_schema(), keys=list(m.key_columns),
            key_sources=[m.column_map.plain_source(k) or k for k in m.key_columns],
            tracked=list(m.tracked), hash_column=m.scd.hash_column)
        change = diff(plan, prepared, read_current(plan, chunk))
        done: list[ChunkResult] = []

        def finish(conn, counts: MergeCounts) -> None:  # type: ignore[no-untyped-def]
            result = ChunkResult(job_id, chunk.number, SUCCEEDED, read=prepared.read,
                                 rejected=prepared.rejects.height,
                                 seconds=time.perf_counter() - started, **counts.__dict__)
            joblog.record_rejects(conn, job_id, chunk.number, prepared.rejects)
            joblog.record_chunk(conn, result, chunk.range.describe(plan.chunk_key))
            done.append(result)

        with connection(m.target_def.url, error=TransientError) as conn:
            write_chunk(conn, plan, change, finish)
        return done[0]
    except Exception as exc:  # reported per chunk; the job decides what it means
        return ChunkResult(job_id, chunk.number, FAILED, seconds=time.perf_counter() - started,
                           error=redact_text(f"{type(exc).__name__}: {exc}"))


def run(plan: Plan, *, n_jobs: int | None = None, progress: bool | None = None) -> JobResult:
    """Run exactly ``plan`` (also one read back from JSON) and return its JobResult.

    Parameters
    ----------
    n_jobs
        Workers; default the mapping's ``parallel(n_jobs=...)``, else joblib's
        ``parallel_config`` (which defaults to 1).
    progress
        Show a progress bar: None shows one on a terminal or in Jupyter only.

    Examples
    --------
    >>> result = md.run(dim.plan(), n_jobs=2)   # doctest: +SKIP
    >>> result.status                           # doctest: +SKIP
    'SUCCEEDED'
    """
    work = plan.resolved()  # fails here, before any write, if a ${VAR} is not set
    m = work.mapping
    assert m.target_def
    job_id = uuid.uuid4().hex[:12]
    ranges = sum(not c.range.nulls for c in plan.chunks)
    log_db = functools.partial(connection, m.target_def.url, error=ExecutionError)
    # The coordinator holds no connection while chunks run: each job-log write opens its own
    # (an idle SQLite connection in this process would lose its locks to a sequential chunk).
    with log_db() as conn:
        joblog.ensure_tables(conn)
        ensure_target(conn, plan)
        started = joblog.start_job(conn, plan, job_id)
    log.info("job %s %s started: %d chunks, ~%d rows", job_id, plan.name, len(plan.chunks),
             plan.estimated_rows)
    results: list[ChunkResult] = []
    bar = tqdm(total=len(plan.chunks), unit="chunk", desc=plan.name,
               disable=None if progress is None else not progress)
    task = functools.partial(process_chunk, work, job_id)
    try:
        for result in run_tasks(task, plan.chunks, n_jobs=n_jobs or m.n_jobs,
                                sequential=ranges <= 1):
            results.append(result)
            with log_db() as conn:
                if result.status == FAILED:
                    with conn.begin():
                        joblog.record_chunk(conn, result, _range_of(plan, result.number))
                joblog.record_progress(conn, job_id, results, len(plan.chunks))
            _log_chunk(result, len(plan.chunks))
            bar.update(1)
            bar.set_postfix(rows=sum(r.read for r in results))
    except BaseException as exc:
        with log_db() as conn:
            _finish(conn, plan, job_id, started, results, f"interrupted: {type(exc).__name__}")
        raise
    finally:
        bar.close()
    with log_db() as conn:
        return _finish(conn, plan, job_id, started, results, None)


def _finish(conn, plan: Plan, job_id: str, started: datetime,  # type: ignore[no-untyped-def]
            results: list[ChunkResult], interrupted: str | None) -> JobResult:
    failed = [r for r in results if r.status != SUCCEEDED]
    ok = not failed and not interrupted and len(results) == len(plan.chunks)
    window = plan.window
    checkpoint = None
    if ok and window is not None:
        checkpoint = window.high if window.high is not None else window.stored
    message = interrupted or (f"{len(failed)} of {len(plan.chunks)} chunks failed; first: "
                              f"chunk {failed[0].number}: {failed[0].error}" if failed else None)
    result = JobResult(job_id=job_id, mapping=plan.name, status=SUCCEEDED if ok else FAILED,
                       started_at=started, finished_at=datetime.now(timezone.utc),
                       chunks=tuple(sorted(results, key=lambda r: r.number)),
                       checkpoint=checkpoint, message=message, decisions=plan.decisions)
    joblog.finish_job(conn, plan, result)
    (log.info if ok else log.error)("job %s %s %s: %s", job_id, plan.name, result.status,
                                    message or result.counts())
    return result


def _range_of(plan: Plan, number: int) -> str:
    return plan.chunks[number - 1].range.describe(plan.chunk_key)


def _log_chunk(result: ChunkResult, total: int) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in result.counts().items() if v)
    level = logging.INFO if result.status == SUCCEEDED else logging.ERROR
    log.log(level, "job %s chunk %d/%d %s %s in %.2fs%s", result.job_id, result.number, total,
            result.status, counts or "no rows", result.seconds,
            f": {result.error}" if result.error else "")

"""One chunk, start to end, in a worker: read, type, map, hash, diff, write, record.

Everything a chunk writes — its rows, its rejects and its ledger row — commits in
one transaction, so a chunk is applied exactly when its ledger row says so. A
transient error retries the whole chunk with exponential backoff and jitter;
any other error fails it at once with the database's message. The function
never raises: the coordinator gets a ChunkResult either way.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import polars as pl
import sqlalchemy as sa

from mapperdsl.connect import connection
from mapperdsl.dialects import POSTGRES, SQLITE
from mapperdsl.dsl.parts import PythonCheckpoint
from mapperdsl.dsl.url import redact_text
from mapperdsl.errors import TerminalError, TransientError
from mapperdsl.execute.faults import failpoint
from mapperdsl.execute.read import read_sql
from mapperdsl.execute.retry import is_transient
from mapperdsl.execute.transform import Prepared, prepare
from mapperdsl.merge.diff import Diff, diff, empty_state, read_current, reads_by_keys
from mapperdsl.merge.write import MergeCounts, write_chunk
from mapperdsl.plan.plan import Chunk, Plan
from mapperdsl.record import joblog, lease
from mapperdsl.record.results import CANCELLED, FAILED, SUCCEEDED, ChunkResult

log = logging.getLogger("mapperdsl")


class RejectLimitError(TerminalError):
    """A chunk would take the job past its reject limit; it is not applied."""


class FencedError(TerminalError):
    """The coordinator of this chunk lost the lease: the chunk must not be applied."""


def process_chunk(plan: Plan, job_id: str, owner: str, chunk: Chunk,
                  state: Any = None, *, empty_target: bool = False,
                  early: Callable[[], Early | None] | None = None) -> ChunkResult:
    """Apply ``chunk`` of ``plan`` for job ``job_id``, whose lease ``owner`` holds;
    ``state`` feeds a Python checkpoint. ``empty_target``: the target was empty when the
    job started, so the chunk's key range holds no rows to compare with. ``early``: gives
    what :func:`work_ahead` did of the chunk before its turn, called once the chunk is sure
    to run; the first attempt starts from it, a retry starts over.

    A stop request seen before the chunk starts cancels it (nothing is read). A chunk
    whose ledger row already says SUCCEEDED (its commit went through, but the answer was
    lost) is not applied again: its recorded result comes back.
    """
    m = plan.mapping
    assert m.target_def
    started = time.perf_counter()
    retries: list[str] = []
    for attempt in range(1, m.policy.attempts + 1):
        try:
            with connection(m.target_def.url, error=TransientError) as conn:
                stop = joblog.stop_requested(conn, job_id)
                applied = joblog.applied_chunk(conn, job_id, chunk.number)
                conn.rollback()
                if applied is not None:  # an earlier attempt committed, then lost its answer
                    return applied
                if stop:
                    return ChunkResult(job_id, chunk.number, CANCELLED, attempts=attempt - 1,
                                       error="stop requested before the chunk started")
                return _apply(conn, plan, job_id, owner, chunk, state, started, attempt,
                              retries, empty_target,
                              early() if early is not None and attempt == 1 else None)
        except Exception as exc:  # reported per chunk; the job decides what it means
            message = redact_text(f"{type(exc).__name__}: {exc}")
            if not is_transient(exc) or attempt == m.policy.attempts:
                return ChunkResult(job_id, chunk.number, FAILED, attempts=attempt,
                                   seconds=time.perf_counter() - started, error=message,
                                   retries="\n".join(retries) or None)
            wait = m.policy.delay(attempt, random.random())
            retries.append(f"attempt {attempt}: {message} (retried after {wait:.2f}s)")
            log.warning("job %s chunk %d: attempt %d of %d failed, retrying in %.2fs: %s",
                        job_id, chunk.number, attempt, m.policy.attempts, wait, message)
            time.sleep(wait)
    raise AssertionError("unreachable: the last attempt returns")


def _apply(conn: sa.Connection, plan: Plan, job_id: str, owner: str, chunk: Chunk, state: Any,
           started: float, attempt: int, retries: list[str],
           empty_target: bool, early: Early | None) -> ChunkResult:
    # ``conn``: the target, idle until the write, which is one transaction on it.
    m = plan.mapping
    if early is not None:  # its time counts as the chunk's
        started -= early.seconds
    early = early or Early(read_chunk(plan, chunk))
    failpoint("read", chunk.number, job_id)
    prepared, change, new_state = early.prepared, early.change, state
    if prepared is None and isinstance(m.checkpoint, PythonCheckpoint):
        assert early.frame is not None
        keep, holder = _python_filter(m.checkpoint, state, plan)
        prepared = prepare_rows(plan, early.frame, keep)
        try:  # the state goes through JSON, as it will when a job is resumed
            new_state = json.loads(json.dumps(holder[0]))
        except (TypeError, ValueError) as exc:
            raise TerminalError(f"the Python checkpoint's state must be JSON-serialisable: "
                                f"{exc}") from None
    elif prepared is None:
        assert early.frame is not None
        prepared = prepare_rows(plan, early.frame)
    del early  # what stays is the prepared rows and the change
    if change is None:
        change = _diff(plan, chunk, prepared, empty_target)
    done: list[ChunkResult] = []

    def finish(conn: sa.Connection, counts: MergeCounts) -> None:
        assert m.target_def
        if not lease.owns(conn, lease.lease_key(plan.name, m.target_def.table), owner):
            raise FencedError(f"job {job_id} is no longer this run's (its lease was taken over "
                              "or the job abandoned); chunk not applied")
        _check_reject_limits(conn, plan, job_id, prepared)
        result = ChunkResult(job_id, chunk.number, SUCCEEDED, read=prepared.read,
                             rejected=prepared.rejects.height, attempts=attempt,
                             seconds=time.perf_counter() - started,
                             retries="\n".join(retries) or None, state=new_state,
                             **counts.__dict__)
        joblog.record_rejects(conn, job_id, chunk.number, prepared.rejects)
        joblog.record_chunk(conn, result, chunk.range.describe(plan.chunk_key))
        failpoint("before_commit", chunk.number, job_id)
        done.append(result)

    write_chunk(conn, plan, change, finish)
    failpoint("after_commit", chunk.number, job_id)
    return done[0]


@dataclass(frozen=True)
class Early:
    """What a chunk worked out before its turn: its rows read and, unless a Python
    checkpoint needs the state the chunk before it leaves, prepared and diffed against
    the target (then the rows read are not kept). The chunks' key ranges do not overlap,
    so no other chunk changes those target rows in between. ``seconds``: the time it took.
    """

    frame: pl.DataFrame | None
    prepared: Prepared | None = None
    change: Diff | None = None
    seconds: float = 0.0


def work_ahead(plan: Plan, empty_target: bool, chunk: Chunk) -> Early:
    """All of a chunk but its write (see :class:`Early`). When the target rows to compare
    with do not depend on the keys read, they are read at the same time as the source."""
    started = time.perf_counter()
    if isinstance(plan.mapping.checkpoint, PythonCheckpoint):
        return Early(read_chunk(plan, chunk), seconds=time.perf_counter() - started)
    if empty_target or reads_by_keys(plan):
        prepared = prepare_rows(plan, read_chunk(plan, chunk))
        change = _diff(plan, chunk, prepared, empty_target)
    else:
        with ThreadPoolExecutor(1, thread_name_prefix="mapperdsl-target") as pool:
            current = pool.submit(read_current, plan, chunk)
            prepared = prepare_rows(plan, read_chunk(plan, chunk))
            change = diff(plan, prepared, current.result())
    return Early(None, prepared, change, time.perf_counter() - started)


def read_chunk(plan: Plan, chunk: Chunk) -> pl.DataFrame:
    """The chunk's source rows, read as a run reads them (read.py's module doc)."""
    assert plan.mapping.source_def
    return read_sql(plan.mapping.source_def.url, chunk.sql, written_here=plan.same_database,
                    schema=plan.read_schema())


def prepare_rows(plan: Plan, frame: pl.DataFrame,
                 keep: Callable[[pl.DataFrame], pl.DataFrame] | None = None) -> Prepared:
    """``frame``, rows a chunk of ``plan`` read, typed, mapped, checked against what the
    target can store and hashed (:func:`~mapperdsl.execute.transform.prepare`)."""
    m = plan.mapping
    assert m.source_def and m.target_def and m.key_columns and m.column_map
    target = m.target_def.url.dialect
    return prepare(
        frame, read_schema=plan.read_schema(), columns=list(m.column_map),
        target_schema=plan.target_schema(), keys=list(m.key_columns),
        key_sources=[m.column_map.plain_source(k) or k for k in m.key_columns],
        tracked=list(m.tracked), hash_column=m.scd.hash_column, keep=keep,
        max_digits=15 if target == SQLITE else None, max_chars=dict(plan.text_limits),
        nul_free=target == POSTGRES and m.source_def.url.dialect != POSTGRES)  # (a PostgreSQL
    # source's text holds no NUL character)


def _diff(plan: Plan, chunk: Chunk, prepared: Prepared, empty_target: bool) -> Diff:
    current = empty_state(plan) if empty_target else read_current(plan, chunk,
                                                                  prepared.keys_seen)
    return diff(plan, prepared, current)


def _python_filter(ck: PythonCheckpoint, state: Any, plan: Plan) -> tuple[Any, list[Any]]:
    # The user's function sees the typed rows in key order and keeps what it returns; each
    # attempt gets its own copy of the state (a function may change it in place, and a
    # retried attempt must start from the state the chunk began with).
    holder = [json.loads(json.dumps(state))]
    keys = [plan.mapping.column_map.plain_source(k) or k  # type: ignore[union-attr]
            for k in plan.mapping.key_columns or ()]

    def keep(rows: pl.DataFrame) -> pl.DataFrame:
        out = ck.fn(rows.sort(keys, nulls_last=True), holder[0])
        if not isinstance(out, tuple) or len(out) != 2 or not isinstance(out[0], pl.DataFrame):
            got = (f"({', '.join(type(v).__name__ for v in out)})" if isinstance(out, tuple)
                   else type(out).__name__)
            raise TerminalError(f"the Python checkpoint {ck.reference} must return "
                                f"(DataFrame, state), got {got}")
        kept, holder[0] = out
        return kept

    return keep, holder


def _check_reject_limits(conn: sa.Connection, plan: Plan, job_id: str,
                         prepared: Prepared) -> None:
    # Judged on the job so far with this chunk; a fraction against at least the rows the
    # plan expects, so a small chunk (the NULL-key one) is not judged on its own.
    policy = plan.mapping.policy
    if policy.max_rejects is None and policy.max_reject_fraction is None:
        return
    before_rejected, before_read = joblog.committed_rejects(conn, job_id)
    rejected = before_rejected + prepared.rejects.height
    read = max(before_read + prepared.read, plan.estimated_rows, 1)
    if policy.max_rejects is not None and rejected > policy.max_rejects:
        raise RejectLimitError(
            f"{rejected} rows rejected in the job with this chunk is past the limit "
            f"rejects(max_rows={policy.max_rejects}); the chunk was not applied")
    if policy.max_reject_fraction is not None and rejected / read > policy.max_reject_fraction:
        raise RejectLimitError(
            f"{rejected} of {read} rows rejected ({rejected / read:.1%}) is past the limit "
            f"rejects(max_fraction={policy.max_reject_fraction}); the chunk was not applied")

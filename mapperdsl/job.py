"""The coordinator: a job from its lease to its checkpoint.

It takes the mapping's lease, writes the job row, hands the chunks not yet
applied to joblib, keeps the job log current as results arrive, and finally —
in one transaction — closes the job row, moves the checkpoint (only when every
chunk was applied) and releases the lease. A new job and a resumed one run
through the same code; a resumed job keeps its id, plan, window and effective
time, and runs only the chunks without a SUCCEEDED ledger row.
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from tqdm.auto import tqdm

from mapperdsl.chunk import Early, process_chunk, work_ahead
from mapperdsl.connect import connection
from mapperdsl.display import counts_text
from mapperdsl.dsl.mapping import check_n_jobs
from mapperdsl.dsl.url import redact_text
from mapperdsl.errors import PlanError, TransientError, UnfinishedJobError
from mapperdsl.execute.interrupt import first_press_stops
from mapperdsl.execute.retry import retrying
from mapperdsl.execute.runner import Ahead, run_tasks, runs_here, start_workers
from mapperdsl.execute.runner import backend as using_backend
from mapperdsl.merge.ddl import ensure_index, ensure_target, first_load, has_rows, is_empty
from mapperdsl.plan.facts import drift
from mapperdsl.plan.plan import Chunk, Plan
from mapperdsl.record import joblog, lease
from mapperdsl.record.results import (
    CANCELLED,
    FAILED,
    STOPPED,
    SUCCEEDED,
    ChunkResult,
    JobResult,
)

log = logging.getLogger("mapperdsl")

ABORTED = "interrupted (Ctrl-C): stopped at once, the running chunks not waited for"


def show_progress(progress: bool | None) -> bool:
    """Whether to draw a progress bar: as asked, else on a terminal or in a Jupyter kernel
    (where tqdm.auto draws a widget), never into a log file or a pipe."""
    if progress is not None:
        return progress
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    return type(shell).__name__ == "ZMQInteractiveShell" or sys.stderr.isatty()


def refuse_unfinished(conn: sa.Connection, name: str, table: str, lease_seconds: float) -> None:
    """Raise when ``name`` has a running job (lease held) or one to resume or abandon."""
    key = lease.lease_key(name, table)
    # The job first: a job row and its lease commit together, and each statement sees at
    # least what the one before saw, so a running job is never mistaken for a dead one.
    job = joblog.latest_unfinished(conn, name, table)
    current = lease.holder(conn, key)
    if current and current.alive(lease_seconds, datetime.now(timezone.utc)):
        raise lease.held(key, current)
    if job is not None:
        why = f": {job.message}" if job.message else ""
        raise UnfinishedJobError(
            f"mapping {name!r} has an unfinished job {job.job_id} ({job.status}, started "
            f"{job.started_at:%Y-%m-%d %H:%M:%S}{why}). Resume it with dim.resume() or "
            f"md.resume({job.job_id!r}, target_url), or give it up with dim.abandon() or "
            f"md.abandon({job.job_id!r}, target_url)")


def refuse_older(conn: sa.Connection, plan: Plan) -> None:
    """Raise when the mapping's last job to apply chunks to the target, still filled, did so
    as of a later effective time: run now, the plan (a saved one, or one given an earlier
    time) would write it as of before that (SCD2 versions that end before they begin, a
    checkpoint moved back). A target emptied since (a rebuild) may start from any time."""
    assert plan.mapping.target_def
    table = plan.mapping.target_def.table
    later = joblog.latest_applied(conn, plan.name, table)
    if later is not None and later[1] > plan.effective_time and has_rows(conn, table):
        at = "%Y-%m-%d %H:%M:%S.%f UTC"
        raise PlanError(
            f"the plan of {plan.name!r} is as of {plan.effective_time.strftime(at)}, but job "
            f"{later[0]} already wrote its target as of {later[1].strftime(at)}; run now, it "
            "would write history as of before that. Plan again (dim.plan()), with an effective "
            "time no earlier than that")


def execute_job(plan: Plan, *, job_id: str | None = None, n_jobs: int | None = None,
                progress: bool | None = None, backend: str | None = None,
                scheduler: str | None = None, just_planned: bool = False) -> JobResult:
    """Run ``plan`` as a new job, or resume ``job_id`` (which must have been made from it),
    on joblib backend ``backend`` (see :func:`mapperdsl.execute.runner.backend`).
    ``just_planned``: the plan was compiled by this same call, from the databases as they
    are, so they are not checked against it once more (the schema drift check)."""
    check_n_jobs(n_jobs, "run(n_jobs=...)")
    with using_backend(backend, scheduler):  # a scheduler out of reach fails before any write
        return _execute(plan, job_id, n_jobs, progress, just_planned)


def _execute(plan: Plan, job_id: str | None, n_jobs: int | None,
             progress: bool | None, just_planned: bool) -> JobResult:
    work = plan.resolved()  # fails here, before any write, if a ${VAR} is not set
    m = work.mapping
    assert m.source_def and m.target_def
    n_jobs = n_jobs or m.n_jobs
    if not plan.sequential:  # more than one key range
        start_workers(n_jobs)  # they start while the job is set up
    # A first load run here reads its first chunk while the job is set up (nothing of the
    # target is read before the lease is held: a target missing when planned has no rows).
    # A set-up that fails waits for that read before it raises.
    first = Ahead(functools.partial(work_ahead, work, True))
    early = job_id is None and not work.target_exists and not _reads_in_turn(work) \
        and runs_here(n_jobs, work.sequential, len(work.chunks))
    try:
        return _run(plan, work, job_id, n_jobs, progress, first if early else None,
                    just_planned)
    finally:
        first.close()


def _run(plan: Plan, work: Plan, job_id: str | None, n_jobs: int | None, progress: bool | None,
         early: Ahead[Chunk, Early] | None, just_planned: bool) -> JobResult:
    # ``plan`` as given (kept in the job row: its ${VAR}s unresolved), ``work`` resolved;
    # ``early``: to read the first chunk with once the plan is known to fit the databases.
    m = work.mapping
    assert m.source_def and m.target_def
    no_nulls = not any(c.range.nulls for c in work.chunks)  # the key was declared NOT NULL
    problems = [] if just_planned else drift(
        m.source_def, m.target_def, dict(work.read_columns),
        [*dict(work.target_columns), *m.scd.system_columns],
        not_null=work.chunk_key if no_nulls else None)
    if problems:
        raise PlanError(["the databases changed since this plan was made; make a new plan",
                         *problems])
    if early is not None:  # (after the drift check: its sqlite3 connection to a SQLite
        early.start(work.chunks[0])  # source would drop ConnectorX's locks on the file)
    log_db = functools.partial(connection, m.target_def.url, error=TransientError)
    key = lease.lease_key(plan.name, m.target_def.table)
    owner = lease.new_owner()
    with log_db() as conn:
        joblog.ensure_tables(conn)
        ensure_target(conn, work)
        if job_id is None:
            job_id = uuid.uuid4().hex[:12]
            with conn.begin():
                refuse_unfinished(conn, plan.name, m.target_def.table, m.policy.lease_seconds)
                refuse_older(conn, plan)
                lease.acquire(conn, key, job_id, m.policy.lease_seconds, owner)
                started = joblog.start_job(conn, plan, job_id)
            done: list[ChunkResult] = []
        else:
            with conn.begin():
                lease.acquire(conn, key, job_id, m.policy.lease_seconds, owner)
                started = joblog.restart_job(conn, job_id)
            done = [r for r in joblog.ledger(conn, job_id) if r.status == SUCCEEDED]
        # Under the lease nothing else writes the target. An empty one is a first load: its
        # key index is built once after the load (several times faster than maintaining it
        # row by row), and the chunks skip reading the current rows (there are none).
        empty = is_empty(conn, work)
        if not empty:  # filled since it was planned: what was read early is not used
            ensure_index(conn, work)
    applied = {r.number for r in done}
    todo = [c for c in work.chunks if c.number not in applied]
    log.info("job %s %s %s: %d of %d chunks to run, ~%d rows", job_id, plan.name,
             "resumed" if done else "started", len(todo), len(work.chunks),
             sum(c.estimated_rows for c in todo))

    def beat() -> bool:
        with log_db() as conn:
            return lease.beat(conn, key, owner)

    def stop_asked() -> None:  # the first Ctrl-C, from a thread of its own
        log.warning("job %s %s: Ctrl-C: stopping once the running chunks finish (press Ctrl-C "
                    "again to stop at once)", job_id, plan.name)
        try:
            with log_db() as conn:
                joblog.request_stop(conn, job_id)
        except Exception as exc:  # the chunks still stop: the coordinator asks again
            log.warning("job %s: could not record the stop request: %s", job_id,
                        redact_text(str(exc)))

    results: list[ChunkResult] = []
    interrupted, stopping = None, False
    bar = tqdm(total=len(work.chunks), initial=len(done), unit="chunk", desc=plan.name,
               disable=not show_progress(progress))
    recorder = _Recorder(f"job {job_id}")
    with first_press_stops(stop_asked) as ctrl_c, first_load(log_db, work, empty) as index:
        try:
            with lease.Heartbeat(beat, every=m.policy.lease_seconds / 3) as heartbeat:
                for result in _results(work, job_id, owner, todo, done, n_jobs, empty,
                                       early if empty else None):
                    results.append(result)
                    recorder.add(functools.partial(
                        retrying, functools.partial(_record, log_db, work, owner, result,
                                                    done + results),
                        m.policy, f"job {job_id}: writing the job log"))
                    bar.update(1)
                    bar.set_postfix(rows=sum(r.read for r in done + results))
                    # A chunk that committed found the lease its run's in its own transaction;
                    # after any other result, its record (which checks) is waited for.
                    lost = recorder.lost() if result.status == SUCCEEDED else recorder.wait()
                    if lost or heartbeat.lost.is_set():  # another coordinator owns the job
                        interrupted = "the lease was taken over by another run"
                        break
                    if not stopping and ((result.status == FAILED and m.policy.fail_fast)
                                         or ctrl_c.pressed.is_set()):
                        stopping = True
                        with log_db() as conn:  # the chunks not started cancel themselves
                            joblog.request_stop(conn, job_id)
                if interrupted is None and recorder.wait():  # (the lease still beating)
                    interrupted = "the lease was taken over by another run"
        except KeyboardInterrupt:  # pressed twice (or raised in a worker)
            interrupted = ABORTED
        except Exception as exc:  # a worker process died, the pool broke: the job can be resumed
            interrupted = f"the run broke off: {type(exc).__name__}: {redact_text(str(exc))}"
        finally:
            bar.close()
        ctrl_c.closing = True  # from here a press is ignored: the job closes itself
        if interrupted == ABORTED:
            # A connection the interrupt caught closing is left open — on SQLite holding the
            # write lock that closing the job (and the records and stop request under way)
            # wait for — until it is collected, which it can be now that the exception is gone.
            gc.collect()
        elif interrupted is None and ctrl_c.pressed.is_set():
            interrupted = "interrupted (Ctrl-C): the running chunks finished"
        recorder.close()  # (after a break or an interrupt, records may still be under way)

        def finish() -> JobResult:
            index()  # a first load's, whatever its outcome: the next job finds the index
            with log_db() as conn:
                return _finish(conn, work, job_id, owner, started, interrupted)

        return retrying(finish, m.policy, f"job {job_id}: closing the job")


def _results(plan: Plan, job_id: str, owner: str, todo: list[Chunk], done: list[ChunkResult],
             n_jobs: int | None, empty: bool,
             first: Ahead[Chunk, Early] | None) -> Iterator[ChunkResult]:
    task = functools.partial(process_chunk, plan, job_id, owner, empty_target=empty)
    if plan.mode != "python":
        yield from run_tasks(task, todo, n_jobs=n_jobs, sequential=plan.sequential,
                             in_turn=lambda chunks: _in_turn(plan, task, chunks, empty,
                                                             ahead=first))
        return
    # A Python checkpoint threads its state through the chunks in key order.
    state = max(done, key=lambda r: r.number).state if done else plan.python_state
    for result in _in_turn(plan, task, todo, empty, state, ahead=first):
        yield result
        if result.status != SUCCEEDED:
            return  # the rest cannot run without this chunk's state


def _in_turn(plan: Plan, task: Callable[..., ChunkResult], chunks: Sequence[Chunk],
             empty: bool, state: Any = None,
             ahead: Ahead[Chunk, Early] | None = None) -> Iterator[ChunkResult]:
    """The chunks one after another in this process, each one read, prepared and diffed
    while the chunk before it is written. The next chunk's work starts only once this one
    is sure to run (not cancelled, not already applied), and never outlives the job. A
    source in the target's own SQLite file is read in turn (see :mod:`mapperdsl.execute.read`).
    ``state``: the first chunk's Python checkpoint state; each next chunk gets the state the
    chunk before it returned. ``ahead``: the one to use, when started before the job was
    set up (its work is for a target with ``empty`` as it is here).
    """
    read_in_turn = _reads_in_turn(plan)
    ahead = ahead or Ahead(functools.partial(work_ahead, plan, empty))

    def early(i: int) -> Early | None:
        worked = ahead.take(chunks[i])
        if i + 1 < len(chunks):
            ahead.start(chunks[i + 1])
        return worked

    try:
        for i, chunk in enumerate(chunks):
            result = task(chunk, state,
                          early=None if read_in_turn else functools.partial(early, i))
            state = result.state
            yield result
    finally:  # stopped, interrupted, or the lease lost: nothing reads on
        ahead.close()


def _reads_in_turn(plan: Plan) -> bool:
    """A source in the target's own SQLite file is read in turn, not ahead (see
    :mod:`mapperdsl.execute.read`)."""
    source = plan.mapping.source_def.url  # type: ignore[union-attr]
    return plan.same_database and source.dialect == "sqlite"


class _Recorder:
    """The job log's writes of the chunks' results, one after another in a thread of their
    own: the next chunk (with ``n_jobs=1``, run by this thread) starts while the one before
    is recorded, instead of waiting two connections and a commit for it. Each record returns
    whether the lease was still this run's; what one raises is raised by the next check.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mapperdsl-record")
        self._records: list[Future[bool]] = []

    def add(self, record: Callable[[], bool]) -> None:
        self._records.append(self._pool.submit(record))

    def lost(self) -> bool:
        """Whether a record done so far found the lease taken; raises the first error of one
        (the run then breaks off, and the records after it no longer matter)."""
        finished: list[Future[bool]] = []
        pending: list[Future[bool]] = []
        for record in self._records:  # each asked once: one finishing now stays pending
            (finished if record.done() else pending).append(record)
        self._records = pending
        return not all([record.result() for record in finished])

    def wait(self) -> bool:
        """:meth:`lost`, once every record is done."""
        wait(self._records)
        return self.lost()

    def close(self) -> None:
        """Wait for the records under way: none outlives this. The job is closing for
        another reason by then, so what one raised is logged, not raised."""
        self._pool.shutdown(wait=True)
        for record in self._records:
            if record.exception() is not None:
                log.warning("%s: writing the job log failed: %s", self.what,
                            redact_text(str(record.exception())))


def _record(log_db: Any, plan: Plan, owner: str, result: ChunkResult,
            results: list[ChunkResult]) -> bool:
    """Write ``result`` to the job log; False (writing nothing) when the lease is lost."""
    assert plan.mapping.target_def
    with log_db() as conn, conn.begin():
        if not lease.owns(conn, lease.lease_key(plan.name, plan.mapping.target_def.table), owner):
            return False
        if result.status != SUCCEEDED:
            joblog.record_chunk(conn, result, _range(plan, result.number))
        joblog.record_progress(conn, result.job_id, results, len(plan.chunks))
    counts = counts_text(result.counts())
    level = logging.INFO if result.status != FAILED else logging.ERROR
    retried = f" after {result.attempts} attempts" if result.attempts > 1 else ""
    log.log(level, "job %s chunk %d/%d %s %s in %.2fs%s%s", result.job_id, result.number,
            len(plan.chunks), result.status, counts, result.seconds, retried,
            f": {result.error}" if result.error else "")
    return True


def _range(plan: Plan, number: int) -> str:
    return plan.chunks[number - 1].range.describe(plan.chunk_key)


def _ranges(plan: Plan) -> tuple[str, ...]:
    return tuple(_range(plan, c.number) for c in plan.chunks)


def _finish(conn: sa.Connection, plan: Plan, job_id: str, owner: str, started: datetime,
            interrupted: str | None) -> JobResult:
    assert plan.mapping.target_def
    key = lease.lease_key(plan.name, plan.mapping.target_def.table)
    with conn.begin():
        if not lease.owns(conn, key, owner, exclusive=True):
            # Presumed dead and replaced (or abandoned): the job is no longer ours to close.
            message = ("this run lost the mapping's lease (another run took the job over, or it "
                       "was abandoned); it wrote nothing more")
            log.error("job %s %s: %s", job_id, plan.name, message)
            now = datetime.now(timezone.utc)
            return JobResult(job_id=job_id, mapping=plan.name, status=FAILED, started_at=started,
                             finished_at=now, chunks=tuple(joblog.ledger(conn, job_id)),
                             message=message, decisions=plan.decisions, ranges=_ranges(plan))
        # The ledger is the truth: a worker may have committed a chunk whose result never
        # came back (it died after the commit). Chunks without a ledger row were not applied;
        # after a run that broke off, one may have been running (its worker killed).
        ledger = {r.number: r for r in joblog.ledger(conn, job_id)}
        for c in plan.chunks:
            if c.number not in ledger:
                ledger[c.number] = ChunkResult(
                    job_id, c.number, CANCELLED, attempts=0,
                    error=f"not applied: {interrupted}" if interrupted else "not started")
                joblog.record_chunk(conn, ledger[c.number], _range(plan, c.number))
        result = _result(plan, job_id, started, [ledger[c.number] for c in plan.chunks],
                         interrupted)
        joblog.finish_job(conn, plan, result)
        lease.release(conn, key, owner)
    (log.info if result.ok else log.error)("job %s %s %s: %s", job_id, plan.name, result.status,
                                            result.message or result.counts())
    return result


def _result(plan: Plan, job_id: str, started: datetime, chunks: list[ChunkResult],
            interrupted: str | None) -> JobResult:
    failed = [r for r in chunks if r.status == FAILED]
    policy = plan.mapping.policy
    rejected, read = sum(r.rejected for r in chunks), sum(r.read for r in chunks)
    if failed:
        status = FAILED
        message = (f"{len(failed)} of {len(chunks)} chunks failed; first: chunk "
                   f"{failed[0].number}: {failed[0].error}")
        if interrupted:
            message = f"{interrupted}; {message}"
    elif policy.max_reject_fraction is not None and read and \
            rejected / read > policy.max_reject_fraction:
        status = FAILED
        message = (f"{rejected} of {read} rows rejected ({rejected / read:.1%}) is past "
                   f"rejects(max_fraction={policy.max_reject_fraction})")
    elif all(r.status == SUCCEEDED for r in chunks):
        status, message = SUCCEEDED, None
    else:
        status = FAILED if interrupted and not interrupted.startswith("interrupted") else STOPPED
        message = interrupted or "stop requested: the chunks not started were cancelled"
    checkpoint = None
    if status == SUCCEEDED:
        if plan.window is not None:
            checkpoint = plan.window.high if plan.window.high is not None else plan.window.stored
        elif plan.mode == "python":
            checkpoint = chunks[-1].state
    return JobResult(job_id=job_id, mapping=plan.name, status=status, started_at=started,
                     finished_at=datetime.now(timezone.utc), chunks=tuple(chunks),
                     checkpoint=checkpoint, message=message, decisions=plan.decisions,
                     ranges=_ranges(plan))

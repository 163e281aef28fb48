"""The public verbs: plan, run, resume, abandon, request_stop.

Each stage lives in its own package and only knows the one before it; this
module and :mod:`mapperdsl.job` (the coordinator) and :mod:`mapperdsl.chunk`
(the worker) are where they are called in order.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from mapperdsl.connect import connection
from mapperdsl.dsl.url import Url
from mapperdsl.errors import CheckpointError, ExecutionError, NoSuchJobError
from mapperdsl.job import execute_job
from mapperdsl.plan.compile import compile_mapping, resolved
from mapperdsl.plan.plan import Plan
from mapperdsl.record import joblog, lease
from mapperdsl.record.results import ABANDONED, UNFINISHED, JobResult

if TYPE_CHECKING:
    from mapperdsl.dsl.mapping import Mapping

__all__ = ["abandon", "compile_mapping", "request_stop", "resume", "run"]


def run(plan: Plan, *, n_jobs: int | None = None, progress: bool | None = None,
        backend: str | None = None, scheduler: str | None = None) -> JobResult:
    """Run exactly ``plan`` (also one read back from JSON) as a new job.

    Refused with :class:`~mapperdsl.errors.LeaseHeldError` while another job of the
    mapping runs, and with :class:`~mapperdsl.errors.UnfinishedJobError` while one
    waits to be resumed or abandoned.

    Parameters
    ----------
    n_jobs
        Workers; default the mapping's ``parallel(n_jobs=...)``, else joblib's
        ``parallel_config`` (which defaults to 1).
    progress
        Show a progress bar: None shows one on a terminal or in Jupyter only.
    backend
        The joblib backend the chunks run on: None follows ``joblib.parallel_config``
        (loky processes by default); ``"dask"`` runs them on the ``distributed`` client of
        this process, ``"ray"`` on Ray; also ``"threading"``, ``"loky"``, ...
    scheduler
        A dask scheduler's address (``tcp://host:8786``) to run the chunks on.

    Examples
    --------
    >>> result = md.run(dim.plan(), n_jobs=2)   # doctest: +SKIP
    >>> result.status                           # doctest: +SKIP
    'SUCCEEDED'
    >>> md.run(plan, backend="dask", scheduler="tcp://10.0.0.5:8786")  # doctest: +SKIP
    """
    return execute_job(plan, n_jobs=n_jobs, progress=progress, backend=backend,
                       scheduler=scheduler)


def resume(job_id: str, target_url: str, *, source_url: str | None = None,
           n_jobs: int | None = None, progress: bool | None = None,
           backend: str | None = None, scheduler: str | None = None) -> JobResult:
    """Finish job ``job_id`` of the target at ``target_url``: only its chunks not applied,
    in its original window and with its original effective time.

    The job's plan comes from the job log; ``target_url`` (and ``source_url``, when
    the saved plan's source needs a password) supply the credentials. The other
    arguments are :func:`run`'s.

    Examples
    --------
    >>> md.resume("3f2a9c1b7d4e", "postgresql://etl@db/dw")   # doctest: +SKIP
    """
    target = Url.parse(target_url, argument="target_url")
    with connection(target, error=ExecutionError) as conn:
        row = joblog.job(conn, job_id)
        conn.rollback()
    if row is None:
        raise NoSuchJobError(job_id, target)
    plan = Plan.from_json(row.plan_json)
    return _resume(plan, row, target_url, source_url,
                   dict(n_jobs=n_jobs, progress=progress, backend=backend, scheduler=scheduler))


def resume_mapping(mapping: Mapping, **how: Any) -> JobResult:
    """Finish ``mapping``'s latest unfinished job (see :meth:`Mapping.resume`)."""
    row = _latest_unfinished(mapping)
    plan = Plan.from_json(row.plan_json, checkpoint=mapping.checkpoint)
    # The plan holds the mapping resolved: resolve this one alike (a column map left out
    # stands for the columns the plan found, which are then its map's)
    now = resolved(mapping, tuple(name for name, _ in plan.mapping.column_map or ())).fingerprint()
    if plan.fingerprint != now:
        raise CheckpointError(
            f"mapping {mapping.name!r} changed since job {row.job_id} was planned (fingerprint "
            f"{plan.fingerprint} -> {now}); resume it with the mapping it was planned from, or "
            f"give it up with dim.abandon()")
    assert mapping.source_def and mapping.target_def
    return _resume(plan, row, mapping.target_def.url.written, mapping.source_def.url.written,
                   how)


def _resume(plan: Plan, row: joblog.JobRow, target_url: str, source_url: str | None,
            how: dict[str, Any]) -> JobResult:
    if row.status not in UNFINISHED:
        raise CheckpointError(f"job {row.job_id} is {row.status}; only a RUNNING (dead), FAILED "
                              "or STOPPED job can be resumed")
    plan = plan.with_urls(target=target_url, source=source_url)
    return execute_job(plan, job_id=row.job_id, **how)


def abandon(job_id: str, target_url: str) -> None:
    """Give up an unfinished job: it ends ABANDONED; its applied chunks stay applied and the
    checkpoint does not move, so the next run reads the same window again."""
    target = Url.parse(target_url, argument="target_url")
    with connection(target, error=ExecutionError) as conn, conn.begin():
        row = joblog.job(conn, job_id)
        if row is None:
            raise NoSuchJobError(job_id, target)
        if row.status not in UNFINISHED:
            raise CheckpointError(f"job {job_id!r} is not unfinished in {target} "
                                  f"(status: {row.status})")
        key = lease.lease_key(row.mapping, row.target_table)
        current = lease.holder(conn, key, lock=True)
        if current and current.job_id == job_id:
            if current.alive(_lease_seconds(row), datetime.now(timezone.utc)):
                raise CheckpointError(
                    f"job {job_id} is running on host {current.host} (pid {current.pid}); stop "
                    f"it first with md.request_stop({job_id!r}, target_url)")
            lease.release(conn, key, current.owner)
        joblog.set_status(conn, job_id, ABANDONED, "abandoned by request")


def abandon_mapping(mapping: Mapping) -> str:
    """Abandon ``mapping``'s latest unfinished job; returns its id."""
    row = _latest_unfinished(mapping)
    assert mapping.target_def
    abandon(row.job_id, mapping.target_def.url.written)
    return row.job_id


def request_stop(job_id: str, target_url: str) -> None:
    """Ask a running job to stop between chunks (from any process): chunks not started are
    cancelled, running ones finish, and the job ends STOPPED, ready to be resumed."""
    target = Url.parse(target_url, argument="target_url")
    with connection(target, error=ExecutionError) as conn:
        if not joblog.request_stop(conn, job_id):
            row = joblog.job(conn, job_id)
            if row is None:
                raise NoSuchJobError(job_id, target)
            raise CheckpointError(f"job {job_id!r} is not running in {target} "
                                  f"(status: {row.status})")


def _latest_unfinished(mapping: Mapping) -> joblog.JobRow:
    missing = mapping.missing()
    if missing or mapping.target_def is None:
        raise CheckpointError("; ".join(missing))
    with connection(mapping.target_def.url, error=ExecutionError) as conn:
        joblog.ensure_tables(conn)
        row = joblog.latest_unfinished(conn, mapping.name, mapping.target_def.table)
        conn.rollback()
    if row is None:
        raise CheckpointError(f"mapping {mapping.name!r} has no unfinished job in "
                              f"{mapping.target_def.url}")
    return row


def _lease_seconds(row: joblog.JobRow) -> float:
    return float(Plan.from_json(row.plan_json, checkpoint=None, lenient=True)
                 .mapping.policy.lease_seconds)

"""Running chunk tasks with joblib: loky processes by default, any joblib backend works.

A task is a picklable function of (plan, chunk) with nothing live in it; each
worker opens its own connections. Results stream back in completion order so
the caller can keep the job log and the progress bar current.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from joblib import Parallel, delayed
from joblib.parallel import LokyBackend, get_active_backend

T = TypeVar("T")
R = TypeVar("R")


def run_tasks(fn: Callable[[T], R], items: Sequence[T], *, n_jobs: int | None,
              sequential: bool) -> Iterator[R]:
    """Yield ``fn(item)`` for every item as each finishes; ``sequential`` runs them here."""
    if sequential or n_jobs == 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    _wait_for_workers()
    parallel = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
    yield from parallel(delayed(fn)(item) for item in items)


def start_workers(n_jobs: int | None) -> None:
    """Start the worker processes of the default (loky) backend in the background, so they
    start and import mapperdsl (about a second) while the caller plans. Nothing waits for
    them unless tasks run in parallel: :func:`run_tasks` does, so one pool starts at a time.
    """
    global _starting
    backend, default_jobs = get_active_backend()
    n = n_jobs or default_jobs
    if not isinstance(backend, LokyBackend) or n is None or n == 1 or _starting is not None:
        return
    _starting = threading.Thread(target=_start, args=(n,), daemon=True, name="mapperdsl-workers")
    _starting.start()


def _wait_for_workers() -> None:
    global _starting
    if _starting is not None:
        _starting.join()
        _starting = None


def _start(n_jobs: int) -> None:
    with contextlib.suppress(Exception):  # only a head start: the run reports what breaks
        Parallel(n_jobs=n_jobs)(delayed(_ready)() for _ in range(max(n_jobs, 1)))


def _ready() -> None:
    import mapperdsl.chunk  # noqa: F401 - what every task needs, imported ahead


_starting: threading.Thread | None = None

"""Running chunk tasks with joblib: loky processes by default, any joblib backend works.

A task is a picklable function of (plan, chunk) with nothing live in it; each
worker opens its own connections. Results stream back in completion order so
the caller can keep the job log and the progress bar current.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from joblib import Parallel, delayed

T = TypeVar("T")
R = TypeVar("R")


def run_tasks(fn: Callable[[T], R], items: Sequence[T], *, n_jobs: int | None,
              sequential: bool) -> Iterator[R]:
    """Yield ``fn(item)`` for every item as each finishes; ``sequential`` runs them here."""
    if sequential or n_jobs == 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    parallel = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
    yield from parallel(delayed(fn)(item) for item in items)

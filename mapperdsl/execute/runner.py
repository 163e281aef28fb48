"""Running chunk tasks with joblib: loky processes by default, any joblib backend works.

A task is a picklable function of (plan, chunk) with nothing live in it; each
worker opens its own connections. Results stream back in completion order so
the caller can keep the job log and the progress bar current. ``dask`` runs the
tasks on a ``distributed`` cluster, ``ray`` on a Ray cluster (see docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from joblib import Parallel, delayed, parallel_config
from joblib.parallel import (
    BACKENDS,
    EXTERNAL_BACKENDS,
    LokyBackend,
    SequentialBackend,
    ThreadingBackend,
    get_active_backend,
)

from mapperdsl.errors import PlanError
from mapperdsl.execute.interrupt import coordinator_decides

SCHEDULER_SECONDS = 10  # a dask scheduler that does not answer by then is out of reach

T = TypeVar("T")
R = TypeVar("R")


def runs_here(n_jobs: int | None, sequential: bool, count: int) -> bool:
    """Whether :func:`run_tasks` runs ``count`` items in this process, one after another."""
    active, default_jobs = get_active_backend()
    local = isinstance(active, (LokyBackend, ThreadingBackend, SequentialBackend))
    one = n_jobs == 1 or (local and active.effective_n_jobs(n_jobs or default_jobs) == 1)
    return sequential or one or (count <= 1 and local)  # a cluster gets even one


def run_tasks(fn: Callable[[T], R], items: Sequence[T], *, n_jobs: int | None,
              sequential: bool,
              in_turn: Callable[[Sequence[T]], Iterator[R]] | None = None) -> Iterator[R]:
    """Yield ``fn(item)`` for every item as each finishes; ``sequential`` runs them here,
    one after another, through ``in_turn`` when given (else ``fn`` on each)."""
    if runs_here(n_jobs, sequential, len(items)):
        yield from in_turn(items) if in_turn else (fn(item) for item in items)
        return
    _wait_for_workers()
    task = delayed(coordinator_decides)  # Ctrl-C is the coordinator's to handle
    here = os.getpid()
    active, _ = get_active_backend()
    if active.supports_return_generator:
        with _workers_ignore_ctrl_c():
            parallel = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
            yield from parallel(task(fn, here, item) for item in items)
        return
    # A backend that cannot stream (Ray's): results come in batches, as each batch is done.
    batch = active.effective_n_jobs(Parallel(n_jobs=n_jobs).n_jobs)  # as joblib resolves it
    for start in range(0, len(items), batch):
        yield from Parallel(n_jobs=n_jobs)(task(fn, here, item)
                                           for item in items[start:start + batch])


class Ahead(Generic[T, R]):
    """``fn`` of the next item, worked out in a background thread while this process works on
    the current one; one at a time. ConnectorX and Polars release the GIL while they work, so
    a chunk's rows are read and prepared while the chunk before it is written. Whatever
    fails ahead is dropped: the item's own turn does it again and reports it.
    """

    def __init__(self, fn: Callable[[T], R]) -> None:
        self.fn = fn
        self._item: object = None
        self._thread: threading.Thread | None = None
        self._value: list[R] = []

    def start(self, item: T) -> None:
        """Work ``item`` out in the background (a result not taken yet is dropped)."""
        self.close()
        value: list[R] = []

        def work() -> None:
            with contextlib.suppress(BaseException):  # its own turn does it again, and says
                value.append(self.fn(item))

        self._item, self._value = item, value
        self._thread = threading.Thread(target=work, daemon=True, name="mapperdsl-ahead")
        self._thread.start()

    def take(self, item: T) -> R | None:
        """What was worked out for ``item``, waiting for it (and starting it now if it was
        not started); None if it failed."""
        if self._thread is None or item is not self._item:
            self.start(item)
        value = self._value
        self.close()
        return value[0] if value else None

    def close(self) -> None:
        """Wait for the work under way, if any, and drop it: nothing runs on after this."""
        if self._thread is not None:
            self._thread.join()
        self._thread, self._item, self._value = None, None, []


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
    with contextlib.suppress(Exception), _workers_ignore_ctrl_c():  # only a head start: the
        Parallel(n_jobs=n_jobs)(delayed(_ready)() for _ in range(max(n_jobs, 1)))  # run says


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """loky workers started inside ignore Ctrl-C from their start: a terminal sends it to
    every process of the group, and a worker it stopped, even an idle one, would break the
    pool and kill the chunks running in the others. The coordinator decides."""
    active, _ = get_active_backend()
    if type(active) is not LokyBackend or "initializer" in active.backend_kwargs:
        yield
        return
    with parallel_config(backend=LokyBackend(**active.backend_kwargs,
                                             initializer=_ignore_ctrl_c)):
        yield


def _ignore_ctrl_c() -> None:  # run by each loky worker as it starts
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ready() -> None:
    import mapperdsl.chunk  # noqa: F401 - what every task needs, imported ahead


_starting: threading.Thread | None = None


@contextlib.contextmanager
def backend(name: str | None, scheduler: str | None = None) -> Iterator[None]:
    """Run the tasks inside on joblib backend ``name`` (None: the caller's
    ``joblib.parallel_config``, else loky). ``dask`` takes the ``distributed`` client of
    this process, or connects to ``scheduler`` (``tcp://host:8786``) for the block.
    """
    if scheduler is not None and name not in (None, "dask"):
        raise PlanError(f"a scheduler address is for backend='dask', not backend={name!r}")
    name = "dask" if scheduler is not None else name
    if name is None:
        yield
    elif name == "dask":
        with _dask_client(scheduler) as client, parallel_config(backend="dask", client=client):
            yield
    elif name == "ray":
        _needs("ray", "ray.util.joblib")
        import ray
        from ray.util.joblib import register_ray

        if not ray.is_initialized():  # a local Ray; ray.init(address=...) first joins a cluster
            ray.init()
        register_ray()
        with parallel_config(backend="ray", n_jobs=-1):  # all its CPUs, unless n_jobs says
            yield
    elif name in BACKENDS or name in EXTERNAL_BACKENDS:
        with parallel_config(backend=name):
            yield
    else:
        allowed = sorted({*BACKENDS, *EXTERNAL_BACKENDS, "ray"})
        raise PlanError(f"unknown joblib backend {name!r}; allowed: {', '.join(allowed)} "
                        "(or one registered with joblib.register_parallel_backend)")


@contextlib.contextmanager
def _dask_client(scheduler: str | None) -> Iterator[Any]:
    _needs("dask", "distributed")
    from distributed import Client, get_client
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    if scheduler is None:
        try:
            current = get_client()
        except ValueError:
            raise PlanError("backend='dask' runs on a dask.distributed Client: create one first "
                            "(Client() starts a local cluster, Client('tcp://host:8786') joins a "
                            "running one), or pass scheduler='tcp://host:8786'") from None
        yield current
        return
    try:  # the address's form first (a Client half made of a malformed one hangs in its
        # __del__); its host is looked up by the Client, within the time it is given
        scheme, location = parse_address(scheduler)
        get_backend(scheme)
        if scheme != "inproc":
            parse_host_port(location)
    except (ValueError, TypeError) as exc:
        raise PlanError(f"scheduler {scheduler!r} is not a dask scheduler address ({exc}); "
                        "expected one like tcp://host:8786") from None
    try:
        client = Client(scheduler, set_as_default=False, timeout=SCHEDULER_SECONDS)
    except OSError as exc:
        raise PlanError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
    with client:
        yield client


def _needs(extra: str, module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise PlanError(f"backend={extra!r} needs {module.split('.')[0]}: "
                        f"pip install 'mapperdsl[{extra}]'") from None

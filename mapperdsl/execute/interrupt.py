"""Ctrl-C during a job: the first press stops it between chunks, a second one at once.

The first press raises nothing: a KeyboardInterrupt raised between two bytecodes
can land inside a driver's commit or close and leave a connection open (on
SQLite, holding the write lock the job then waits for to close itself). It sets a
flag, and a watcher thread — not the signal handler, which may run in the middle
of the main thread's own logging or database work — tells the user and asks the
job to stop: the running chunks finish, the ones not started cancel themselves.
A second press raises KeyboardInterrupt where the main thread is.

A terminal (and Jupyter's interrupt button) sends Ctrl-C to every process of the
group, worker processes included: loky workers ignore it from their start (see
:mod:`mapperdsl.execute.runner`), and :func:`coordinator_decides` makes any other
worker process ignore it while it runs a chunk, so the coordinator alone decides.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

R = TypeVar("R")


class CtrlC:
    """What the handler of :func:`first_press_stops` saw: ``pressed`` is set by the first
    Ctrl-C. Once ``closing`` is set (the job is closing itself), a press raises nothing:
    interrupted there, the job would stay RUNNING with its lease held."""

    def __init__(self) -> None:
        self.pressed = threading.Event()
        self.closing = False


@contextlib.contextmanager
def first_press_stops(on_press: Callable[[], None]) -> Iterator[CtrlC]:
    """Within the block, the first Ctrl-C sets ``pressed`` and calls ``on_press`` in a thread
    of its own (joined on exit); a second one raises KeyboardInterrupt, until ``closing``.
    Outside the main thread, or when the program has its own SIGINT handler, Ctrl-C is
    left as it is."""
    state = CtrlC()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() \
            or previous is not signal.default_int_handler:
        yield state
        return
    done = threading.Event()

    def watch() -> None:
        state.pressed.wait()
        if not done.is_set():
            on_press()

    def handler(signum: int, frame: Any) -> None:
        if state.pressed.is_set() and not state.closing:  # the second press: at once
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        state.pressed.set()  # only this: the watcher does the rest

    watcher = threading.Thread(target=watch, daemon=True, name="mapperdsl-ctrl-c")
    try:
        watcher.start()
        signal.signal(signal.SIGINT, handler)
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)
        if not state.pressed.is_set():
            done.set()
            state.pressed.set()  # wakes the watcher, which does nothing
        watcher.join()


def coordinator_decides(fn: Callable[..., R], coordinator: int, *args: Any) -> R:
    """``fn(*args)`` with Ctrl-C ignored, when it runs in the main thread of a process other
    than the coordinator's (a worker process of a backend other than loky, whose workers
    ignore it from their start); elsewhere as it is."""
    if os.getpid() == coordinator or threading.current_thread() is not threading.main_thread():
        return fn(*args)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return fn(*args)
    finally:
        signal.signal(signal.SIGINT, previous)

"""The parts a mapping is made of: small frozen values, each checked when it is made."""

from __future__ import annotations

import base64
import importlib
import io
import os
import runpy
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import polars as pl

from mapperdsl.dsl.url import Url
from mapperdsl.errors import DeclarationError

SCD1_DELETES = ("ignore", "delete", "close")
SCD2_DELETES = ("ignore", "close")


@dataclass(frozen=True)
class Source:
    """Where rows come from: a table or a SQL query, and the database's URL."""

    url: Url
    table: str | None = None
    query: str | None = None

    @property
    def label(self) -> str:
        return self.table if self.table is not None else "query"


@dataclass(frozen=True)
class Target:
    """The dimension table rows go to, and its database's URL."""

    url: Url
    table: str


@dataclass(frozen=True)
class Scd1:
    """Type 1: overwrite changed rows in place.

    ``deletes``: ``ignore`` keeps rows whose key left the source, ``delete``
    removes them, ``close`` sets ``deleted_flag`` to true (a soft delete).
    """

    track: tuple[str, ...] | None = None
    deletes: str = "ignore"
    deleted_flag: str = "is_deleted"
    hash_column: str = "row_hash"

    type = 1

    def __post_init__(self) -> None:
        _check_choice("scd1(deletes=...)", self.deletes, SCD1_DELETES)
        _check_names("scd1", deleted_flag=self.deleted_flag, hash_column=self.hash_column)

    @property
    def system_columns(self) -> tuple[str, ...]:
        flag = (self.deleted_flag,) if self.deletes == "close" else ()
        return (*flag, self.hash_column)


@dataclass(frozen=True)
class Scd2:
    """Type 2: keep history; a change closes the current version and adds a new one.

    ``deletes``: ``ignore`` keeps the current version of a key that left the
    source, ``close`` closes it (``valid_to`` set, ``is_current`` false).
    """

    track: tuple[str, ...] | None = None
    deletes: str = "ignore"
    valid_from: str = "valid_from"
    valid_to: str = "valid_to"
    is_current: str = "is_current"
    hash_column: str = "row_hash"

    type = 2

    def __post_init__(self) -> None:
        _check_choice("scd2(deletes=...)", self.deletes, SCD2_DELETES)
        _check_names(
            "scd2",
            valid_from=self.valid_from,
            valid_to=self.valid_to,
            is_current=self.is_current,
            hash_column=self.hash_column,
        )

    @property
    def system_columns(self) -> tuple[str, ...]:
        return (self.valid_from, self.valid_to, self.is_current, self.hash_column)


@dataclass(frozen=True)
class Incremental:
    """KEY checkpoint: read rows with ``stored - lag < columns <= high-water mark``."""

    columns: tuple[str, ...]
    lag: int | float | timedelta | None = None

    def __post_init__(self) -> None:
        if not self.columns or not all(isinstance(c, str) and c for c in self.columns):
            raise DeclarationError(
                f"`incremental(...)` needs one or more column names, got {list(self.columns)!r}"
            )
        if self.lag is not None:
            if len(self.columns) > 1:
                raise DeclarationError(
                    f"`incremental(lag=...)` works on one checkpoint column, got {len(self.columns)}"
                    f" columns {list(self.columns)!r}"
                )
            if isinstance(self.lag, bool) or not isinstance(self.lag, (int, float, timedelta)):
                raise DeclarationError(
                    f"`incremental(lag=...)` must be a number or a timedelta, got {self.lag!r}"
                )
            if (self.lag.total_seconds() if isinstance(self.lag, timedelta) else self.lag) < 0:
                raise DeclarationError(f"`incremental(lag=...)` must be >= 0, got {self.lag!r}")


@dataclass(frozen=True)
class PythonCheckpoint:
    """PYTHON checkpoint: ``fn(batch, state) -> (rows_to_keep, new_state)``.

    ``fn`` sees the source's rows in key order, one batch (a chunk) at a time, with
    the state the previous batch returned (the stored state for the first). The
    state must be JSON-serialisable. It needs the whole ordered stream, so a plan
    with it runs its chunks one after another, in this process.
    """

    fn: Callable[[pl.DataFrame, Any], tuple[pl.DataFrame, Any]]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise DeclarationError(f"`incremental(python=...)` must be a function "
                                   f"fn(batch, state) -> (rows, state), got {self.fn!r}")

    @property
    def reference(self) -> str:
        """``module:qualname`` of the function, how a saved plan names it; a function of a
        file that no import reaches (a mapping file the ``mapperdsl`` command ran) is named
        by the file instead, ``/path/to/file.py:qualname``."""
        module = getattr(self.fn, "__module__", "?")
        qualname = getattr(self.fn, "__qualname__", "?")
        file = getattr(self.fn, "__globals__", {}).get("__file__")
        if module == FILE_MODULE and file:
            return f"{os.path.abspath(file)}:{qualname}"
        return f"{module}:{qualname}"

    @classmethod
    def load(cls, reference: str) -> PythonCheckpoint:
        module, _, name = reference.rpartition(":")
        if "<" in name:
            raise DeclarationError(
                f"the Python checkpoint function {reference} cannot be loaded from a saved plan: "
                "define it at module level (not a lambda or a nested function)")
        try:
            value: Any = (SimpleNamespace(**run_file(module)) if module.endswith(".py")
                          else importlib.import_module(module))
            for part in name.split("."):
                value = getattr(value, part)
        except (ImportError, OSError, AttributeError) as exc:
            raise DeclarationError(
                f"the Python checkpoint function {reference} of the saved plan cannot be loaded "
                f"({type(exc).__name__}: {exc}): run where its module can be imported (from its "
                "folder, or with that folder on PYTHONPATH)") from None
        return cls(value)


FILE_MODULE = "mapperdsl_mappings"  # the module name of a file run by run_file


def run_file(path: str) -> dict[str, Any]:
    """Run the Python file ``path`` as a module (not as ``__main__``), its folder first on
    ``sys.path`` as ``python path`` would put it, so that it imports the modules beside it;
    returns its globals."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return runpy.run_path(path, run_name=FILE_MODULE)


@dataclass(frozen=True)
class Chunking:
    """How the key range is cut: about ``rows`` rows per chunk, exactly ``count`` chunks, or
    (neither, the default) as many rows as make about :data:`CHUNK_BYTES` of data, from
    the source's row width, between :data:`MIN_ROWS` and :data:`MAX_ROWS`."""

    rows: int | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if self.rows is not None and self.count is not None:
            raise DeclarationError(
                f"`chunks(...)` takes one of rows= or count= (or neither, to size chunks from "
                f"the data), got rows={self.rows!r}, count={self.count!r}"
            )
        for name, value in (("rows", self.rows), ("count", self.count)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise DeclarationError(
                    f"`chunks({name}=...)` must be a whole number >= 1, got {value!r}"
                )

    def rows_for(self, row_bytes: int) -> int:
        """Rows per chunk when sized from the data: ``row_bytes`` is the source's row width."""
        return self.rows or min(MAX_ROWS, max(MIN_ROWS, CHUNK_BYTES // max(row_bytes, 1)))

    def describe(self, row_bytes: int | None = None) -> str:
        if self.count:
            return f"count={self.count}"
        if self.rows:
            return f"at most {self.rows:,} rows each"
        if row_bytes is None:
            return f"sized from the data: about {CHUNK_BYTES >> 20} MiB each"
        return (f"at most {self.rows_for(row_bytes):,} rows each: {CHUNK_BYTES >> 20} MiB at "
                f"about {row_bytes} bytes a row")


CHUNK_BYTES = 32 << 20  # of source data per chunk; a worker's peak is a few times this
MIN_ROWS, MAX_ROWS = 10_000, 1_000_000


@dataclass(frozen=True)
class Policy:
    """How a run meets faults: retries of transient errors, fail-fast, reject limits, the lease.

    ``attempts``: tries per chunk for transient errors (1 = no retry); the n-th retry
    waits about ``base_delay * 2**(n-1)`` seconds (capped at ``max_delay``, with
    jitter). ``max_rejects`` / ``max_reject_fraction``: past either the job fails and
    the chunk that crossed it is not applied. ``lease_seconds``: a running job's lease
    is taken over when its heartbeat is older than this.
    """

    attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 30.0
    fail_fast: bool = False
    max_rejects: int | None = None
    max_reject_fraction: float | None = None
    lease_seconds: float = 60.0

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            problems.append(f"`retries(attempts=...)` must be a whole number >= 1, got {self.attempts!r}")
        for name, argument, least in (("base_delay", "retries(base_delay=...)", 0),
                                      ("max_delay", "retries(max_delay=...)", 0),
                                      ("lease_seconds", "lease(seconds=...)", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least:
                problems.append(f"`{argument}` must be a number of seconds >= {least}, got {value!r}")
        if self.max_rejects is not None and (isinstance(self.max_rejects, bool) or not isinstance(
                self.max_rejects, int) or self.max_rejects < 0):
            problems.append(f"`rejects(max_rows=...)` must be a whole number >= 0, got "
                            f"{self.max_rejects!r}")
        fraction = self.max_reject_fraction
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(
                fraction, (int, float)) or not 0 <= fraction <= 1):
            problems.append(f"`rejects(max_fraction=...)` must be between 0 and 1, got {fraction!r}")
        if problems:
            raise DeclarationError(problems)

    def delay(self, retry: int, jitter: float) -> float:
        """Seconds to wait before retry number ``retry`` (1-based); ``jitter`` in [0, 1)."""
        return min(self.max_delay, self.base_delay * 2 ** (retry - 1)) * (0.5 + jitter)


class ColumnMap:
    """Target column name -> Polars expression, in order; compared by the expressions' bytes."""

    __slots__ = ("_items", "_bytes")

    def __init__(self, items: Iterable[tuple[str, pl.Expr]]) -> None:
        self._items = tuple(items)
        self._bytes = tuple((name, expr.meta.serialize()) for name, expr in self._items)

    @classmethod
    def build(cls, spec: dict[str, str | pl.Expr]) -> ColumnMap:
        problems: list[str] = []
        items: list[tuple[str, pl.Expr]] = []
        for name, value in spec.items():
            if isinstance(value, str):
                items.append((name, pl.col(value)))
            elif isinstance(value, pl.Expr):
                items.append((name, value))
            else:
                problems.append(
                    f"`columns({name}=...)` must be a source column name or a Polars expression, "
                    f"got {type(value).__name__} {value!r}"
                )
        if problems:
            raise DeclarationError(problems)
        return cls(items)

    def __iter__(self) -> Iterator[tuple[str, pl.Expr]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return any(n == name for n, _ in self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ColumnMap) and self._bytes == other._bytes

    def __hash__(self) -> int:
        return hash(self._bytes)

    def __repr__(self) -> str:
        return "ColumnMap(" + ", ".join(f"{n}={describe(e)}" for n, e in self._items) + ")"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ColumnMap.from_json, (self.to_json(),))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self._items)

    def expr(self, name: str) -> pl.Expr:
        return dict(self._items)[name]

    def plain_source(self, name: str) -> str | None:
        """The source column a target column copies unchanged, or None for an expression."""
        expr = self.expr(name)
        return expr.meta.output_name() if expr.meta.is_column() else None

    def source_columns(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for _, expr in self._items:
            for root in expr.meta.root_names():
                seen.setdefault(root, None)
        return tuple(seen)

    def with_first(self, name: str, expr: pl.Expr) -> ColumnMap:
        return ColumnMap(((name, expr), *self._items))

    def to_json(self) -> list[list[str]]:
        return [[n, base64.b64encode(b).decode()] for n, b in self._bytes]

    @classmethod
    def from_json(cls, data: list[list[str]]) -> ColumnMap:
        return cls(
            (n, pl.Expr.deserialize(io.BytesIO(base64.b64decode(b)))) for n, b in data
        )


def describe(expr: pl.Expr) -> str:
    """A short text for an expression: the column name when it only copies one."""
    if expr.meta.is_column():
        return repr(expr.meta.output_name())
    return str(expr)


def as_names(value: str | Iterable[str] | None, argument: str) -> tuple[str, ...] | None:
    """A column name or a list of them, as a tuple; a clear error for anything else."""
    if value is None:
        return None
    if not isinstance(value, (str, Iterable)) or isinstance(value, (bytes, dict)):
        raise DeclarationError(
            f"`{argument}` must be a column name or a non-empty list of names, got {value!r}")
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise DeclarationError(
            f"`{argument}` must be a column name or a non-empty list of names, got {value!r}"
        )
    if len(set(names)) != len(names):
        raise DeclarationError(f"`{argument}` names a column twice: {list(names)!r}")
    return names


def _check_choice(argument: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise DeclarationError(
            f"`{argument}` must be one of {', '.join(map(repr, allowed))}, got {value!r}"
        )


def _check_names(call: str, **names: str) -> None:
    for argument, value in names.items():
        if not isinstance(value, str) or not value.strip():
            raise DeclarationError(f"`{call}({argument}=...)` must be a column name, got {value!r}")
    values = list(names.values())
    if len(set(values)) != len(values):
        raise DeclarationError(f"`{call}(...)` column names must differ, got {names!r}")

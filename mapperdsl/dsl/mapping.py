"""The fluent mapping: what the user declared, frozen, checked, no I/O.

Every builder call returns a new :class:`Mapping` (``dataclasses.replace``), so
re-running a notebook cell never applies a step twice and a mapping can serve
as a template. ``plan()`` and ``run()`` hand the mapping to :mod:`mapperdsl.api`.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import polars as pl

from mapperdsl.dsl.parts import (
    Chunking,
    ColumnMap,
    Incremental,
    Policy,
    PythonCheckpoint,
    Scd1,
    Scd2,
    Source,
    Target,
    as_names,
    describe,
)
from mapperdsl.dsl.url import TARGET_DIALECTS, Url
from mapperdsl.errors import DeclarationError

if TYPE_CHECKING:
    from datetime import datetime

    from mapperdsl.plan.plan import Plan
    from mapperdsl.record.results import JobResult


def mapping(name: str) -> Mapping:
    """Start a mapping called ``name`` (the job log and checkpoints are kept under it).

    Examples
    --------
    >>> import mapperdsl as md
    >>> m = md.mapping("dim_customer").source("sqlite:///shop.db", table="customer").key("id")
    >>> m.name
    'dim_customer'
    """
    if not isinstance(name, str) or not name.strip():
        raise DeclarationError(f"`mapping(name)` must be a non-empty string, got {name!r}")
    return Mapping(name=name)


@dataclass(frozen=True)
class Mapping:
    """A declared load of one source into one dimension table. Build it with :func:`mapping`."""

    name: str
    source_def: Source | None = None
    key_columns: tuple[str, ...] | None = None
    column_map: ColumnMap | None = None
    scd: Scd1 | Scd2 = Scd1()
    checkpoint: Incremental | PythonCheckpoint | None = None
    chunking: Chunking = Chunking()
    target_def: Target | None = None
    n_jobs: int | None = None
    policy: Policy = Policy()

    # -- builder -------------------------------------------------------------------------

    def source(self, url: str | Url, *, table: str | None = None,
               query: str | None = None) -> Mapping:
        """Read from ``table`` or from the SQL ``query`` in the database at ``url``."""
        if (table is None) == (query is None):
            raise DeclarationError(
                f"`source(...)` takes exactly one of table= or query=, got table={table!r}, "
                f"query={'...' if query else query!r}"
            )
        for argument, value in (("table", table), ("query", query)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DeclarationError(f"`source({argument}=...)` must be a non-empty string, "
                                       f"got {value!r}")
        if query is not None and query.strip().rstrip(";").count(";"):
            raise DeclarationError("`source(query=...)` must be one SELECT statement, got several")
        src = Source(Url.parse(url, argument="source(url)"), table=table,
                     query=query.strip().rstrip(";") if query else None)
        return self._with(source_def=src)

    def key(self, columns: str | Iterable[str]) -> Mapping:
        """The business key: one column or a list; chunks are cut on its first column."""
        return self._with(key_columns=as_names(columns, "key(...)"))

    def columns(self, **columns: str | pl.Expr) -> Mapping:
        """Target column = source column name or Polars expression, in target order."""
        if not columns:
            raise DeclarationError("`columns(...)` needs at least one target=source pair")
        return self._with(column_map=ColumnMap.build(columns))

    def scd1(self, *, deletes: str = "ignore", track: str | Iterable[str] | None = None,
             deleted_flag: str = "is_deleted", hash_column: str = "row_hash") -> Mapping:
        """Type 1 history: overwrite in place. ``deletes``: ignore, delete or close (soft)."""
        return self._with(scd=Scd1(track=as_names(track, "scd1(track=...)"), deletes=deletes,
                                   deleted_flag=deleted_flag, hash_column=hash_column))

    def scd2(self, *, track: str | Iterable[str] | None = None, deletes: str = "ignore",
             valid_from: str = "valid_from", valid_to: str = "valid_to",
             is_current: str = "is_current", hash_column: str = "row_hash") -> Mapping:
        """Type 2 history: close the current version and add a new one on each change."""
        return self._with(scd=Scd2(track=as_names(track, "scd2(track=...)"), deletes=deletes,
                                   valid_from=valid_from, valid_to=valid_to,
                                   is_current=is_current, hash_column=hash_column))

    def incremental(self, columns: str | Iterable[str] | None = None, *,
                    lag: int | float | timedelta | None = None,
                    python: Callable[[pl.DataFrame, Any], tuple[pl.DataFrame, Any]] | None = None,
                    ) -> Mapping:
        """KEY checkpoint: each run reads only rows past the stored value of ``columns``.

        Or a PYTHON checkpoint: ``python=fn`` with ``fn(batch, state) -> (rows, state)``
        sees the source in key order and keeps what it returns (runs sequentially).
        """
        if (columns is None) == (python is None):
            raise DeclarationError("`incremental(...)` takes checkpoint columns or python=fn, "
                                   f"exactly one; got columns={columns!r}, python={python!r}")
        if python is not None:
            if lag is not None:
                raise DeclarationError("`incremental(lag=...)` works with checkpoint columns, "
                                       "not with python=")
            return self._with(checkpoint=PythonCheckpoint(python))
        names = as_names(columns, "incremental(...)")
        assert names is not None
        return self._with(checkpoint=Incremental(columns=names, lag=lag))

    def retries(self, *, attempts: int = 3, base_delay: float = 0.5,
                max_delay: float = 30.0) -> Mapping:
        """Retry a chunk on transient errors (lost connection, deadlock, locked database)."""
        return self._with(policy=replace(self.policy, attempts=attempts, base_delay=base_delay,
                                         max_delay=max_delay))

    def fail_fast(self) -> Mapping:
        """Cancel the chunks not started yet as soon as one chunk fails."""
        return self._with(policy=replace(self.policy, fail_fast=True))

    def rejects(self, *, max_rows: int | None = None,
                max_fraction: float | None = None) -> Mapping:
        """Fail the job past this many rejected rows, or this fraction of the rows read."""
        return self._with(policy=replace(self.policy, max_rejects=max_rows,
                                         max_reject_fraction=max_fraction))

    def lease(self, *, seconds: float) -> Mapping:
        """Take over a running job's lease when its heartbeat is older than ``seconds``."""
        return self._with(policy=replace(self.policy, lease_seconds=seconds))

    def full(self) -> Mapping:
        """Read the whole source on every run (the default; the only mode that sees deletes)."""
        return self._with(checkpoint=None)

    def chunks(self, *, rows: int | None = None, count: int | None = None) -> Mapping:
        """About ``rows`` rows per chunk, or exactly ``count`` key-range chunks; neither (the
        default) sizes chunks from the source's row width (about 32 MiB of data each)."""
        return self._with(chunking=Chunking(rows=rows, count=count))

    def parallel(self, *, n_jobs: int | None) -> Mapping:
        """Workers to run chunks on (joblib ``n_jobs``); None follows joblib.parallel_config."""
        check_n_jobs(n_jobs, "parallel(n_jobs=...)")
        return self._with(n_jobs=n_jobs)

    def target(self, url: str | Url, *, table: str) -> Mapping:
        """Write to the dimension ``table`` in the database at ``url`` (created when missing)."""
        if not isinstance(table, str) or not table.strip():
            raise DeclarationError(f"`target(table=...)` must be a non-empty string, got {table!r}")
        parsed = Url.parse(url, argument="target(url)")
        if parsed.dialect not in TARGET_DIALECTS:
            raise DeclarationError(f"`target(url)` uses the database {parsed.dialect!r}, which "
                                   f"mapperdsl reads from but does not write to; targets: "
                                   f"{', '.join(TARGET_DIALECTS)}")
        return self._with(target_def=Target(parsed, table=table))

    # -- actions (delegated to mapperdsl.api) ---------------------------------------------

    def plan(self, *, effective_time: datetime | None = None,
             allow_source_changes: bool = False) -> Plan:
        """Compile the dry run: reads metadata and statistics only, writes nothing.

        ``effective_time`` fixes the job's validity time (default: now);
        ``allow_source_changes`` accepts source columns retyped since the last success.
        """
        from mapperdsl.api import compile_mapping

        return compile_mapping(self, effective_time=effective_time,
                               allow_source_changes=allow_source_changes)

    def run(self, *, n_jobs: int | None = None, progress: bool | None = None,
            backend: str | None = None, scheduler: str | None = None) -> JobResult:
        """Plan and run now; returns the :class:`~mapperdsl.record.results.JobResult`.
        ``backend`` and ``scheduler``: where the chunks run (see :func:`mapperdsl.run`)."""
        from mapperdsl.api import compile_mapping
        from mapperdsl.execute.runner import start_workers
        from mapperdsl.job import execute_job

        check_n_jobs(n_jobs, "run(n_jobs=...)")  # before the plan reads anything
        def ranges(count: int) -> None:  # more than one: the workers start while the key
            if count > 1 and not isinstance(self.checkpoint, PythonCheckpoint) \
                    and backend is None and scheduler is None:  # is walked for them
                start_workers(n_jobs or self.n_jobs)

        return execute_job(compile_mapping(self, on_ranges=ranges), n_jobs=n_jobs,
                           progress=progress, backend=backend, scheduler=scheduler,
                           just_planned=True)

    def resume(self, *, n_jobs: int | None = None, progress: bool | None = None,
               backend: str | None = None, scheduler: str | None = None) -> JobResult:
        """Finish this mapping's latest unfinished job: only its chunks not yet applied."""
        from mapperdsl.api import resume_mapping

        check_n_jobs(n_jobs, "resume(n_jobs=...)")
        return resume_mapping(self, n_jobs=n_jobs, progress=progress, backend=backend,
                              scheduler=scheduler)

    def abandon(self) -> str:
        """Give up this mapping's latest unfinished job (its applied chunks stay applied)."""
        from mapperdsl.api import abandon_mapping

        return abandon_mapping(self)

    # -- derived --------------------------------------------------------------------------

    @property
    def tracked(self) -> tuple[str, ...]:
        """The columns whose change makes a new version (all mapped non-key ones by default)."""
        if self.scd.track is not None:
            return self.scd.track
        keys = self.key_columns or ()
        return tuple(n for n in (self.column_map.names if self.column_map else ()) if n not in keys)

    def missing(self) -> list[str]:
        """What must still be declared before the mapping can be planned."""
        needs = [("source", self.source_def), ("key", self.key_columns),
                 ("target", self.target_def)]
        return [f"`{what}(...)` is not declared" for what, value in needs if value is None]

    def fingerprint(self) -> str:
        """A hash of what changes the data written (source, key, expressions, history) — not
        how it is read (checkpoint, chunks, workers, retries)."""
        data = self.to_dict()
        for side in ("source", "target"):
            if data[side]:
                data[side]["url"] = Url(data[side]["url"]).redacted
        for how_not_what in ("n_jobs", "chunking", "name", "policy", "checkpoint"):
            data.pop(how_not_what)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # -- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        src, dst, scd, ck = self.source_def, self.target_def, self.scd, self.checkpoint
        return {
            "name": self.name,
            "source": src and {"url": src.url.to_json(password_variable="MAPPERDSL_SOURCE_PASSWORD"),
                               "table": src.table, "query": src.query},
            "key": list(self.key_columns) if self.key_columns else None,
            "columns": self.column_map.to_json() if self.column_map else None,
            "scd": {"type": scd.type, **{k: (list(v) if isinstance(v, tuple) else v)
                                         for k, v in scd.__dict__.items()}},
            "checkpoint": _checkpoint_to_json(ck),
            "chunking": {"rows": self.chunking.rows, "count": self.chunking.count},
            "target": dst and {"url": dst.url.to_json(password_variable="MAPPERDSL_TARGET_PASSWORD"),
                               "table": dst.table},
            "n_jobs": self.n_jobs,
            "policy": dict(self.policy.__dict__),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, checkpoint: Any = None,
                  lenient: bool = False) -> Mapping:
        """The mapping :meth:`to_dict` wrote; ``checkpoint`` replaces a Python checkpoint that
        cannot be imported, ``lenient`` drops it (to read the other settings)."""
        scd_data = dict(data["scd"])
        scd_type = scd_data.pop("type")
        if scd_data.get("track") is not None:
            scd_data["track"] = tuple(scd_data["track"])
        ck = data["checkpoint"]
        return cls(
            name=data["name"],
            source_def=data["source"] and Source(Url.parse(data["source"]["url"]),
                                                 table=data["source"]["table"],
                                                 query=data["source"]["query"]),
            key_columns=tuple(data["key"]) if data["key"] else None,
            column_map=ColumnMap.from_json(data["columns"]) if data["columns"] else None,
            scd=(Scd2 if scd_type == 2 else Scd1)(**scd_data),
            checkpoint=(checkpoint if isinstance(checkpoint, PythonCheckpoint) and ck
                        and "python" in ck else None if lenient and ck and "python" in ck
                        else _checkpoint_from_json(ck)),
            chunking=Chunking(**data["chunking"]),
            target_def=data["target"] and Target(Url.parse(data["target"]["url"]),
                                                 table=data["target"]["table"]),
            n_jobs=data["n_jobs"],
            policy=Policy(**data.get("policy", {})),
        )

    # -- display --------------------------------------------------------------------------

    def __repr__(self) -> str:
        src = f"{self.source_def.url} {self.source_def.label}" if self.source_def else "?"
        dst = f"{self.target_def.url} {self.target_def.table}" if self.target_def else "?"
        mode = ("full" if self.checkpoint is None else "python"
                if isinstance(self.checkpoint, PythonCheckpoint) else "incremental")
        key = ",".join(self.key_columns) if self.key_columns else "?"
        return f"<Mapping {self.name}: {src} -> {dst}, key={key}, scd{self.scd.type}, {mode}>"

    def __str__(self) -> str:
        return "\n".join(self._lines())

    def explain(self) -> str:
        """The mapping as a text tree."""
        return str(self)

    def _lines(self) -> list[str]:
        src, dst, scd = self.source_def, self.target_def, self.scd
        lines = [f"Mapping {self.name}"]
        if src:
            what = f"table {src.table}" if src.table else f"query {src.query}"
            lines.append(f"  source  {src.url}  {what}")
        lines.append(f"  key     {', '.join(self.key_columns) if self.key_columns else '?'}")
        lines.append("  columns")
        for name, expr in self.column_map or ():
            lines.append(f"    {name} = {describe(expr)}")
        if self.column_map is None:
            lines.append("    (every source column, as it is)")
        history = f"scd{scd.type}, deletes={scd.deletes}, track={', '.join(self.tracked) or '?'}"
        lines.append(f"  history {history}")
        ck = self.checkpoint
        if isinstance(ck, Incremental):
            lag = f", lag {ck.lag}" if ck.lag is not None else ""
            lines.append(f"  checkpoint incremental on {', '.join(ck.columns)}{lag}")
        elif isinstance(ck, PythonCheckpoint):
            lines.append(f"  checkpoint python {ck.reference} (runs sequentially)")
        else:
            lines.append("  checkpoint full (every run reads the whole source)")
        chunking = self.chunking
        lines.append(f"  chunks  {chunking.describe()}")
        if dst:
            lines.append(f"  target  {dst.url}  table {dst.table}")
        return lines

    def _repr_html_(self) -> str:
        from mapperdsl.display import html_table

        src, dst = self.source_def, self.target_def
        head = (f"<b>Mapping {html.escape(self.name)}</b>: "
                f"{html.escape(f'{src.url} {src.label}' if src else '?')} &rarr; "
                f"{html.escape(f'{dst.url} {dst.table}' if dst else '?')}")
        rows = [(n, describe(e), "key" if n in (self.key_columns or ()) else
                 "tracked" if n in self.tracked else "") for n, e in self.column_map or ()]
        return head + html_table(("target column", "from", "role"), rows) + "<pre>" + \
            html.escape(str(self)) + "</pre>"

    # -- checks ---------------------------------------------------------------------------

    def _with(self, **changes: Any) -> Mapping:
        new = replace(self, **changes)
        problems = new._problems()
        if problems:
            raise DeclarationError(problems)
        return new

    def _problems(self) -> list[str]:
        """Cross-part mistakes visible without a database, among the parts declared so far."""
        problems = []
        scd, keys, cols = self.scd, self.key_columns, self.column_map
        if cols is not None and keys is not None:
            for key in keys:
                if key in cols and cols.plain_source(key) is None:
                    problems.append(f"key column {key!r} must copy a source column (e.g. "
                                    f"{key}={key!r}), got the expression {describe(cols.expr(key))}")
        if scd.track is not None:
            if keys is not None and set(scd.track) & set(keys):
                problems.append(f"`scd{scd.type}(track=...)` must not name key columns, got "
                                f"{sorted(set(scd.track) & set(keys))!r}")
            if cols is not None:
                unmapped = [c for c in scd.track if c not in cols]
                if unmapped:
                    problems.append(f"`scd{scd.type}(track=...)` names columns that are not mapped: "
                                    f"{unmapped!r}. Mapped: {', '.join(cols.names)}")
        if cols is not None:
            clash = [c for c in scd.system_columns if c in cols]
            if clash:
                problems.append(f"mapped columns {clash!r} clash with the scd{scd.type} columns "
                                f"{list(scd.system_columns)!r}; rename them in scd{scd.type}(...)")
        return problems


def check_n_jobs(n_jobs: Any, argument: str) -> None:
    """Raise unless ``n_jobs`` is what joblib takes: a non-zero whole number, or None."""
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int)
                               or n_jobs == 0):
        raise DeclarationError(f"`{argument}` must be a non-zero whole number (-1: one per core) "
                               f"or None, got {n_jobs!r}")


def _checkpoint_to_json(ck: Incremental | PythonCheckpoint | None) -> Any:
    if isinstance(ck, PythonCheckpoint):
        return {"python": ck.reference}
    return ck and {"columns": list(ck.columns), "lag": _lag_to_json(ck.lag)}


def _checkpoint_from_json(data: Any) -> Incremental | PythonCheckpoint | None:
    if not data:
        return None
    if "python" in data:
        return PythonCheckpoint.load(data["python"])
    return Incremental(tuple(data["columns"]), _lag_from_json(data["lag"]))


def _lag_to_json(lag: int | float | timedelta | None) -> Any:
    return {"seconds": lag.total_seconds()} if isinstance(lag, timedelta) else lag


def _lag_from_json(data: Any) -> int | float | timedelta | None:
    return timedelta(seconds=data["seconds"]) if isinstance(data, dict) else data

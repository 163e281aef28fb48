"""The plan: a frozen, JSON-serialisable dry run of one job.

A plan is everything a run needs and nothing it must ask again: the resolved
mapping, the types read and written, the checkpoint window and its high-water
mark, the job's effective time, and the chunks with the SQL each one runs.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import polars as pl

from mapperdsl.connect import same_database
from mapperdsl.dialects import dtype_from_text
from mapperdsl.dsl.mapping import Mapping
from mapperdsl.dsl.parts import PythonCheckpoint, describe
from mapperdsl.dsl.url import Url
from mapperdsl.plan.values import from_jsonable, show, to_jsonable

PLAN_FORMAT = 1


@dataclass(frozen=True)
class KeyRange:
    """``lo <= key < hi`` (a missing bound is open), or the rows whose key is NULL."""

    lo: Any = None
    hi: Any = None
    nulls: bool = False

    def describe(self, column: str) -> str:
        if self.nulls:
            return f"{column} IS NULL"
        if self.lo is None and self.hi is None:
            return f"every non-NULL {column}"
        if self.lo is None:
            return f"{column} < {show(self.hi)}"
        if self.hi is None:
            return f"{column} >= {show(self.lo)}"
        return f"{show(self.lo)} <= {column} < {show(self.hi)}"

    def predicate(self, col: str, literal: Any) -> str:
        """The SQL condition of the range on the key expression ``col``; ``literal``
        renders a bound."""
        if self.nulls:
            return f"{col} IS NULL"
        parts = [f"{col} IS NOT NULL"] if self.lo is None and self.hi is None else []
        if self.lo is not None:
            parts.append(f"{col} >= {literal(self.lo)}")
        if self.hi is not None:
            parts.append(f"{col} < {literal(self.hi)}")
        return " AND ".join(parts)


@dataclass(frozen=True)
class Chunk:
    """One unit of work: a key range, the SQL that reads it, and the rows expected."""

    number: int
    range: KeyRange
    sql: str
    estimated_rows: int


@dataclass(frozen=True)
class Window:
    """The KEY checkpoint window: ``low < columns <= high``; ``low`` None reads from the start."""

    columns: tuple[str, ...]
    stored: tuple[Any, ...] | None
    low: tuple[Any, ...] | None
    high: tuple[Any, ...] | None

    def describe(self) -> str:
        cols = ", ".join(self.columns)
        if self.high is None:
            return f"incremental on {cols}: the source has no value yet, nothing to read"
        low = "the start" if self.low is None else _one(self.low)
        return f"incremental on {cols}: after {low} up to {_one(self.high)} (high-water mark)"


def _one(values: tuple[Any, ...]) -> str:
    return show(values[0]) if len(values) == 1 else show(values)


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided from the mapping and the databases' metadata.

    Build it with :meth:`Mapping.plan`; run it with :func:`mapperdsl.run`. It
    prints as a text tree, shows as a table in a notebook, and survives a JSON
    round trip: ``Plan.from_json(plan.to_json())`` runs the same job.
    """

    mapping: Mapping
    fingerprint: str
    effective_time: datetime
    read_columns: tuple[tuple[str, str], ...]
    target_columns: tuple[tuple[str, str], ...]
    target_exists: bool
    window: Window | None
    python_state: Any
    chunks: tuple[Chunk, ...]
    decisions: tuple[str, ...]
    planned_at: datetime = field(compare=False)
    polars_version: str = field(default=pl.__version__, compare=False)
    text_limits: tuple[tuple[str, int], ...] = ()  # the most characters a target column holds

    # -- derived --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.mapping.name

    @property
    def dialects(self) -> tuple[str, str]:
        assert self.mapping.source_def and self.mapping.target_def
        return self.mapping.source_def.url.dialect, self.mapping.target_def.url.dialect

    @property
    def same_database(self) -> bool:
        """Source and target are one database (then SQLite reads it with sqlite3): for
        SQLite, one file however its URLs spell it (links and relative paths resolved)."""
        m = self.mapping
        assert m.source_def and m.target_def
        return same_database(m.source_def.url, m.target_def.url)

    @property
    def chunk_key(self) -> str:
        """The source column chunks are cut on: the first business key column's source."""
        m = self.mapping
        assert m.key_columns and m.column_map
        return m.column_map.plain_source(m.key_columns[0]) or m.key_columns[0]

    @property
    def mode(self) -> str:
        """full, incremental (KEY checkpoint) or python (PYTHON checkpoint)."""
        ck = self.mapping.checkpoint
        return "full" if ck is None else "python" if isinstance(ck, PythonCheckpoint) \
            else "incremental"

    @property
    def sequential(self) -> bool:
        """Chunks run one after another in this process (one key range, or python mode)."""
        return self.mode == "python" or sum(not c.range.nulls for c in self.chunks) <= 1

    @property
    def estimated_rows(self) -> int:
        return sum(c.estimated_rows for c in self.chunks)

    def read_schema(self) -> dict[str, pl.DataType]:
        return {name: dtype_from_text(t) for name, t in self.read_columns}

    def target_schema(self) -> dict[str, pl.DataType]:
        return {name: dtype_from_text(t) for name, t in self.target_columns}

    def preview(self, *, chunks: Any = None, limit: int = 5) -> Any:
        """What ``chunks`` (numbers; default all) would change, with ``limit`` sample rows of
        each kind — computed with the run's own reader and diff, writing nothing.
        Returns a :class:`mapperdsl.preview.Preview`."""
        from mapperdsl.preview import preview

        return preview(self, chunks=chunks, limit=limit)

    def resolved(self) -> Plan:
        """The plan with ``${VAR}`` in its URLs expanded here, so workers need no environment.

        Raises ExecutionError naming any variable that is not set.
        """
        m = self.mapping
        assert m.source_def and m.target_def
        src = replace(m.source_def, url=Url(m.source_def.url.resolved()))
        dst = replace(m.target_def, url=Url(m.target_def.url.resolved()))
        return replace(self, mapping=replace(m, source_def=src, target_def=dst))

    # -- serialisation --------------------------------------------------------------------

    def to_json(self, *, indent: int | None = 2) -> str:
        """The plan as JSON; literal passwords become ``${MAPPERDSL_*_PASSWORD}`` references."""
        w = self.window
        data = {
            "format": PLAN_FORMAT,
            "polars_version": self.polars_version,
            "mapping": self.mapping.to_dict(),
            "fingerprint": self.fingerprint,
            "effective_time": self.effective_time.isoformat(),
            "planned_at": self.planned_at.isoformat(),
            "read_columns": [list(c) for c in self.read_columns],
            "target_columns": [list(c) for c in self.target_columns],
            "target_exists": self.target_exists,
            "window": w and {"columns": list(w.columns), "stored": to_jsonable(w.stored),
                             "low": to_jsonable(w.low), "high": to_jsonable(w.high)},
            "python_state": self.python_state,
            "chunks": [{"number": c.number, "lo": to_jsonable(c.range.lo),
                        "hi": to_jsonable(c.range.hi), "nulls": c.range.nulls, "sql": c.sql,
                        "estimated_rows": c.estimated_rows} for c in self.chunks],
            "decisions": list(self.decisions),
            "text_limits": [list(c) for c in self.text_limits],
        }
        return json.dumps(data, indent=indent)

    def with_urls(self, *, target: str | None = None, source: str | None = None) -> Plan:
        """The same plan against these URLs (to give credentials a saved plan left out)."""
        m = self.mapping
        assert m.source_def and m.target_def
        src = replace(m.source_def, url=Url.parse(source).absolute()) if source else m.source_def
        dst = replace(m.target_def, url=Url.parse(target).absolute()) if target else m.target_def
        return replace(self, mapping=replace(m, source_def=src, target_def=dst))

    @classmethod
    def from_json(cls, text: str, *, checkpoint: Any = None, lenient: bool = False) -> Plan:
        """Read a plan written by :meth:`to_json`.

        ``checkpoint``: the live Python checkpoint, for a plan whose function cannot be
        imported (a lambda); ``lenient`` skips loading it (to read the plan's settings).
        """
        data = json.loads(text)
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan format {data.get('format')!r} is not supported; "
                             f"this mapperdsl reads format {PLAN_FORMAT}")
        w = data["window"]
        return cls(
            mapping=Mapping.from_dict(data["mapping"], checkpoint=checkpoint, lenient=lenient),
            fingerprint=data["fingerprint"],
            effective_time=datetime.fromisoformat(data["effective_time"]),
            read_columns=tuple((n, t) for n, t in data["read_columns"]),
            target_columns=tuple((n, t) for n, t in data["target_columns"]),
            target_exists=data["target_exists"],
            window=w and Window(tuple(w["columns"]), from_jsonable(w["stored"]),
                                from_jsonable(w["low"]), from_jsonable(w["high"])),
            python_state=data["python_state"],
            chunks=tuple(Chunk(c["number"], KeyRange(from_jsonable(c["lo"]),
                                                     from_jsonable(c["hi"]), c["nulls"]),
                               c["sql"], c["estimated_rows"]) for c in data["chunks"]),
            decisions=tuple(data["decisions"]),
            planned_at=datetime.fromisoformat(data["planned_at"]),
            polars_version=data["polars_version"],
            text_limits=tuple((n, k) for n, k in data.get("text_limits", ())),
        )

    # -- display --------------------------------------------------------------------------

    def __repr__(self) -> str:
        m = self.mapping
        return (f"<Plan {self.name}: scd{m.scd.type}, {self.mode}, {len(self.chunks)} chunks, "
                f"~{self.estimated_rows:,} rows>")

    def __str__(self) -> str:
        return self.explain()

    def explain(self, *, sql: bool = True) -> str:
        """The plan as a text tree; stable names, so it can be compared in tests."""
        m = self.mapping
        assert m.source_def and m.target_def and m.column_map and m.key_columns
        src, dst = m.source_def, m.target_def
        out = [f"Plan {self.name}: scd{m.scd.type}, {self.mode}, {len(self.chunks)} chunks, "
               f"~{self.estimated_rows:,} rows"]
        what = f"table {src.table}" if src.table else "query"
        out.append(f"  source  {src.url}  {what}")
        created = "exists" if self.target_exists else "created on first run"
        out.append(f"  target  {dst.url}  table {dst.table} ({created})")
        out.append(f"  key     {', '.join(m.key_columns)}")
        out.append(f"  effective time  {self.effective_time.isoformat(sep=' ')}")
        out.append("  window  " + self._window_text())
        out.append("  columns")
        types = dict(self.target_columns)
        width = max(len(n) for n in types)
        for name, expr in m.column_map:
            role = " key" if name in m.key_columns else " tracked" if name in m.tracked else ""
            out.append(f"    {name:<{width}}  {types[name]:<16} = {describe(expr)}{role}")
        out.append(f"  chunks by {self.chunk_key}")
        total = len(self.chunks)
        for c in self.chunks:
            out.append(f"    chunk {c.number}/{total}  {c.range.describe(self.chunk_key)}  "
                       f"~{c.estimated_rows:,} rows")
            if sql:
                out.append(f"      {c.sql}")
        out.append("  decisions")
        out.extend(f"    - {d}" for d in self.decisions)
        return "\n".join(out)

    def _window_text(self) -> str:
        if self.window:
            return self.window.describe()
        if self.mode == "python":
            ck = self.mapping.checkpoint
            assert isinstance(ck, PythonCheckpoint)
            return f"python: every source row through {ck.reference}, state {self.python_state!r}"
        return "full: every source row (deletes can be seen)"

    def _repr_html_(self) -> str:
        from mapperdsl.display import html_table

        total = len(self.chunks)
        rows = [(f"chunk {c.number}/{total}", c.range.describe(self.chunk_key),
                 f"{c.estimated_rows:,}") for c in self.chunks]
        sql = "".join(f"<p>chunk {c.number}/{total}</p><pre>{html.escape(c.sql)}</pre>"
                      for c in self.chunks)
        window = self._window_text()
        return (f"<b>{html.escape(repr(self))}</b><br>"
                f"effective time {html.escape(self.effective_time.isoformat(sep=' '))}; "
                f"window {html.escape(window)}"
                + html_table(("chunk", "range", "est. rows"), rows)
                + f"<details><summary>SQL of each chunk</summary>{sql}</details>"
                + "<ul>" + "".join(f"<li>{html.escape(d)}</li>" for d in self.decisions)
                + "</ul>")

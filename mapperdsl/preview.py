"""The change preview: what chosen chunks of a plan would do, computed without writing.

It walks the plan with the same reader, transform and hash diff a run uses, and
stops before the write: exact counts of each kind of change per chunk, and a
sample of each kind — for updates the old and the new values side by side.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from mapperdsl.chunk import prepare_rows, read_chunk
from mapperdsl.dialects import key_expr, key_literal, quote, quote_column
from mapperdsl.display import counts_text, html_table
from mapperdsl.dsl.parts import Scd1, Scd2
from mapperdsl.errors import DeclarationError
from mapperdsl.execute.read import read_sql
from mapperdsl.execute.transform import convert, unspellable
from mapperdsl.merge.diff import diff, empty_state, read_current
from mapperdsl.plan.facts import read_target_state
from mapperdsl.plan.plan import Chunk, Plan
from mapperdsl.record.results import COUNTS


@dataclass(frozen=True)
class ChunkPreview:
    """One chunk's would-be changes: counts, and up to ``limit`` sample rows of each kind."""

    number: int
    key_range: str
    counts: dict[str, int]
    inserts: pl.DataFrame
    updates: pl.DataFrame
    removals: pl.DataFrame
    rejects: pl.DataFrame

    def samples(self) -> list[tuple[str, pl.DataFrame]]:
        """The kinds of change this chunk has samples of, with the samples."""
        kinds = ("inserts", "updates", "removals", "rejects")
        return [(kind, getattr(self, kind)) for kind in kinds if getattr(self, kind).height]


@dataclass(frozen=True)
class Preview:
    """What a run of the plan would change in the previewed chunks; nothing was written."""

    name: str
    total_chunks: int
    chunks: tuple[ChunkPreview, ...]

    def counts(self) -> dict[str, int]:
        return {c: sum(p.counts[c] for p in self.chunks) for c in COUNTS}

    def __repr__(self) -> str:
        return (f"<Preview {self.name}: {len(self.chunks)} of {self.total_chunks} chunks, "
                f"{counts_text(self.counts())}>")

    def __str__(self) -> str:
        lines = [repr(self)]
        for p in self.chunks:
            lines.append(f"  chunk {p.number}/{self.total_chunks}  {p.key_range}  "
                         f"{counts_text(p.counts)}")
            for kind, frame in p.samples():
                lines.append(f"    {kind} (sample of {frame.height}):")
                lines.extend("      " + line for line in str(frame).splitlines())
        return "\n".join(lines)

    def explain(self) -> str:
        """The preview as text: counts per chunk and the sample rows."""
        return str(self)

    def _repr_html_(self) -> str:
        out = [f"<b>{html.escape(repr(self))}</b>"]
        for p in self.chunks:
            out.append(f"<h4>chunk {p.number}/{self.total_chunks}: {html.escape(p.key_range)} "
                       f"&mdash; {html.escape(counts_text(p.counts))}</h4>")
            out.extend(f"<p>{kind}</p>" + html_table(frame.columns, frame.rows())
                       for kind, frame in p.samples())
        return "".join(out)


def preview(plan: Plan, *, chunks: Iterable[int] | None = None, limit: int = 5) -> Preview:
    """Compute what ``chunks`` (numbers; default all) of ``plan`` would change. Writes nothing.

    Examples
    --------
    >>> print(dim.plan().preview(chunks=[1], limit=3))   # doctest: +SKIP
    """
    numbers = list(chunks) if chunks is not None else [c.number for c in plan.chunks]
    bad = [n for n in numbers if not 1 <= n <= len(plan.chunks)]
    if bad:
        raise DeclarationError(f"`chunks` must be chunk numbers from 1 to {len(plan.chunks)}, "
                               f"got {bad!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise DeclarationError(f"`limit` must be a whole number >= 0, got {limit!r}")
    work = plan.resolved()
    m = work.mapping
    assert m.target_def
    exists = read_target_state(m.target_def, m.name).exists
    return Preview(plan.name, len(plan.chunks),
                   tuple(_chunk(work, work.chunks[n - 1], limit, exists) for n in numbers))


def _chunk(plan: Plan, chunk: Chunk, limit: int, target_exists: bool) -> ChunkPreview:
    m = plan.mapping
    assert m.source_def and m.target_def and m.key_columns and m.column_map
    keys = list(m.key_columns)
    frame = read_chunk(plan, chunk)
    prepared = prepare_rows(plan, frame)
    current = read_current(plan, chunk) if target_exists else empty_state(plan)
    change = diff(plan, prepared, current)
    scd = m.scd
    removed_by_close = isinstance(scd, Scd2) or (isinstance(scd, Scd1) and scd.deletes == "close")
    counts = {"read": prepared.read, "inserted": change.new.height,
              "updated": change.changed.height,
              "closed": change.gone.height if removed_by_close else 0,
              "deleted": 0 if removed_by_close else change.gone.height,
              "unchanged": change.unchanged, "rejected": prepared.rejects.height}
    shown = list(m.column_map.names)
    changed = change.changed.head(limit)
    old = _old_rows(plan, changed.select(keys), shown) if changed.height else None
    updates = changed.select(shown)
    if old is not None:
        pairs = [pl.col(k) for k in keys]
        for c in shown:
            if c not in keys:
                pairs += [pl.col(f"{c} (old)"), pl.col(c).alias(f"{c} (new)")]
        updates = updates.join(old.rename({c: f"{c} (old)" for c in shown if c not in keys}),
                               on=keys, how="left").select(pairs)
    removals = (_old_rows(plan, change.gone.head(limit), shown)
                if change.gone.height else change.gone.head(0))
    return ChunkPreview(chunk.number, chunk.range.describe(plan.chunk_key), counts,
                        change.new.select(shown).head(limit), updates, removals,
                        prepared.rejects.head(limit))


def _old_rows(plan: Plan, keys: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """The target's current values of the rows with these keys (a handful: a sample), but
    for keys no literal spells (an infinity, a NUL character: shown without them)."""
    m = plan.mapping
    assert m.target_def and m.key_columns
    dialect = m.target_def.url.dialect
    types = plan.target_schema()
    keys = keys.filter(~unspellable(keys))
    if keys.height == 0:
        return pl.DataFrame(schema={c: types[c] for c in columns})
    matches = []
    for row in keys.iter_rows(named=True):
        parts = [f"{key_expr(k, types[k], dialect, source=False)} = "
                 f"{key_literal(row[k], types[k], dialect, source=False)}" for k in m.key_columns]
        matches.append("(" + " AND ".join(parts) + ")")
    where = " OR ".join(matches)
    if isinstance(m.scd, Scd2):
        where = f"{quote_column(m.scd.is_current)} AND ({where})"
    sql = (f"SELECT {', '.join(quote_column(c) for c in columns)} FROM "
           f"{quote(m.target_def.table)} WHERE {where}")
    found = read_sql(m.target_def.url, sql, written_here=True)
    return found.select([convert(c, found.schema[c], types[c]).alias(c) for c in columns])

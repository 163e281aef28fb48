"""The values a run ends with: one ChunkResult per chunk, reduced into a JobResult."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mapperdsl.display import counts_text, html_table

COUNTS = ("read", "inserted", "updated", "closed", "deleted", "unchanged", "rejected")
SUCCEEDED, FAILED, RUNNING, STOPPED = "SUCCEEDED", "FAILED", "RUNNING", "STOPPED"
CANCELLED, ABANDONED = "CANCELLED", "ABANDONED"
UNFINISHED = (RUNNING, FAILED, STOPPED)  # a job in one of these can be resumed or abandoned


@dataclass(frozen=True)
class ChunkResult:
    """What one chunk did. ``read`` = every row read, each ending as exactly one of
    inserted, updated, unchanged or rejected; ``closed`` and ``deleted`` count target
    rows whose key left the source."""

    job_id: str
    number: int
    status: str
    read: int = 0
    inserted: int = 0
    updated: int = 0
    closed: int = 0
    deleted: int = 0
    unchanged: int = 0
    rejected: int = 0
    seconds: float = 0.0
    error: str | None = None
    attempts: int = 1
    retries: str | None = None  # the transient errors retried, with the waits
    state: Any = None  # a PYTHON checkpoint's state after this chunk

    def counts(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in COUNTS}


@dataclass(frozen=True)
class JobResult:
    """The outcome of a run: status, counts summed over its chunks, and each chunk's result."""

    job_id: str
    mapping: str
    status: str
    started_at: datetime
    finished_at: datetime
    chunks: tuple[ChunkResult, ...]
    checkpoint: Any = None
    message: str | None = None
    decisions: tuple[str, ...] = field(default=(), compare=False)
    ranges: tuple[str, ...] = field(default=(), compare=False)  # chunk n's keys: ranges[n - 1]

    def __getattr__(self, name: str) -> int:
        if name in COUNTS:
            return sum(getattr(c, name) for c in self.chunks)
        raise AttributeError(name)

    def counts(self) -> dict[str, int]:
        return {c: sum(getattr(ch, c) for ch in self.chunks) for c in COUNTS}

    @property
    def seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED

    def __repr__(self) -> str:
        return (f"<JobResult {self.job_id} {self.status} {self.mapping}: "
                f"{counts_text(self.counts(), empty='nothing read')} in {self.seconds:.2f}s>")

    def __str__(self) -> str:
        rate = self.read / self.seconds if self.seconds > 0 else 0.0
        lines = [f"Job {self.job_id} {self.status}: {self.mapping}",
                 f"  {self.started_at.isoformat(sep=' ', timespec='seconds')} -> "
                 f"{self.finished_at.isoformat(sep=' ', timespec='seconds')} "
                 f"({self.seconds:.2f}s, {rate:,.0f} rows/s)",
                 "  " + counts_text(self.counts(), zeros=True)]
        if self.checkpoint is not None:
            lines.append(f"  checkpoint {self.checkpoint}")
        if self.message:
            lines.append(f"  message {self.message}")
        total = len(self.chunks)
        for c in sorted(self.chunks, key=lambda c: c.number):
            error = f": {c.error}" if c.error else ""
            keys = f"({keys}) " if (keys := self._range(c.number)) else ""
            lines.append(f"  chunk {c.number}/{total} {keys}{c.status} "
                         f"{counts_text(c.counts())} ({c.seconds:.2f}s){error}")
        return "\n".join(lines)

    def _range(self, number: int) -> str:
        """Chunk ``number``'s key range, or "" when the result does not know it."""
        return self.ranges[number - 1] if number <= len(self.ranges) else ""

    def explain(self) -> str:
        """The result as a text tree: times, counts, each chunk."""
        return str(self)

    def _repr_html_(self) -> str:
        rows = [(f"chunk {c.number}", self._range(c.number), c.status, *c.counts().values(),
                 f"{c.seconds:.2f}", c.error or "")
                for c in sorted(self.chunks, key=lambda c: c.number)]
        rate = self.read / self.seconds if self.seconds > 0 else 0.0
        totals = html_table((*COUNTS, "seconds", "rows/s"),
                            [(*(f"{v:,}" for v in self.counts().values()), f"{self.seconds:.2f}",
                              f"{rate:,.0f}")])
        message = f"<p>{html.escape(self.message)}</p>" if self.message else ""
        return (f"<b>{html.escape(repr(self))}</b>{message}{totals}"
                + html_table(("chunk", "keys", "status", *COUNTS, "seconds", "error"), rows))

"""HTML tables for notebooks: escaped, truncated, never a secret (callers pass redacted text)."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

MAX_ROWS = 50
MAX_CELL = 200


def html_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A small HTML table; cells are escaped and cut at ``MAX_CELL`` characters."""
    rows = list(rows)
    shown = rows[:MAX_ROWS]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                   for row in shown)
    more = (f"<tr><td colspan={len(header)}>… {len(rows) - len(shown)} more rows</td></tr>"
            if len(rows) > len(shown) else "")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}{more}</tbody></table>"


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    if len(text) > MAX_CELL:
        text = text[: MAX_CELL - 1] + "…"
    return html.escape(text)


GONE = ("closed", "deleted")  # target rows whose key left the source: not among the rows read


def counts_text(counts: dict[str, int], *, empty: str = "no rows", zeros: bool = False) -> str:
    """``read 1,000: inserted 5, unchanged 995; gone from the source: closed 5``: the counts
    a result or preview shows (zeros left out unless ``zeros``). What became of the rows
    read comes after them; the keys gone from the source, which were not read, apart."""
    def some(names: list[str]) -> str:
        return ", ".join(f"{k} {counts[k]:,}" for k in names if counts[k] or zeros)

    read = "read" in counts and (counts["read"] or zeros)
    rows = some([k for k in counts if k not in GONE and k != "read"])
    gone = some([k for k in counts if k in GONE])
    text = (f"read {counts['read']:,}" if read else "") + (": " if read and rows else "") + rows
    if gone:
        text += ("; " if text else "") + f"gone from the source: {gone}"
    return text or empty

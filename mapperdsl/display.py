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


def counts_text(counts: dict[str, int], *, empty: str = "no rows", zeros: bool = False) -> str:
    """``read 1,000, inserted 5``: the counts a result or preview shows (zeros left out)."""
    return ", ".join(f"{k} {v:,}" for k, v in counts.items() if v or zeros) or empty

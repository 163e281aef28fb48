"""SCD2 with a KEY checkpoint: each run reads only the rows changed since the last one.

    python examples/scd2_incremental.py [FOLDER]
"""

from __future__ import annotations

import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

import mapperdsl as md


def main(folder: Path) -> list[md.JobResult]:
    folder.mkdir(parents=True, exist_ok=True)
    src, dw = folder / "orders.db", folder / "dw.db"
    for f in (src, dw):
        f.unlink(missing_ok=True)
    with sqlite3.connect(src) as con:
        con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT, total NUMERIC(10,2),"
                    " updated_at TIMESTAMP)")
        con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)",
                        [(i, "new", i * 1.5, f"2026-03-01 08:{i % 60:02d}:00") for i in range(1, 201)])

    dim = (md.mapping("dim_orders")
           .source(f"sqlite:///{src}", table="orders")
           .key("id")
           .columns(id="id", status="status", total="total")
           .scd2(track=["status", "total"])
           .incremental("updated_at")
           .chunks(rows=100)
           .target(f"sqlite:///{dw}", table="dim_orders"))

    # Both loads as of a given time (history in 2026); dim.run() would load as of now
    first = md.run(dim.plan(effective_time=datetime(2026, 3, 1, 9, tzinfo=timezone.utc)),
                   progress=False)
    print(first, end="\n\n")
    assert first.ok and first.inserted == 200

    with sqlite3.connect(src) as con:  # ten orders are paid an hour later
        con.execute("UPDATE orders SET status = 'paid', updated_at = '2026-03-01 09:30:00' "
                    "WHERE id <= 10")
    plan = dim.plan(effective_time=datetime(2026, 3, 1, 10, tzinfo=timezone.utc))
    print(plan.explain(sql=False), end="\n\n")
    assert plan.window is not None and plan.window.low == first.checkpoint
    second = md.run(plan, progress=False)
    print(second, end="\n\n")
    assert (second.read, second.updated, second.inserted) == (10, 10, 0)
    assert second.checkpoint == ("2026-03-01 09:30:00",)

    third = dim.run(progress=False)  # nothing new past the checkpoint
    print(f"third run: {third!r}")
    assert third.read == 0
    return [first, second, third]


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "incremental-data").resolve())

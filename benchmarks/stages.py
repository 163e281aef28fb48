"""What one chunk costs on PostgreSQL, stage by stage, each stage alone.

    python3 benchmarks/stages.py [--rows 250000] [--repeat 5] [--pg-url URL]

The benchmark's customer table (``run.py``'s workload) of ``--rows`` rows, planned as one
chunk, then each stage of that chunk timed on its own, the median of ``--repeat``: the read
(taking turns with the same read as ConnectorX's default ``COPY ... TO STDOUT BINARY``), the
prepare (and, each timed apart, its key checks, typing checks and row hash), the diff, the
binary COPY's encoding, the COPY itself (with the server process's CPU, from ``/proc``: Linux
only) and its commit; then what ``n_jobs`` >= 2 adds: a task's pickle and a worker's imports
(in a fresh process, the median of 3). The stages run one after another here; in a
job they overlap (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import connectorx as cx
import polars as pl
import psycopg
import sqlalchemy as sa
from run import database, postgres

import mapperdsl as md
from mapperdsl import chunk as chunk_stages
from mapperdsl.dsl.parts import Scd2
from mapperdsl.execute.transform import _duplicated, cast_checked, row_hash
from mapperdsl.merge import pgcopy
from mapperdsl.merge.ddl import target_ddl
from mapperdsl.merge.diff import diff, empty_state

STAGES_DB = "mapperdsl_stages"
WORKER_IMPORTS = "import time; t, c = time.perf_counter(), time.process_time(); " \
                 "import mapperdsl.chunk; print(time.perf_counter() - t, time.process_time() - c)"


def backend_cpu(pg: psycopg.Connection) -> float:
    """CPU seconds of ``pg``'s server process so far (``/proc/PID/stat``: utime + stime)."""
    with open(f"/proc/{pg.info.backend_pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(rows: list[str], label: str, fn: Callable[[], Any], repeat: int,
          note: Callable[[Any], str] | None = None) -> Any:
    """Run ``fn`` ``repeat`` times; add a row of the medians (seconds, CPU of this process)."""
    return in_turns(rows, {label: fn}, repeat, note)


def in_turns(rows: list[str], fns: dict[str, Callable[[], Any]], repeat: int,
             note: Callable[[Any], str] | None = None) -> Any:
    """Run each of ``fns`` ``repeat`` times, taking turns; add a row of the medians of each
    (seconds, CPU of this process). Returns the first one's last result."""
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in fns}
    results: dict[str, Any] = {}
    for _ in range(repeat):
        for label, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            results[label] = fn()
            runs[label].append((time.perf_counter() - t, time.process_time() - c))
    for label, times in runs.items():
        seconds, used = (statistics.median(r[i] for r in times) for i in (0, 1))
        rows.append(f"| {label} | {seconds:.3f} | {used:.2f}"
                    f"{note(results[label]) if note else ''} |")
    return next(iter(results.values()))


def stages(url: str, repeat: int) -> list[str]:
    dim = (md.mapping("dim_stages").source(url, table="customer").key("id").scd2(deletes="close")
           .chunks(count=1).target(url, table="dim_stages"))
    plan = dim.plan().resolved()
    chunk = plan.chunks[0]
    m = plan.mapping
    rows = [f"one chunk of {chunk.estimated_rows:,} rows, the median of {repeat}", "",
            "| stage | seconds | CPU-seconds (this process) |", "|---|--:|--:|"]
    assert m.source_def
    cx_url = m.source_def.url.connectorx_url()
    frame = in_turns(rows, {
        "read (ConnectorX, to Polars)": lambda: chunk_stages.read_chunk(plan, chunk),
        "the same read as COPY ... TO STDOUT BINARY (ConnectorX's default; not used)":
            lambda: cx.read_sql(cx_url, chunk.sql, return_type="arrow", protocol="binary"),
    }, repeat)
    prepared = timed(rows, "prepare: key checks, typing, column map, row hash",
                     lambda: chunk_stages.prepare_rows(plan, frame), repeat)
    keys = frame.select("id")
    timed(rows, "of which NULL and duplicate keys",
          lambda: (keys.select(pl.col("id").is_null()), _duplicated(keys)), repeat)
    timed(rows, "of which typing checks",
          lambda: cast_checked(frame, plan.read_schema(), ["id"], "source"), repeat)
    timed(rows, "of which the row hash",
          lambda: prepared.rows.select(row_hash(list(m.tracked))), repeat)
    timed(rows, "diff (a first load: no target rows)",
          lambda: diff(plan, prepared, empty_state(plan)), repeat)
    assert isinstance(m.scd, Scd2)
    history = {m.scd.valid_from: pl.lit(datetime.now(timezone.utc)),
               m.scd.valid_to: pl.lit(None, dtype=pl.Datetime("us", "UTC")),
               m.scd.is_current: pl.lit(True)}
    loaded = prepared.rows.with_columns(**history)
    with sa.create_engine(url).begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS dim_stages")
        for statement in target_ddl(plan)[:-1]:
            conn.exec_driver_sql(statement)
        types = pgcopy.column_types(conn, "dim_stages")

    def encode() -> int:  # each piece let go once used, as a COPY does
        return sum(len(piece) for piece in pgcopy.copy_data(loaded, types)[1])

    timed(rows, "encode the binary COPY", encode, repeat, lambda size: f" ({size / 2**20:.0f} MiB)")
    names, stream = pgcopy.copy_data(loaded, types)
    pieces = list(stream)
    copies: list[tuple[float, float, float]] = []  # seconds, the server's CPU, the commit's
    with psycopg.connect(url) as pg:
        columns = ", ".join(f'"{n}"' for n in names)
        for _ in range(repeat):
            pg.execute("TRUNCATE dim_stages")
            pg.commit()
            before, t = backend_cpu(pg), time.perf_counter()
            with pg.cursor() as cur, cur.copy(f"COPY dim_stages ({columns}) FROM STDIN "
                                               "(FORMAT binary)") as writer:
                for piece in pieces:
                    writer.write(piece)
            copied = time.perf_counter()
            pg.commit()
            copies.append((copied - t, backend_cpu(pg) - before, time.perf_counter() - copied))
        pg.execute("DROP TABLE dim_stages")
        pg.commit()
    seconds, server, commit = (statistics.median(c[i] for c in copies) for i in (0, 1, 2))
    rows.append(f"| COPY: send, the server parses and writes | {seconds:.3f} | "
                f"– (the server: {server:.2f}) |")
    rows.append(f"| commit | {commit:.3f} | – |")
    timed(rows, "pickle a task (plan and chunk; n_jobs >= 2)", lambda: pickle.dumps((plan, chunk)),
          repeat, lambda task: f" ({len(task):,} bytes)")
    imports = [subprocess.run([sys.executable, "-c", WORKER_IMPORTS], check=True,
                              capture_output=True, text=True).stdout.split() for _ in range(3)]
    seconds, used = (statistics.median(float(run[i]) for run in imports) for i in (0, 1))
    rows.append(f"| a worker's imports (n_jobs >= 2; in that process) | {seconds:.3f} | {used:.2f} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description="What one chunk costs, stage by stage.")
    p.add_argument("--rows", type=int, default=250_000, help="the chunk's rows, a multiple of 1000")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--pg-url", default=os.environ.get("MAPPERDSL_BENCH_PG_URL"))
    args = p.parse_args()
    if args.rows < 1000 or args.rows % 1000 or args.repeat < 1:
        p.error("--rows must be a positive multiple of 1000 and --repeat at least 1")
    with postgres(args.pg_url) as server, database(server, STAGES_DB) as db:
        db.create_base(args.rows)
        db.reset()
        print("\n".join(stages(db.src, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

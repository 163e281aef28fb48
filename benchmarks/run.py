"""Measure mapperdsl against its I/O floor: one command, fresh processes, time and peak memory.

    python3 benchmarks/run.py --rows 1000000 [--db postgresql] [--db sqlite] [--jobs 1 --jobs 2]
                              [--json benchmarks/results.json] [--pg-url URL] [--peers] [--workdir DIR]
                              [--column-map python]

The workload is a 9-column customer table of ``--rows`` rows (a multiple of 1000), made with SQL in
the database and kept as ``customer_base``. Each configuration starts from a fresh ``customer`` copied
from it and no target; step A is the first load; then a deterministic mutation (1% updated, 0.5%
inserted, 0.1% deleted); then step B. Every measurement runs in a fresh child process
(``run.py --child SPEC``) that times only its work with ``time.perf_counter()``; the parent samples
the summed VmRSS of the child and all its descendants (joblib/loky workers) every 20 ms.
PostgreSQL: ``--pg-url``, else ``$MAPPERDSL_BENCH_PG_URL``, else a throwaway server from
``scripts/pg.sh``; the benchmark works in its own database ``mapperdsl_bench`` there.
SQLite: ``src.db`` and ``dw.db`` in a temporary folder (or ``--workdir``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import adbc_driver_postgresql.dbapi as adbc_pg
import adbc_driver_sqlite.dbapi as adbc_sqlite
import connectorx as cx
import polars as pl
import polars_hash as plh
import psycopg
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parent.parent
MARKER = "BENCH-RESULT "
BENCH_DB = "mapperdsl_bench"
DLT_DATASET = "dlt_bench"  # dlt's schema in the target database
DBT_SCHEMA = "dbt_bench"  # the dbt peer's schema (its profile's)
PEER_SECONDS = 600  # a peer that has not finished a step by then is reported as such
LATER = "2025-01-01 00:00:00"  # updated_at of every changed and inserted row
TARGETS = ("floor_a", "floor_dim", "floor_keys", "dim_customer", "peer_dim", "peer_keys",
           "mapperdsl_jobs", "mapperdsl_chunks", "mapperdsl_checkpoints", "mapperdsl_rejects",
           "mapperdsl_leases")
DDL = {"postgresql": "id bigint PRIMARY KEY, name text, email text, segment text, balance numeric(12,2), "
                     "updated_at timestamptz, active boolean, since date, city text",
       "sqlite": "id INTEGER PRIMARY KEY, name TEXT, email TEXT, segment TEXT, balance NUMERIC(12,2), "
                 "updated_at TIMESTAMP, active BOOLEAN, since DATE, city TEXT"}
ROW = {"postgresql": "g, 'Customer ' || g, 'customer' || g || '@example.com', "
                     "(ARRAY['retail', 'smb', 'enterprise'])[1 + g % 3], ((g * 37) % 100000) / 100.0, {ts}, "
                     "g % 7 <> 0, date '2015-01-01' + (g % 3650)::int, 'City ' || (g % 500)",
       "sqlite": "g, 'Customer ' || g, 'customer' || g || '@example.com', "
                 "CASE g % 3 WHEN 0 THEN 'retail' WHEN 1 THEN 'smb' ELSE 'enterprise' END, "
                 "((g * 37) % 100000) / 100.0, {ts}, g % 7 <> 0, "
                 "date('2015-01-01', '+' || (g % 3650) || ' days'), 'City ' || (g % 500)"}
BASE_TS = {"postgresql": "timestamptz '2024-01-01 00:00:00+00' + (g % 86400) * interval '1 second'",
           "sqlite": "datetime('2024-01-01 00:00:00', '+' || (g % 86400) || ' seconds')"}
COLUMNS = tuple(column.split()[0] for column in DDL["postgresql"].split(", "))
LATER_TS = {"postgresql": f"timestamptz '{LATER}+00'", "sqlite": f"'{LATER}'"}


class BenchError(RuntimeError):
    """A measurement that failed or counted wrong: the run exits non-zero."""


# --- the databases (parent side, never timed) ----------------------------------------------------

class Database:
    """One database under test: the source (``customer_base``, ``customer``) and the targets."""

    def __init__(self, dialect: str, src: str, dw: str) -> None:
        self.dialect, self.src, self.dw = dialect, src, dw  # SQLAlchemy URLs, as mapperdsl takes
        self.checkpoints = dialect == "postgresql"  # until CHECKPOINT is refused (see settle)

    def execute(self, url: str, *statements: str) -> None:
        """Each statement in autocommit (VACUUM and CREATE DATABASE need it)."""
        if self.dialect == "sqlite":
            with contextlib.closing(sqlite3.connect(sqlite_path(url), isolation_level=None)) as con:
                for statement in statements:
                    con.execute(statement)
        else:
            with psycopg.connect(url, autocommit=True) as pg:
                for statement in statements:
                    pg.execute(statement.encode())

    def insert_rows(self, table: str, first: int, last: int, ts: str) -> str:
        row = ROW[self.dialect].format(ts=ts)
        if self.dialect == "sqlite":
            return (f"INSERT INTO {table} WITH RECURSIVE c(g) AS (SELECT {first} UNION ALL "
                    f"SELECT g + 1 FROM c WHERE g < {last}) SELECT {row} FROM c")
        return f"INSERT INTO {table} SELECT {row} FROM generate_series({first}, {last}) g"

    def create_base(self, n: int) -> None:
        self.execute(self.src, "DROP TABLE IF EXISTS customer_base",
                     f"CREATE TABLE customer_base ({DDL[self.dialect]})",
                     self.insert_rows("customer_base", 1, n, BASE_TS[self.dialect]))

    def reset(self) -> None:
        """A fresh ``customer`` copied from ``customer_base`` in its order, and no target tables.
        (PostgreSQL would start the copy's scan where an earlier scan of ``customer_base``
        stopped, so each copy's rows came in another order, and the row-width sample of the
        plan, the first 1,000 rows, saw other rows: other chunk counts.)"""
        sync = ["SET synchronize_seqscans = off"] if self.dialect == "postgresql" else []
        self.execute(self.src, *sync, "DROP TABLE IF EXISTS customer",
                     f"CREATE TABLE customer ({DDL[self.dialect]})",
                     "INSERT INTO customer SELECT * FROM customer_base",
                     "CREATE INDEX customer_updated_at ON customer (updated_at)",
                     "ANALYZE customer" if self.dialect == "sqlite" else "VACUUM ANALYZE customer")
        if self.dialect == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(sqlite_path(self.dw) + suffix).unlink(missing_ok=True)
        else:
            self.execute(self.dw, *(f"DROP TABLE IF EXISTS {t} CASCADE" for t in TARGETS),
                         f"DROP SCHEMA IF EXISTS {DLT_DATASET} CASCADE",
                         f"DROP SCHEMA IF EXISTS {DBT_SCHEMA} CASCADE")
        self.settle()

    def settle(self) -> None:
        """PostgreSQL writes out what the steps before left dirty (``CHECKPOINT``), so that each
        step starts from the same state and none pays for an earlier one's writes (with the
        stock ``max_wal_size``, the 1.2 GB of WAL a repeat of the workload writes at 1M rows
        brought two checkpoints, in whichever step was running: one step A of five took
        6.5 s against 3.9 to 5.7)."""
        if not self.checkpoints:
            return
        try:
            self.execute(self.src, "CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege as exc:
            self.checkpoints = False
            print(f"CHECKPOINT refused ({str(exc).strip()}): the benchmark's user needs to be a "
                  "superuser or to have pg_checkpoint; the steps run without one before them, "
                  "and vary more", file=sys.stderr)

    def settings(self) -> dict[str, str]:
        """The PostgreSQL settings a load's time depends on most, for the JSON."""
        if self.dialect != "postgresql":
            return {}
        names = ("server_version", "fsync", "synchronous_commit", "wal_level", "shared_buffers",
                 "max_wal_size", "max_parallel_maintenance_workers", "max_connections")
        with psycopg.connect(self.src) as pg:
            return {n: str(pg.execute(f"SHOW {n}".encode()).fetchall()[0][0]) for n in names}

    def mutate(self, n: int) -> None:
        """1% updated (``id % 100 = 0``: new name and ``updated_at``), 0.1% deleted
        (``id % 1000 = 1``), 0.5% inserted (ids n+1 .. n+n/200)."""
        later = LATER_TS[self.dialect]
        self.execute(self.src,
                     f"UPDATE customer SET name = name || ' (moved)', updated_at = {later} "
                     "WHERE id % 100 = 0",
                     "DELETE FROM customer WHERE id % 1000 = 1",
                     self.insert_rows("customer", n + 1, n + n // 200, later),
                     "ANALYZE" if self.dialect == "sqlite" else "VACUUM ANALYZE")
        self.settle()


def sqlite_path(url: str) -> str:
    return url.split(":///", 1)[1]


# --- the children (the timed work) ---------------------------------------------------------------

def read_cx(url: str, query: str = "SELECT * FROM customer") -> pl.DataFrame:
    # On PostgreSQL as a plain query's rows, as mapperdsl reads (less CPU than ConnectorX's
    # default COPY ... TO STDOUT BINARY): the floor is the cheapest read there is.
    protocol: Literal["cursor"] | None = "cursor" if url.startswith("postgresql") else None
    table = cx.read_sql(url, query, partition_on="id", partition_num=2, return_type="arrow",
                        protocol=protocol)
    return pl.DataFrame(pl.from_arrow(table))


def row_hash(frame: pl.DataFrame) -> pl.Expr:
    """mapperdsl's row hash: polars-hash ``hash_rows`` of the non-key columns, xxHash64, signed."""
    return (plh.hash_rows([pl.col(c) for c in frame.columns if c != "id"]).nchash.xxhash64()
            .reinterpret(signed=True).alias("row_hash"))


class Writer:
    """One write connection and one transaction: ADBC (PostgreSQL, SQLite) or Python's sqlite3.
    SQLite connections run with ``journal_mode=WAL`` and ``synchronous=OFF``."""

    def __init__(self, dialect: str, url: str, method: str) -> None:
        self.dialect, self.method = dialect, method
        if method == "sqlite3":
            self.con: Any = sqlite3.connect(sqlite_path(url))
        elif dialect == "sqlite":  # the pragmas need autocommit; then one transaction
            self.con = adbc_sqlite.connect(sqlite_path(url), autocommit=True)
        else:
            self.con = adbc_pg.connect(url)
        self.cur = self.con.cursor()
        if dialect == "sqlite":
            self.cur.execute("PRAGMA journal_mode=WAL")
            self.cur.execute("PRAGMA synchronous=OFF")
            if method == "adbc":
                self.con.adbc_connection.set_autocommit(False)

    def ingest(self, table: str, frame: pl.DataFrame, mode: str, temporary: bool = False) -> None:
        if self.method == "adbc":
            if self.dialect == "sqlite":  # the ADBC SQLite driver takes no decimal128
                frame = frame.with_columns(pl.col(pl.Decimal).cast(pl.Float64))
            self.cur.adbc_ingest(table, frame.to_arrow(), mode=mode, temporary=temporary)
            return
        if mode == "create":
            types = {pl.Int64: "INTEGER", pl.Float64: "REAL", pl.Boolean: "BOOLEAN", pl.Date: "DATE"}
            cols = ", ".join(f"{c} {types.get(t.base_type(), 'TEXT')}" for c, t in frame.schema.items())
            self.cur.execute(f"CREATE {'TEMP ' if temporary else ''}TABLE {table} ({cols})")
        values = frame.with_columns(  # what sqlite3 binds: ISO text for times, floats for decimals
            pl.col(pl.Datetime).dt.strftime("%Y-%m-%d %H:%M:%S"), pl.col(pl.Date).cast(pl.String),
            pl.col(pl.Decimal).cast(pl.Float64))
        self.cur.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * frame.width)})",
                             values.iter_rows())

    def read(self, query: str) -> pl.DataFrame:
        self.cur.execute(query)
        if self.method == "adbc":
            return pl.DataFrame(pl.from_arrow(self.cur.fetch_arrow_table()))
        return pl.DataFrame(self.cur.fetchall(), schema=[d[0] for d in self.cur.description], orient="row")

    def commit(self) -> None:
        (self.con.adbc_connection if self.method == "adbc" else self.con).commit()
        self.cur.close()
        self.con.close()


def child_floor_a(s: dict[str, Any]) -> dict[str, Any]:
    """Floor A: ConnectorX reads the source (2 partitions), one bulk ingest creates ``floor_a``."""
    t0 = time.perf_counter()
    frame = read_cx(s["src"])
    writer = Writer(s["dialect"], s["dw"], s["method"])
    writer.ingest("floor_a", frame, "create")
    writer.commit()
    return {"seconds": time.perf_counter() - t0, "counts": {"inserted": frame.height}}


def child_prep_b(s: dict[str, Any]) -> dict[str, Any]:
    """Set-up of floor B (not measured): ``floor_dim`` = the source + ``row_hash``, ``is_current``,
    ``valid_to``, with a unique index on the key of the current rows, as mapperdsl makes."""
    frame = read_cx(s["src"])
    frame = frame.with_columns(row_hash(frame), is_current=pl.lit(True),
                               valid_to=pl.lit(None, dtype=pl.Datetime("us", "UTC")))
    writer = Writer(s["dialect"], s["dw"], s["method"])
    writer.ingest("floor_dim", frame, "create")
    writer.cur.execute("CREATE UNIQUE INDEX floor_dim_current ON floor_dim (id) WHERE is_current")
    writer.commit()
    return {"seconds": 0.0, "counts": {"inserted": frame.height}}


def child_floor_b(s: dict[str, Any]) -> dict[str, Any]:
    """Floor B: the least a full SCD2 load does after the mutation, in one process.

    1. read the whole source with ConnectorX (2 partitions), hash every row with polars-hash;
    2. read key + hash of the target's current rows (PostgreSQL: ConnectorX; SQLite: the writer's
       own library, as mapperdsl does, so two SQLite libraries never hold the file at once);
    3. diff in Polars: changed keys (hash differs), new keys, gone keys (deleted in the source);
    4. in one transaction: bulk-load changed + gone keys into a temporary table, close them with
       one UPDATE (``is_current = false, valid_to = now``), bulk-ingest the changed and new rows
       as current versions. No job log, chunks, checkpoint, type checks or rejects.
    """
    t0 = time.perf_counter()
    src = read_cx(s["src"])
    src = src.with_columns(row_hash(src))
    writer = Writer(s["dialect"], s["dw"], s["method"])
    query = "SELECT id, row_hash FROM floor_dim WHERE is_current"
    tgt = read_cx(s["dw"], query) if s["dialect"] == "postgresql" else writer.read(query)
    both = src.join(tgt, on="id", how="left", suffix="_target")
    changed = both.filter(pl.col("row_hash_target").is_not_null()
                          & (pl.col("row_hash") != pl.col("row_hash_target")))
    new = both.filter(pl.col("row_hash_target").is_null())
    gone = tgt.join(src.select("id"), on="id", how="anti")
    writer.ingest("floor_keys", pl.concat([changed.select("id"), gone.select("id")]), "create",
                  temporary=True)
    now = "CURRENT_TIMESTAMP" if s["dialect"] == "sqlite" else "now()"
    writer.cur.execute(f"UPDATE floor_dim SET is_current = false, valid_to = {now} "
                       "WHERE is_current AND id IN (SELECT id FROM floor_keys)")
    versions = pl.concat([changed, new]).drop("row_hash_target").with_columns(
        is_current=pl.lit(True), valid_to=pl.lit(None, dtype=pl.Datetime("us", "UTC")))
    writer.ingest("floor_dim", versions, "append")
    writer.commit()
    return {"seconds": time.perf_counter() - t0,
            "counts": {"inserted": new.height, "updated": changed.height, "closed": gone.height}}


def tidy_name(name: str) -> str:
    """``--column-map python``: what a user writes in Python when no Polars expression does."""
    return " ".join(part.capitalize() for part in name.split())


def tidy_email(email: str) -> str:
    user, _, domain = email.strip().partition("@")
    return f"{user.lower()}@{domain.lower().removeprefix('www.')}"


def python_columns() -> dict[str, str | pl.Expr]:
    """Every source column, ``name`` and ``email`` through Python functions (GIL-bound, about
    0.7 CPU-seconds per 250,000 rows together): a transform, not the database, to wait on."""
    columns: dict[str, str | pl.Expr] = {c: c for c in COLUMNS}
    columns["name"] = pl.col("name").map_elements(tidy_name, return_dtype=pl.String)
    columns["email"] = pl.col("email").map_elements(tidy_email, return_dtype=pl.String)
    return columns


def child_mapperdsl(s: dict[str, Any]) -> dict[str, Any]:
    """mapperdsl: the user's call, ``dim.run(n_jobs=n, progress=False)``, its plan included."""
    import mapperdsl as md
    from mapperdsl.dsl.url import Url
    mapping = md.mapping("dim_customer").source(s["src"], table="customer").key("id")
    if s.get("column_map") == "python":
        mapping = mapping.columns(**python_columns())
    if s["mode"] == "full":
        mapping = mapping.scd2(deletes="close")
    else:
        mapping = mapping.scd2().incremental("updated_at")
    dim = mapping.target(s["dw"], table="dim_customer")
    if s.get("chunk_rows"):
        dim = dim.chunks(rows=s["chunk_rows"])
    for url in {s["src"], s["dw"]}:  # imports are not timed, as the floor's are not: SQLAlchemy
        make_url(Url.parse(url).sqlalchemy_url()).get_dialect()  # imports a URL's on first use
    t0 = time.perf_counter()
    result = dim.run(n_jobs=s["n_jobs"], progress=False)
    cols = dim.column_map
    return {"seconds": time.perf_counter() - t0, "counts": result.counts(), "status": result.status,
            "message": result.message, "chunks": len(result.chunks),
            "mapped": [name for name, _ in cols if cols.plain_source(name) is None] if cols else []}


def child_pandas(s: dict[str, Any]) -> dict[str, Any]:
    """A hand-written pandas + SQLAlchemy SCD2 load: read all, hash with pandas, compare, close the
    changed and gone keys (keys table + one UPDATE), ``to_sql`` the new versions."""
    import pandas as pd
    import sqlalchemy as sa

    def engine(url: str) -> sa.Engine:
        return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    t0 = time.perf_counter()
    dw = engine(s["dw"])
    src = pd.read_sql("SELECT * FROM customer", engine(s["src"]))
    src["row_hash"] = pd.util.hash_pandas_object(src.drop(columns="id"), index=False).astype("int64")
    if sa.inspect(dw).has_table("peer_dim"):
        tgt = pd.read_sql("SELECT id, row_hash FROM peer_dim WHERE is_current", dw)
    else:
        tgt = pd.DataFrame({"id": pd.Series(dtype="int64"), "row_hash": pd.Series(dtype="int64")})
    both = src.merge(tgt, on="id", suffixes=("", "_target"))
    changed = both[both["row_hash"] != both["row_hash_target"]][src.columns]
    new = src[~src["id"].isin(tgt["id"])]
    gone = tgt[~tgt["id"].isin(src["id"])]
    now = pd.Timestamp.now(tz="UTC")
    with dw.begin() as conn:
        keys = pd.concat([changed["id"], gone["id"]])
        if len(keys):
            keys.to_frame("id").to_sql("peer_keys", conn, if_exists="replace", index=False)
            conn.execute(sa.text("UPDATE peer_dim SET is_current = false, valid_to = :now WHERE is_current "
                                 "AND id IN (SELECT id FROM peer_keys)"), {"now": now.to_pydatetime()})
        pd.concat([changed, new]).assign(valid_from=now, valid_to=pd.NaT, is_current=True).to_sql(
            "peer_dim", conn, if_exists="append", index=False, chunksize=10_000)
    return {"seconds": time.perf_counter() - t0,
            "counts": {"inserted": len(new), "updated": len(changed), "closed": len(gone)}}


def child_dlt(s: dict[str, Any]) -> dict[str, Any]:
    """dlt: ``sql_table`` with its ConnectorX backend into PostgreSQL, ``merge`` with the ``scd2``
    strategy (a Polars row hash as the row version), its parquet loader, and ``work_mem`` raised
    to 256MB for its sessions (with the defaults its retire query does not finish in minutes at
    1M rows). Counts from its versions."""
    import dlt
    from dlt.sources.sql_database import sql_table

    os.environ["NORMALIZE__PARQUET_NORMALIZER__ADD_DLT_ID"] = "true"  # scd2 hashes rows into it
    t0 = time.perf_counter()
    table = sql_table(credentials=s["src"], table="customer", backend="connectorx")
    # Arrow rows get random _dlt_ids: scd2 needs a content hash of each row, given as its version.
    table.add_map(lambda t: pl.from_arrow(t).with_columns(  # type: ignore[union-attr]
        row_hash=pl.from_arrow(t).hash_rows(seed=0)  # type: ignore[union-attr]
        .reinterpret(signed=True)).to_arrow())
    table.apply_hints(write_disposition={"disposition": "merge", "strategy": "scd2",
                                         "row_version_column_name": "row_hash"})
    dw = make_url(s["dw"])  # dlt wants a password, also where the server asks for none
    dw = dw.set(password=dw.password or "unused", query={**dw.query, "options": "-cwork_mem=256MB"})
    dest = dlt.destinations.postgres(credentials=dw.render_as_string(hide_password=False))
    pipeline = dlt.pipeline(pipeline_name="bench_dlt", destination=dest, dataset_name=DLT_DATASET,
                            pipelines_dir=s["dlt_dir"])
    pipeline.run(table, loader_file_format="parquet")
    seconds = time.perf_counter() - t0
    with psycopg.connect(s["dw"]) as pg:
        latest = f"(SELECT MAX(_dlt_valid_from) FROM {DLT_DATASET}.customer)"
        new = {r[0] for r in pg.execute(f"SELECT id FROM {DLT_DATASET}.customer "
                                        f"WHERE _dlt_valid_from = {latest}")}
        gone = {r[0] for r in pg.execute(f"SELECT id FROM {DLT_DATASET}.customer "
                                         f"WHERE _dlt_valid_to = {latest}")}
    return {"seconds": seconds, "counts": {"inserted": len(new - gone), "updated": len(new & gone),
                                           "closed": len(gone - new)}}


def dbt_project(dw: str) -> str:
    """A dbt project (and its profile) in a fresh folder: ``customer`` as a source and its YAML
    snapshot ``dbt_customer``, strategy ``check`` on all columns, hard deletes invalidated."""
    url = make_url(dw)
    folder = Path(tempfile.mkdtemp(prefix="mapperdsl-bench-dbt-"))
    (folder / "models").mkdir()
    (folder / "snapshots").mkdir()
    (folder / "dbt_project.yml").write_text(
        'name: bench\nversion: "1.0"\nconfig-version: 2\nprofile: bench\n')
    profile = {"type": "postgres", "host": url.host or "localhost", "port": url.port or 5432,
               "user": url.username or "postgres", "password": url.password or "",
               "dbname": url.database, "schema": DBT_SCHEMA, "threads": 1}
    (folder / "profiles.yml").write_text(  # JSON is YAML
        json.dumps({"bench": {"target": "pg", "outputs": {"pg": profile}}}))
    (folder / "models" / "sources.yml").write_text(
        "sources:\n  - name: bench\n    schema: public\n    tables:\n      - name: customer\n")
    (folder / "snapshots" / "customer.yml").write_text(
        "snapshots:\n  - name: dbt_customer\n    relation: source('bench', 'customer')\n"
        "    config:\n      unique_key: id\n      strategy: check\n      check_cols: all\n"
        "      hard_deletes: invalidate\n")
    return str(folder)


def dbt_python(given: str | None) -> str | None:
    """An interpreter with dbt-postgres: ``--dbt-python``, else this one if it has it."""
    if given:
        return given
    return sys.executable if importlib.util.find_spec("dbt.adapters.postgres") else None


CHILDREN = {"floor-a": child_floor_a, "prep-b": child_prep_b, "floor-b": child_floor_b,
            "mapperdsl": child_mapperdsl, "pandas": child_pandas, "dlt": child_dlt}


# --- measuring (parent side) ---------------------------------------------------------------------

def postmaster_pid(url: str) -> int | None:
    """The main process of the PostgreSQL server at ``url`` when it runs on this machine (its
    processes are then in ``/proc``), else None."""
    with contextlib.suppress(OSError, psycopg.Error, ValueError, IndexError), \
            psycopg.connect(url) as pg:
        backend = pg.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        parent = int(_stat(backend)[1])
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in (backend, parent)}
        return parent if names == {"postgres"} else None
    return None


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command's name (state, parent, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def server_cpu(postmaster: int) -> float:
    """CPU-seconds the server's processes have used so far: those gone (the postmaster's
    children's times, once reaped) and those alive (backends, parallel workers, writers)."""
    ticks = 0
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.isdigit() and int(entry) == postmaster:
                ticks += sum(int(f) for f in _stat(postmaster)[11:15])  # utime .. cstime
            elif entry.isdigit() and int((fields := _stat(int(entry)))[1]) == postmaster:
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class TreeRss(threading.Thread):
    """Peak summed VmRSS (KiB) of a process and all its descendants, sampled every 20 ms
    (``/proc/<pid>/stat`` gives each process's parent; it is read once per new pid)."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak_kib, self.done = root, 0, threading.Event()
        self.parents: dict[int, int] = {}

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_kib = max(self.peak_kib, self.sample())
            self.done.wait(0.02)

    def sample(self) -> int:
        live = {int(p) for p in os.listdir("/proc") if p.isdigit()}
        for pid in self.parents.keys() - live:
            del self.parents[pid]
        for pid in live - self.parents.keys():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_bytes()
                self.parents[pid] = int(stat[stat.rindex(b")") + 2:].split()[1])
        tree, todo, total = [], [self.root], 0
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(p for p, parent in self.parents.items() if parent == pid)
        for pid in tree:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                total += next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")), 0)
        return total


def measure(spec: dict[str, Any], postmaster: int | None = None) -> dict[str, Any]:
    """Run one child: its seconds and counts, the peak RSS of its process tree in MiB, and the
    CPU-seconds used by it and its workers (imports included) and, given the ``postmaster``
    of a PostgreSQL server on this machine, by the server's processes meanwhile."""
    client, server = resource.getrusage(resource.RUSAGE_CHILDREN), \
        server_cpu(postmaster) if postmaster else None
    peer = spec["what"] in ("pandas", "dlt", "dbt")  # its own process group, to be stopped whole
    command = ([spec["dbt_python"], str(Path(__file__).with_name("peer_dbt.py")),
                json.dumps({**spec, "marker": MARKER})] if spec["what"] == "dbt" else
               [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=peer)
    sampler = TreeRss(proc.pid)
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=PEER_SECONDS if peer else None)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and every process it started
        proc.communicate()
        raise BenchError(f"{spec['what']} did not finish in {PEER_SECONDS} s") from None
    finally:
        sampler.done.set()
        sampler.join()
    lines = [line for line in out.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"{spec['what']} exited {proc.returncode} (its traceback is above)")
    result: dict[str, Any] = json.loads(lines[-1][len(MARKER):])
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"client": round(used.ru_utime + used.ru_stime - client.ru_utime - client.ru_stime, 2)}
    if postmaster and server is not None:
        cpu["server"] = round(server_cpu(postmaster) - server, 2)
    return {**result, "peak_rss_mib": round(sampler.peak_kib / 1024, 1), "cpu_seconds": cpu}


def check(result: dict[str, Any], expected: dict[str, int], label: str) -> None:
    got = {k: result["counts"].get(k) for k in expected}
    if result.get("status", "SUCCEEDED") != "SUCCEEDED" or got != expected:
        raise BenchError(f"{label}: expected {expected}, got {got} "
                         f"(status {result.get('status')}, {result.get('message')})")


def median(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median time, every repeat's seconds kept (``runs``)."""
    ordered = sorted(results, key=lambda r: r["seconds"])
    return {**ordered[(len(ordered) - 1) // 2], "runs": [round(r["seconds"], 3) for r in results]}


def bench(db: Database, args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration on one database; each row of the report has a step A and a step B,
    each the median of ``--repeat`` measurements (the configurations take turns)."""
    n, jobs, peers = args.rows, args.jobs, args.peers
    spec = {"dialect": db.dialect, "src": db.src, "dw": db.dw}
    full_b = {"inserted": n // 200, "updated": n // 100, "closed": n // 1000}
    print(f"[{db.dialect}] generating {n:,} rows", file=sys.stderr)
    db.create_base(n)
    pm = postmaster_pid(db.dw) if db.dialect == "postgresql" else None  # (its CPU, when local)

    sizes = args.chunk_rows or [None]
    udf = " (Python column map)" if args.column_map == "python" else ""
    runs = [(f"mapperdsl {mode} n_jobs={j}" + (f" chunks of {c:,} rows" if c else "") + udf,
             "mapperdsl", {"mode": mode, "n_jobs": j, "chunk_rows": c, "column_map": args.column_map},
             full_b if mode == "full" else {"inserted": n // 200, "updated": n // 100})
            for mode in args.mode or ["full", "incremental"] for j in jobs for c in sizes]
    if peers:
        try:
            import pandas  # noqa: F401
            runs.append(("pandas + SQLAlchemy SCD2 script", "pandas", {}, full_b))
        except ImportError:
            print("--peers: pandas is not installed: no pandas + SQLAlchemy script", file=sys.stderr)
        try:
            import dlt  # noqa: F401
            if db.dialect == "postgresql":
                runs.append(("dlt sql_table (connectorx) merge/scd2, parquet, work_mem 256MB", "dlt",
                             {"dlt_dir": tempfile.mkdtemp(prefix="mapperdsl-bench-dlt-")}, full_b))
        except ImportError:
            print("--peers: dlt is not installed: no dlt pipeline", file=sys.stderr)
        python = dbt_python(args.dbt_python)
        if db.dialect == "postgresql" and python:
            runs.append(("dbt snapshot (check all columns, hard deletes invalidated)", "dbt",
                         {"dbt_dir": dbt_project(db.dw), "dbt_python": python,
                          "dbt_table": f"{DBT_SCHEMA}.dbt_customer"}, full_b))
        elif db.dialect == "postgresql":
            print("--peers: no dbt-postgres here: no dbt snapshot (give --dbt-python PATH)",
                  file=sys.stderr)

    methods = ("adbc", "sqlite3") if db.dialect == "sqlite" else ("adbc",)
    floors: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    floor_bs: list[dict[str, Any]] = []
    measured: list[dict[str, list[dict[str, Any]]]] = [{"A": [], "B": []} for _ in runs]
    failed: dict[int, str] = {}
    for repeat in range(args.repeat):
        tag = f" (repeat {repeat + 1} of {args.repeat})" if args.repeat > 1 else ""
        for method in methods:
            db.reset()
            print(f"[{db.dialect}] floor A, {method}{tag}", file=sys.stderr)
            floors[method].append(measure({**spec, "what": "floor-a", "method": method}, pm))
            check(floors[method][-1], {"inserted": n}, f"floor A ({method})")
        best = min(floors, key=lambda m: median(floors[m])["seconds"])
        db.reset()
        measure({**spec, "what": "prep-b", "method": best})
        db.mutate(n)
        print(f"[{db.dialect}] floor B, {best}{tag}", file=sys.stderr)
        floor_bs.append(measure({**spec, "what": "floor-b", "method": best}, pm))
        check(floor_bs[-1], full_b, "floor B")
        for i, (label, what, extra, expect_b) in enumerate(runs):
            if i in failed:
                continue
            print(f"[{db.dialect}] {label}{tag}", file=sys.stderr)
            sure = {"rejected": 0} if what == "mapperdsl" else {}
            try:
                db.reset()
                measured[i]["A"].append(measure({**spec, **extra, "what": what}, pm))
                check(measured[i]["A"][-1], {"inserted": n, **sure}, f"{label} step A")
                db.mutate(n)
                measured[i]["B"].append(measure({**spec, **extra, "what": what}, pm))
                check(measured[i]["B"][-1], {**expect_b, **sure}, f"{label} step B")
            except BenchError as e:
                failed[i] = str(e)
                print(f"ERROR {e}", file=sys.stderr)

    for _, _, extra, _ in runs:  # the peers' folders (dlt's pipeline, the dbt project)
        for folder in (extra.get("dlt_dir"), extra.get("dbt_dir")):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
    best = min(floors, key=lambda m: median(floors[m])["seconds"])
    floor_b = median(floor_bs)
    rows: list[dict[str, Any]] = [
        {"what": f"floor: ConnectorX + {'ADBC ingest' if m == 'adbc' else 'sqlite3 executemany'}"
                 + (" (the floor)" if m == best and len(floors) > 1 else ""),
         "A": median(a), "B": floor_b if m == best else None} for m, a in floors.items()]
    errors: list[str] = []
    for i, (label, _, extra, _) in enumerate(runs):
        row: dict[str, Any] = {"what": label, **extra,
                               "A": median(measured[i]["A"]) if measured[i]["A"] else None,
                               "B": median(measured[i]["B"]) if measured[i]["B"] else None}
        if i in failed:
            row["error"] = failed[i]
            errors.append(f"[{db.dialect}] {failed[i]}")
        rows.append(row)
    return {"server": db.settings(), "checkpoint_before_each_step": db.checkpoints,
            "floor_a_method": best,
            "floor_a_seconds": median(floors[best])["seconds"],
            "floor_b_seconds": floor_b["seconds"], "repeat": args.repeat, "rows": rows,
            "errors": errors}


# --- the report and the command ------------------------------------------------------------------

def markdown(dialect: str, n: int, r: dict[str, Any]) -> str:
    fa, fb = r["floor_a_seconds"], r["floor_b_seconds"]
    medians = f", the median of {r['repeat']} runs" if r.get("repeat", 1) > 1 else ""
    out = [f"### {dialect}, {n:,} rows{medians}", "",
           "| what | rows | step A s | × floor A | step B s | × floor B | peak RSS MiB (A / B) "
           "| CPU-s of step A: client / server |",
           "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for row in r["rows"]:
        a, b = row["A"], row["B"]
        cpu = (a or {}).get("cpu_seconds", {})
        cells = [f"{a['seconds']:.2f}" if a else "–", f"{a['seconds'] / fa:.2f}" if a else "–",
                 f"{b['seconds']:.2f}" if b else "–", f"{b['seconds'] / fb:.2f}" if b else "–",
                 " / ".join(f"{x['peak_rss_mib']:.0f}" if x else "–" for x in (a, b)),
                 " / ".join(f"{cpu[k]:.2f}" if k in cpu else "–" for k in ("client", "server"))]
        out.append(f"| {row['what']}{' **ERROR**' if 'error' in row else ''} | {n:,} | {' | '.join(cells)} |")
    full = {row["n_jobs"]: row["B"] for row in r["rows"] if row.get("mode") == "full" and row["B"]}
    ratios = [f"n_jobs={row['n_jobs']}: {row['B']['seconds'] / full[row['n_jobs']]['seconds']:.2f}"
              for row in r["rows"] if row.get("mode") == "incremental" and row["B"] and row["n_jobs"] in full]
    if ratios:
        out += ["", "incremental step B / full step B: " + ", ".join(ratios)]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "polars": pl.__version__, "connectorx": cx.__version__, "mapperdsl_commit": commit}


@contextlib.contextmanager
def postgres(url: str | None) -> Iterator[str]:
    """The server URL given, or a throwaway server from scripts/pg.sh with the stock settings,
    stopped at the end."""
    if url:
        yield url
        return
    script = str(REPO / "scripts" / "pg.sh")
    out = subprocess.run(["bash", script, "start", "stock"], check=True,  # fsync on, as shipped
                         stdout=subprocess.PIPE, text=True).stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if "=" in line)
    try:
        yield env["MAPPERDSL_TEST_PG_URL"]
    finally:
        subprocess.run(["bash", script, "stop", env["MAPPERDSL_PG_DIR"]], check=False)


@contextlib.contextmanager
def database(server: str, name: str) -> Iterator[Database]:
    """A fresh database ``name`` on ``server`` (one left over is dropped first), dropped at the end."""
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    admin = Database("postgresql", server, server)
    admin.execute(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}")
    try:
        yield Database("postgresql", url, url)
    finally:
        admin.execute(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run_database(dialect: str, args: argparse.Namespace) -> dict[str, Any]:
    if dialect == "postgresql":
        with postgres(args.pg_url) as server, database(server, BENCH_DB) as db:
            return bench(db, args)
    folder = (args.workdir or Path(tempfile.mkdtemp(prefix="mapperdsl-bench-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        db = Database("sqlite", f"sqlite:///{folder}/src.db", f"sqlite:///{folder}/dw.db")
        return bench(db, args)
    finally:
        if not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description="Measure mapperdsl against its I/O floor.")
    p.add_argument("--rows", type=int, default=100_000, help="source rows, a multiple of 1000")
    p.add_argument("--db", action="append", choices=["postgresql", "sqlite"], help="default: both")
    p.add_argument("--jobs", action="append", type=int, help="mapperdsl n_jobs values; default: 1 and 2")
    p.add_argument("--json", type=Path, help="write every number and the machine's facts here")
    p.add_argument("--pg-url", default=os.environ.get("MAPPERDSL_BENCH_PG_URL"))
    p.add_argument("--peers", action="store_true",
                   help="also a pandas + SQLAlchemy SCD2 script, a dlt pipeline and a dbt snapshot, "
                        "when installed")
    p.add_argument("--dbt-python", help="a Python with dbt-postgres for the dbt peer (default: this one, "
                                        "if it has it)")
    p.add_argument("--workdir", type=Path, help="SQLite files here (default: a temporary folder)")
    p.add_argument("--mode", action="append", choices=["full", "incremental"],
                   help="mapperdsl modes; default: both")
    p.add_argument("--chunk-rows", action="append", type=int,
                   help="rows per chunk, repeatable (a sweep); default: mapperdsl's own sizing")
    p.add_argument("--column-map", choices=["copy", "python"], default="copy",
                   help="mapperdsl's column map: every column copied (default), or name and email "
                        "through Python functions (a transform that holds the GIL)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure every configuration this many times, taking turns; the tables "
                        "show the median (default: 1)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(MARKER + json.dumps(CHILDREN[spec["what"]](spec)), flush=True)
        return 0
    if args.rows < 1000 or args.rows % 1000:
        p.error("--rows must be a positive multiple of 1000 (the mutation's counts are exact)")
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    args.jobs = args.jobs or [1, 2]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a stopped run still cleans up
    report: dict[str, Any] = {"machine": machine(), "rows": args.rows, "jobs": args.jobs, "databases": {}}
    errors: list[str] = []
    for dialect in args.db or ["postgresql", "sqlite"]:
        try:
            result = run_database(dialect, args)
        except BenchError as e:  # a floor failed: nothing to compare with on this database
            result = {"rows": [], "errors": [f"[{dialect}] {e}"]}
        else:
            result["table"] = markdown(dialect, args.rows, result)
            print(result["table"], end="\n\n", flush=True)
        report["databases"][dialect] = result
        errors += result["errors"]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    for error in errors:
        print(f"ERROR {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Quickstart: load a customer table into an SCD2 dimension, change the source, load again.

Runs on SQLite files in a folder of its own (default: ./quickstart-data, or the
first argument), so it needs no server:

    python examples/quickstart.py
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import polars as pl

import mapperdsl as md


def make_source(path: Path) -> None:
    """A small shop database, the way people create SQLite tables."""
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as con:
        con.execute("""CREATE TABLE customer (
            id INTEGER PRIMARY KEY, name TEXT, email TEXT, segment TEXT,
            balance NUMERIC(12, 2), updated_at TIMESTAMP)""")
        con.executemany(
            "INSERT INTO customer VALUES (?, ?, ?, ?, ?, ?)",
            [(i, f" Customer {i} ", f"C{i}@Example.com", ["retail", "business"][i % 2],
              round(i * 10.25, 2), "2026-01-01 00:00:00") for i in range(1, 1001)])


def change_source(path: Path) -> None:
    """A day of changes: 20 renamed, 10 moved segment, 5 deleted, 5 new customers."""
    with sqlite3.connect(path) as con:
        con.execute("UPDATE customer SET name = name || ' Jr' WHERE id <= 20")
        con.execute("UPDATE customer SET segment = 'vip' WHERE id BETWEEN 101 AND 110")
        con.execute("DELETE FROM customer WHERE id BETWEEN 501 AND 505")
        con.executemany(
            "INSERT INTO customer VALUES (?, ?, ?, ?, ?, ?)",
            [(i, f"Customer {i}", f"c{i}@example.com", "retail", 0, "2026-01-02 00:00:00")
             for i in range(1001, 1006)])


def main(folder: Path) -> md.JobResult:
    folder.mkdir(parents=True, exist_ok=True)
    shop, dw = folder / "shop.db", folder / "dw.db"
    dw.unlink(missing_ok=True)
    make_source(shop)

    dim = (
        md.mapping("dim_customer")
        .source(f"sqlite:///{shop}", table="customer")
        .key("id")
        .columns(
            id="id",
            name=pl.col("name").str.strip_chars(),
            email=pl.col("email").str.to_lowercase(),
            segment="segment",
            balance="balance",
        )
        .scd2(track=["name", "email", "segment"], deletes="close")
        .chunks(rows=250)
        .target(f"sqlite:///{dw}", table="dim_customer")
    )

    plan = dim.plan()
    print(plan.explain(sql=False), end="\n\n")
    first = md.run(plan, n_jobs=2, progress=False)
    print(first, end="\n\n")
    assert first.ok and first.inserted == 1000, first

    change_source(shop)
    second = dim.run(n_jobs=2, progress=False)
    print(second, end="\n\n")
    assert second.ok, second
    assert (second.inserted, second.updated, second.closed) == (5, 30, 5), second.counts()

    third = dim.run(n_jobs=2, progress=False)
    print(f"third run, nothing changed: {third!r}")
    assert third.ok and third.inserted == third.updated == third.closed == 0, third.counts()

    with sqlite3.connect(dw) as con:
        versions = con.execute("SELECT COUNT(*), SUM(is_current) FROM dim_customer").fetchone()
    print(f"dim_customer holds {versions[0]} versions, {versions[1]} of them current")
    assert versions == (1035, 1000)
    return second


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart-data").resolve())

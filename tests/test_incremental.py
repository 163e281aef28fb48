"""KEY checkpoints: the window (stored, high-water mark], single and composite columns."""

from __future__ import annotations

from datetime import timedelta

import polars as pl
import pytest

import mapperdsl as md

from conftest import Engine
from helpers import CUSTOMER_DDL, load_snapshot, step_time

DDL = "CREATE TABLE orders (id INTEGER, status TEXT, batch INTEGER, seq INTEGER, changed_at TIMESTAMP)"


def insert(engine: Engine, rows: list[tuple[object, ...]]) -> None:
    engine.execute(engine.source, rows=rows,
                   insert=f"INSERT INTO orders VALUES ({engine.placeholders(5)})")


def orders(engine: Engine, *columns: str, lag: timedelta | None = None) -> md.Mapping:
    return (md.mapping("dim_orders").source(engine.source, table="orders").key("id")
            .columns(id="id", status="status").scd2()
            .incremental(list(columns), lag=lag).chunks(count=2)
            .target(engine.target, table="dim_orders"))


def test_window_reads_only_rows_after_the_checkpoint(engine: Engine) -> None:
    engine.execute(engine.source, DDL)
    insert(engine, [(i, "new", 1, i, f"2026-01-01 00:00:{i:02d}") for i in range(1, 11)])
    dim = orders(engine, "changed_at")
    first = md.run(dim.plan(effective_time=step_time(0)), progress=False)
    assert (first.read, first.inserted) == (10, 10)
    assert str(first.checkpoint[0]).startswith("2026-01-01 00:00:10")

    insert(engine, [(11, "new", 2, 11, "2026-01-01 00:01:00")])
    engine.execute(engine.source, "UPDATE orders SET status = 'paid', "
                                  "changed_at = '2026-01-01 00:01:00' WHERE id = 3")
    plan = dim.plan(effective_time=step_time(1))
    assert plan.window is not None and plan.window.low == first.checkpoint
    assert "after" in plan.explain() and "high-water mark" in plan.explain()
    second = md.run(plan, n_jobs=2, progress=False)
    assert (second.read, second.inserted, second.updated) == (2, 1, 1)

    third = dim.run(progress=False)
    assert third.read == 0 and third.checkpoint == second.checkpoint


def test_rows_arriving_after_planning_wait_for_the_next_run(engine: Engine) -> None:
    engine.execute(engine.source, DDL)
    insert(engine, [(1, "a", 1, 1, "2026-01-01 00:00:01")])
    dim = orders(engine, "changed_at")
    plan = dim.plan()
    insert(engine, [(2, "late", 1, 2, "2026-01-01 00:00:05")])  # after the high-water mark
    assert md.run(plan, progress=False).read == 1
    assert dim.run(progress=False).read == 1  # the next run picks it up, nothing skipped


def test_composite_checkpoint_compares_as_a_tuple(engine: Engine) -> None:
    engine.execute(engine.source, DDL)
    insert(engine, [(i, "a", 1, i, None) for i in range(1, 6)])
    dim = orders(engine, "batch", "seq")
    first = dim.run(progress=False)
    assert first.checkpoint == (1, 5)
    # (1, 6) and (2, 1) are past (1, 5); (1, 4) is not, even though 4 < 5 only in seq.
    insert(engine, [(6, "b", 1, 6, None), (7, "c", 2, 1, None)])
    engine.execute(engine.source, "UPDATE orders SET status = 'z' WHERE id = 4")
    second = dim.run(progress=False)
    assert (second.read, second.inserted, second.updated) == (2, 2, 0)
    assert second.checkpoint == (2, 1)


def test_checkpoint_stays_when_a_chunk_fails(engine: Engine) -> None:
    engine.execute(engine.source, DDL)
    insert(engine, [(i, str(i), 1, i, None) for i in range(1, 21)])
    engine.execute(engine.source, "UPDATE orders SET status = 'oops' WHERE id = 18")
    dim = (orders(engine, "seq").columns(id="id", status=pl.col("status").cast(pl.Int64))
           .chunks(count=3))
    failed = dim.run(n_jobs=2, progress=False)
    assert failed.status == "FAILED"
    assert [c.status for c in failed.chunks].count("FAILED") == 1
    assert "oops" in (failed.message or "")
    assert failed.checkpoint is None
    # The stored checkpoint did not move, so a later run reads the whole window again.
    assert dim.plan().window.stored is None  # type: ignore[union-attr]
    rows = engine.query(engine.target, "SELECT status, checkpoint FROM mapperdsl_jobs")
    assert rows == [("FAILED", None)]


def test_lag_reopens_the_window(engine: Engine) -> None:
    engine.execute(engine.source, DDL)
    insert(engine, [(1, "a", 1, 1, "2026-01-01 10:00:00")])
    dim = orders(engine, "changed_at", lag=timedelta(hours=1))
    dim.run(progress=False)
    # A row committed late with an older value inside the lag is still read.
    insert(engine, [(2, "late", 1, 2, "2026-01-01 09:30:00")])
    second = dim.run(progress=False)
    assert (second.read, second.inserted, second.unchanged) == (2, 1, 1)


def test_deletes_apply_on_full_runs_of_an_incremental_mapping(engine: Engine) -> None:
    engine.execute(engine.source, DDL)
    insert(engine, [(i, "a", 1, i, None) for i in range(1, 11)])
    dim = orders(engine, "seq").scd2(deletes="close")
    plan = dim.plan()
    assert any("deletes='close' applies on full runs only" in d for d in plan.decisions)
    assert md.run(plan, progress=False).inserted == 10
    engine.execute(engine.source, "DELETE FROM orders WHERE id <= 3")
    assert dim.run(progress=False).closed == 0  # an incremental run cannot see deletes
    full = dim.full().run(progress=False)
    assert (full.read, full.closed, full.unchanged) == (7, 3, 7)
    assert dim.run(progress=False).read == 0  # the full run kept the stored checkpoint


def test_a_template_mapping_keeps_one_checkpoint_per_target(engine: Engine) -> None:
    engine.execute(engine.source, DDL)
    insert(engine, [(i, "a", 1, i, None) for i in range(1, 11)])
    base = orders(engine, "seq")
    a = base.target(engine.target, table="dim_a")
    b = base.target(engine.target, table="dim_b")
    assert a.run(progress=False).inserted == 10
    first_b = b.run(progress=False)  # its own window, not dim_a's checkpoint
    assert (first_b.read, first_b.inserted) == (10, 10)


def test_hostile_checkpoint_values_are_escaped(engine: Engine) -> None:
    engine.execute(engine.source, "CREATE TABLE notes (id INTEGER, status TEXT, tag TEXT)")
    hostile = ["a'b", "x'; DROP TABLE notes; --", "c\\d", "%", "e\"f"]
    engine.execute(engine.source, rows=[(i, "s", t) for i, t in enumerate(hostile, 1)],
                   insert=f"INSERT INTO notes VALUES ({engine.placeholders(3)})")
    dim = (md.mapping("notes").source(engine.source, table="notes").key("id")
           .columns(id="id", status="status").scd2().incremental("tag")
           .target(engine.target, table="dim_notes"))
    first = dim.run(progress=False)
    assert first.inserted == 5 and first.checkpoint == (max(hostile),)
    engine.execute(engine.source, rows=[(9, "s", "zz'z")],
                   insert=f"INSERT INTO notes VALUES ({engine.placeholders(3)})")
    second = dim.run(progress=False)
    assert (second.read, second.inserted) == (1, 1)
    assert engine.query(engine.source, "SELECT COUNT(*) FROM notes") == [(6,)]


def test_few_keys_read_only_their_target_rows(sqlite_engine: Engine) -> None:
    # Without deletes to see, a chunk that read few keys asks the target for those keys only.
    from mapperdsl.merge.diff import current_state_sql

    engine = sqlite_engine
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, {1: ("a", "a@x", "s"), 2: ("b", "b@x", "s")})
    plan = (md.mapping("few").source(engine.source, table="customer").key("id").scd2()
            .target(engine.target, table="dim_few").plan())
    chunk = plan.chunks[0]
    sql = current_state_sql(plan, chunk, pl.DataFrame({"id": [2, None, 7]}))
    assert sql.endswith(' AND "id" IN (2,7)')  # (no NULL key is ever a target's)
    assert " IN (" not in current_state_sql(plan, chunk)


def test_a_sqlite_time_checkpoint_compares_moments_not_their_text(sqlite_engine: Engine) -> None:
    # SQLite keeps times as text in the user's forms: in a column of times with a zone,
    # '09:30:00+00:00' is after '10:00:00+02:00' (08:00 UTC) but sorts before it, so it was
    # never read again; nor was a change after a fall-back hour ('02:10+01:00').
    e = sqlite_engine
    e.execute(e.source, "CREATE TABLE ev (id INTEGER PRIMARY KEY, v TEXT, ts TIMESTAMPTZ)",
              "CREATE INDEX ev_ts ON ev (ts)",
              "INSERT INTO ev VALUES (1, 'a', '2024-01-01 10:00:00+02:00'), "
              "(3, 'c', '2024-10-27 02:30:00+02:00')")
    dim = (md.mapping("ev").source(e.source, table="ev").key("id").scd1().incremental("ts")
           .target(e.target, table="dim_ev"))
    first = dim.run(progress=False)
    assert (first.inserted, first.checkpoint) == (2, ("2024-10-27 00:30:00",))
    e.execute(e.source, "INSERT INTO ev VALUES (2, 'b', '2024-10-27T01:30:00.25Z'), "
                        "(4, 'd', '2024-10-27 02:10:00+01:00'), (5, 'early', '2024-01-01 09:00:00')")
    second = dim.run(progress=False)
    assert (second.inserted, second.checkpoint) == (2, ("2024-10-27 01:30:00.25",))
    assert e.query(e.target, "SELECT id FROM dim_ev ORDER BY id") == [(1,), (2,), (3,), (4,)]
    plan = dim.plan()  # the window's text range comes from the index: the days around it
    assert "\"ts\" >= '2024-10-24'" in plan.chunks[0].sql


def test_a_sqlite_checkpoint_value_unlike_its_column_is_no_high_water_mark(
        sqlite_engine: Engine) -> None:
    # Text in an INTEGER checkpoint column sorts after every number: it became the mark, and
    # no later change was read (ver > 'n/a'); nor was one after text that is no time.
    e = sqlite_engine
    e.execute(e.source, "CREATE TABLE vers (id INTEGER PRIMARY KEY, name TEXT, ver INTEGER, "
                        "at TIMESTAMP)",
              "INSERT INTO vers VALUES (1, 'a', 1, '2024-01-01'), (2, 'b', 2, '2024-01-02'), "
              "(3, 'bad', 'n/a', 'soon')")
    def dim(column: str) -> md.Mapping:
        return (md.mapping(f"vers_{column}").source(e.source, table="vers").key("id").scd1()
                .incremental(column).target(e.target, table=f"dim_{column}"))

    for column, mark in (("ver", (2,)), ("at", ("2024-01-02",))):
        assert dim(column).run(progress=False).checkpoint == mark
    e.execute(e.source, "UPDATE vers SET name = 'b2', ver = 10, at = '2024-02-01' WHERE id = 2")
    for column in ("ver", "at"):
        assert dim(column).run(progress=False).updated == 1
        assert e.query(e.target, f"SELECT name FROM dim_{column} WHERE id = 2") == [("b2",)]


def test_a_postgresql_real_checkpoint_reads_the_row_that_holds_its_mark(pg_engine: Engine) -> None:
    # psycopg gives the real 1.1 as the float 1.1, and `ck <= 1.1` compares as a double
    # (the real is 1.10000002): the row holding the mark was outside its own window.
    e = pg_engine
    e.execute(e.source, "CREATE TABLE r (id int PRIMARY KEY, name text, ck real)",
              "INSERT INTO r VALUES (1, 'a', 0.5), (2, 'b', 0.75), (3, 'c', 1.1)")
    dim = (md.mapping("r").source(e.source, table="r").key("id").scd1().incremental("ck")
           .target(e.target, table="dim_r"))
    first = dim.run(progress=False)
    assert (first.read, first.inserted) == (3, 3), first
    e.execute(e.source, "UPDATE r SET name = 'a2', ck = 2.2 WHERE id = 1")
    second = dim.run(progress=False)
    assert (second.read, second.updated) == (1, 1), second


def test_a_sqlite_time_sqlite_reads_no_moment_in_compares_as_it_is_kept(
        sqlite_engine: Engine) -> None:
    # A Unix time in a DATETIME column, or an offset without its colon ('+0200'): SQLite's
    # date functions read no moment in them, and such a column's rows were in no window at
    # all (the plan found no high-water mark): they compare as they are kept, as before.
    e = sqlite_engine
    e.execute(e.source, "CREATE TABLE ep (id INTEGER PRIMARY KEY, v TEXT, at DATETIME, "
                        "off DATETIME)",
              "INSERT INTO ep VALUES (1, 'a', 1704067200, '2024-01-01 10:00:00+0200')")
    def dim(column: str) -> md.Mapping:
        return (md.mapping(f"ep_{column}").source(e.source, table="ep").key("id")
                .columns(id="id", v="v").scd1().incremental(column)
                .target(e.target, table=f"dim_{column}"))

    for column in ("at", "off"):
        assert dim(column).run(progress=False).inserted == 1
    e.execute(e.source, "INSERT INTO ep VALUES (2, 'b', 1704153600, '2024-01-02 10:00:00+0200')")
    for column in ("at", "off"):
        again = dim(column).run(progress=False)
        assert (again.read, again.inserted) == (1, 1), (column, again)


def test_a_composite_sqlite_time_checkpoint_finds_its_mark_through_the_index(
        sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its mark was the largest moment of every row: a scan and sort of the whole table.
    from mapperdsl.plan import facts

    e = sqlite_engine
    e.execute(e.source, "CREATE TABLE cp (id INTEGER PRIMARY KEY, v TEXT, at TIMESTAMPTZ)",
              "CREATE INDEX cp_at ON cp (at, id)",
              *(f"INSERT INTO cp VALUES ({i}, 'x', '2024-01-{i:02d} 10:00:00')"
                for i in range(1, 29)))
    asked: list[str] = []
    real = facts.execute
    monkeypatch.setattr(facts, "execute",
                        lambda conn, sql, **kw: (asked.append(sql), real(conn, sql, **kw))[1])
    plan = (md.mapping("cp").source(e.source, table="cp").key("id").scd1()
            .incremental(["at", "id"]).target(e.target, table="dim_cp")).plan()
    assert plan.window is not None and plan.window.high == ("2024-01-28 10:00:00", 28)
    mark = next(sql for sql in asked if "ORDER BY COALESCE" in sql)
    steps = " ".join(str(r[-1]) for r in e.query(e.source, f"EXPLAIN QUERY PLAN {mark}"))
    assert "USING COVERING INDEX cp_at (at>?)" in steps, steps  # only the last days

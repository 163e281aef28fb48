"""SCD1 and SCD2 merges against a pure-Python reference model, on every engine."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import date, timedelta

import polars as pl
import pytest

import mapperdsl as md
from mapperdsl.execute.transform import duplicated_in_order

from conftest import Engine
from helpers import (
    CUSTOMER_DDL,
    Snapshot,
    current_versions,
    load_snapshot,
    read_scd2,
    scd1_model,
    scd2_model,
    step_time,
)

BASE: Snapshot = {
    1: ("Ann", "ann@x.org", "retail"),
    2: ("a|b", "c", "retail"),          # separator values: must not collide with id 3's change
    3: ("a", "b|c", "retail"),
    4: (None, "dan@x.org", "retail"),   # NULL, later a value
    5: ("Eve", "", "business"),         # empty string, later NULL
    6: ("Bob", "bob@x.org", "business"),
    7: ("Tom", "tom@x.org", None),
    8: ("Sue", "sue@x.org", "retail"),
    **{i: (f"name {i}", f"n{i}@x.org", "retail") for i in range(9, 41)},
}


def scenario() -> list[Snapshot]:
    s1 = dict(BASE)
    s1[2] = ("a", "b|c", "retail")        # same joined text as id 3 had: still a change
    s1[3] = ("a|b", "c", "retail")
    s1[4] = ("Dan", "dan@x.org", "retail")  # NULL -> value
    s1[5] = ("Eve", None, "business")       # "" -> NULL
    s1[6] = ("Bob ", "bob@x.org", "business")  # whitespace-only change
    del s1[8]                               # deleted
    s1[41] = ("New", "new@x.org", "retail")  # inserted
    s2 = dict(s1)
    s2[6] = ("bob ", "bob@x.org", "business")  # case-only change
    s2[8] = ("Sue", "sue@x.org", "retail")     # deleted key returns
    s2[7] = ("Tom", "tom@x.org", "")           # NULL -> ""
    s3 = dict(s2)                              # no change at all
    s4 = {k: v for k, v in s3.items() if k % 5}  # many deletes
    s4[5] = ("Eve", "eve@x.org", "business")
    return [BASE, s1, s2, s3, s4]


def customer_mapping(engine: Engine, **scd: object) -> md.Mapping:
    m = (md.mapping("dim_customer")
         .source(engine.source, table="customer")
         .key("id")
         .columns(id="id", name="name", email="email", segment="segment")
         .chunks(count=3)
         .target(engine.target, table="dim_customer"))
    return m.scd1(**scd) if scd.pop("type", 2) == 1 else m.scd2(**scd)  # type: ignore[arg-type]


def run_scenario(engine: Engine, n_jobs: int) -> Iterator[tuple[int, md.JobResult]]:
    """Each snapshot of :func:`scenario` loaded into the source, then an SCD2 run (closing
    deletes): the step and its result, once the run succeeded."""
    engine.execute(engine.source, CUSTOMER_DDL)
    dim = customer_mapping(engine, deletes="close")
    for step, snap in enumerate(scenario()):
        load_snapshot(engine, snap)
        result = md.run(dim.plan(effective_time=step_time(step)), n_jobs=n_jobs, progress=False)
        assert result.ok, result
        yield step, result


def test_scd2_history_matches_reference_model(engine: Engine) -> None:
    snapshots = scenario()
    for step, result in run_scenario(engine, n_jobs=2):
        assert read_scd2(engine) == scd2_model(snapshots[: step + 1]), f"after step {step}"
        assert set(current_versions(engine).values()) == {1}
        if step == 3:  # the no-op step writes nothing
            assert (result.inserted, result.updated, result.closed) == (0, 0, 0), result
    assert result.read == len(snapshots[-1])


def test_scd2_counts_each_kind_of_change(engine: Engine) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    dim = customer_mapping(engine, deletes="close")
    snapshots = scenario()
    load_snapshot(engine, snapshots[0])
    md.run(dim.plan(effective_time=step_time(0)), progress=False)
    load_snapshot(engine, snapshots[1])
    result = md.run(dim.plan(effective_time=step_time(1)), progress=False)
    assert result.counts() == {"read": 40, "inserted": 1, "updated": 5, "closed": 1,
                               "deleted": 0, "unchanged": 34, "rejected": 0}


def test_scd2_ignore_keeps_deleted_keys_current(engine: Engine) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    dim = customer_mapping(engine, deletes="ignore")
    snapshots = scenario()
    for step, snap in enumerate(snapshots):
        load_snapshot(engine, snap)
        assert md.run(dim.plan(effective_time=step_time(step)), progress=False).ok
    assert read_scd2(engine) == scd2_model(snapshots, deletes="ignore")


def _read_scd1(engine: Engine, flag: bool) -> list[tuple[object, ...]]:
    extra = ", is_deleted" if flag else ""
    rows = engine.query(engine.target, f"SELECT id, name, email, segment{extra} FROM dim_customer")
    if flag:
        return sorted(((r[0], r[1:4], bool(r[4])) for r in rows), key=repr)
    return sorted(((r[0], r[1:4]) for r in rows), key=repr)


def test_scd1_delete_and_soft_delete_match_reference_model(engine: Engine) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    snapshots = scenario()
    for deletes in ("delete", "close", "ignore"):
        engine.execute(engine.target, "DROP TABLE IF EXISTS dim_customer",
                       "DROP TABLE IF EXISTS mapperdsl_checkpoints")
        dim = customer_mapping(engine, type=1, deletes=deletes)
        for step, snap in enumerate(snapshots):
            load_snapshot(engine, snap)
            result = md.run(dim.plan(effective_time=step_time(step)), progress=False)
            assert result.ok, result
        expected = scd1_model(snapshots, deletes=deletes)
        if deletes == "ignore":
            expected = sorted(scd1_model(snapshots, deletes="close"), key=repr)
            expected = sorted(((k, v) for k, v, _ in expected), key=repr)
        assert _read_scd1(engine, deletes == "close") == expected, deletes
        assert (result.updated, result.deleted) == ((1, 7) if deletes == "delete" else (1, 0))


def test_rerun_without_change_writes_nothing(engine: Engine) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, BASE)
    dim = customer_mapping(engine, deletes="close")
    md.run(dim.plan(effective_time=step_time(0)), progress=False)
    before = engine.query(engine.target, "SELECT * FROM dim_customer ORDER BY id")
    again = md.run(dim.plan(effective_time=step_time(1)), n_jobs=2, progress=False)
    assert again.counts() == {"read": 40, "inserted": 0, "updated": 0, "closed": 0,
                              "deleted": 0, "unchanged": 40, "rejected": 0}
    assert engine.query(engine.target, "SELECT * FROM dim_customer ORDER BY id") == before


def test_rejects_are_counted_exactly_and_kept(engine: Engine) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    rows: Snapshot = {i: (f"n{i}", f"e{i}", "retail") for i in range(1, 11)}
    load_snapshot(engine, rows)
    engine.execute(engine.source,
                   "INSERT INTO customer VALUES (NULL, 'nokey', 'x', 'retail')",
                   "INSERT INTO customer VALUES (3, 'dup', 'x', 'retail')",
                   "INSERT INTO customer VALUES (NULL, 'nokey2', 'y', NULL)")
    dim = customer_mapping(engine, deletes="close")
    result = md.run(dim.plan(), n_jobs=2, progress=False)
    assert result.ok
    assert result.counts() == {"read": 13, "inserted": 9, "updated": 0, "closed": 0,
                               "deleted": 0, "unchanged": 0, "rejected": 4}
    kept = engine.query(engine.target, "SELECT job_id, chunk, key, reason, row FROM "
                                       "mapperdsl_rejects ORDER BY reason, row")
    assert [(r[2], r[3]) for r in kept] == [
        ("3", "business key appears more than once in the source"),
        ("3", "business key appears more than once in the source"),
        (None, "business key is NULL"),
        (None, "business key is NULL"),
    ]
    assert {r[0] for r in kept} == {result.job_id}
    assert json.loads(kept[2][4])["name"] == "nokey"
    # The duplicated key is neither inserted nor closed while it is duplicated.
    assert 3 not in current_versions(engine)


def test_rejected_key_is_not_closed_as_deleted(engine: Engine) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, {1: ("a", "b", "c"), 2: ("d", "e", "f")})
    dim = customer_mapping(engine, deletes="close")
    md.run(dim.plan(effective_time=step_time(0)), progress=False)
    engine.execute(engine.source, "INSERT INTO customer VALUES (2, 'dup', 'e', 'f')")
    result = md.run(dim.plan(effective_time=step_time(1)), progress=False)
    assert (result.rejected, result.closed) == (2, 0)
    assert current_versions(engine) == {1: 1, 2: 1}


def test_values_that_do_not_fit_the_target_type_are_rejected(engine: Engine) -> None:
    engine.execute(engine.source, "CREATE TABLE src (id INTEGER, amount TEXT)")
    engine.execute(engine.target,
                   "CREATE TABLE dim_amount (id BIGINT NOT NULL, amount NUMERIC(8,2), "
                   "row_hash BIGINT NOT NULL)")
    engine.execute(engine.source, rows=[(1, "12.50"), (2, "not a number"), (3, None)],
                   insert=f"INSERT INTO src VALUES ({engine.placeholders(2)})")
    dim = (md.mapping("amounts").source(engine.source, table="src").key("id")
           .columns(id="id", amount="amount").scd1().target(engine.target, table="dim_amount"))
    plan = dim.plan()
    assert any("amount: String is cast to the target's Decimal(8,2)" in d for d in plan.decisions)
    result = md.run(plan, progress=False)
    assert (result.read, result.inserted, result.rejected) == (3, 2, 1)
    reason, row = engine.query(engine.target, "SELECT reason, row FROM mapperdsl_rejects")[0]
    assert "amount" in reason and "Decimal(8,2)" in reason
    assert json.loads(row) == {"id": "2", "amount": "not a number"}


def test_query_source_with_percent_and_expressions(engine: Engine) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, BASE)
    dim = (md.mapping("dim_query")
           .source(engine.source, query="SELECT id, name, LOWER(email) AS email_lc, 1 AS one "
                                        "FROM customer WHERE email LIKE '%@x.org'")
           .key("id").scd2().chunks(count=2).target(engine.target, table="dim_query"))
    plan = dim.plan()
    assert "FROM (SELECT id, name" in plan.chunks[0].sql
    result = md.run(plan, n_jobs=2, progress=False)
    assert result.ok, result
    expected = sum(1 for v in BASE.values() if v[1] and v[1].endswith("@x.org"))
    assert result.inserted == expected
    assert engine.query(engine.target, "SELECT MIN(one), MAX(one) FROM dim_query") == [(1, 1)]


def load_src(engine: Engine, rows: list[tuple[int, str]]) -> md.JobResult:
    """``rows`` (id, amount text) as the source ``src``, loaded into the SCD1 ``dim_d``."""
    engine.execute(engine.source, "CREATE TABLE src (id INTEGER, amount TEXT)")
    engine.execute(engine.source, rows=rows,
                   insert=f"INSERT INTO src VALUES ({engine.placeholders(2)})")
    return (md.mapping("d").source(engine.source, table="src").key("id").scd1()
            .target(engine.target, table="dim_d").run(progress=False))


def test_every_row_of_a_duplicate_key_is_rejected_even_a_bad_one(engine: Engine) -> None:
    engine.execute(engine.target, "CREATE TABLE dim_d (id BIGINT NOT NULL, amount NUMERIC(8,2), "
                                  "row_hash BIGINT NOT NULL)")
    result = load_src(engine, [(1, "x"), (1, "2.00"), (2, "3.00")])
    assert (result.read, result.inserted, result.rejected) == (3, 1, 2)
    keys = engine.query(engine.target, "SELECT key, reason FROM mapperdsl_rejects ORDER BY id")
    assert keys == [("1", "business key appears more than once in the source")] * 2


@pytest.mark.parametrize("ids", [[1, 2, 2, 2, 3, 4, 4], [4, 2, 2, 1, 3, 4, 2]],
                         ids=["in key order", "out of order"])
def test_duplicate_keys_are_found_in_and_out_of_key_order(engine: Engine, ids: list[int]) -> None:
    # Keys read in ascending order are compared with their neighbours, others by hashing:
    # both reject every row of keys 2 and 4, first and last rows included.
    result = load_src(engine, [(i, f"{n}.00") for n, i in enumerate(ids)])
    assert (result.read, result.inserted, result.rejected) == (7, 2, 5)
    keys = engine.query(engine.target, "SELECT key FROM mapperdsl_rejects ORDER BY key")
    assert keys == [("2",)] * 3 + [("4",)] * 2


def test_duplicates_by_neighbours_match_hashing() -> None:
    rng = random.Random(5)
    for _ in range(200):
        values = sorted(rng.randint(0, 30) for _ in range(rng.randint(1, 40)))
        in_order = [pl.DataFrame({"k": values}),
                    pl.DataFrame({"k": [str(v).zfill(2) for v in values]}),
                    pl.DataFrame({"k": [date(2024, 1, 1) + timedelta(days=v) for v in values]})]
        for frame in in_order:
            expected = frame.select(pl.col("k").is_duplicated()).to_series().to_list()
            found = duplicated_in_order(frame)
            assert found is not None and found.to_list() == expected, values
        if len(set(values)) > 1:  # out of order: left to the hash table
            assert duplicated_in_order(pl.DataFrame({"k": values[::-1]})) is None
    for other in (pl.DataFrame({"k": [1, None, 2]}), pl.DataFrame({"k": [1.0, 1.0]}),
                  pl.DataFrame({"k": [1, 1], "j": [1, 2]})):
        assert duplicated_in_order(other) is None  # a NULL, a float, two key columns


def test_sqlite_inserts_many_rows_per_statement(sqlite_engine: Engine,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # With 20 parameters a statement, 40 rows go 4 to a statement and the rest one by
    # one (the chunks run in this process, so the patched limit holds); the history is the
    # model's, NULLs, empty strings and the history literals included.
    from mapperdsl.merge import write

    monkeypatch.setattr(write, "SQLITE_PARAMETERS", 20)
    assert len(list(run_scenario(sqlite_engine, n_jobs=1))) == len(scenario())
    assert read_scd2(sqlite_engine) == scd2_model(scenario())


SCD2_TARGET = ("id BIGINT NOT NULL, name TEXT, email TEXT, segment TEXT, valid_from TIMESTAMPTZ "
               "NOT NULL, valid_to TIMESTAMPTZ, is_current BOOLEAN NOT NULL, row_hash BIGINT NOT NULL")


def test_sqlite_closes_versions_without_splitting_pages(sqlite_engine: Engine) -> None:
    # A current version's valid_to is NULL; setting it in place grows the row by a
    # timestamp, and the full pages of a bulk-loaded table split (twice as slow at 1M
    # rows). Closed versions are moved to the table's end instead, so the table grows by
    # the pages of the new and the moved versions only (in place here: twice as many).
    e = sqlite_engine
    e.execute(e.source, CUSTOMER_DDL)
    rows, every = 20_000, 40
    base = {i: (f"name {i:05}", f"n{i:05}@example.org", "retail") for i in range(rows)}
    changed = {i: (v[0].upper(), *v[1:]) if i % every == 0 else v for i, v in base.items()}
    load_snapshot(e, base)
    dim = customer_mapping(e, deletes="close")
    md.run(dim.plan(effective_time=step_time(0)), progress=False)
    pages = e.query(e.target, "PRAGMA page_count")[0][0]
    load_snapshot(e, changed)
    result = md.run(dim.plan(effective_time=step_time(1)), progress=False)
    assert (result.inserted, result.updated) == (0, rows // every)
    grown = e.query(e.target, "PRAGMA page_count")[0][0] - pages
    versions = 2 * rows // every * pages / rows  # the pages 2 x 500 rows fill, as loaded
    assert grown < 1.5 * versions, (pages, grown, versions)
    assert read_scd2(e) == scd2_model([base, changed])


def test_sqlite_moved_versions_keep_the_users_own_columns(sqlite_engine: Engine) -> None:
    e = sqlite_engine
    e.execute(e.target, f"CREATE TABLE dim_customer ({SCD2_TARGET}, \"my :note\" TEXT DEFAULT 'new', "
                        "label TEXT GENERATED ALWAYS AS (name || '!') VIRTUAL)")
    snapshots = []
    for step, _ in run_scenario(e, n_jobs=1):
        snapshots.append(scenario()[step])
        if step == 0:
            e.execute(e.target, "UPDATE dim_customer SET \"my :note\" = 'mine ' || id")
            first = dict(e.query(e.target, "SELECT id, rowid FROM dim_customer"))
        if step == 1:
            break
    assert read_scd2(e) == scd2_model(snapshots)
    closed = e.query(e.target, "SELECT id, \"my :note\", label, rowid FROM dim_customer "
                               "WHERE NOT is_current ORDER BY id")
    assert [(k, n, lab) for k, n, lab, _ in closed] == [
        (k, f"mine {k}", None if BASE[k][0] is None else BASE[k][0] + "!") for k in (2, 3, 4, 5, 6, 8)]
    assert all(rowid > max(first.values()) for *_, rowid in closed)  # moved


def test_sqlite_closes_in_place_where_row_ids_mean_something(sqlite_engine: Engine) -> None:
    # A surrogate INTEGER PRIMARY KEY is the row id, which facts may point at; a unique
    # index of the user's would see a moved copy beside its original; a trigger would see
    # a move as an insert and a delete (its table named in another case: SQLite's names
    # are case-blind). Such tables are updated in place.
    e = sqlite_engine
    e.execute(e.target, f"CREATE TABLE dim_customer (sk INTEGER PRIMARY KEY, {SCD2_TARGET})",
              f"CREATE TABLE dim_other ({SCD2_TARGET})",
              f"CREATE TABLE dim_unique ({SCD2_TARGET}, UNIQUE (id, valid_from))",
              "CREATE TABLE audit (id BIGINT, what TEXT)",
              "CREATE TRIGGER on_update AFTER UPDATE ON DIM_OTHER BEGIN "
              "INSERT INTO audit VALUES (old.id, 'update'); END",
              "CREATE TRIGGER on_delete AFTER DELETE ON Dim_Other BEGIN "
              "INSERT INTO audit VALUES (old.id, 'delete'); END")
    others = [(md.mapping(table).source(e.source, table="customer").key("id")
               .columns(id="id", name="name", email="email", segment="segment")
               .scd2(deletes="close").target(e.target, table=table))
              for table in ("dim_other", "dim_unique")]
    snapshots = []
    for step, _ in run_scenario(e, n_jobs=1):
        for other in others:
            assert md.run(other.plan(effective_time=step_time(step)), progress=False).ok
        snapshots.append(scenario()[step])
        if step == 0:
            sks = dict(e.query(e.target, "SELECT id, sk FROM dim_customer"))
            rowids = {t: dict(e.query(e.target, f"SELECT id, rowid FROM {t}"))
                      for t in ("dim_other", "dim_unique")}
        if step == 1:
            break
    assert read_scd2(e) == scd2_model(snapshots) == read_scd2(e, "dim_other") \
        == read_scd2(e, "dim_unique")
    closed = {2, 3, 4, 5, 6, 8}
    assert dict(e.query(e.target, "SELECT id, sk FROM dim_customer WHERE NOT is_current")) == {
        k: sks[k] for k in closed}
    for table, ids in rowids.items():
        assert dict(e.query(e.target, f"SELECT id, rowid FROM {table} WHERE NOT is_current")) \
            == {k: ids[k] for k in closed}
    assert sorted(e.query(e.target, "SELECT id, what FROM audit")) == [
        (k, "update") for k in sorted(closed)]

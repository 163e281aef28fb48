"""Every common column type round-trips exactly, with NULLs, and hashes the same on both engines."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import polars as pl
import pytest

import mapperdsl as md
from mapperdsl import connect

from conftest import Engine

UTC = timezone.utc
PLUS2 = timezone(timedelta(hours=2))

DDL = {
    "sqlite": "CREATE TABLE typed (id INTEGER, i INTEGER, b BIGINT, amount NUMERIC(12,2), "
              "r REAL, d DOUBLE, s TEXT, day DATE, ts TIMESTAMP, tstz TIMESTAMPTZ, flag BOOLEAN)",
    "postgresql": "CREATE TABLE typed (id integer, i integer, b bigint, amount numeric(12,2), "
                  "r real, d double precision, s text, day date, ts timestamp, "
                  "tstz timestamptz, flag boolean)",
}

# id, i, b, amount, r, d, s, day, ts, tstz, flag
ROWS: list[tuple[Any, ...]] = [
    (1, 2147483647, 9007199254740993, Decimal("12345678.90"), 1.5, 0.1, "héllo ✓ 日本 \"q\" 'a'",
     date(2024, 2, 29), datetime(2024, 1, 2, 3, 4, 5, 123456),
     datetime(2024, 1, 2, 5, 4, 5, 123456, tzinfo=PLUS2), True),
    (2, -2147483648, -9223372036854775807, Decimal("-0.01"), -2.25, 1e300, "",
     date(1970, 1, 1), datetime(1999, 12, 31, 23, 59, 59),
     datetime(2000, 1, 1, 0, 0, tzinfo=UTC), False),
    (3, None, None, None, None, None, None, None, None, None, None),
    (4, 0, 0, Decimal("0.00"), 0.0, -0.5, "a,b|c\nd;e", date(9999, 12, 31),
     datetime(2024, 6, 30, 12, 0, 0, 1), datetime(2024, 6, 30, 12, 0, 0, 1, tzinfo=UTC), None),
]


def sqlite_value(v: Any) -> Any:
    """How a SQLite user stores the value (sqlite3 has no decimal, date or time types)."""
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, date):
        return v.isoformat()
    return v


def load(engine: Engine) -> md.JobResult:
    engine.execute(engine.source, DDL[engine.name])
    rows = [tuple(sqlite_value(v) for v in r) for r in ROWS] if engine.name == "sqlite" else ROWS
    engine.execute(engine.source, rows=rows,
                   insert=f"INSERT INTO typed VALUES ({engine.placeholders(11)})")
    dim = (md.mapping("typed").source(engine.source, table="typed").key("id").scd1()
           .target(engine.target, table="dim_typed"))
    result = dim.run(progress=False)
    assert result.ok and result.inserted == len(ROWS), result
    return result


def expected_utc(v: Any) -> Any:
    return v.astimezone(UTC) if isinstance(v, datetime) and v.tzinfo else v


def test_types_round_trip_on_postgresql(pg_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Read as a plain query's rows, not COPY ... BINARY (ConnectorX's default), which costs
    # the client more CPU (connect.py read_arrow): every read asks for it, and the types still
    # round-trip.
    protocols, real = [], connect.cx.read_sql

    def spy(url, sql, **kwargs):  # type: ignore[no-untyped-def]
        protocols.append(kwargs.get("protocol"))
        return real(url, sql, **kwargs)

    monkeypatch.setattr(connect.cx, "read_sql", spy)
    load(pg_engine)
    assert protocols and set(protocols) == {"cursor"}, protocols
    got = pg_engine.query(pg_engine.target, "SELECT id, i, b, amount, r, d, s, day, ts, tstz, flag "
                                            "FROM dim_typed ORDER BY id")
    for want, have in zip(ROWS, got, strict=True):
        assert tuple(expected_utc(v) for v in want) == tuple(
            v.astimezone(UTC) if isinstance(v, datetime) and v.tzinfo else v for v in have)
    types = dict(pg_engine.query(pg_engine.target, "SELECT column_name, data_type || "
                 "coalesce('(' || numeric_precision || ',' || numeric_scale || ')', '') "
                 "FROM information_schema.columns WHERE table_name = 'dim_typed'"))
    assert types["amount"] == "numeric(12,2)"
    assert types["tstz"] == "timestamp with time zone"
    assert types["ts"] == "timestamp without time zone"
    assert types["b"].startswith("bigint") and types["flag"] == "boolean"


def test_types_round_trip_on_sqlite(sqlite_engine: Engine) -> None:
    load(sqlite_engine)
    got = sqlite_engine.query(sqlite_engine.target, "SELECT id, i, b, amount, r, d, s, day, ts, "
                                                    "tstz, flag FROM dim_typed ORDER BY id")
    assert got[0] == (1, 2147483647, 9007199254740993, 12345678.9, 1.5, 0.1,
                      "héllo ✓ 日本 \"q\" 'a'", "2024-02-29", "2024-01-02 03:04:05.123456",
                      "2024-01-02 03:04:05.123456+00:00", 1)
    assert got[1][3] == -0.01 and got[1][6] == "" and got[1][10] == 0
    assert got[2] == (3, *([None] * 10))
    assert got[3][6] == "a,b|c\nd;e" and got[3][7] == "9999-12-31"


def test_the_same_rows_hash_the_same_on_both_engines(sqlite_engine: Engine,
                                                      pg_engine: Engine) -> None:
    load(sqlite_engine)
    load(pg_engine)
    sql = "SELECT id, row_hash FROM dim_typed ORDER BY id"
    lite = sqlite_engine.query(sqlite_engine.target, sql)
    pg = pg_engine.query(pg_engine.target, sql)
    assert lite == pg
    assert len({h for _, h in lite}) == len(ROWS)
    # And a re-run on each engine finds every row unchanged.
    for engine in (sqlite_engine, pg_engine):
        again = (md.mapping("typed").source(engine.source, table="typed").key("id").scd1()
                 .target(engine.target, table="dim_typed")).run(progress=False)
        assert again.unchanged == len(ROWS), (engine.name, again)


def test_a_postgresql_enum_is_read_as_its_label(pg_engine: Engine) -> None:
    # ConnectorX decodes an enum from COPY ... BINARY only, not from a plain query's rows:
    # the plan reads it as text (an enum key too), and a second run finds nothing changed.
    e = pg_engine
    e.execute(e.source, "CREATE TYPE mood AS ENUM ('sad', 'happy')",
              "CREATE TABLE moods (id mood, m mood, note text)",
              "INSERT INTO moods VALUES ('sad', 'happy', 'a'), ('happy', NULL, 'b')")
    dim = (md.mapping("moods").source(e.source, table="moods").key("id").scd2()
           .target(e.target, table="dim_moods"))
    plan = dim.plan()
    assert 'CAST("m" AS TEXT) AS "m"' in plan.chunks[0].sql, plan.chunks[0].sql
    assert dim.run(progress=False).inserted == 2
    assert e.query(e.target, "SELECT id, m, note FROM dim_moods ORDER BY id") == [
        ("happy", None, "b"), ("sad", "happy", "a")]
    assert dim.run(progress=False).unchanged == 2


def test_postgresql_types_connectorx_does_not_read_as_planned_are_read_as_text(
        pg_engine: Engine) -> None:
    # The plan types every column of a type it does not know as text; ConnectorX panics on
    # an interval, money, xml or point, and reads an array as a list, an oid as a number and
    # a "char" not at all: each is cast to text in the chunk's SQL, as the plan says.
    e = pg_engine
    e.execute(e.source, "CREATE TABLE odd_types (id int, wait interval, price money, doc xml, "
              "spot point, tags int[], o oid, c \"char\", ip inet)",
              "INSERT INTO odd_types VALUES (1, '1 day 02:00', '12.50', '<a>1</a>', '(1,2)', "
              "'{1,2}', 12, 'x', '10.0.0.1'), (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)")
    dim = md.mapping("odd").source(e.source, table="odd_types").key("id").scd1().target(
        e.target, table="dim_odd")
    plan = dim.plan()
    assert 'CAST("wait" AS TEXT) AS "wait"' in plan.chunks[0].sql, plan.chunks[0].sql
    assert all(t == "String" for name, t in plan.read_columns if name != "id"), plan.read_columns
    result = dim.run(progress=False)
    assert result.ok and result.inserted == 2, result
    assert 'CAST("ip"' not in plan.chunks[0].sql  # inet is read as its output writes it, as
    assert e.query(e.target, "SELECT wait, price, doc, spot, tags, o, c, ip FROM dim_odd "
                             "ORDER BY id") == [  # before (a cast would add a /32)
        ("1 day 02:00:00", "$12.50", "<a>1</a>", "(1,2)", "{1,2}", "12", "x", "10.0.0.1"),
        (None,) * 8]
    assert dim.run(progress=False).unchanged == 2


def test_a_connectorx_panic_fails_the_job_cleanly(pg_engine: Engine,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A panic in ConnectorX is a BaseException, not an Exception: the job fails with its
    # reason, and its row and lease are closed, not left RUNNING. (The panic is ConnectorX's
    # own, on an interval, since mapperdsl reads every type it knows as text.)
    e = pg_engine
    e.execute(e.source, "CREATE TABLE waits (id int, wait text)", "INSERT INTO waits VALUES (1, 'x')")
    real = connect.cx.read_sql
    monkeypatch.setattr(connect.cx, "read_sql", lambda url, sql, **kwargs: real(
        url, "SELECT CAST('1 day' AS interval) AS wait", **kwargs))
    dim = md.mapping("waits").source(e.source, table="waits").key("id").scd1().target(
        e.target, table="dim_waits")
    result = dim.run(progress=False)
    assert not result.ok and "not implemented: interval" in (result.message or "") + "".join(
        c.error or "" for c in result.chunks), result
    assert e.query(e.target, "SELECT status FROM mapperdsl_jobs") == [("FAILED",)]
    assert e.query(e.target, "SELECT count(*) FROM mapperdsl_leases")[0][0] == 0


def test_postgresql_bytea_uuid_and_copy_end_marker(pg_engine: Engine) -> None:
    e = pg_engine
    e.execute(e.source, "CREATE TABLE odd (id uuid, t text, b bytea, n numeric)",
              "INSERT INTO odd VALUES ('00000000-0000-0000-0000-000000000001', '\\.', "
              "'\\x00ff'::bytea, 1.5), ('00000000-0000-0000-0000-000000000002', '', NULL, "
              "1.23456789012345678901), ('00000000-0000-0000-0000-000000000003', NULL, "
              "'\\x'::bytea, NULL)")
    dim = (md.mapping("odd").source(e.source, table="odd").key("id").scd1(deletes="delete")
           .chunks(count=2).target(e.target, table="dim_odd"))
    result = dim.run(progress=False)
    # The unconstrained numeric with 20 decimals does not fit Decimal(38,10): rejected, not cut.
    assert (result.inserted, result.rejected) == (2, 1), result
    reason = e.query(e.target, "SELECT reason FROM mapperdsl_rejects")[0][0]
    assert "column n: value does not fit Decimal(38,10)" in reason
    rows = e.query(e.target, "SELECT id, t, b, n FROM dim_odd ORDER BY id")
    assert rows == [("00000000-0000-0000-0000-000000000001", "\\.", b"\x00\xff", Decimal("1.5")),
                    ("00000000-0000-0000-0000-000000000003", None, b"", None)]
    e.execute(e.source, "DELETE FROM odd WHERE t = '\\.'")  # a staged key holding \. deletes
    again = dim.run(progress=False)
    assert (again.deleted, again.rejected) == (1, 1)
    assert len(e.query(e.target, "SELECT id FROM dim_odd")) == 1


@pytest.mark.parametrize("extra", ["", ", u uuid"])  # binary COPY; CSV (no uuid encoder)
def test_postgresql_infinity_stays_infinity(pg_engine: Engine, sqlite_engine: Engine,
                                            extra: str) -> None:
    # ConnectorX reads 'infinity' as chrono's last instant (the year +262142): written back
    # as that, a timestamp became a date 260,000 years on and a -infinity timestamptz
    # failed its chunk (out of range). Both targets get infinity; a re-run finds no change.
    e = pg_engine
    e.execute(e.source, f"CREATE TABLE spans (id int, ts timestamp, tz timestamptz, d date{extra})",
              "INSERT INTO spans (id, ts, tz, d) VALUES (1, 'infinity', '-infinity', 'infinity'), "
              "(2, '-infinity', 'infinity', '-infinity'), "
              "(3, '2024-01-02 03:04:05', '2024-01-02 03:04:05+00', '2024-01-02'), (4, NULL, NULL, NULL)")
    for target in (e.target, sqlite_engine.target):
        dim = md.mapping("spans").source(e.source, table="spans").key("id").scd2().target(
            target, table="dim_spans")
        result = dim.run(progress=False)
        assert result.ok and result.inserted == 4, result
        assert dim.run(progress=False).unchanged == 4
    cast = "SELECT id, CAST(ts AS text), CAST(tz AS text), CAST(d AS text) FROM dim_spans ORDER BY id"
    assert e.query(e.target, cast)[:2] == [(1, "infinity", "-infinity", "infinity"),
                                           (2, "-infinity", "infinity", "-infinity")]
    assert e.query(e.target, cast)[2][1:] == ("2024-01-02 03:04:05", "2024-01-02 03:04:05+00",
                                             "2024-01-02")
    assert sqlite_engine.query(sqlite_engine.target, "SELECT id, ts, tz, d FROM dim_spans "
                                                     "ORDER BY id")[:2] == [
        (1, "infinity", "-infinity", "infinity"), (2, "-infinity", "infinity", "-infinity")]


def test_an_incremental_checkpoint_on_infinity_is_a_plan_error(pg_engine: Engine,
                                                               sqlite_engine: Engine) -> None:
    # SQLite holds it as the text 'infinity', as mapperdsl writes a PostgreSQL infinity there.
    sqlite_engine.execute(sqlite_engine.source, "CREATE TABLE spans (id INTEGER, up TIMESTAMP)",
                          "INSERT INTO spans VALUES (1, 'infinity'), (2, '2024-01-02')")
    with pytest.raises(md.PlanError, match="hold infinity: no row would ever be later"):
        (md.mapping("spans").source(sqlite_engine.source, table="spans").key("id").scd2()
         .incremental("up").target(sqlite_engine.target, table="dim_spans")).plan()
    sqlite_engine.execute(sqlite_engine.source, "CREATE TABLE tags (id INTEGER, tag TEXT)",
                          "INSERT INTO tags VALUES (1, 'infinity'), (2, 'alpha')")
    assert (md.mapping("tags").source(sqlite_engine.source, table="tags").key("id").scd2()
            .incremental("tag").target(sqlite_engine.target, table="dim_tags")).plan()  # a word
    e = pg_engine
    e.execute(e.source, "CREATE TABLE spans (id int, up timestamptz)",
              "INSERT INTO spans VALUES (1, 'infinity'), (2, '2024-01-02')",
              "CREATE TABLE starts (id int, up date)", "INSERT INTO starts VALUES (1, '-infinity')")
    for table, said in (("spans", "infinity: no row would ever be later"),
                        ("starts", "-infinity as their largest value, which a checkpoint "
                                   "cannot hold")):
        dim = md.mapping(table).source(e.source, table=table).key("id").scd2().incremental(
            "up").target(e.target, table=f"dim_{table}")
        with pytest.raises(md.PlanError, match=f"checkpoint column.s. up of the source "
                                               f"'{table}' hold {said}"):
            dim.plan()


def test_infinity_through_a_column_map_a_sqlite_target_and_back(
        pg_engine: Engine, sqlite_engine: Engine) -> None:
    # Infinity stays infinity when the column map makes a time of a date or changes its
    # unit; SQLite holds it as the text 'infinity', which reads back as infinity; a reject's
    # row (here a NULL key's) shows it as 'infinity'.
    e = pg_engine
    e.execute(e.source, "CREATE TABLE spans (id int, ts timestamp, d date)",
              "INSERT INTO spans VALUES (1, 'infinity', '-infinity'), (NULL, '-infinity', "
              "'infinity'), (3, '2024-01-02 03:04:05', '2024-01-02')")
    dim = (md.mapping("spans").source(e.source, table="spans").key("id").scd1()
           .columns(id="id", ms=pl.col("ts").dt.cast_time_unit("ms"),
                    at=pl.col("d").cast(pl.Datetime("us")), d="d")
           .target(sqlite_engine.target, table="dim_spans"))
    result = dim.run(progress=False)
    assert (result.inserted, result.rejected) == (2, 1), result
    assert sqlite_engine.query(sqlite_engine.target, "SELECT id, ms, at, d FROM dim_spans "
                                                     "ORDER BY id")[0] == (
        1, "infinity", "-infinity", "-infinity")
    row = json.loads(sqlite_engine.query(sqlite_engine.target,
                                         "SELECT row FROM mapperdsl_rejects")[0][0])
    assert (row["ts"], row["d"]) == ("-infinity", "infinity"), row
    back = (md.mapping("back").source(sqlite_engine.target, table="dim_spans").key("id")
            .scd1().columns(id="id", d="d", ms="ms").target(e.target, table="dim_back"))
    assert back.run(progress=False).inserted == 2
    assert e.query(e.target, "SELECT id, CAST(d AS text), CAST(ms AS text) FROM dim_back "
                             "ORDER BY id")[0] == (1, "-infinity", "infinity")


def test_an_infinite_date_key_is_rejected_and_the_rest_loads(pg_engine: Engine) -> None:
    # A date dimension with a '-infinity' "start of time" row: no key literal or Python date
    # holds it, so its row is rejected with the reason, and planning, ranges and re-runs work.
    e = pg_engine
    e.execute(e.source, "CREATE TABLE days (d date PRIMARY KEY, note text)",
              "INSERT INTO days SELECT date '2024-01-01' + g, 'n' FROM generate_series(0, 99) g",
              "INSERT INTO days VALUES ('-infinity', 'start'), ('infinity', 'end')")
    dim = (md.mapping("days").source(e.source, table="days").key("d").scd2().chunks(count=3)
           .target(e.target, table="dim_days"))
    result = dim.run(progress=False)
    assert (result.inserted, result.rejected) == (100, 2), result
    reason = ("business key is infinity or -infinity, which no key can be: map it to a date "
              "or time in the column map or a source query")
    assert sorted(e.query(e.target, "SELECT key, reason FROM mapperdsl_rejects")) == [
        ("-infinity", reason), ("infinity", reason)]
    e.execute(e.source, "UPDATE days SET note = 'm' WHERE d = '2024-01-05'")
    again = dim.run(progress=False)
    assert (again.updated, again.unchanged, again.rejected, again.closed) == (1, 99, 2, 0), again


@pytest.mark.parametrize("kind", ["date", "timestamp", "timestamptz"])
@pytest.mark.parametrize("deletes", ["ignore", "close"])  # target read by keys; by range
def test_infinite_keys_as_chunk_bounds(pg_engine: Engine, kind: str, deletes: str) -> None:
    # One row a tile: the key walk loads both infinities as bounds (the last and first
    # value Python has); their rows are rejected. A target row of an infinite key (written
    # by another tool) is not taken for gone: the key is in the source.
    e = pg_engine
    e.execute(e.source, f"CREATE TABLE ends (k {kind}, note text)",
              "INSERT INTO ends VALUES ('-infinity', 'a'), ('2024-01-01', 'b'), "
              "('2024-01-02', 'c'), ('infinity', 'd')")
    dim = (md.mapping("ends").source(e.source, table="ends").key("k").scd2(deletes=deletes)
           .chunks(count=4).target(e.target, table="dim_ends"))
    plan = dim.plan()
    assert len([c for c in plan.chunks if not c.range.nulls]) == 4, plan.chunks
    result = md.run(plan, progress=False)
    assert (result.inserted, result.rejected) == (2, 2), result
    e.execute(e.target, "INSERT INTO dim_ends (k, note, row_hash, valid_from, valid_to, "
                        "is_current) SELECT 'infinity', 'd', row_hash, valid_from, valid_to, "
                        "is_current FROM dim_ends LIMIT 1")
    again = dim.run(progress=False)
    assert (again.unchanged, again.rejected, again.closed) == (2, 2, 0), again
    if deletes == "close":  # gone from the source now: closed, and the preview says so
        e.execute(e.source, "DELETE FROM ends WHERE k = 'infinity'")
        assert sum(c.counts["closed"] for c in dim.plan().preview().chunks) == 1
        assert dim.run(progress=False).closed == 1


def test_text_with_a_nul_character_is_rejected_by_a_postgresql_target(
        sqlite_engine: Engine, pg_engine: Engine) -> None:
    # SQLite's text may hold a NUL character, PostgreSQL's may not: the row is rejected with
    # the reason (not the whole chunk failed by the COPY), its key spelt out, and the dry
    # run's preview says the same.
    sqlite_engine.execute(sqlite_engine.source, "CREATE TABLE notes (id TEXT, note TEXT, n INTEGER)",
                          rows=[("a", "fine", 1), ("b", "x\x00y", 2), ("c\x00", "ok", 3),
                                ("d", None, 4)], insert="INSERT INTO notes VALUES (?, ?, ?)")
    dim = (md.mapping("notes").source(sqlite_engine.source, table="notes").key("id").scd2()
           .target(pg_engine.target, table="dim_notes"))
    assert dim.plan().preview().chunks[0].counts["rejected"] == 2
    result = dim.run(progress=False)
    assert (result.inserted, result.rejected) == (2, 2), result
    assert pg_engine.query(pg_engine.target, "SELECT id, note FROM dim_notes ORDER BY id") == [
        ("a", "fine"), ("d", None)]
    assert sorted(pg_engine.query(pg_engine.target, "SELECT key, reason FROM mapperdsl_rejects")) == [
        ("b", "target: column note: text holds a NUL character (\\x00), which PostgreSQL "
              "cannot store"),
        ("c\\x00", "target: column id: text holds a NUL character (\\x00), which PostgreSQL "
                    "cannot store")]
    again = dim.run(progress=False)
    assert (again.unchanged, again.rejected, again.closed) == (2, 2, 0), again
    # A categorical column is text in the target too.
    categorical = (dim.columns(id="id", note=pl.col("note").cast(pl.Categorical))
                   .target(pg_engine.target, table="dim_notes_cat")).run(progress=False)
    assert (categorical.inserted, categorical.rejected) == (2, 2), categorical


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_keys_no_literal_spells_are_found_in_the_target_by_range(
        sqlite_engine: Engine, pg_engine: Engine, target: str) -> None:
    # A run that looks the target up by the keys it read (deletes="ignore") reads the
    # chunk's range instead when a key has no SQL literal: a NUL character (SQLite stores
    # it; a PostgreSQL target rejects the row, here once as a duplicate), a float's infinity.
    url = sqlite_engine.target if target == "sqlite" else pg_engine.target
    rows = [("a", 1.5, "x"), ("e\x00", float("inf"), "y")]
    sqlite_engine.execute(sqlite_engine.source, "CREATE TABLE odd_keys (k TEXT, f REAL, note TEXT)",
                          rows=rows + [("e\x00", 3.5, "z")] * (target == "postgresql"),
                          insert="INSERT INTO odd_keys VALUES (?, ?, ?)")
    for key in ("k", "f"):
        dim = (md.mapping(f"odd_{key}").source(sqlite_engine.source, table="odd_keys").key(key)
               .scd1().target(url, table=f"dim_odd_{key}"))
        first = dim.run(progress=False)
        assert first.ok, first
        sqlite_engine.execute(sqlite_engine.source, "UPDATE odd_keys SET note = note || '!'")
        again = dim.run(progress=False)
        assert again.ok and again.updated == first.inserted, again


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_chunk_bounds_on_keys_with_a_nul_character(
        sqlite_engine: Engine, pg_engine: Engine, target: str) -> None:
    # SQLite keys may hold a NUL character, and the key walk may start a chunk on one: the
    # bound is spelt as SQLite text from its bytes, and on a PostgreSQL target (whose text
    # holds no NUL, and which rejects those rows) as the first text after the part before
    # the NUL ('a\x00c' -> 'a\x01'), which splits its keys exactly as the source's bound.
    url = sqlite_engine.target if target == "sqlite" else pg_engine.target
    keys = ["a", "a\x00b", "a\x00c", "b", "c\x00", "d"]
    sqlite_engine.execute(sqlite_engine.source, "CREATE TABLE nul_keys (k TEXT, note TEXT)",
                          rows=[(k, "x") for k in keys], insert="INSERT INTO nul_keys VALUES (?, ?)")
    dim = (md.mapping("nul_keys").source(sqlite_engine.source, table="nul_keys").key("k")
           .scd2(deletes="close").chunks(count=3).target(url, table="dim_nul_keys"))
    plan = dim.plan()
    assert [(c.range.lo, c.range.hi) for c in plan.chunks if not c.range.nulls] == [
        (None, "a\x00c"), ("a\x00c", "c\x00"), ("c\x00", None)]
    stored = 6 if target == "sqlite" else 3  # PostgreSQL: 'a', 'b' and 'd'
    first = md.run(plan, progress=False)
    assert (first.inserted, first.rejected) == (stored, 6 - stored), first
    again = dim.run(progress=False)
    assert (again.unchanged, again.closed, again.inserted) == (stored, 0, 0), again
    sqlite_engine.execute(sqlite_engine.source, "UPDATE nul_keys SET note = 'y' WHERE k = 'b'",
                          "DELETE FROM nul_keys WHERE k IN ('a', 'd')")
    third = dim.run(progress=False)
    assert (third.updated, third.closed, third.unchanged) == (1, 2, stored - 3), third
    query = sqlite_engine.query if target == "sqlite" else pg_engine.query
    assert query(url, "SELECT COUNT(*) FROM dim_nul_keys WHERE is_current") == [(stored - 2,)]


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_a_binary_business_key(sqlite_engine: Engine, pg_engine: Engine, target: str) -> None:
    # A key of bytes (a uuid kept as 16 bytes, say): chunk bounds, a saved plan and the
    # lookups of later runs spell it as hex, which compares byte by byte everywhere.
    url = sqlite_engine.target if target == "sqlite" else pg_engine.target
    keys = [bytes([i, 255 - i]) + b"\x00'" for i in range(0, 60, 3)]
    sqlite_engine.execute(sqlite_engine.source, "CREATE TABLE blobs (k BLOB, note TEXT)",
                          rows=[(k, "x") for k in keys], insert="INSERT INTO blobs VALUES (?, ?)")
    dim = (md.mapping("blobs").source(sqlite_engine.source, table="blobs").key("k")
           .scd2(deletes="close").chunks(count=3).target(url, table="dim_blobs"))
    plan = dim.plan()
    assert isinstance(plan.chunks[0].range.hi, bytes), plan.chunks
    assert md.Plan.from_json(plan.to_json()).chunks == plan.chunks
    first = md.run(plan, progress=False)
    assert (first.inserted, first.rejected) == (20, 0), first
    sqlite_engine.execute(sqlite_engine.source, "UPDATE blobs SET note = 'y' WHERE rowid % 4 = 0",
                          "DELETE FROM blobs WHERE rowid % 5 = 0")
    again = dim.run(progress=False)
    assert (again.updated, again.closed, again.unchanged) == (4, 4, 12), again
    by_keys = dim.scd2().run(progress=False)  # deletes ignored: the target read by keys
    assert (by_keys.unchanged, by_keys.inserted) == (16, 0), by_keys


def test_text_longer_than_a_varchar_target_column_is_rejected(pg_engine: Engine) -> None:
    # A target made by the user with varchar(n) and char(n): a longer value is the row's
    # reject with the reason, not a COPY failing the chunk; blanks past the limit are cut
    # off, as PostgreSQL does itself. The dry run's preview says the same.
    e = pg_engine
    e.execute(e.source, "CREATE TABLE names (id int, name text, code text)",
              "INSERT INTO names VALUES (1, 'abc', 'x'), (2, 'toolong', 'y'), "
              "(3, 'ab     ', 'zz'), (4, 'a', 'www'), (5, NULL, NULL)")
    e.execute(e.target, "CREATE TABLE dim_names (id int, name varchar(3), code char(2), "
                        "row_hash bigint, valid_from timestamptz, valid_to timestamptz, "
                        "is_current boolean)")
    dim = (md.mapping("names").source(e.source, table="names").key("id").scd2()
           .target(e.target, table="dim_names"))
    assert dim.plan().preview().chunks[0].counts["rejected"] == 2
    result = dim.run(progress=False)
    assert (result.inserted, result.rejected) == (3, 2), result
    assert sorted(e.query(e.target, "SELECT key, reason FROM mapperdsl_rejects")) == [
        ("2", "target: column name: text longer than the 3 characters it holds"),
        ("4", "target: column code: text longer than the 2 characters it holds")]
    assert e.query(e.target, "SELECT id, name FROM dim_names ORDER BY id") == [
        (1, "abc"), (3, "ab "), (5, None)]
    assert dim.run(progress=False).unchanged == 3


@pytest.mark.parametrize("same_file", [False, True])
def test_a_sqlite_value_unlike_its_declared_type_is_rejected(sqlite_engine: Engine,
                                                             same_file: bool) -> None:
    # SQLite keeps text in an INTEGER column; ConnectorX (a source file of its own) refuses
    # it, Python's sqlite3 (the target's own file) reads it: the row is a reject either way.
    e = sqlite_engine
    src = e.target if same_file else e.source
    e.execute(src, "CREATE TABLE mixed (id INTEGER, n INTEGER, s TEXT, p NUMERIC, b BOOLEAN)",
              rows=[(1, 5, "a", 7, 1), (2, "abc", "b", 0.1 + 0.2, 0), (3, None, "c", 0.1 + 0.2, 0),
                    (4, 1.5, None, 1, 1), (5, 6, "d", 8, "maybe")],
              insert="INSERT INTO mixed VALUES (?, ?, ?, ?, ?)")
    dim = (md.mapping("mixed").source(src, table="mixed").key("id").scd1()
           .target(e.target, table="dim_mixed"))
    result = dim.run(progress=False)  # (a NUMERIC column: ConnectorX takes its first type)
    assert (result.inserted, result.rejected) == (2, 3), result
    assert e.query(e.target, "SELECT id, n, s, p, b FROM dim_mixed ORDER BY id") == [
        (1, 5, "a", 7, 1), (3, None, "c", 0.1 + 0.2, 0)]  # the float's every digit
    reasons = e.query(e.target, "SELECT key, reason FROM mapperdsl_rejects ORDER BY key")
    assert [k for k, _ in reasons] == ["2", "4", "5"], reasons
    assert all("column n" in r for _, r in reasons[:2]) and "column b" in reasons[2][1]
    assert dim.run(progress=False).unchanged == 2


@pytest.mark.parametrize("same_file", [False, True])
def test_sqlite_values_unlike_their_type_beside_others_keep_the_others_whole(
        sqlite_engine: Engine, same_file: bool) -> None:
    # Read with Python's sqlite3 (a source in the target's own file), a column's type came
    # from its values: an INTEGER column with text and a BLOB in it became bytes, and its
    # integers NULL (a key: every row a NULL-key reject, and its versions closed as gone);
    # a REAL 2.5 in an INTEGER key was cut to 2, a second current version of key 2.
    e = sqlite_engine
    src = e.target if same_file else e.source
    e.execute(src, "CREATE TABLE odd (id INTEGER, n INTEGER, s TEXT)",
              rows=[(1, 10, "a"), (2, "x", "b"), (3, b"\x01\x02", "c"), (4, 40, "d"),
                    (5, 2.5, "e")], insert="INSERT INTO odd VALUES (?, ?, ?)")
    dim = (md.mapping("odd").source(src, table="odd").key("id").scd1()
           .target(e.target, table="dim_odd"))
    result = dim.run(progress=False)
    assert (result.status, result.inserted, result.rejected) == ("SUCCEEDED", 2, 3), result
    assert e.query(e.target, "SELECT id, n FROM dim_odd ORDER BY id") == [(1, 10), (4, 40)]
    e.execute(src, "CREATE TABLE oddkey (id INTEGER, v TEXT)",
              rows=[(1, "a"), (2, "b"), (2.5, "c"), (3, "d"), ("x", "e"), (b"\x01", "f")],
              insert="INSERT INTO oddkey VALUES (?, ?)")
    keyed = (md.mapping("oddkey").source(src, table="oddkey").key("id").scd2(deletes="close")
             .chunks(rows=2).target(e.target, table="dim_oddkey"))
    for _ in range(2):  # the second run closes nothing: every good key is still there
        run = keyed.run(progress=False)
        assert (run.status, run.rejected, run.closed) == ("SUCCEEDED", 3, 0), run
    assert e.query(e.target, "SELECT id, v FROM dim_oddkey WHERE is_current ORDER BY id") == [
        (1, "a"), (2, "b"), (3, "d")]


@pytest.mark.parametrize("target_type", ["INTEGER", "BIGINT"])
def test_a_fraction_into_an_integer_target_column_is_a_reject_not_cut(
        engine: Engine, target_type: str) -> None:
    # A float or decimal the target keeps as an integer: 1.5 was written as 1, -2.7 as -2.
    engine.execute(engine.source, "CREATE TABLE fr (id INTEGER PRIMARY KEY, f REAL, d DECIMAL(6,2))",
                   rows=[(1, 1.0, 3), (2, 1.5, 4), (3, -2.7, 5), (4, 2.0, 6.5)],
                   insert=f"INSERT INTO fr VALUES ({engine.placeholders(3)})")
    engine.execute(engine.target, f"CREATE TABLE dim_fr (id {target_type}, f {target_type}, "
                                  f"d {target_type}, row_hash BIGINT)")
    dim = (md.mapping("fr").source(engine.source, table="fr").key("id").scd1()
           .target(engine.target, table="dim_fr"))
    result = dim.run(progress=False)
    assert (result.inserted, result.rejected) == (1, 3), result
    assert engine.query(engine.target, "SELECT id, f, d FROM dim_fr") == [(1, 1, 3)]


def test_sqlite_nulls_in_a_chunks_first_row(sqlite_engine: Engine) -> None:
    # ConnectorX types a column with no declared type (the text a date is read as, an
    # untyped column) by the first row, and failed every run of a chunk whose first row
    # held NULL there: here both chunks', and again once text in an INTEGER column is
    # read apart (the rows left then start with NULLs too).
    e = sqlite_engine
    e.execute(e.source, "CREATE TABLE nullish (id INTEGER, d DATE, t TIMESTAMP, p NUMERIC, u, "
              "n INTEGER)",
              rows=[(1, None, None, None, None, "abc"), (2, None, None, None, None, 5),
                    (3, None, None, None, None, None),
                    (4, "2024-01-02", "2024-01-02 03:04:05", 0.1 + 0.2, 7, 6)],
              insert="INSERT INTO nullish VALUES (?, ?, ?, ?, ?, ?)")
    dim = (md.mapping("nullish").source(e.source, table="nullish").key("id").scd2()
           .chunks(count=2).target(e.target, table="dim_nullish"))
    result = dim.run(progress=False)
    assert (result.inserted, result.rejected) == (3, 1), result
    assert e.query(e.target, "SELECT id, d, t, p, u, n FROM dim_nullish ORDER BY id") == [
        (2, None, None, None, None, 5), (3, None, None, None, None, None),
        (4, "2024-01-02", "2024-01-02 03:04:05.000000", 0.1 + 0.2, 7, 6)]
    assert e.query(e.target, "SELECT key, reason FROM mapperdsl_rejects") == [
        ("1", "source: column n: value does not fit Int64")]
    assert dim.run(progress=False).unchanged == 3


def test_sqlite_bytes_in_text_columns_and_text_in_bytes_columns(sqlite_engine: Engine) -> None:
    # Bytes that are not UTF-8 where text is read (a TEXT column, the text of a DATE)
    # failed the chunk on every run; they are the row's reject now. Bytes that are UTF-8
    # are text; text in a BLOB column is its bytes, beside bytes that are not UTF-8.
    e = sqlite_engine
    e.execute(e.source, "CREATE TABLE raw (id INTEGER, t TEXT, d DATE, b BLOB)",
              rows=[(1, "a", "2024-01-01", b"\x00\xff"), (2, b"\x00\xff", "2024-01-02", b"\x01"),
                    (3, "c", b"\xc3", b"\xfe"), (4, "d", "2024-01-04", "text in blob"),
                    (5, b"ok", "2024-01-05", b"\x80"), (6, None, None, None)],
              insert="INSERT INTO raw VALUES (?, ?, ?, ?)")
    dim = (md.mapping("raw").source(e.source, table="raw").key("id").scd2()
           .target(e.target, table="dim_raw"))
    result = dim.run(progress=False)
    assert (result.inserted, result.rejected) == (4, 2), result
    assert e.query(e.target, "SELECT id, t, d, b FROM dim_raw ORDER BY id") == [
        (1, "a", "2024-01-01", b"\x00\xff"), (4, "d", "2024-01-04", b"text in blob"),
        (5, "ok", "2024-01-05", b"\x80"), (6, None, None, None)]  # (NULLs read as hex too)
    assert e.query(e.target, "SELECT key, reason FROM mapperdsl_rejects ORDER BY key") == [
        ("2", "source: column t: value does not fit String"),
        ("3", "source: column d: value does not fit Date")]
    assert dim.run(progress=False).unchanged == 4


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_a_sqlite_key_holding_values_of_several_types(sqlite_engine: Engine, pg_engine: Engine,
                                                      target: str) -> None:
    # SQLite sorts numbers before any text and text before any bytes; the target's key is
    # text (or bytes) only, so '10' < '10a' < '9' there where 9 < 10 < '10a' in the source:
    # a key fell in another chunk, and a second run closed current versions of keys still
    # in the source (a SQLite target) or failed (`text < integer` on PostgreSQL). Such a
    # key compares as the text (bytes) it is read as now: an untyped key, BLOBs in a TEXT
    # key, text in a BLOB key, a query's UNION of a text and an untyped column. A float's
    # text reads back as the float: 0.1 + 0.2 is not the text '0.3' beside it.
    e, url = sqlite_engine, sqlite_engine.target if target == "sqlite" else pg_engine.target
    e.execute(e.source, "CREATE TABLE loose (k, v TEXT)", rows=[
        (9, "a"), (10, "b"), (100, "c"), (5, "d"), ("x", "e"), ("10a", "f"), (2, "g"),
        ("abc", "h"), (1000, "i"), ("0.1", "j"), (0.1 + 0.2, "k"), ("0.3", "l")],
        insert="INSERT INTO loose VALUES (?, ?)")
    e.execute(e.source, "CREATE TABLE texts (k TEXT, v TEXT)", "CREATE TABLE blobs (k BLOB, v TEXT)",
              rows=[(f"k{i:02d}", "t") for i in range(20)] + [(b"a", "b"), (b"k05x", "b")],
              insert="INSERT INTO texts VALUES (?, ?)")
    e.execute(e.source, "INSERT INTO blobs SELECT CAST(k AS BLOB), v FROM texts "
              "WHERE typeof(k) = 'text'", "INSERT INTO blobs VALUES ('Ab', 't'), ('zz', 't')")
    sources = {"loose": dict(table="loose"), "texts": dict(table="texts"),
               "blobs": dict(table="blobs"),
               "union": dict(query="SELECT k, v FROM texts WHERE typeof(k) = 'text' "
                                   "UNION ALL SELECT k, v FROM loose")}
    for name, source in sources.items():
        dim = (md.mapping(f"mixed_{name}").source(e.source, **source).key("k")
               .scd2(deletes="close").chunks(count=6).target(url, table=f"dim_{name}"))
        assert any("values of several types" in d for d in dim.plan().decisions), name
        first = dim.run(progress=False)
        assert first.ok and first.rejected == 0, (name, first)
        for _ in range(2):
            again = dim.run(progress=False)
            assert (again.unchanged, again.closed, again.inserted) == (first.inserted, 0, 0), (
                name, again)
    query = sqlite_engine.query if target == "sqlite" else pg_engine.query
    assert sorted(query(url, "SELECT k FROM dim_loose WHERE is_current")) == sorted(
        [("9",), ("10",), ("100",), ("5",), ("x",), ("10a",), ("2",), ("abc",), ("1000",),
         ("0.1",), ("0.30000000000000004",), ("0.3",)])


def test_a_sqlite_mixed_key_with_bytes_that_are_not_text(sqlite_engine: Engine) -> None:
    # The quantiles of such a key are its text: a tile starting at bytes that are not UTF-8
    # failed the plan (Python's sqlite3 cannot decode them); the bound is their UTF-8 part
    # now, and the row a reject, as when it is read.
    # The same in a TEXT key holding only text, one of it not UTF-8.
    e = sqlite_engine
    e.execute(e.source, "CREATE TABLE bad_keys (k, v TEXT)",
              rows=[(f"k{i:02d}", "t") for i in range(1, 10)] + [(5, "n"), (b"k\xff", "bad")],
              insert="INSERT INTO bad_keys VALUES (?, ?)")
    e.execute(e.source, "CREATE TABLE bad_texts (k TEXT PRIMARY KEY, v TEXT)",
              "INSERT INTO bad_texts SELECT k, v FROM bad_keys WHERE typeof(k) = 'text'",
              "INSERT INTO bad_texts VALUES (CAST(X'6b3035ff' AS TEXT), 'bad')")
    for table, count, good in (("bad_keys", 11, 10), ("bad_texts", 3, 9), ("bad_texts", 9, 9)):
        dim = (md.mapping(f"{table}_{count}").source(e.source, table=table).key("k")
               .scd2(deletes="close").chunks(count=count)
               .target(e.target, table=f"dim_{table}_{count}"))
        first = dim.run(progress=False)
        assert (first.inserted, first.rejected) == (good, 1), (table, count, first)
        assert dim.run(progress=False).unchanged == good


def test_a_sqlite_untyped_column_has_one_text_per_value(sqlite_engine: Engine) -> None:
    # Read as ConnectorX typed it by each chunk's first row, 7 was '7' or '7.0', and 0.1
    # '0.1' or '0.10000000000000001': a first row changing to a float made new versions of
    # rows that had not changed. SQLite's text of each value now, whatever the first row.
    e = sqlite_engine
    e.execute(e.source, "CREATE TABLE untyped (id INTEGER PRIMARY KEY, u)",
              rows=[(1, None), (2, 7), (3, "x"), (4, 0.1), (5, 1 / 3)],
              insert="INSERT INTO untyped VALUES (?, ?)")
    dim = (md.mapping("untyped").source(e.source, table="untyped").key("id").scd2()
           .target(e.target, table="dim_untyped"))
    assert dim.run(progress=False).inserted == 5
    e.execute(e.source, "UPDATE untyped SET u = 2.5 WHERE id = 1")
    again = dim.run(progress=False)
    assert (again.updated, again.unchanged) == (1, 4), again
    assert e.query(e.target, "SELECT id, u FROM dim_untyped WHERE is_current ORDER BY id") == [
        (1, "2.5"), (2, "7"), (3, "x"), (4, "0.1"), (5, "0.33333333333333331")]


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_text_in_a_sqlite_integer_key_column(sqlite_engine: Engine, pg_engine: Engine,
                                             target: str) -> None:
    # Text in an INTEGER key: its rows are rejects that say so, a chunk bound on such text
    # (SQLite orders it after every number) splits the target's keys as it does the
    # source's, and floats of the good rows stay exact though the column also held text.
    url = sqlite_engine.target if target == "sqlite" else pg_engine.target
    sqlite_engine.execute(sqlite_engine.source, "CREATE TABLE odd (id INTEGER, r REAL)",
                          rows=[(1, 0.1 + 0.2), (2, 1 / 3), ("x", 1.0), ("y", 2.0), (3, "z")],
                          insert="INSERT INTO odd VALUES (?, ?)")
    dim = (md.mapping("odd").source(sqlite_engine.source, table="odd").key("id")
           .scd2(deletes="close").chunks(count=2).target(url, table="dim_odd"))
    assert any(c.range.lo == "x" or c.range.hi == "x" for c in dim.plan().chunks)
    first = dim.run(progress=False)
    assert (first.inserted, first.rejected) == (2, 3), first
    query = sqlite_engine.query if target == "sqlite" else pg_engine.query
    assert sorted(query(url, "SELECT key, reason FROM mapperdsl_rejects")) == [
        ("3", "source: column r: value does not fit Float64"),
        ("x", "business key does not fit its type (id: Int64)"),
        ("y", "business key does not fit its type (id: Int64)")]
    assert query(url, "SELECT id, r FROM dim_odd ORDER BY id") == [(1, 0.1 + 0.2), (2, 1 / 3)]
    again = dim.run(progress=False)
    assert (again.unchanged, again.closed, again.rejected) == (2, 0, 3), again


@pytest.mark.parametrize("deletes", ["close", "ignore"])
def test_sub_millisecond_time_keys_of_a_sqlite_source(sqlite_engine: Engine,
                                                     deletes: str) -> None:
    # Chunk bounds of a SQLite time key have milliseconds; a key's microseconds are cut to
    # them, never rounded (Python's SQLite rounds '00.9996' up to '01.000', past a bound the
    # target's '00.999600' is below), so source and target keep each key in one chunk. With
    # or without an offset (mapperdsl itself writes '+00:00').
    e = sqlite_engine
    tables = {"TIMESTAMP": ["2024-01-01 00:00:00.100000", "2024-01-01 00:00:00.200000",
                            "2024-01-01T00:00:00.999600", "2024-01-01 00:00:05.000000"],
              "TIMESTAMPTZ": ["2024-01-01 00:00:00.100000+00:00", "2024-01-01 02:00:00.9996+02:00",
                              "2024-01-01T01:00:00.999600Z", "2024-01-01 02:00:00.999700+00:00"]}
    for url in (e.source, e.target):  # read by ConnectorX, and by Python's own SQLite
        for kind, keys in tables.items():
            table = f"ts_{kind.lower()}"
            e.execute(url, f"CREATE TABLE {table} (k {kind}, note TEXT)", rows=[
                (k, "x") for k in keys], insert=f"INSERT INTO {table} VALUES (?, ?)")
            dim = (md.mapping(table).source(url, table=table).key("k").scd2(deletes=deletes)
                   .chunks(count=2).target(e.target, table=f"dim_{table}{url == e.target}"))
            assert dim.run(progress=False).inserted == 4
            for _ in range(2):
                again = dim.run(progress=False)
                assert again.ok and again.unchanged == 4 and again.closed == 0, (kind, again)


def test_sqlite_decimal_target_rejects_what_it_would_round(sqlite_engine: Engine,
                                                            pg_engine: Engine) -> None:
    pg_engine.execute(pg_engine.source, "CREATE TABLE money (id int, amount numeric(20,2))",
                      "INSERT INTO money VALUES (1, 123456789012345678.91), (2, 1234567.89)")
    dim = (md.mapping("money").source(pg_engine.source, table="money").key("id").scd1()
           .target(sqlite_engine.target, table="dim_money"))
    result = dim.run(progress=False)
    assert (result.inserted, result.rejected) == (1, 1)
    assert sqlite_engine.query(sqlite_engine.target, "SELECT id, amount FROM dim_money") == \
        [(2, 1234567.89)]
    reason = sqlite_engine.query(sqlite_engine.target, "SELECT reason FROM mapperdsl_rejects")
    assert "at most 15 significant digits" in reason[0][0]


def test_sqlite_text_times_in_mixed_forms(sqlite_engine: Engine) -> None:
    e = sqlite_engine
    e.execute(e.source, "CREATE TABLE ev (id INTEGER, at TIMESTAMP, atz TIMESTAMPTZ, day DATE)",
              "INSERT INTO ev VALUES (1, '2026-01-02 03:04:05', '2026-01-02 05:04:05+02:00', "
              "'2026-01-02'), (2, '2026-01-02T03:04:05.5', '2026-01-02T03:04:05Z', "
              "'2026-01-02T00:00:00'), (3, '2026-01-02 03:04', '2026-01-02 03:04:05', "
              "'2026-01-02')")
    dim = (md.mapping("ev").source(e.source, table="ev").key("id").scd1()
           .target(e.target, table="dim_ev"))
    result = dim.run(progress=False)
    assert (result.inserted, result.rejected) == (3, 0), result
    assert e.query(e.target, "SELECT atz FROM dim_ev ORDER BY id") == [
        ("2026-01-02 03:04:05.000000+00:00",), ("2026-01-02 03:04:05.000000+00:00",),
        ("2026-01-02 03:04:05.000000+00:00",)]

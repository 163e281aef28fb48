"""Plans: text per dialect, JSON round trip, plan-time errors, and that planning writes nothing."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import polars as pl
import psycopg
import pytest

import mapperdsl as md
from mapperdsl.plan.compile import key_ranges

from conftest import PG_PASSWORD, Engine

EFFECTIVE = datetime(2026, 3, 1, 6, 0, tzinfo=timezone.utc)


def shop(engine: Engine) -> md.Mapping:
    engine.execute(engine.source,
                   "CREATE TABLE customer (id INTEGER, name TEXT, email TEXT, "
                   "balance NUMERIC(10,2), updated_at TIMESTAMP)")
    engine.execute(engine.source, rows=[(i, f"n{i}", f"E{i}@X.ORG", "1.50",
                                         f"2026-01-01 00:00:{i % 60:02d}") for i in range(1, 101)],
                   insert=f"INSERT INTO customer VALUES ({engine.placeholders(5)})")
    return (md.mapping("dim_customer")
            .source(engine.source, table="customer")
            .key("id")
            .columns(name=pl.col("name").str.to_uppercase(),
                     email=pl.col("email").str.to_lowercase(), balance="balance")
            .scd2(track=["name", "email"], deletes="close")
            .chunks(rows=40)
            .target(engine.target, table="dim_customer"))


def normalise(text: str, engine: Engine) -> str:
    text = text.replace(str(engine.folder), "<tmp>")
    if engine.name == "postgresql":
        from sqlalchemy.engine import make_url

        url = make_url(engine.target)
        text = text.replace(f"{url.host}:{url.port}/{url.database}", "<server>/<db>")
    return text


EXPECTED_SQLITE = """\
Plan dim_customer: scd2, full, 4 chunks, ~100 rows
  source  sqlite:///<tmp>/src.db  table customer
  target  sqlite:///<tmp>/dw.db  table dim_customer (created on first run)
  key     id
  effective time  2026-03-01 06:00:00+00:00
  window  full: every source row (deletes can be seen)
  columns
    id       Int64            = 'id' key
    name     String           = col("name").str.to_uppercase() tracked
    email    String           = col("email").str.to_lowercase() tracked
    balance  Decimal(10,2)    = 'balance'
  chunks by id
    chunk 1/4  id < 35  ~34 rows
      SELECT "id", "name", "email", CAST("balance" AS TEXT) AS "balance" FROM "customer" WHERE "id" < 35
    chunk 2/4  35 <= id < 68  ~33 rows
      SELECT "id", "name", "email", CAST("balance" AS TEXT) AS "balance" FROM "customer" WHERE "id" >= 35 AND "id" < 68
    chunk 3/4  id >= 68  ~33 rows
      SELECT "id", "name", "email", CAST("balance" AS TEXT) AS "balance" FROM "customer" WHERE "id" >= 68
    chunk 4/4  id IS NULL  ~0 rows
      SELECT "id", "name", "email", CAST("balance" AS TEXT) AS "balance" FROM "customer" WHERE "id" IS NULL
  decisions
    - 3 key ranges on id from its quantiles (at most 40 rows each), the first and last open-ended, plus one chunk for rows whose id is NULL (they are rejected)
    - target table dim_customer does not exist: it is created on the first run, with an index on the key
    - full mode: every row is read and compared; keys missing from the source are closed
    - scd2: a change in name, email closes the current version and adds a new one"""

EXPECTED_POSTGRESQL = (
    EXPECTED_SQLITE
    .replace("sqlite:///<tmp>/src.db", "postgresql://postgres:***@<server>/<db>")
    .replace("sqlite:///<tmp>/dw.db", "postgresql://postgres:***@<server>/<db>")
    .replace("id       Int64 ", "id       Int32 ")  # PostgreSQL's integer is 32-bit
)

EXPECTED_WINDOW = {
    "sqlite": ("incremental on updated_at: after the start up to '2026-01-01 00:00:59' "
               "(high-water mark)",
               """SELECT "id", "name", "email", CAST("balance" AS TEXT) AS "balance" """
               """FROM "customer" WHERE "id" < 51 AND "updated_at" <= '2026-01-01 00:00:59'"""),
    "postgresql": ("incremental on updated_at: after the start up to 2026-01-01 00:00:59 "
                   "(high-water mark)",
                   """SELECT "id", "name", "email", CAST("balance" AS TEXT) AS "balance" """
                   """FROM "customer" WHERE "id" < 51 AND "updated_at" <= """
                   """TIMESTAMP '2026-01-01 00:00:59.000000'"""),
}


def test_plan_text_for_a_fixed_mapping(engine: Engine) -> None:
    plan = shop(engine).plan(effective_time=EFFECTIVE)
    expected = EXPECTED_SQLITE if engine.name == "sqlite" else EXPECTED_POSTGRESQL
    assert normalise(plan.explain(), engine) == expected
    assert str(plan) == plan.explain()
    assert repr(plan) == "<Plan dim_customer: scd2, full, 4 chunks, ~100 rows>"


def test_incremental_window_sql_per_dialect(engine: Engine) -> None:
    plan = (shop(engine).scd2(track=["name", "email"]).incremental("updated_at").chunks(count=2)
            .plan(effective_time=EFFECTIVE))
    assert plan.window is not None
    assert (plan.window.describe(), plan.chunks[0].sql) == EXPECTED_WINDOW[engine.name]


def test_planning_writes_nothing(engine: Engine) -> None:
    dim = shop(engine)
    before = engine.query(engine.source, "SELECT COUNT(*) FROM customer")
    dim.plan()
    if engine.name == "sqlite":
        assert not os.path.exists(engine.folder / "dw.db")
    else:
        tables = engine.query(engine.target, "SELECT table_name FROM information_schema.tables "
                                             "WHERE table_schema = 'public'")
        assert tables == [("customer",)]
    assert engine.query(engine.source, "SELECT COUNT(*) FROM customer") == before


def test_json_round_trip_runs_the_same(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    dim = shop(engine)
    plan = dim.plan(effective_time=EFFECTIVE)
    text = plan.to_json()
    again = md.Plan.from_json(text)
    assert again.to_json() == text
    assert again.chunks == plan.chunks and again.window == plan.window
    if engine.name == "sqlite":
        assert again == plan
    else:  # the saved plan names a variable for the password instead of holding it
        assert PG_PASSWORD not in text and "${MAPPERDSL_TARGET_PASSWORD}" in text
        with pytest.raises(md.ExecutionError, match="MAPPERDSL_SOURCE_PASSWORD, which are not set"):
            md.run(again, progress=False)
        monkeypatch.setenv("MAPPERDSL_SOURCE_PASSWORD", PG_PASSWORD)
        monkeypatch.setenv("MAPPERDSL_TARGET_PASSWORD", PG_PASSWORD)
    result = md.run(again, n_jobs=2, progress=False)
    assert result.ok and result.inserted == 100
    stored = engine.query(engine.target, "SELECT DISTINCT valid_from FROM dim_customer")
    assert len(stored) == 1 and str(stored[0][0]).startswith("2026-03-01 06:00:00")


def test_plan_time_errors_list_every_problem_and_write_nothing(engine: Engine) -> None:
    base = shop(engine)
    dim = base.scd2().columns(nmae=pl.col("nmae"),
                                      email=pl.col("emial").str.to_lowercase(), balance="balance")
    with pytest.raises(md.PlanError) as info:
        dim.plan()
    message = str(info.value)
    assert "2 problems" in message
    assert "Column 'nmae' (used by column map `nmae`) is not in source 'customer'. " \
           "Columns: id, name, email, balance, updated_at." in message
    assert "Column 'emial'" in message
    wrong_type = base.scd2().columns(name=pl.col("balance").str.to_uppercase())
    with pytest.raises(md.PlanError, match="column map `name`"):
        wrong_type.plan()
    with pytest.raises(md.PlanError, match="lacks the columns"):
        engine.execute(engine.target, "CREATE TABLE dim_other (id BIGINT)")
        base.target(engine.target, table="dim_other").plan()
    if engine.name == "sqlite":
        assert {p.name for p in engine.folder.iterdir()} <= {"src.db", "dw.db"}


def test_unknown_source_table_and_missing_file() -> None:
    dim = (md.mapping("m").source("sqlite:///does/not/exist.db", table="t").key("id")
           .target("sqlite:///dw.db", table="d"))
    with pytest.raises(md.PlanError, match="does not exist"):
        dim.plan()


@pytest.mark.parametrize("tiles, expected", [
    ((), [(None, None, 0)]),
    (((1, 10),), [(None, None, 10)]),
    (((1, 5), (6, 5), (11, 5)), [(None, 6, 5), (6, 11, 5), (11, None, 5)]),
    (((1, 5), (1, 5), (3, 5)), [(None, 3, 10), (3, None, 5)]),  # one key spans two tiles
])
def test_key_ranges_tile_the_key_space(tiles: tuple[tuple[int, int], ...],
                                       expected: list[tuple[object, object, int]]) -> None:
    ranges = key_ranges(tiles)
    assert [(r.lo, r.hi, n) for r, n in ranges] == expected
    # Contiguous and open at both ends: every key falls in exactly one range.
    for key in range(-5, 20):
        inside = [r for r, _ in ranges if (r.lo is None or r.lo <= key)
                  and (r.hi is None or key < r.hi)]
        assert len(inside) == 1


def test_default_chunks_are_sized_from_the_row_width(sqlite_engine: Engine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Wide rows make fewer rows per chunk; the decision says how the size was chosen.
    from mapperdsl.dsl import parts
    from mapperdsl.dsl.parts import CHUNK_BYTES, MAX_ROWS, MIN_ROWS, Chunking

    assert Chunking().rows_for(100) == CHUNK_BYTES // 100
    assert Chunking().rows_for(10**9) == MIN_ROWS and Chunking().rows_for(1) == MAX_ROWS
    assert Chunking(rows=7).rows_for(100) == 7
    monkeypatch.setattr(parts, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(parts, "MIN_ROWS", 1)
    engine = sqlite_engine
    engine.execute(engine.source, "CREATE TABLE wide (id INTEGER, note TEXT)")
    engine.execute(engine.source, rows=[(i, "x" * 1000) for i in range(1, 601)],
                   insert="INSERT INTO wide VALUES (?, ?)")
    plan = (md.mapping("wide").source(engine.source, table="wide").key("id").scd1()
            .target(engine.target, table="dim_wide").plan())
    width = 8 + 8 + 1000
    per_chunk = (64 << 10) // width
    assert len(plan.chunks) == 1 + -(-600 // per_chunk)
    assert f"at most {per_chunk:,} rows each: 0 MiB at about {width} bytes a row" in plan.explain()


def test_row_width_sample_ignores_where_another_scan_is(pg_engine: Engine) -> None:
    # A table over a quarter of shared_buffers (128 MB here) is scanned in sync: a new scan
    # starts where a running one is. The row-width sample must still read the first rows,
    # so the same table is cut into the same chunks whatever else reads it.
    engine = pg_engine
    engine.execute(engine.source,
                   "CREATE TABLE big (id bigint PRIMARY KEY, name text, pad text)",
                   "INSERT INTO big SELECT g, CASE WHEN g <= 20000 THEN 'n' ELSE repeat('n', 400) "
                   "END, repeat('x', 1000) FROM generate_series(1, 40000) g", "ANALYZE big")
    big, quarter = engine.query(engine.source, "SELECT pg_relation_size('big'), setting::bigint "
                                               "* 8192 / 4 FROM pg_settings WHERE name = "
                                               "'shared_buffers'")[0]
    assert big > quarter, "the table must be large enough to be scanned in sync"
    dim = (md.mapping("big").source(engine.source, table="big").key("id")
           .columns(id="id", name="name").scd1().target(engine.target, table="dim_big"))
    alone = dim.plan()
    assert any("at about 17 bytes a row" in line for line in alone.decisions), alone.decisions
    with psycopg.connect(engine.source) as other:
        other.execute("DECLARE halfway NO SCROLL CURSOR FOR SELECT * FROM big")
        other.execute("MOVE FORWARD 30000 IN halfway")  # paused in the long names
        beside = dim.plan()
    assert beside.decisions == alone.decisions and beside.chunks == alone.chunks


def test_row_width_sample_survives_a_failing_computed_column(pg_engine: Engine) -> None:
    # The sample's rows divide by zero: the width is guessed, and planning goes on in the
    # same transaction (its savepoint taken back), as the chunk that holds them will fail.
    engine = pg_engine
    engine.execute(engine.source, "CREATE TABLE tq (id bigint PRIMARY KEY, v int)",
                   "INSERT INTO tq SELECT g, g - 1 FROM generate_series(1, 100) g")
    plan = (md.mapping("q").source(engine.source, query="SELECT id, (10 / v)::text AS name FROM tq")
            .key("id").scd1().target(engine.target, table="dim_q").plan())
    assert any("at about 48 bytes a row" in line for line in plan.decisions), plan.decisions
    assert sum(c.estimated_rows for c in plan.chunks) == 100

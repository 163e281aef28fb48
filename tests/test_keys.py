"""Chunk keys order the same way in source and target, across engines and collations."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import mapperdsl as md

from conftest import PG_PASSWORD, Engine, _driver, pg_server_url

WORDS = ["a", "B", "b", "_x", "Z", "é", "e", "f", "A1", "a-2", "a 3", "ß", "Ä", "z", "0", "~"]
KEYS = [f"{w}{i}" if i else w for i in range(4) for w in WORDS]


@pytest.fixture
def icu_pg(tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL database whose default collation is ICU English (not byte order)."""
    server = pg_server_url()
    name = "icu_" + uuid.uuid4().hex[:8]
    admin = sa.create_engine(_driver(server), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
                             "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'")
    try:
        yield make_url(server).set(database=name, password=PG_PASSWORD).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def run_twice(engine: Engine, source: str, target: str, create: str,
              rows: list[tuple[object, ...]]) -> None:
    engine.execute(source, create)
    engine.execute(source, rows=rows, insert="INSERT INTO src VALUES (:k, :v)".replace(
        ":k, :v", "?, ?" if source.startswith("sqlite") else "%s, %s"))
    dim = (md.mapping("keys").source(source, table="src").key("k").scd2(deletes="close")
           .chunks(count=5).target(target, table="dim_keys"))
    first = dim.run(n_jobs=2, progress=False)
    assert (first.inserted, first.closed, first.rejected) == (len(rows), 0, 0), first
    second = dim.run(n_jobs=2, progress=False)
    assert (second.unchanged, second.inserted, second.closed) == (len(rows), 0, 0), second
    current = engine.query(target, "SELECT k, COUNT(*) FROM dim_keys WHERE is_current GROUP BY k")
    assert len(current) == len(rows) and {n for _, n in current} == {1}


@pytest.mark.parametrize("direction", ["sqlite->postgresql", "postgresql->sqlite"])
def test_text_keys_under_a_language_collation(direction: str, icu_pg: str,
                                              sqlite_engine: Engine) -> None:
    lite = sqlite_engine.source
    source, target = (lite, icu_pg) if direction.startswith("sqlite") else (icu_pg, lite)
    collate = ' COLLATE "en-x-icu"' if source == icu_pg else " COLLATE NOCASE"
    run_twice(sqlite_engine, source, target, f"CREATE TABLE src (k TEXT{collate}, v TEXT)",
              [(k, f"v{i}") for i, k in enumerate(KEYS)])


def test_sqlite_timestamp_keys_written_with_a_t(sqlite_engine: Engine, pg_engine: Engine) -> None:
    t0 = datetime(2026, 1, 1, 12, 0, 0)
    rows = [((t0 + timedelta(microseconds=1500 * i + (i % 3))).isoformat(), f"v{i}")
            for i in range(40)]
    lite = sqlite_engine
    lite.execute(lite.source, "CREATE TABLE src (k TIMESTAMP, v TEXT)", rows=rows,
                 insert="INSERT INTO src VALUES (?, ?)")
    for target in (lite.target, pg_engine.target):
        dim = (md.mapping(f"ts_{target[:6]}").source(lite.source, table="src").key("k")
               .scd2(deletes="close").chunks(count=4).target(target, table="dim_ts"))
        assert dim.run(progress=False).inserted == 40
        again = dim.run(n_jobs=2, progress=False)
        assert (again.unchanged, again.inserted, again.closed) == (40, 0, 0), (target, again)


@pytest.mark.parametrize("keys", [
    [-(2**62), -5, -1, 0, 1, 2**40, 2**62 + 7],
    ["2026-01-01", "1999-12-31", "2000-02-29", "1970-01-01", "2026-01-02"],
    ["it's", "a;b", "c'; DROP TABLE src; --", 'd"e', "e\\f", "%", "_", ""],
])
@pytest.mark.parametrize("deletes", ["close", "ignore"])  # ignore: the target read by key list
def test_other_key_types_and_hostile_values(engine: Engine, keys: list[object],
                                            deletes: str) -> None:
    kind = "BIGINT" if isinstance(keys[0], int) else "DATE" if "-" in str(keys[0])[:5] \
        and str(keys[0])[:4].isdigit() else "TEXT"
    engine.execute(engine.source, f"CREATE TABLE src (k {kind}, v TEXT)")
    engine.execute(engine.source, rows=[(k, "v") for k in keys],
                   insert=f"INSERT INTO src VALUES ({engine.placeholders(2)})")
    dim = (md.mapping("other").source(engine.source, table="src").key("k").scd2(deletes=deletes)
           .chunks(count=3).target(engine.target, table="dim_other"))
    assert dim.run(n_jobs=2, progress=False).inserted == len(keys)
    engine.execute(engine.source, "UPDATE src SET v = 'w'")
    again = dim.run(progress=False)
    assert (again.updated, again.closed, again.inserted) == (len(keys), 0, 0)
    assert engine.query(engine.source, "SELECT COUNT(*) FROM src") == [(len(keys),)]


def test_tiles_past_rows_gone_since_the_count_merge_into_the_last(pg_engine: Engine) -> None:
    # PostgreSQL counts the rows, then walks a cursor to each tile's first row: rows deleted
    # in between (or gone from an incremental window) must not give a tile without a key.
    from mapperdsl.connect import connection
    from mapperdsl.dsl.url import Url
    from mapperdsl.plan.stats import _walk

    pg_engine.execute(pg_engine.source, "CREATE TABLE k (id bigint PRIMARY KEY)",
                      "INSERT INTO k SELECT generate_series(1, 10)")
    with connection(Url.parse(pg_engine.source)) as conn:
        assert _walk(conn, "SELECT id FROM k ORDER BY id", [1, 4, 8]) == [1, 4, 8]
        conn.rollback()
        assert _walk(conn, "SELECT id FROM k ORDER BY id", [1, 6, 11, 16]) == [1, 6, 6, 6]
        conn.rollback()
        assert _walk(conn, "SELECT id FROM k WHERE id > 10 ORDER BY id", [1, 2]) == []


def four_tiles(url: str, table: str) -> tuple[tuple[tuple[object, int], ...], int]:
    """PostgreSQL's four tiles of ``table``'s NOT NULL bigint key ``id``, and its NULL keys."""
    from mapperdsl.connect import connection
    from mapperdsl.dsl.parts import Source
    from mapperdsl.dsl.url import Url
    from mapperdsl.plan import stats

    source = Source(url=Url.parse(url), table=table)
    with connection(source.url, readonly=True) as conn:
        return stats.read_key_stats(conn, source, "id", pl.Int64(), "1 = 1", lambda rows: 4,
                                    not_null=True)


@pytest.mark.parametrize("deleted", [0, 1, 50])
def test_tiles_cut_from_the_statistics_count_the_rows_as_they_are(
        pg_engine: Engine, deleted: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # A large table with a NOT NULL key is not counted first: its tiles are cut from the
    # planner's estimate by one walk that counts the rows. Its chunks must hold every row,
    # with the rows each really has: NTILE's own when the estimate is right, near equal
    # when it is a little off (rows deleted since ANALYZE: the last tile has fewer),
    # counted and cut again when it is far off.
    from mapperdsl.plan import stats

    monkeypatch.setattr(stats, "ESTIMATE_ROWS", 1000)
    pg_engine.execute(pg_engine.source, "CREATE TABLE big (id bigint PRIMARY KEY, v text)",
                      "INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 10000) g",
                      "ANALYZE big", f"DELETE FROM big WHERE mod(id, 100) < {deleted}")
    sql: list[str] = []
    monkeypatch.setattr(stats, "execute", lambda conn, text, **kw: (
        sql.append(text), md.connect.execute(conn, text, **kw))[1])
    tiles, nulls = four_tiles(pg_engine.source, "big")
    rows = 10000 - deleted * 100
    counted = any("COUNT(" in text for text in sql)
    assert counted == (deleted == 50) and nulls == 0
    bounds = [lo for lo, _ in tiles[1:]]
    found = pg_engine.query(pg_engine.source, "SELECT COUNT(*) FROM big GROUP BY "
                            f"width_bucket(id, ARRAY{bounds}::bigint[]) ORDER BY 1 DESC")
    assert sorted(count for _, count in tiles) == sorted(c for c, in found) \
        and sum(count for _, count in tiles) == rows
    if deleted != 1:  # the estimate right, or counted: NTILE's tiles
        assert [count for _, count in tiles] == [rows // 4] * 4
    else:
        assert all(abs(count - rows / 4) <= 0.1 * rows / 4 for _, count in tiles)


def test_tiles_cut_from_too_low_an_estimate_are_counted_and_cut_again(
        pg_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # More rows than the statistics say would all go to the last tile, past the rows a
    # chunk may have: the rows are counted and the tiles cut as NTILE cuts them.
    from mapperdsl.plan import stats

    pg_engine.execute(pg_engine.source, "CREATE TABLE big (id bigint PRIMARY KEY)",
                      "INSERT INTO big SELECT generate_series(1, 10000)")
    monkeypatch.setattr(stats, "_estimated_rows", lambda conn, source: 9950)
    tiles, _ = four_tiles(pg_engine.source, "big")
    assert tiles == ((1, 2500), (2501, 2500), (5001, 2500), (7501, 2500))


def test_a_parent_table_whose_child_holds_null_keys_gets_its_null_chunk(
        pg_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # A table's rows include its inheritance children's, and a child may drop the NOT
    # NULL its parent declares (PostgreSQL 17 and before): their NULL keys are read and
    # rejected, counted, not lost.
    from mapperdsl.connect import connection
    from mapperdsl.dsl.parts import Source
    from mapperdsl.dsl.url import Url
    from mapperdsl.plan import stats
    from mapperdsl.plan.facts import declared_not_null

    monkeypatch.setattr(stats, "ESTIMATE_ROWS", 1000)
    pg_engine.execute(pg_engine.source, "CREATE TABLE par (id bigint PRIMARY KEY, v text)",
                      "CREATE TABLE kid () INHERITS (par)",
                      "ALTER TABLE kid ALTER COLUMN id DROP NOT NULL",
                      "INSERT INTO par SELECT g, 'v' || g FROM generate_series(1, 5000) g",
                      "INSERT INTO kid SELECT NULL, 'null ' || g FROM generate_series(1, 7) g",
                      "ANALYZE par", "ANALYZE kid")
    source = Source(url=Url.parse(pg_engine.source), table="par")
    with connection(source.url, readonly=True) as conn:  # (a saved plan's run checks it too)
        assert not declared_not_null(conn, source, "id")
    dim = (md.mapping("dim_par").source(pg_engine.source, table="par").key("id").scd1()
           .chunks(count=4).target(pg_engine.target, table="dim_par"))
    assert dim.plan().chunks[-1].range.nulls
    result = dim.run(progress=False)
    assert (result.inserted, result.rejected) == (5000, 7)


@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("chunks", [1, 3, 7, 40])
def test_quantiles_cut_exactly_like_ntile(engine: Engine, chunks: int, indexed: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Skewed keys with long runs of one value, text keys in byte order: the tiles come from
    # a cursor moved to each tile's first row (PostgreSQL), a walk of the key's index or a
    # stream of the sorted keys (SQLite), and must be the ones NTILE gives.
    from mapperdsl.connect import connection
    from mapperdsl.dsl.parts import Source
    from mapperdsl.dsl.url import Url
    from mapperdsl.plan.stats import read_key_stats

    engine.execute(engine.source, "CREATE TABLE skew (n INTEGER, t TEXT)",
                   rows=[((g % 7) * (g % 3), chr(65 + g % 26) + str(g % 5) + "é" * (g % 2))
                         for g in range(1, 302)],
                   insert=f"INSERT INTO skew VALUES ({engine.placeholders(2)})")
    from mapperdsl.plan import stats
    if indexed:
        if engine.name == "sqlite" and chunks <= stats.INDEX_WALK * 2:  # the walk, not a stream
            monkeypatch.setattr(stats, "_rows_at", lambda *_: pytest.fail("keys streamed"))
        engine.execute(engine.source, "CREATE INDEX skew_n ON skew (n)",
                       "CREATE INDEX skew_t ON skew (t)" if engine.name == "sqlite" else
                       'CREATE INDEX skew_t ON skew (t COLLATE "C")')
    source = Source(url=Url.parse(engine.source), table="skew")
    collate = '"C"' if engine.name == "postgresql" else "BINARY"
    for key, dtype, expr in (("n", pl.Int32(), '"n"'), ("t", pl.String(), f'"t" COLLATE {collate}')):
        with connection(source.url, readonly=True) as conn:
            tiles, nulls = read_key_stats(conn, source, key, dtype, "1 = 1", lambda _: chunks)
        expected = engine.query(engine.source,
            f"SELECT MIN(k), COUNT(*) FROM (SELECT {expr} AS k, NTILE({chunks}) OVER "
            f"(ORDER BY {expr}) AS t FROM skew) q GROUP BY t ORDER BY t")
        assert [tuple(t) for t in tiles] == expected and nulls == 0


def test_sqlite_target_columns_read_exactly(tmp_path: Path) -> None:
    # The target's key + hash come back as one JSON array per column: int64 extremes, text
    # with quotes, escapes and emoji, NULLs and no rows at all must survive it unchanged.
    import sqlite3

    from mapperdsl.dsl.url import Url
    from mapperdsl.execute.read import read_sqlite_columns

    path = tmp_path / "t.db"
    rows = [('a"b\\n\u00e9 \U0001F600', -2**63, 1), ("x", 2**63 - 1, 0), (None, None, None),
            ("'", 0, 1), ("", 1, 0)]
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE t (k TEXT, h BIGINT, f BOOLEAN)")
        con.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    url, schema = Url.parse(f"sqlite:///{path}"), {"k": pl.String(), "h": pl.Int64(),
                                                    "f": pl.Boolean()}
    assert read_sqlite_columns(url, "SELECT k, h, f FROM t", schema).rows() == rows
    empty = read_sqlite_columns(url, "SELECT k, h, f FROM t WHERE 0 = 1", schema)
    assert empty.height == 0 and empty.columns == ["k", "h", "f"]

"""MariaDB (MySQL) as a source, into PostgreSQL: quoting, byte-order text keys, tiles, types."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

import mapperdsl as md

from conftest import Engine
from helpers import step_time

DDL = ("CREATE TABLE `cust omer` (id BIGINT PRIMARY KEY, code VARCHAR(20), `na\"me` VARCHAR(50), "
       "`we``ird` TEXT, balance DECIMAL(12,2), updated DATETIME(6), since DATE, "
       "visits INT UNSIGNED)")
INSERT = "INSERT INTO `cust omer` VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
CODES = ["a", "B", "b", "é", "z", "Z0", "ü", "\U0001F600", "a b", "A",  # byte order differs
         "p", "p\t", "p ", "p!", "k\\", "k\\x", "a\\' OR 1=1 -- "]  # padding, backslashes
T = datetime(2026, 3, 1, 12, 0, 0, 123456)


def rows(n: int, *, changed: bool = False) -> list[tuple[object, ...]]:
    out = []
    for i in range(1, n + 1):
        name = f"n{i}" + ("!" if changed and i % 5 == 0 else "")
        out.append((i, f"{CODES[i % len(CODES)]}{i}", name, None if i % 7 == 0 else f"w'{i}\"",
                    Decimal(i) / 4 - 10, T + timedelta(seconds=i), date(2020, 1, 1 + i % 28),
                    4_000_000_000 + i))
    return out


@pytest.fixture
def mariadb(mysql_source: str, tmp_path: Path) -> Engine:
    """A MariaDB source (the targets are ``pg_engine``'s)."""
    return Engine("mysql", mysql_source, "", tmp_path)


def load(engine: Engine, data: list[tuple[object, ...]]) -> None:
    engine.execute(engine.source, "DELETE FROM `cust omer`", rows=data, insert=INSERT)


def test_a_mariadb_table_loads_into_postgresql(mariadb: Engine, pg_engine: Engine) -> None:
    src, dst = mariadb, pg_engine
    src.execute(src.source, DDL)
    load(src, rows(60))
    dim = (md.mapping("dim_maria").source(src.source, table="cust omer").key("id")
           .scd2(deletes="close").chunks(count=4).target(dst.target, table="dim_maria"))
    plan = dim.plan(effective_time=step_time(0))
    assert "FROM `cust omer` WHERE `id` < " in plan.chunks[0].sql
    assert not plan.chunks[-1].range.nulls  # `id` is the primary key: no NULL-key chunk
    assert plan.target_schema()["balance"] == pl.Decimal(12, 2)
    assert plan.target_schema()["visits"] == pl.UInt32()
    first = md.run(plan, n_jobs=2, progress=False)
    assert first.ok and first.inserted == 60, first.message
    changed = [r for r in rows(70, changed=True) if r[0] % 9]  # updates, inserts, deletes
    load(src, changed)
    second = md.run(dim.plan(effective_time=step_time(1)), n_jobs=2, progress=False)
    gone = [i for i in range(1, 61) if i % 9 == 0]
    assert (second.inserted, second.updated, second.closed) == (
        sum(1 for r in changed if r[0] > 60),
        sum(1 for r in changed if r[0] <= 60 and r[0] % 5 == 0), len(gone))
    current = dst.query(dst.target, 'SELECT id, code, "na""me", "we`ird", balance, updated, '
                                    'since, visits FROM dim_maria WHERE is_current ORDER BY id')
    assert current == sorted(changed)
    again = md.run(dim.plan(effective_time=step_time(2)), progress=False)
    assert again.unchanged == len(changed) and again.counts()["inserted"] == 0


def test_text_keys_split_the_same_in_mariadb_and_postgresql(mariadb: Engine,
                                                              pg_engine: Engine) -> None:
    # Chunks cut on UTF-8 byte order in MariaDB (no padding: 'p ' is not 'p') must hold the
    # same keys as in PostgreSQL (COLLATE "C"); bounds with backslashes and quotes stay
    # literal: a second run finds every key where the first put it.
    src, dst = mariadb, pg_engine
    src.execute(src.source, DDL)
    load(src, [(i, CODES[i % len(CODES)], *rest) for i, _, *rest in rows(len(CODES))])
    dim = (md.mapping("dim_codes").source(src.source, table="cust omer").key("code")
           .columns(code="code", name='na"me').scd1(deletes="delete").chunks(count=9)
           .target(dst.target, table="dim_codes"))
    plan = dim.plan()
    assert len(plan.chunks) == 10  # bounds on trailing blanks and backslashes among them
    assert md.run(plan, n_jobs=2, progress=False).inserted == len(CODES)
    unchanged = md.run(dim.plan(), n_jobs=2, progress=False)
    assert (unchanged.inserted, unchanged.deleted, unchanged.unchanged) == (0, 0, len(CODES))
    src.execute(src.source, "DELETE FROM `cust omer` WHERE MOD(id, 4) = 3")
    again = md.run(dim.plan(), n_jobs=2, progress=False)
    gone = sum(1 for i in range(1, len(CODES) + 1) if i % 4 == 3)
    assert (again.inserted, again.updated, again.deleted) == (0, 0, gone)
    assert sorted(r[0] for r in dst.query(dst.target, "SELECT code FROM dim_codes")) == \
        sorted(CODES[i % len(CODES)] for i in range(1, len(CODES) + 1) if i % 4 != 3)


def test_a_bound_on_a_key_with_a_nul_character(mariadb: Engine, pg_engine: Engine) -> None:
    # MariaDB text may hold a NUL, and a tile may start on it: its bound is its hex bytes in
    # MariaDB and, in the PostgreSQL target (which rejects those rows), the text after 'a'.
    src, dst = mariadb, pg_engine
    src.execute(src.source, "CREATE TABLE nk (k VARCHAR(10) PRIMARY KEY, note TEXT)",
                rows=[(k, "x") for k in ["a", "a\x00b", "a\x00c", "b", "c\x00", "d"]],
                insert="INSERT INTO nk VALUES (%s, %s)")
    dim = (md.mapping("nk").source(src.source, table="nk").key("k").scd2(deletes="close")
           .chunks(count=3).target(dst.target, table="dim_nk"))
    plan = dim.plan()
    assert [(c.range.lo, c.range.hi) for c in plan.chunks] == [
        (None, "a\x00c"), ("a\x00c", "c\x00"), ("c\x00", None)]
    first = md.run(plan, progress=False)
    assert (first.inserted, first.rejected) == (3, 3), first
    src.execute(src.source, "DELETE FROM nk WHERE k = 'b'")
    again = dim.run(progress=False)
    assert (again.unchanged, again.closed, again.rejected) == (2, 1, 3), again


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_tiles_cut_exactly_like_ntile(mariadb: Engine, chunks: int) -> None:
    from mapperdsl.connect import connection
    from mapperdsl.dsl.parts import Source
    from mapperdsl.dsl.url import Url
    from mapperdsl.plan.stats import read_key_stats

    src = mariadb
    src.execute(src.source, DDL)
    load(src, rows(50))
    src.execute(src.source, "UPDATE `cust omer` SET code = 'same' WHERE MOD(id, 3) = 0")
    source = Source(url=Url.parse(src.source), table="cust omer")
    expr = "CAST(CONVERT(code USING utf8mb4) AS BINARY)"
    with connection(source.url, readonly=True) as conn:
        tiles, nulls = read_key_stats(conn, source, "code", pl.String(), "1 = 1",
                                      lambda _: chunks)
    expected = src.query(src.source, f"SELECT MIN(k), COUNT(*) FROM (SELECT {expr} AS k, "
                                     f"NTILE({chunks}) OVER (ORDER BY {expr}) AS t FROM "
                                     "`cust omer`) q GROUP BY t ORDER BY t")
    assert [tuple(t) for t in tiles] == [(k.decode() if isinstance(k, bytes) else k, n)
                                         for k, n in expected] and nulls == 0


def test_an_incremental_mariadb_source_reads_only_changed_rows(mariadb: Engine,
                                                               pg_engine: Engine) -> None:
    src, dst = mariadb, pg_engine
    src.execute(src.source, DDL)
    load(src, rows(40))
    dim = (md.mapping("dim_inc").source(src.source, table="cust omer").key("id").scd2()
           .incremental("updated").chunks(count=2).target(dst.target, table="dim_inc"))
    assert md.run(dim.plan(effective_time=step_time(0)), progress=False).inserted == 40
    src.execute(src.source, "UPDATE `cust omer` SET `na\"me` = 'moved', "
                            "updated = '2026-04-01 00:00:00' WHERE id IN (3, 4)")
    second = md.run(dim.plan(effective_time=step_time(1)), progress=False)
    assert (second.read, second.updated) == (2, 2)
    assert md.run(dim.plan(effective_time=step_time(2)), progress=False).read == 0


def test_mariadb_is_a_source_not_a_target() -> None:
    with pytest.raises(md.DeclarationError, match="reads from but does not write to"):
        md.mapping("m").target("mysql://u:pw@db/dw", table="t")
    assert repr(md.mapping("m").source("mariadb://u:s3cret@db/x", table="t")).count("s3cret") == 0



def test_decimals_past_38_digits_are_refused_in_the_plan(mariadb: Engine,
                                                          pg_engine: Engine) -> None:
    mariadb.execute(mariadb.source, "CREATE TABLE wide (id INT, amount DECIMAL(65,30))")
    dim = (md.mapping("wide").source(mariadb.source, table="wide").key("id").scd1()
           .target(pg_engine.target, table="wide"))
    with pytest.raises(md.PlanError, match="'amount' is a decimal of 65 digits"):
        dim.plan()


def test_a_text_checkpoint_meets_a_column_of_another_collation(mariadb: Engine,
                                                               pg_engine: Engine) -> None:
    # The checkpoint is a text literal compared with a utf8mb4_unicode_ci column: it must take
    # the column's collation ("Illegal mix of collations" otherwise).
    mariadb.execute(mariadb.source, "CREATE TABLE tagged (id INT PRIMARY KEY, "
                    "tag VARCHAR(10) COLLATE utf8mb4_unicode_ci)",
                    rows=[(1, "a\\"), (2, "b'"), (3, "c")],
                    insert="INSERT INTO tagged VALUES (%s, %s)")
    dim = (md.mapping("tagged").source(mariadb.source, table="tagged").key("id").scd1()
           .incremental("tag").target(pg_engine.target, table="tagged"))
    assert md.run(dim.plan(), progress=False).inserted == 3
    mariadb.execute(mariadb.source, "INSERT INTO tagged VALUES (4, 'd')")
    again = md.run(dim.plan(), progress=False)
    assert (again.read, again.inserted) == (1, 1)


@pytest.mark.parametrize("target", ["postgresql", "sqlite"])
def test_mysql_values_no_target_holds_are_rejects(mariadb: Engine, pg_engine: Engine,
                                                  sqlite_engine: Engine, target: str) -> None:
    # MySQL keeps zero dates ('0000-00-00', '2024-00-00'), a TIME of -838 hours and unsigned
    # 64-bit numbers past bigint's; ConnectorX could not read the dates and times, and the
    # targets cannot hold the number: each failed the chunk on every run, and is the row's
    # reject now, the dates and times read as their text when ConnectorX refuses them.
    src = mariadb
    src.execute(src.source, "SET SESSION sql_mode = ''",
                "CREATE TABLE odd_times (id INT PRIMARY KEY, d DATE, t DATETIME(3), "
                "tm TIME, u BIGINT UNSIGNED)",
                "INSERT INTO odd_times VALUES (1, NULL, NULL, NULL, NULL), "
                "(2, '0000-00-00', '2024-01-02 03:04:05.125', '12:00:00', 1), "
                "(3, '2024-00-00', '2024-01-02 03:04:05', '01:02:03', 2), "
                "(4, '2024-01-02', '0000-00-00 00:00:00', '01:02:03', 3), "
                "(5, '2024-01-02', '2024-01-02 03:04:05', '-838:59:59', 4), "
                "(6, '2024-01-03', '2024-01-02 03:04:05', '23:59:59', 18446744073709551615), "
                "(7, '2024-01-04', '2024-01-02 03:04:05.5', '00:00:01', 9223372036854775807)")
    url = pg_engine.target if target == "postgresql" else sqlite_engine.target
    dim = (md.mapping("odd_times").source(src.source, table="odd_times").key("id").scd2()
           .chunks(count=2).target(url, table="dim_odd_times"))
    first = dim.run(progress=False)
    assert (first.inserted, first.rejected) == (2, 5), first
    query = pg_engine.query if target == "postgresql" else sqlite_engine.query
    assert [k for k, in query(url, "SELECT key FROM mapperdsl_rejects ORDER BY key")] == [
        "2", "3", "4", "5", "6"]
    reasons = dict(query(url, "SELECT key, reason FROM mapperdsl_rejects"))
    assert "column d: value does not fit Date" in reasons["2"]
    assert "column tm: value does not fit Time" in reasons["5"]
    assert "column u: a number past the signed 64-bit integers" in reasons["6"]
    assert [r[0] for r in query(url, "SELECT id FROM dim_odd_times ORDER BY id")] == [1, 7]
    again = dim.run(progress=False)
    assert (again.unchanged, again.rejected) == (2, 5), again


def test_a_mysql_column_connectorx_cannot_read_is_named_in_the_plan(mariadb: Engine,
                                                                    pg_engine: Engine) -> None:
    # A geometry: the plan says what to do about it, and a query source that turns it into
    # text loads.
    src = mariadb
    src.execute(src.source, "CREATE TABLE places (id INT PRIMARY KEY, spot GEOMETRY)",
                "INSERT INTO places VALUES (1, ST_GeomFromText('POINT(1 2)'))")
    dim = (md.mapping("places").source(src.source, table="places").key("id").scd1()
           .target(pg_engine.target, table="dim_places"))
    with pytest.raises(md.PlanError, match=r"MYSQL_TYPE_GEOMETRY.*ST_AsText"):
        dim.plan()
    as_text = (md.mapping("places").source(src.source, query="SELECT id, ST_AsText(spot) AS spot "
                                                                "FROM places").key("id").scd1()
               .target(pg_engine.target, table="dim_places"))
    assert as_text.run(progress=False).inserted == 1
    assert pg_engine.query(pg_engine.target, "SELECT spot FROM dim_places") == [("POINT(1 2)",)]


def test_a_mysql_date_key_with_zeros_as_a_chunk_bound(mariadb: Engine, pg_engine: Engine) -> None:
    # '2024-05-00' is a reject, and can be where the chunks are cut: the bound is the
    # first real date after it, which PostgreSQL reads (it refused the target's query on
    # every run after the first).
    src = mariadb
    src.execute(src.source, "SET SESSION sql_mode = ''",
                "CREATE TABLE days (k DATE PRIMARY KEY, v INT)",
                "INSERT INTO days VALUES ('2024-05-00', 0), "
                + ", ".join(f"('2024-01-{i:02d}', {i})" for i in range(1, 12)) + ", "
                + ", ".join(f"('2024-06-{i:02d}', {i})" for i in range(1, 20)))
    dim = (md.mapping("days").source(src.source, table="days").key("k").scd2(deletes="close")
           .chunks(count=3).target(pg_engine.target, table="dim_days"))
    assert any(c.range.lo == date(2024, 5, 1) for c in dim.plan().chunks)
    first = dim.run(progress=False)
    assert (first.inserted, first.rejected) == (30, 1), first
    again = dim.run(progress=False)
    assert (again.unchanged, again.rejected) == (30, 1), again


def test_a_mysql_date_with_zeros_is_no_high_water_mark(mariadb: Engine,
                                                        pg_engine: Engine) -> None:
    # '2025-00-00' sorts after every real date of 2024: as the mark, it left later changes
    # dated 2024 unread for good. The mark is the largest real date; that row waits past it,
    # as a row dated in the future does (read, and a reject, once the mark passes it).
    src = mariadb
    src.execute(src.source, "SET SESSION sql_mode = ''",
                "CREATE TABLE stamped (id INT PRIMARY KEY, at DATETIME, v INT)",
                "INSERT INTO stamped VALUES (1, '2024-01-01 00:00:00', 1), "
                "(2, '2024-02-01 00:00:00', 2), (3, '2025-00-00 00:00:00', 3)")
    dim = (md.mapping("stamped").source(src.source, table="stamped").key("id").scd2()
           .incremental("at").target(pg_engine.target, table="dim_stamped"))
    assert dim.plan().window.high == (datetime(2024, 2, 1),)
    first = dim.run(progress=False)
    assert (first.inserted, first.rejected) == (2, 0), first
    src.execute(src.source, "UPDATE stamped SET v = 10, at = '2024-03-01 00:00:00' WHERE id = 1")
    second = dim.run(progress=False)
    assert (second.read, second.updated) == (1, 1), second

"""The job log: jobs, chunks, checkpoints and rejects rows, and a chunk's all-or-nothing commit."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest

import mapperdsl as md
from mapperdsl.record import joblog

from conftest import Engine
from helpers import CUSTOMER_DDL, load_snapshot

ROWS = {i: (f"n{i}", f"e{i}", "s") for i in range(1, 101)}


def mapping(engine: Engine, **kw: object) -> md.Mapping:
    return (md.mapping("dim_log").source(engine.source, table="customer").key("id").scd2()
            .chunks(count=4).target(engine.target, table="dim_log"))


def test_job_and_chunk_rows_hold_the_counts(engine: Engine) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, ROWS)
    engine.execute(engine.source, "INSERT INTO customer VALUES (NULL, 'x', 'y', 'z')")
    result = mapping(engine).run(n_jobs=2, progress=False)
    jobs = engine.query(engine.target, "SELECT job_id, mapping, target_table, status, read, "
                                       "inserted, rejected, chunks_total, chunks_done, progress, "
                                       "plan_json, started_at, finished_at FROM mapperdsl_jobs")
    assert len(jobs) == 1
    job = jobs[0]
    assert job[:10] == (result.job_id, "dim_log", "dim_log", "SUCCEEDED", 101, 100, 1, 5, 5, 1.0)
    assert md.Plan.from_json(job[10]).name == "dim_log"
    assert job[11] is not None and job[12] is not None
    chunks = engine.query(engine.target, "SELECT chunk, key_range, status, read, inserted, "
                                         "rejected, attempts FROM mapperdsl_chunks ORDER BY chunk")
    assert [c[0] for c in chunks] == [1, 2, 3, 4, 5]
    assert sum(c[3] for c in chunks) == 101 and sum(c[4] for c in chunks) == 100
    assert chunks[0][1] == "id < 26" and chunks[-1][1] == "id IS NULL"
    assert chunks[-1][2:6] == ("SUCCEEDED", 1, 0, 1)
    ck = engine.query(engine.target, "SELECT mapping, value, job_id FROM mapperdsl_checkpoints")
    assert ck == [("dim_log", None, result.job_id)]


def test_chunk_data_and_ledger_row_commit_together(engine: Engine,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, ROWS)
    original = joblog.record_chunk

    def failing(conn, result, key_range):  # type: ignore[no-untyped-def]
        if result.number == 2 and result.status == "SUCCEEDED":
            raise RuntimeError("ledger write failed")
        original(conn, result, key_range)

    monkeypatch.setattr(joblog, "record_chunk", failing)
    result = mapping(engine).run(n_jobs=1, progress=False)  # in this process: the patch applies
    assert result.status == "FAILED"
    assert [c.status for c in result.chunks] == ["SUCCEEDED", "FAILED", "SUCCEEDED",
                                                 "SUCCEEDED", "SUCCEEDED"]
    assert "ledger write failed" in (result.chunks[1].error or "")
    ids = {r[0] for r in engine.query(engine.target, "SELECT id FROM dim_log")}
    assert ids == set(range(1, 26)) | set(range(51, 101))  # chunk 2 (26..50) left nothing behind
    ledger = engine.query(engine.target, "SELECT chunk, status, inserted FROM mapperdsl_chunks "
                                         "ORDER BY chunk")
    assert ledger[1] == (2, "FAILED", 0)
    assert engine.query(engine.target, "SELECT COUNT(*) FROM mapperdsl_checkpoints") == [(0,)]


def test_composite_business_key(engine: Engine) -> None:
    engine.execute(engine.source, "CREATE TABLE lines (order_id INTEGER, line INTEGER, qty INTEGER)")
    rows = [(o, n, o * n) for o in range(1, 21) for n in range(1, 4)]
    insert = f"INSERT INTO lines VALUES ({engine.placeholders(3)})"
    engine.execute(engine.source, rows=rows, insert=insert)
    dim = (md.mapping("lines").source(engine.source, table="lines").key(["order_id", "line"])
           .scd2(deletes="close").chunks(count=3).target(engine.target, table="dim_lines"))
    assert dim.run(n_jobs=2, progress=False).inserted == 60
    engine.execute(engine.source, "UPDATE lines SET qty = 0 WHERE line = 2",
                   "DELETE FROM lines WHERE order_id = 5 AND line = 3")
    second = dim.run(n_jobs=2, progress=False)
    assert (second.updated, second.closed, second.unchanged) == (20, 1, 39)
    current = engine.query(engine.target, "SELECT order_id, line, COUNT(*) FROM dim_lines "
                                          "WHERE is_current GROUP BY order_id, line")
    assert len(current) == 59 and {c[2] for c in current} == {1}


def test_postgresql_rows_arrive_by_copy(pg_engine: Engine) -> None:
    engine = pg_engine
    log = Path(os.environ.get("MAPPERDSL_PG_DIR", "/nonexistent")) / "server.log"
    if not log.exists():
        pytest.skip("the server log of scripts/pg.sh is not here")
    database = engine.target.rsplit("/", 1)[1]
    engine.execute(engine.source, CUSTOMER_DDL, f'ALTER DATABASE "{database}" SET log_statement = \'all\'')
    load_snapshot(engine, ROWS)
    start = log.stat().st_size
    result = mapping(engine).run(n_jobs=2, progress=False)
    assert result.inserted == 100
    with log.open() as f:
        f.seek(start)
        statements = f.read()
    assert 'COPY "dim_log"' in statements and "FROM STDIN" in statements
    assert 'INSERT INTO "dim_log"' not in statements and "INSERT INTO dim_log" not in statements
    plan_json = engine.query(engine.target, "SELECT plan_json FROM mapperdsl_jobs")[0][0]
    assert json.loads(plan_json)["mapping"]["name"] == "dim_log"


@pytest.mark.parametrize("first_run", ["succeeds", "fails"])
def test_target_is_created_with_the_index_the_merge_uses(engine: Engine, first_run: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A first load builds the index after its chunks, whatever their outcome.
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, ROWS)
    if first_run == "fails":
        monkeypatch.setenv("MAPPERDSL_FAILPOINT", "read:2:raise")
    result = mapping(engine).run(progress=False)
    assert result.ok == (first_run == "succeeds")
    if engine.name == "sqlite":
        sql = engine.query(engine.target, "SELECT sql FROM sqlite_master WHERE type = 'index' "
                                          "AND tbl_name = 'dim_log'")
    else:
        sql = engine.query(engine.target, "SELECT indexdef FROM pg_indexes "
                                          "WHERE tablename = 'dim_log'")
    assert len(sql) == 1
    text = sql[0][0].replace('"', "")
    assert "UNIQUE INDEX" in text and "(id)" in text and "is_current" in text.split("WHERE")[1]


def test_results_display_in_three_tiers(sqlite_engine: Engine) -> None:
    engine = sqlite_engine
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, ROWS)
    plan = mapping(engine).plan()
    result = md.run(plan, progress=False)
    for value in (plan, result):
        assert "\n" not in repr(value)
        assert "<table>" in value._repr_html_()
    assert repr(result).startswith(f"<JobResult {result.job_id} SUCCEEDED dim_log: read 100: "
                                   "inserted 100 in ")
    assert "chunk 1/5 (id < 26) SUCCEEDED read 25: inserted 25" in str(result)
    assert "<th>keys</th>" in result._repr_html_() and "<td>id &lt; 26</td>" in result._repr_html_()
    assert "chunk 5/5" in plan._repr_html_() and "id IS NULL" in plan._repr_html_()


def test_progress_bar_and_one_log_line_per_chunk(sqlite_engine: Engine,
                                                 capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import logging

    engine = sqlite_engine
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, ROWS)
    caplog.set_level(logging.INFO, logger="mapperdsl")
    result = mapping(engine).run(progress=True)
    bar = capsys.readouterr().err
    assert "dim_log" in bar and "5/5" in bar and "chunk" in bar
    lines = [r.getMessage() for r in caplog.records if " chunk " in r.getMessage()]
    assert len(lines) == 5 and all(result.job_id in line for line in lines)
    quiet = mapping(engine).run(progress=False)
    assert quiet.ok and "5/5" not in capsys.readouterr().err


def test_html_tables_escape_and_truncate() -> None:
    from mapperdsl.display import MAX_CELL, MAX_ROWS, html_table

    rows = [(i, "<script>" + "x" * 500) for i in range(MAX_ROWS + 7)]
    html = html_table(("n", "text"), rows)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("<tr>") == MAX_ROWS + 2 and "7 more rows" in html
    assert "x" * MAX_CELL not in html


@pytest.mark.parametrize("columns", ["all", "key left out"])
def test_dim_resume_takes_the_mapping_as_written(sqlite_engine: Engine, columns: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A job's plan holds its mapping resolved (every column, the key, absolute paths); the
    # mapping as the user wrote it, with relative SQLite paths, is still the one it was
    # planned from, and dim.resume() finishes its job. A mapping changed since is refused.
    engine = sqlite_engine
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, ROWS)
    monkeypatch.chdir(engine.folder)
    dim = (md.mapping("dim_log").source("sqlite:///src.db", table="customer").key("id").scd2()
           .chunks(count=4).target("sqlite:///dw.db", table="dim_log"))
    if columns == "key left out":
        dim = dim.columns(name="name", email="email")
    monkeypatch.setenv("MAPPERDSL_FAILPOINT", "read:2:raise")
    failed = dim.run(progress=False)
    assert not failed.ok
    monkeypatch.delenv("MAPPERDSL_FAILPOINT")
    with pytest.raises(md.CheckpointError, match="changed since job"):
        dim.scd1().resume(progress=False)
    resumed = dim.resume(progress=False)
    assert resumed.status == "SUCCEEDED" and resumed.job_id == failed.job_id, resumed
    assert engine.query(engine.target, "SELECT COUNT(*) FROM dim_log") == [(100,)]


def test_a_relative_sqlite_path_follows_the_working_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A notebook that changes folders between runs: the same relative URLs reach the files
    # of the folder it is in (SQLAlchemy fixes an engine's SQLite path when the engine is
    # made), here to find the folder's own failed job and resume it.
    for n, folder in ((30, tmp_path / "one"), (50, tmp_path / "two")):
        folder.mkdir()
        monkeypatch.chdir(folder)
        with sqlite3.connect("src.db") as conn:
            conn.execute("CREATE TABLE t (id INTEGER, v TEXT)")
            conn.executemany("INSERT INTO t VALUES (?, 'x')", [(i,) for i in range(n)])
        dim = (md.mapping("rel").source("sqlite:///src.db", table="t").key("id").scd1()
               .chunks(count=2).target("sqlite:///dw.db", table="dim_rel"))
        monkeypatch.setenv("MAPPERDSL_FAILPOINT", "read:2:raise")
        failed = dim.run(progress=False)
        monkeypatch.delenv("MAPPERDSL_FAILPOINT")
        resumed = dim.resume(progress=False)
        assert resumed.job_id == failed.job_id and resumed.inserted == n, resumed
        with sqlite3.connect("dw.db") as conn:
            assert conn.execute("SELECT COUNT(*) FROM dim_rel").fetchone() == (n,)


def test_a_plan_older_than_the_last_job_is_refused(sqlite_engine: Engine) -> None:
    # A saved plan run after a newer job (or one planned as of an earlier time) would close
    # versions before they began: it is refused, and nothing is written.
    engine = sqlite_engine
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, ROWS)
    dim = mapping(engine)
    saved = dim.plan().to_json()
    engine.execute(engine.source, "UPDATE customer SET name = 'a2' WHERE id = 1")
    assert dim.run(progress=False).inserted == 100
    engine.execute(engine.source, "UPDATE customer SET name = 'a3' WHERE id = 1")
    with pytest.raises(md.PlanError, match="already wrote its target as of"):
        md.run(md.Plan.from_json(saved), progress=False)
    with pytest.raises(md.PlanError, match="Plan again"):
        md.run(dim.plan(effective_time=datetime(2020, 1, 1, tzinfo=timezone.utc)),
               progress=False)
    assert engine.query(engine.target, "SELECT COUNT(*) FROM mapperdsl_jobs") == [(1,)]
    newer = dim.run(progress=False)  # planned now: fine
    assert newer.updated == 1 and engine.query(
        engine.target, "SELECT COUNT(*) FROM dim_log WHERE valid_to < valid_from") == [(0,)]

"""Parallel runs: any n_jobs and chunk count give the same target; skewed keys still split evenly."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import joblib
import pytest

import mapperdsl as md

from conftest import Engine
from helpers import CUSTOMER_DDL, load_snapshot, step_time

ROWS = {i: (f"name {i % 37}", f"e{i}@x.org" if i % 11 else None, ["a", "b", ""][i % 3])
        for i in range(1, 601)}


def changed(rows: dict[int, tuple[object, ...]]) -> dict[int, tuple[object, ...]]:
    out = {k: v for k, v in rows.items() if k % 50}  # deletes
    out.update({k: (v[0], v[1], "moved") for k, v in rows.items() if k % 7 == 0 and k % 50})
    out.update({i: ("new", None, "a") for i in range(601, 621)})
    return out


def load_twice(engine: Engine, table: str, *, n_jobs: int | None, count: int) -> list[tuple[object, ...]]:
    dim = (md.mapping(table).source(engine.source, table="customer").key("id")
           .columns(id="id", name="name", email="email", segment="segment")
           .scd2(deletes="close").chunks(count=count).target(engine.target, table=table))
    load_snapshot(engine, ROWS)
    first = md.run(dim.plan(effective_time=step_time(0)), n_jobs=n_jobs, progress=False)
    assert first.ok, first
    load_snapshot(engine, changed(ROWS))
    second = md.run(dim.plan(effective_time=step_time(1)), n_jobs=n_jobs, progress=False)
    assert second.ok, second
    assert len(second.chunks) == min(count, len(changed(ROWS))) + 1  # + the NULL-key chunk
    return engine.query(engine.target, f"SELECT id, name, email, segment, valid_from, valid_to, "
                                       f"is_current, row_hash FROM {table} "
                                       "ORDER BY id, valid_from")


def test_n_jobs_and_chunk_counts_give_identical_targets(engine: Engine) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    reference = load_twice(engine, "dim_ref", n_jobs=1, count=1)
    assert len(reference) == 600 + 84 + 20  # first versions, new versions of changes, new keys
    for n_jobs, count in [(2, 1), (1, 3), (2, 3), (1, 17), (2, 17)]:
        table = f"dim_{n_jobs}_{count}"
        assert load_twice(engine, table, n_jobs=n_jobs, count=count) == reference, table


def scd1_of_rows(engine: Engine, count: int) -> md.Mapping:
    """An SCD1 mapping of ROWS (loaded into the source) cut into ``count`` chunks."""
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, ROWS)
    return (md.mapping("dim").source(engine.source, table="customer").key("id").scd1()
            .chunks(count=count).target(engine.target, table="dim"))


def test_joblib_parallel_config_is_respected(sqlite_engine: Engine) -> None:
    dim = scd1_of_rows(sqlite_engine, 4)
    with joblib.parallel_config(backend="threading", n_jobs=2):
        result = dim.run(progress=False)
    assert result.ok and result.inserted == 600


def test_many_parallel_sqlite_writers_never_fail_with_locked(sqlite_engine: Engine) -> None:
    dim = scd1_of_rows(sqlite_engine, 40)
    result = dim.run(n_jobs=4, progress=False)
    assert result.ok, result.message
    assert (result.inserted, len(result.chunks)) == (600, 41)


@pytest.mark.parametrize("count", [4, 10])
def test_skewed_keys_give_even_chunks(engine: Engine, count: int) -> None:
    # 90% of the rows sit in 1% of the key range.
    engine.execute(engine.source, "CREATE TABLE skewed (id BIGINT, v TEXT)")
    dense = [(i, "d") for i in range(1, 1801)]
    sparse = [(1_000_000 + i * 900, "s") for i in range(200)]
    engine.execute(engine.source, rows=dense + sparse,
                   insert=f"INSERT INTO skewed VALUES ({engine.placeholders(2)})")
    dim = (md.mapping("skew").source(engine.source, table="skewed").key("id").scd1()
           .chunks(count=count).target(engine.target, table="dim_skew"))
    plan = dim.plan()
    result = md.run(plan, n_jobs=2, progress=False)
    sizes = [c.read for c in result.chunks if not plan.chunks[c.number - 1].range.nulls]
    mean = sum(sizes) / len(sizes)
    assert len(sizes) == count and sum(sizes) == 2000
    assert max(sizes) <= 2 * mean and min(sizes) >= mean / 2, sizes
    assert [c.estimated_rows for c in plan.chunks[:-1]] == sizes


def test_workers_start_ahead_only_for_a_loky_pool() -> None:
    # The head start runs in a thread; the first parallel run waits for it, so one pool
    # starts at a time. A threading (or dask) backend gets no head start.
    from joblib import parallel_config

    from mapperdsl.execute import runner

    with parallel_config(backend="threading"):
        runner.start_workers(2)
    assert runner._starting is None
    runner.start_workers(1)
    assert runner._starting is None
    runner.start_workers(2)
    assert runner._starting is not None and runner._starting.name == "mapperdsl-workers"
    assert sorted(runner.run_tasks(abs, [-1, -2, -3], n_jobs=2, sequential=False)) == [1, 2, 3]
    assert runner._starting is None


@pytest.mark.parametrize("count", [1, 3])
def test_workers_start_while_planning_only_for_a_plan_of_several_ranges(
        sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path, count: int) -> None:
    """A plan of one key range runs here: workers started for it would only take the
    cores (and seconds at exit) from the run. Known once the rows are counted, before
    the key is walked, as dim.run() and `mapperdsl run MAPPING` plan."""
    from click.testing import CliRunner

    import mapperdsl.plan.compile
    from mapperdsl.cli import cli
    from mapperdsl.execute import runner

    events: list[object] = []
    monkeypatch.setattr(runner, "start_workers", lambda n: events.append(n))
    compile_plan = mapperdsl.plan.compile.compile_plan
    monkeypatch.setattr(mapperdsl.plan.compile, "compile_plan",
                        lambda *a, **k: events.append("compiled") or compile_plan(*a, **k))
    dim = scd1_of_rows(sqlite_engine, count)
    expected = [2, "compiled"] if count > 1 else ["compiled"]
    with joblib.parallel_config(backend="threading"):  # (no worker processes in this test)
        for mapping in (dim, dim.incremental("id").target(sqlite_engine.target, table="dim2")):
            assert mapping.run(n_jobs=2, progress=False).inserted == 600
            assert events == expected
            events.clear()
        mappings = tmp_path / "mappings.py"
        mappings.write_text(f"import mapperdsl as md\n"
                            f"dim = md.mapping('dim').source({sqlite_engine.source!r}, "
                            f"table='customer').key('id').scd1().chunks(count={count})"
                            f".target({sqlite_engine.target!r}, table='dim')\n")
        ran = CliRunner().invoke(cli, ["run", str(mappings), "--quiet", "--jobs", "2"])
    assert ran.exit_code == 0, ran.output
    assert events == ([2, "compiled"] if count > 1 else ["compiled"])


def reads_by_thread(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record (thread name, SQL) of every chunk's source read."""
    from mapperdsl import chunk

    seen: list[tuple[str, str]] = []
    real = chunk.read_sql

    def read(url, sql, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, sql))
        return real(url, sql, **kwargs)

    monkeypatch.setattr(chunk, "read_sql", read)
    return seen


def test_chunks_in_turn_are_worked_out_ahead(engine: Engine,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # With one worker (the default, joblib's), each chunk is read, prepared and diffed in a
    # background thread while the chunk before it is written; the target is the one a run
    # with two workers makes.
    engine.execute(engine.source, CUSTOMER_DDL)
    seen = reads_by_thread(monkeypatch)
    ahead = load_twice(engine, "dim_ahead", n_jobs=None, count=4)
    assert len(seen) == 2 * 5 and {name for name, _ in seen} == {"mapperdsl-ahead"}
    monkeypatch.undo()
    assert ahead == load_twice(engine, "dim_workers", n_jobs=2, count=4)


def test_a_chunk_in_turn_does_not_wait_for_the_job_log_of_the_one_before(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # The coordinator records chunk 1's result in the job log while chunk 2 is written:
    # chunk 1's record waits here until chunk 2 writes its own ledger row, which it could
    # never do if the record came first. The job log ends the same.
    import mapperdsl.job
    from mapperdsl.record import joblog

    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, ROWS)
    second_written = threading.Event()
    ledger_row, record = joblog.record_chunk, mapperdsl.job._record

    def record_chunk(conn: Any, result: Any, key_range: str) -> None:
        if result.number == 2:
            second_written.set()
        ledger_row(conn, result, key_range)

    waited: list[bool] = []

    def record_later(log_db: Any, plan: Any, owner: str, result: Any, results: Any) -> bool:
        if result.number == 1:
            waited.append(second_written.wait(timeout=20))
        return record(log_db, plan, owner, result, results)

    monkeypatch.setattr(joblog, "record_chunk", record_chunk)
    monkeypatch.setattr(mapperdsl.job, "_record", record_later)
    dim = (md.mapping("dim_log").source(engine.source, table="customer").key("id")
           .scd2().chunks(count=3).target(engine.target, table="dim_log"))
    result = dim.run(n_jobs=1, progress=False)
    assert waited == [True]
    assert result.ok and result.inserted == len(ROWS)
    job = engine.query(engine.target, "SELECT status, read, inserted FROM mapperdsl_jobs")
    assert job == [("SUCCEEDED", len(ROWS), len(ROWS))]


def test_a_read_that_failed_ahead_is_done_again_in_turn(sqlite_engine: Engine,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:

    from mapperdsl import chunk

    dim = scd1_of_rows(sqlite_engine, 4)
    real, failed = chunk.read_sql, []

    def read(url, sql, **kwargs):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "mapperdsl-ahead" and len(failed) < 2:
            failed.append(sql)
            raise RuntimeError("connection lost while reading ahead")
        return real(url, sql, **kwargs)

    monkeypatch.setattr(chunk, "read_sql", read)
    result = dim.run(n_jobs=1, progress=False)
    assert result.ok and result.inserted == 600 and len(failed) == 2
    assert [c.attempts for c in result.chunks] == [1] * 5  # not a retry: the chunk's first read


def test_a_sqlite_file_this_process_writes_is_not_read_ahead(
        sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Source and target in one SQLite file: sqlite3 reads it in turn (see execute/read.py).
    sqlite_engine.execute(sqlite_engine.target, CUSTOMER_DDL)
    load_snapshot(Engine("sqlite", sqlite_engine.target, sqlite_engine.target,
                         sqlite_engine.folder), ROWS)
    seen = reads_by_thread(monkeypatch)
    (sqlite_engine.folder / "sub").mkdir()
    spelt = f"sqlite:///{sqlite_engine.folder / 'sub' / '..' / 'dw.db'}"  # the same file
    dim = (md.mapping("dim").source(spelt, table="customer").key("id").scd1()
           .chunks(count=3).target(sqlite_engine.target, table="dim"))
    result = dim.run(n_jobs=1, progress=False)
    assert result.ok and result.inserted == 600
    assert len(seen) == 4 and {name for name, _ in seen} == {"MainThread"}


def test_ahead_gives_the_value_of_the_item_asked_for() -> None:
    from mapperdsl.execute.runner import Ahead

    ahead = Ahead(lambda x: 10 // x)
    assert ahead.take(2) == 5  # not started: worked out now
    ahead.start(3)
    assert ahead.take(5) == 2  # another item: the one under way is dropped
    ahead.start(0)  # fails in the background: its turn does it again
    assert ahead.take(0) is None


def test_chunks_cancelled_by_a_stop_are_not_read_ahead(sqlite_engine: Engine,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunk 1 fails, fail_fast requests a stop: the chunks after it are cancelled without
    # being read (only chunk 2 was read, ahead, while chunk 1 ran).
    dim = scd1_of_rows(sqlite_engine, 4).fail_fast()
    seen = reads_by_thread(monkeypatch)
    monkeypatch.setenv("MAPPERDSL_FAILPOINT", "read:1:raise")
    result = dim.run(n_jobs=1, progress=False)
    assert [c.status for c in result.chunks] == ["FAILED"] + ["CANCELLED"] * 4
    assert len(seen) == 2


def test_a_first_load_reads_its_first_chunk_while_the_job_is_set_up(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # The target is missing when planned, so it has no rows to read: chunk 1's source rows
    # are read while the job log, the target and the lease are set up, and used once.
    from mapperdsl.record import joblog

    dim = scd1_of_rows(engine, 3)
    seen = reads_by_thread(monkeypatch)
    real, during_set_up = joblog.ensure_tables, []

    def ensure_tables(conn):  # type: ignore[no-untyped-def]
        for _ in range(500):  # the read under way by now, if it was started before set-up
            if seen:
                break
            time.sleep(0.01)
        during_set_up.append(list(seen))
        return real(conn)

    monkeypatch.setattr(joblog, "ensure_tables", ensure_tables)
    result = dim.run(n_jobs=1, progress=False)
    assert result.ok and result.inserted == 600
    assert [sql for _, sql in during_set_up[0]] == [dim.plan().chunks[0].sql]
    assert len(seen) == 4  # each chunk read once: chunk 1's early read was used


def test_a_target_filled_since_planning_is_compared_with(engine: Engine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Planned while the target was missing; another run loaded it before this plan ran. What
    # was read ahead for an empty target is dropped: the rows are compared, not inserted again.
    dim = scd1_of_rows(engine, 3)
    planned = dim.plan()  # (the other run as of an earlier time: this plan is not older)
    other = md.run(dim.plan(effective_time=planned.effective_time - timedelta(seconds=1)),
                   n_jobs=1, progress=False)
    assert other.inserted == 600
    seen = reads_by_thread(monkeypatch)
    again = md.run(planned, n_jobs=1, progress=False)
    assert again.ok and again.inserted == 0 and again.unchanged == 600, again
    assert len(seen) == 5  # chunk 1 read twice: once for an empty target, once to compare
    assert engine.query(engine.target, "SELECT COUNT(*) FROM dim") == [(600,)]


def test_a_record_that_finds_the_lease_taken_is_never_missed() -> None:
    # The coordinator asks its recorder after each result; a record that finishes while it
    # asks must be reported then or at the next ask, never dropped.
    import random

    from mapperdsl.job import _Recorder

    for _ in range(300):
        recorder = _Recorder("job test")
        recorder.add(lambda: time.sleep(random.random() / 5000) or False)  # the lease is gone
        seen, deadline = False, time.monotonic() + 2
        while not seen and time.monotonic() < deadline:
            seen = recorder.lost()
        recorder.close()
        assert seen

"""The job log read back as frames, and the change preview that writes nothing."""

from __future__ import annotations

import polars as pl
import pytest

import mapperdsl as md

from conftest import Engine
from helpers import CUSTOMER_DDL, load_snapshot, step_time

BEFORE = {i: (f"n{i}", f"e{i}", "a") for i in range(1, 41)}
AFTER = {**{k: v for k, v in BEFORE.items() if k != 7},
         3: ("renamed", "e3", "a"), 30: ("n30", "e30", "b"), 41: ("new", None, "a")}


def setup(engine: Engine) -> md.Mapping:
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, BEFORE)
    return (md.mapping("dim_h").source(engine.source, table="customer").key("id")
            .columns(id="id", name="name", email="email", segment="segment")
            .scd2(deletes="close").chunks(count=2).target(engine.target, table="dim_h"))


def test_history_chunks_and_rejects_frames(engine: Engine) -> None:
    dim = setup(engine)
    first = dim.run(progress=False)
    engine.execute(engine.source, "INSERT INTO customer VALUES (NULL, 'x', 'y', 'z')")
    second = dim.run(progress=False)
    jobs = md.history(engine.target)
    assert jobs["job_id"].to_list() == [second.job_id, first.job_id]
    assert jobs.row(0, named=True)["rejected"] == 1 and jobs["status"].to_list() == \
        ["SUCCEEDED", "SUCCEEDED"]
    assert jobs["seconds"].min() >= 0
    assert md.history(engine.target, "other").height == 0
    assert md.history(engine.target, "dim_h", limit=1)["job_id"].to_list() == [second.job_id]
    parts = md.chunks(first.job_id, engine.target)
    assert parts["chunk"].to_list() == [1, 2, 3] and parts["inserted"].sum() == 40
    bad = md.rejects(second.job_id, engine.target)
    assert bad.select("chunk", "key", "reason").rows() == [(3, None, "business key is NULL")]
    assert md.rejects(first.job_id, engine.target).height == 0


def test_history_of_a_database_without_a_job_log(sqlite_engine: Engine) -> None:
    sqlite_engine.execute(sqlite_engine.target, "CREATE TABLE t (x INTEGER)")
    with pytest.raises(md.CheckpointError, match="no job log yet"):
        md.history(sqlite_engine.target)


def test_preview_counts_and_samples_and_writes_nothing(engine: Engine) -> None:
    dim = setup(engine)
    md.run(dim.plan(effective_time=step_time(0)), progress=False)
    load_snapshot(engine, AFTER)
    engine.execute(engine.source, "INSERT INTO customer VALUES (NULL, 'x', 'y', 'z')")
    before = engine.query(engine.target, "SELECT * FROM dim_h ORDER BY id, valid_from")
    jobs_before = engine.query(engine.target, "SELECT COUNT(*) FROM mapperdsl_jobs")
    plan = dim.plan(effective_time=step_time(1))
    preview = plan.preview(limit=10)
    assert preview.counts() == {"read": 41, "inserted": 1, "updated": 2, "closed": 1,
                                "deleted": 0, "unchanged": 37, "rejected": 1}
    updates = pl.concat([p.updates for p in preview.chunks if p.updates.height])
    renamed = updates.filter(pl.col("id") == 3).row(0, named=True)
    assert (renamed["name (old)"], renamed["name (new)"]) == ("n3", "renamed")
    removed = pl.concat([p.removals for p in preview.chunks if p.removals.height])
    assert removed.rows() == [(7, "n7", "e7", "a")]
    inserts = pl.concat([p.inserts for p in preview.chunks if p.inserts.height])
    assert inserts.rows() == [(41, "new", None, "a")]
    assert "rejects" in str(preview) and "<table>" in preview._repr_html_()
    assert engine.query(engine.target, "SELECT * FROM dim_h ORDER BY id, valid_from") == before
    assert engine.query(engine.target, "SELECT COUNT(*) FROM mapperdsl_jobs") == jobs_before
    # The preview's counts are the run's counts.
    assert md.run(plan, progress=False).counts() == preview.counts()


def test_preview_of_chosen_chunks_before_the_target_exists(engine: Engine) -> None:
    dim = setup(engine)
    preview = dim.plan().preview(chunks=[2], limit=2)
    assert [p.number for p in preview.chunks] == [2]
    assert preview.counts()["inserted"] == 20 and preview.chunks[0].inserts.height == 2
    with pytest.raises(ValueError, match="chunk numbers from 1 to 3"):
        dim.plan().preview(chunks=[4])


def test_preview_reads_a_source_in_the_targets_own_file_as_a_run_does(
        sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run reads such a source with Python's sqlite3, the library that writes the file
    # (execute/read.py); the preview read it with ConnectorX's SQLite, and could differ.
    from mapperdsl.execute import read
    e = sqlite_engine
    e.execute(e.target, CUSTOMER_DDL, rows=[(k, *v) for k, v in BEFORE.items()],
              insert=f"INSERT INTO customer VALUES ({e.placeholders(4)})")
    dim = (md.mapping("dim_same").source(e.target, table="customer").key("id")
           .scd2().target(e.target, table="dim_same"))
    seen: list[str] = []

    def spy(url: object, sql: str, schema: object = None) -> pl.DataFrame:
        seen.append(sql)
        return real(url, sql, schema)  # type: ignore[arg-type]

    real = read._read_sqlite
    monkeypatch.setattr(read, "_read_sqlite", spy)
    preview = dim.plan().preview(limit=5)
    assert preview.counts()["inserted"] == 40
    assert any('FROM "customer"' in sql for sql in seen), seen

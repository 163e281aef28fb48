"""Edge cases, reject limits and the Python checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import mapperdsl as md
from mapperdsl.errors import PlanError

from conftest import Engine
from helpers import CUSTOMER_DDL, load_snapshot


def customers(engine: Engine, rows: dict[int, tuple[Any, ...]]) -> md.Mapping:
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, rows)
    return (md.mapping("dim_edge").source(engine.source, table="customer").key("id")
            .scd2(deletes="close").target(engine.target, table="dim_edge"))


def test_empty_source(engine: Engine) -> None:
    dim = customers(engine, {})
    plan = dim.plan()
    assert len(plan.chunks) == 2 and plan.estimated_rows == 0
    result = md.run(plan, n_jobs=2, progress=False)
    assert result.ok and result.counts() == dict.fromkeys(result.counts(), 0)
    assert engine.query(engine.target, "SELECT COUNT(*) FROM dim_edge") == [(0,)]


def test_one_row_and_a_chunk_larger_than_the_table(engine: Engine) -> None:
    dim = customers(engine, {7: ("a", "b", "c")}).chunks(rows=10**9)
    plan = dim.plan()
    assert [c.range.describe("id") for c in plan.chunks] == ["every non-NULL id", "id IS NULL"]
    assert any("runs in this process" in d for d in plan.decisions)
    assert md.run(plan, n_jobs=4, progress=False).inserted == 1


def test_a_key_declared_not_null_gets_no_null_chunk(engine: Engine) -> None:
    engine.execute(engine.source, "CREATE TABLE pk (id INTEGER PRIMARY KEY, v TEXT)",
                   "CREATE TABLE nn (id INTEGER NOT NULL, v TEXT)",
                   "CREATE TABLE maybe (id INTEGER, v TEXT)",
                   *[f"INSERT INTO {t} VALUES (1, 'a'), (2, 'b')" for t in ("pk", "nn", "maybe")])

    def dim(table: str | None = None, query: str | None = None) -> md.Mapping:
        return (md.mapping(f"nn_{table or 'query'}").source(engine.source, table=table, query=query)
                .key("id").scd1().target(engine.target, table=f"dim_nn_{table or 'query'}"))

    engine.execute(engine.source, "CREATE VIEW pkview AS SELECT * FROM pk")
    for mapping, nulls in [(dim("pk"), False), (dim("nn"), False), (dim("maybe"), True),
                           (dim(query="SELECT * FROM pk"), True), (dim("pkview"), True)]:
        plan = mapping.plan()
        assert [c.range.nulls for c in plan.chunks] == [False] + [True] * nulls, mapping
        assert any("declared NOT NULL" in d for d in plan.decisions) is not nulls
    saved = dim("nn").plan()
    assert md.run(saved, progress=False).inserted == 2
    # The constraint goes and a NULL key comes: the saved plan would never read that row.
    if engine.name == "postgresql":
        engine.execute(engine.source, "ALTER TABLE nn ALTER COLUMN id DROP NOT NULL")
    else:
        engine.execute(engine.source, "ALTER TABLE nn RENAME TO old",
                       "CREATE TABLE nn (id INTEGER, v TEXT)", "INSERT INTO nn SELECT * FROM old")
    engine.execute(engine.source, "INSERT INTO nn VALUES (NULL, 'c')")
    with pytest.raises(md.PlanError, match="source column 'id' may be NULL now; the plan has no "
                                           "chunk for rows whose key is NULL"):
        md.run(saved, progress=False)
    result = dim("nn").run(progress=False)  # a new plan reads it, and rejects it
    assert result.ok and (result.read, result.rejected) == (3, 1)


def test_a_sqlite_date_key_declared_not_null_keeps_its_null_chunk(sqlite_engine: Engine) -> None:
    engine = sqlite_engine  # SQLite keeps any text in a DATE column; date() of it is NULL
    engine.execute(engine.source, "CREATE TABLE days (day DATE NOT NULL PRIMARY KEY, v TEXT)",
                   "INSERT INTO days VALUES ('2026-01-01', 'a'), ('01/02/2026', 'b')")
    dim = (md.mapping("days").source(engine.source, table="days").key("day").scd1()
           .target(engine.target, table="dim_days"))
    assert dim.plan().chunks[-1].range.nulls
    result = dim.run(progress=False)
    assert (result.read, result.inserted, result.rejected) == (2, 1, 1)


def test_sqlite_keys_that_cannot_be_null(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from mapperdsl.dialects import quote
    from mapperdsl.dsl.parts import Source
    from mapperdsl.dsl.url import Url
    from mapperdsl.plan.facts import declared_not_null

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    tables = [  # SQLite lets a primary key hold NULL, except the row id's alias
        ("alias", "(id integer PRIMARY KEY, v TEXT)", True),
        ("declared", "(id TEXT NOT NULL, v TEXT)", True),
        ("textpk", "(id TEXT PRIMARY KEY, v TEXT)", False),
        ("descpk", "(id INTEGER PRIMARY KEY DESC, v TEXT)", False),
        ("twopk", "(id INTEGER, v INTEGER, PRIMARY KEY (id, v))", False),
        ('odd "name"', "(id INTEGER PRIMARY KEY, v TEXT)", True),
    ]
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for table, columns, _ in tables:
            conn.exec_driver_sql(f"CREATE TABLE {quote(table)} {columns}")
        conn.exec_driver_sql("INSERT INTO descpk VALUES (NULL, 'a')")  # as said: not an alias
        assert conn.exec_driver_sql("SELECT id FROM descpk").scalar() is None
    with engine.connect() as conn:
        for table, columns, expected in tables:
            found = declared_not_null(conn, Source(Url.parse(url), table=table), "id")
            assert found is expected, (table, columns)
    engine.dispose()


def test_every_key_null(engine: Engine) -> None:
    dim = customers(engine, {})
    engine.execute(engine.source, *["INSERT INTO customer VALUES (NULL, 'x', 'y', 'z')"] * 5)
    result = dim.run(progress=False)
    assert result.ok and (result.read, result.rejected, result.inserted) == (5, 5, 0)
    assert engine.query(engine.target, "SELECT COUNT(*) FROM mapperdsl_rejects") == [(5,)]


def test_source_column_dropped_or_retyped_between_runs(engine: Engine) -> None:
    engine.execute(engine.source, "CREATE TABLE src (id INTEGER, amount INTEGER, note TEXT)",
                   "INSERT INTO src VALUES (1, 10, 'a'), (2, 20, 'b')")
    dim = (md.mapping("drift").source(engine.source, table="src").key("id").scd1()
           .target(engine.target, table="dim_drift"))
    assert dim.run(progress=False).inserted == 2
    saved = dim.plan()
    before = engine.query(engine.target, "SELECT * FROM dim_drift ORDER BY id")
    engine.execute(engine.source, "ALTER TABLE src RENAME TO old",
                   "CREATE TABLE src (id INTEGER, amount TEXT, note TEXT)",
                   "INSERT INTO src SELECT id, CAST(amount AS TEXT), note FROM old")
    with pytest.raises(md.PlanError, match="source column 'amount' is String now but was"):
        dim.plan()
    with pytest.raises(md.PlanError, match="source column 'amount' is String now, planned as"):
        md.run(saved, progress=False)  # a saved plan checks the databases before writing
    engine.execute(engine.source, "DROP TABLE src",
                   "CREATE TABLE src (id INTEGER, note TEXT)", "INSERT INTO src VALUES (1, 'a')")
    with pytest.raises(md.PlanError, match="source columns \\['amount'\\] were read by the last"):
        dim.plan()
    with pytest.raises(md.PlanError, match="Column 'amount' .* is not in source 'src'"):
        dim.columns(id="id", amount="amount").plan()
    assert engine.query(engine.target, "SELECT * FROM dim_drift ORDER BY id") == before
    jobs = engine.query(engine.target, "SELECT COUNT(*) FROM mapperdsl_jobs")
    assert jobs == [(1,)]  # no job was started by the refused runs
    ok = dim.columns(id="id", note="note").plan(allow_source_changes=True)
    assert ok.read_columns == (("id", ok.read_columns[0][1]), ("note", "String"))


def test_only_a_saved_plan_is_checked_against_the_databases(engine: Engine, monkeypatch,
                                                           tmp_path: Path) -> None:
    """dim.run() and `mapperdsl run MAPPING` plan from the databases as they are: checking
    them again against that plan, milliseconds later, would only cost the run time."""
    from click.testing import CliRunner

    import mapperdsl.job
    from mapperdsl.cli import cli

    engine.execute(engine.source, "CREATE TABLE src (id INTEGER, note TEXT)",
                   "INSERT INTO src VALUES (1, 'a')")
    dim = (md.mapping("fresh").source(engine.source, table="src").key("id").scd1()
           .target(engine.target, table="dim_fresh"))
    checked: list[str] = []
    drift = mapperdsl.job.drift
    monkeypatch.setattr(mapperdsl.job, "drift",
                        lambda source, *a, **k: checked.append(source.table) or drift(source, *a, **k))
    assert dim.run(progress=False).inserted == 1
    assert checked == []
    mappings = tmp_path / "mappings.py"
    mappings.write_text(f"import mapperdsl as md\n"
                        f"dim = md.mapping('fresh').source({engine.source!r}, table='src')"
                        f".key('id').scd1().target({engine.target!r}, table='dim_fresh')\n")
    ran = CliRunner().invoke(cli, ["run", str(mappings), "--quiet"])
    assert ran.exit_code == 0, ran.output
    assert checked == []
    assert md.run(dim.plan(), progress=False).ok
    assert checked == ["src"]


def test_target_altered_by_hand(engine: Engine) -> None:
    dim = customers(engine, {1: ("a", "b", "c"), 2: ("d", "e", "f")})
    dim.run(progress=False)
    saved = dim.plan()
    engine.execute(engine.target, "ALTER TABLE dim_edge DROP COLUMN email")
    with pytest.raises(md.PlanError, match="lacks the columns \\['email'\\]"):
        dim.plan()
    with pytest.raises(md.PlanError, match="has lost the columns \\['email'\\]"):
        md.run(saved, progress=False)


def test_key_index_name_taken_by_another_table(pg_engine: Engine) -> None:
    # A renamed old dimension keeps its index's name: the new target must not go without
    # its own key index (its key lookups would scan it whole), nor be half loaded.
    engine = pg_engine
    dim = customers(engine, {1: ("a", "b", "c")})
    dim.run(progress=False)
    engine.execute(engine.target, "ALTER TABLE dim_edge RENAME TO dim_edge_2025")
    with pytest.raises(md.PlanError, match=r'index "dim_edge_current_key" belongs to table '
                                           r"dim_edge_2025, not to the target dim_edge"):
        dim.run(progress=False)
    assert engine.query(engine.target, "SELECT COUNT(*) FROM mapperdsl_jobs WHERE status = "
                                       "'RUNNING'") == [(0,)]


def test_source_query_failing_on_some_rows_only(engine: Engine) -> None:
    engine.execute(engine.source, "CREATE TABLE docs (id INTEGER, doc TEXT)")
    engine.execute(engine.source, rows=[(i, json.dumps({"a": i})) for i in range(1, 101)],
                   insert=f"INSERT INTO docs VALUES ({engine.placeholders(2)})")
    extract = ("json_extract(doc, '$.a')" if engine.name == "sqlite"
               else "CAST(doc AS json) ->> 'a'")
    dim = (md.mapping("docs").source(engine.source, query=f"SELECT id, {extract} AS a FROM docs")
           .key("id").scd1().chunks(count=4).target(engine.target, table="dim_docs"))
    plan = dim.plan()
    engine.execute(engine.source, "UPDATE docs SET doc = '{oops' WHERE id = 42")
    if engine.name == "sqlite":  # SQLite computes the column while planning: a clear PlanError
        with pytest.raises(md.PlanError, match="(?i)json"):
            dim.plan()
    else:  # PostgreSQL computes only what the statistics need: planning still works
        assert len(dim.plan().chunks) == 5
    result = md.run(plan, n_jobs=2, progress=False)
    assert result.status == "FAILED"
    failed = [c for c in result.chunks if c.status == "FAILED"]
    assert len(failed) == 1 and failed[0].attempts == 1
    assert "json" in (failed[0].error or "").lower()
    assert result.inserted == 75 and result.read == 75  # the failed chunk counts nothing


def test_reject_limit_in_rows(engine: Engine) -> None:
    dim = customers(engine, {i: ("n", "e", "s") for i in range(1, 21)}).rejects(max_rows=2)
    engine.execute(engine.source, *["INSERT INTO customer VALUES (NULL, 'x', 'y', 'z')"] * 3)
    result = dim.run(progress=False)
    assert result.status == "FAILED"
    null_chunk = result.chunks[-1]
    assert null_chunk.status == "FAILED" and "rejects(max_rows=2)" in (null_chunk.error or "")
    assert (result.inserted, result.rejected) == (20, 0)  # nothing past the limit applied
    assert engine.query(engine.target, "SELECT COUNT(*) FROM mapperdsl_rejects") == [(0,)]


def test_reject_limit_as_a_fraction(engine: Engine) -> None:
    engine.execute(engine.source, "CREATE TABLE src (id INTEGER, amount TEXT)")
    engine.execute(engine.source, rows=[(i, "x" if i <= 5 else "1.00") for i in range(1, 41)],
                   insert=f"INSERT INTO src VALUES ({engine.placeholders(2)})")
    engine.execute(engine.target, "CREATE TABLE dim_f (id BIGINT NOT NULL, amount NUMERIC(8,2), "
                                  "row_hash BIGINT NOT NULL)")
    dim = (md.mapping("f").source(engine.source, table="src").key("id").scd1().chunks(count=4)
           .rejects(max_fraction=0.1).target(engine.target, table="dim_f"))
    result = dim.run(progress=False)
    assert result.status == "FAILED"
    assert [c.status for c in result.chunks] == ["FAILED", *["SUCCEEDED"] * 4]
    assert "5 of 40 rows rejected (12.5%)" in (result.chunks[0].error or "")
    assert result.inserted == 30


def test_one_null_key_does_not_break_a_fraction_limit(engine: Engine) -> None:
    dim = customers(engine, {i: ("n", "e", "s") for i in range(1, 201)}).rejects(max_fraction=0.05)
    engine.execute(engine.source, "INSERT INTO customer VALUES (NULL, 'x', 'y', 'z')")
    result = dim.chunks(count=4).run(n_jobs=2, progress=False)
    assert result.ok and (result.inserted, result.rejected) == (200, 1), result.message


SEEN_ORDER: list[bool] = []


def newer_ids(batch: pl.DataFrame, state: Any) -> tuple[pl.DataFrame, Any]:
    """Keep rows whose id is past the largest id seen so far (a PYTHON checkpoint)."""
    ids = batch["id"].drop_nulls()
    SEEN_ORDER.append(ids.is_sorted())
    last = state or 0
    return batch.filter(pl.col("id") > last), max([last, *ids.to_list()])


def test_python_checkpoint_runs_in_key_order_and_keeps_its_state(engine: Engine) -> None:
    SEEN_ORDER.clear()
    dim = (customers(engine, {i: (f"n{i}", "e", "s") for i in range(1, 31)})
           .scd2().incremental(python=newer_ids).chunks(count=3))
    plan = dim.plan()
    assert plan.mode == "python" and plan.sequential
    assert any("python checkpoint" in d and "one after another" in d for d in plan.decisions)
    first = md.run(plan, n_jobs=4, progress=False)
    assert (first.inserted, first.checkpoint) == (30, 30)
    assert SEEN_ORDER and all(SEEN_ORDER)
    engine.execute(engine.source, "UPDATE customer SET name = 'changed' WHERE id = 3")
    load_more = [(i, f"n{i}", "e", "s") for i in range(31, 36)]
    engine.execute(engine.source, rows=load_more,
                   insert=f"INSERT INTO customer VALUES ({engine.placeholders(4)})")
    second = dim.run(n_jobs=4, progress=False)
    assert (second.inserted, second.updated, second.checkpoint) == (5, 0, 35)
    stored = engine.query(engine.target, "SELECT value FROM mapperdsl_checkpoints "
                                         "WHERE mapping = 'dim_edge'")
    assert stored == [('{"python": 35}',)]
    assert md.Plan.from_json(dim.plan().to_json()).python_state == 35


def newest_in_place(batch: pl.DataFrame, state: Any) -> tuple[pl.DataFrame, Any]:
    """A PYTHON checkpoint that changes its state in place, as ordinary Python does."""
    state = state if state is not None else {"last": 0}
    kept = batch.filter(pl.col("id") > state["last"])
    state["last"] = max(state["last"], int(batch["id"].max() or 0))
    return kept, state


def test_a_retried_python_checkpoint_chunk_starts_from_the_state_it_began_with(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # A transient error in chunk 2's write retries the chunk: its first attempt had already
    # moved the state on (in place), so the retry kept none of its rows, and the job
    # SUCCEEDED without them.
    dim = (customers(engine, {i: (f"n{i}", "e", "s") for i in range(1, 41)})
           .scd1().incremental(python=newest_in_place).chunks(count=4))
    monkeypatch.setenv("MAPPERDSL_FAILPOINT", "before_commit:2:transient-1")
    result = dim.run(progress=False)
    assert result.status == "SUCCEEDED" and result.chunks[1].attempts == 2
    assert (result.inserted, result.checkpoint) == (40, {"last": 40})
    assert engine.query(engine.target, "SELECT COUNT(*) FROM dim_edge") == [(40,)]


def rows_only(batch: pl.DataFrame, state: Any) -> pl.DataFrame:
    """A PYTHON checkpoint that forgets to return its state."""
    return batch


def test_a_python_checkpoint_returning_no_state_says_what_it_must_return(engine: Engine) -> None:
    # It failed the chunk with "ValueError: too many values to unpack (expected 2)".
    dim = (customers(engine, {i: (f"n{i}", "e", "s") for i in range(1, 6)})
           .scd1().incremental(python=rows_only))  # type: ignore[arg-type]
    result = dim.run(progress=False)
    assert result.status == "FAILED"
    assert "must return (DataFrame, state), got DataFrame" in (result.message or ""), result


def test_one_engine_per_url_and_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Connections are opened per unit of work; the engine (what it learnt of the dialect)
    # is kept per resolved URL, so a changed ${VAR} gets its own.
    from mapperdsl.connect import connection, engine
    from mapperdsl.dsl.url import Url

    monkeypatch.setenv("EDGE_DIR", str(tmp_path / "a"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    url = Url.parse("sqlite:///${EDGE_DIR}/dw.db")
    first = engine(url)
    with connection(url) as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    assert engine(url) is first and engine(url, readonly=True) is not first
    monkeypatch.setenv("EDGE_DIR", str(tmp_path / "b"))
    assert engine(url) is not first
    with pytest.raises(PlanError, match="does not exist"):
        engine(url, readonly=True)  # checked on every call, not only the first
    assert (tmp_path / "a" / "dw.db").exists()

"""The same plan on a dask ``distributed`` cluster (and Ray): the target a loky run gives,
with resume, stop and retry working as they do with loky."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import joblib
import pytest
from jobscript import EFFECTIVE, mapping
from test_cli import MAPPINGS, cli
from test_faults import AFTER, BEFORE, reference, rows, wait_for_running

import mapperdsl as md

from conftest import Engine
from helpers import CUSTOMER_DDL, load_snapshot

if os.environ.get("CI") == "true":  # the test extra installs it: in CI these tests must run
    import distributed
else:
    distributed = pytest.importorskip("distributed", reason="!!! dask tests SKIPPED: the dask "
                                      "extra is not installed (pip install 'mapperdsl[dask]')")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two worker processes of one thread each, as a small real cluster."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as local, \
            distributed.Client(local, set_as_default=False) as client:
        yield client


@pytest.fixture
def client(cluster: Any) -> Iterator[Any]:
    """The cluster's client as this test's current one; failpoints set on its workers."""
    with cluster.as_current():
        yield cluster
    set_failpoint(cluster, None)


def set_failpoint(client: Any, spec: str | None, marks: Path | None = None) -> None:
    """``MAPPERDSL_FAILPOINT`` (and ``MAPPERDSL_FAILPOINT_MARKS``: ``marks``) in every worker
    process (they read it at each failpoint)."""
    def put(values: dict[str, str | None]) -> None:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    client.run(put, {"MAPPERDSL_FAILPOINT": spec,
                     "MAPPERDSL_FAILPOINT_MARKS": str(marks) if marks else None})


def loaded(engine: Engine, table: str) -> md.Mapping:
    """Source at BEFORE loaded into ``table`` (one loky run), then changed to AFTER."""
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, BEFORE)
    dim = mapping(engine.source, engine.target, name=table, table=table, count=4)
    assert md.run(dim.plan(effective_time=EFFECTIVE - timedelta(days=1)), progress=False).ok
    load_snapshot(engine, AFTER)
    return dim


def test_a_dask_run_gives_the_target_a_loky_run_gives(engine: Engine, client: Any) -> None:
    dim = mapping(engine.source, engine.target, name="dim_dask", table="dim_dask", count=4)
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, BEFORE)
    first = md.run(dim.plan(effective_time=EFFECTIVE - timedelta(days=1)), progress=False,
                   backend="dask")
    assert first.ok and first.inserted == len(BEFORE)
    load_snapshot(engine, AFTER)
    with joblib.parallel_config(backend="dask"), \
            distributed.get_task_stream(client) as tasks:  # the same, set the joblib way
        second = md.run(dim.plan(effective_time=EFFECTIVE), progress=False)
    assert len(tasks.data) >= 1  # (joblib may batch the five chunks into fewer tasks)
    expected_rows, expected_counts = reference(engine)  # the same two steps with loky
    assert second.ok and second.counts() == expected_counts
    assert rows(engine, "dim_dask") == expected_rows
    assert [c.status for c in second.chunks] == ["SUCCEEDED"] * 5


def test_transient_errors_retry_on_a_dask_worker(engine: Engine, client: Any) -> None:
    dim = loaded(engine, "dim_kill").retries(attempts=3, base_delay=0.01)
    set_failpoint(client, "read:2:transient-2")
    result = md.run(dim.plan(effective_time=EFFECTIVE), progress=False, backend="dask")
    assert result.ok, result.message
    assert result.chunks[1].attempts == 3 and "connection reset (injected)" in (
        result.chunks[1].retries or "")
    assert rows(engine, "dim_kill") == reference(engine)[0]


def test_a_failed_dask_run_resumes_to_the_same_target(engine: Engine, client: Any) -> None:
    dim = loaded(engine, "dim_kill")
    set_failpoint(client, "before_commit:3:raise")
    failed = md.run(dim.plan(effective_time=EFFECTIVE), progress=False, backend="dask")
    assert failed.status == "FAILED" and "InjectedFault" in (failed.message or "")
    assert [c.number for c in failed.chunks if c.status == "FAILED"] == [3]
    again = dim.resume(progress=False, backend="dask")  # the one chunk left runs on a worker,
    assert again.status == "FAILED" and "InjectedFault" in (again.message or "")  # not here
    set_failpoint(client, None)
    resumed = dim.resume(progress=False, backend="dask")
    assert resumed.status == "SUCCEEDED" and resumed.job_id == failed.job_id
    assert rows(engine, "dim_kill") == reference(engine)[0]


def test_stop_reaches_the_chunks_on_a_dask_cluster(engine: Engine, client: Any) -> None:
    dim = loaded(engine, "dim_kill")
    marks = engine.folder / "marks"
    marks.mkdir()
    set_failpoint(client, ",".join(f"read:{n}:hold" for n in range(1, 6)), marks)
    done: list[md.JobResult] = []

    def run() -> None:
        with client.as_current():  # (the current client is per thread)
            done.append(md.run(dim.plan(effective_time=EFFECTIVE), progress=False,
                               backend="dask"))

    runner = threading.Thread(target=run)
    runner.start()
    job_id, _ = wait_for_running(engine)
    for _ in range(1000):  # the two workers each hold a chunk
        if len(held := list(marks.iterdir())) == 2:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"the workers did not both start a chunk: {list(marks.iterdir())}")
    md.request_stop(job_id, engine.target)
    for mark in held:
        mark.unlink()
    runner.join(timeout=120)
    stopped = done[0]
    assert stopped.status == "STOPPED", stopped.message
    statuses = [c.status for c in stopped.chunks]
    assert sorted(statuses) == ["CANCELLED"] * 3 + ["SUCCEEDED"] * 2, statuses
    set_failpoint(client, None)
    assert dim.resume(progress=False, backend="dask").status == "SUCCEEDED"
    assert rows(engine, "dim_kill") == reference(engine)[0]


def test_a_saved_plan_runs_on_a_dask_scheduler(sqlite_engine: Engine, cluster: Any) -> None:
    # `mapperdsl plan --json` here, `mapperdsl run --plan --scheduler` as on another machine.
    engine, folder = sqlite_engine, sqlite_engine.folder
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, {i: (f"n{i}", f"e{i}", "a") for i in range(1, 41)})
    (folder / "mappings.py").write_text(MAPPINGS)
    planned = cli("plan", "mappings.py:dim", "--json", "plan.json", folder=folder)
    assert planned.returncode == 0, planned.stderr
    assert "${CLI_DIR}" in Path(folder / "plan.json").read_text()  # the URL travels unresolved
    set_failpoint(cluster, "read:1:transient-1")  # only the workers fail once: a retry there
    try:
        ran = cli("run", "--plan", "plan.json", "--scheduler", cluster.scheduler.address,
                  "--quiet", "--json", folder=folder)
    finally:
        set_failpoint(cluster, None)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["counts"]["inserted"] == 40
    assert engine.query(engine.target, "SELECT attempts FROM mapperdsl_chunks WHERE chunk = 1") \
        == [(2,)]  # chunk 1 ran on the cluster
    local = cli("run", "mappings.py:other", "--quiet", folder=folder)
    assert local.returncode == 0, local.stderr
    columns = "id, name, email, is_current, row_hash"
    assert engine.query(engine.target, f"SELECT {columns} FROM dim_cli ORDER BY id") == \
        engine.query(engine.target, f"SELECT {columns} FROM dim_other ORDER BY id")


def test_backend_mistakes_are_clear(sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from mapperdsl.execute import runner

    monkeypatch.setattr(runner, "SCHEDULER_SECONDS", 1)
    dim = mapping(sqlite_engine.source, sqlite_engine.target, name="d", table="d", count=2)
    sqlite_engine.execute(sqlite_engine.source, CUSTOMER_DDL)
    plan = dim.plan()
    with pytest.raises(md.PlanError, match="runs on a dask.distributed Client"):
        md.run(plan, backend="dask", progress=False)
    with pytest.raises(md.PlanError, match="unknown joblib backend 'daks'; allowed: .*dask"):
        md.run(plan, backend="daks", progress=False)
    with pytest.raises(md.PlanError, match="for backend='dask', not backend='threading'"):
        md.run(plan, backend="threading", scheduler="tcp://127.0.0.1:1", progress=False)
    started = time.monotonic()
    with pytest.raises(md.PlanError, match="cannot reach the dask scheduler at tcp://127.0.0.1:9"):
        md.run(plan, scheduler="tcp://127.0.0.1:9", progress=False)
    assert time.monotonic() - started < 30
    for address in ("tcp://127.0.0.1:notaport", "127.0.0.1:8786:9", "nosuch://host:1", ""):
        with pytest.raises(md.PlanError, match=f"scheduler '{re.escape(address)}' is not a "
                                               "dask scheduler address .*tcp://host:8786"):
            md.run(plan, scheduler=address, progress=False)
    with pytest.raises(md.PlanError, match="cannot reach the dask scheduler at "
                                           "tcp://no-such-host.invalid:8786"):
        md.run(plan, scheduler="tcp://no-such-host.invalid:8786", progress=False)
    assert sqlite_engine.query(sqlite_engine.target, "SELECT name FROM sqlite_master "
                                                     "WHERE name = 'mapperdsl_jobs'") == []


def test_a_ray_run_gives_the_target_a_loky_run_gives(sqlite_engine: Engine) -> None:
    ray = pytest.importorskip("ray", reason="!!! Ray test SKIPPED: the ray extra is not "
                                            "installed (pip install 'mapperdsl[ray]')")
    engine = sqlite_engine
    # Only Ray's workers have the failpoint: a chunk 1 that needed two attempts ran there.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"MAPPERDSL_FAILPOINT": "read:1:transient-1"}})
    try:
        dim = mapping(engine.source, engine.target, name="dim_ray", table="dim_ray", count=4)
        engine.execute(engine.source, CUSTOMER_DDL)
        load_snapshot(engine, BEFORE)
        assert md.run(dim.plan(effective_time=EFFECTIVE - timedelta(days=1)), progress=False,
                      backend="ray").ok  # n_jobs: all of Ray's CPUs
        load_snapshot(engine, AFTER)
        second = md.run(dim.plan(effective_time=EFFECTIVE), progress=False, backend="ray")
    finally:
        ray.shutdown()
    expected_rows, expected_counts = reference(engine)
    assert second.chunks[0].attempts == 2, second.chunks[0]
    assert second.ok and second.counts() == expected_counts
    assert rows(engine, "dim_ray") == expected_rows

"""Property: any sequence of source states, chunking, n_jobs and kill/resume points gives the
history of the pure-Python reference model, with exactly one current version per key."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mapperdsl as md

from conftest import Engine
from helpers import CUSTOMER_DDL, Snapshot, current_versions, load_snapshot, read_scd2, scd2_model, step_time

VALUES = st.sampled_from([None, "", "a", "A", "a ", "a|b", "b", "é"])
ROW = st.tuples(VALUES, VALUES, VALUES)
SNAPSHOT = st.dictionaries(st.integers(min_value=1, max_value=40), ROW, max_size=25)
KILL = st.one_of(st.none(), st.tuples(st.sampled_from(["read", "before_commit", "after_commit"]),
                                      st.integers(min_value=1, max_value=7)))
STEP = st.tuples(SNAPSHOT, st.integers(min_value=1, max_value=6), st.sampled_from([1, 2]), KILL)
EXAMPLES = int(os.environ.get("MAPPERDSL_PROPERTY_EXAMPLES", "100"))
_gone = subprocess.Popen([sys.executable, "-c", "pass"])
_gone.wait()
DEAD_PID = _gone.pid  # a process that has ended


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=4))
def test_any_history_matches_the_model(steps: list[tuple[Snapshot, int, int, object]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        engine = Engine("sqlite", f"sqlite:///{path / 'src.db'}", f"sqlite:///{path / 'dw.db'}",
                        path)
        engine.execute(engine.source, CUSTOMER_DDL)
        base = (md.mapping("prop").source(engine.source, table="customer").key("id")
                .columns(id="id", name="name", email="email", segment="segment")
                .scd2(deletes="close").target(engine.target, table="dim_customer"))
        for step, (snapshot, count, n_jobs, kill) in enumerate(steps):
            load_snapshot(engine, snapshot)
            dim = base.chunks(count=count)
            plan = dim.plan(effective_time=step_time(step))
            if kill is not None:  # the process "dies" at that point, then the job is resumed
                point, chunk = kill  # type: ignore[misc]
                monkeypatch.setenv("MAPPERDSL_FAILPOINT", f"{point}:{chunk}:exit")
                try:
                    result = md.run(plan, n_jobs=1, progress=False)
                except SystemExit:  # as if this process were gone: its lease names a dead pid
                    monkeypatch.delenv("MAPPERDSL_FAILPOINT")
                    engine.execute(engine.target, f"UPDATE mapperdsl_leases SET pid = {DEAD_PID}")
                    result = dim.resume(n_jobs=n_jobs, progress=False)
                monkeypatch.delenv("MAPPERDSL_FAILPOINT", raising=False)
            else:
                result = md.run(plan, n_jobs=n_jobs, progress=False)
            assert result.ok, result
            assert result.read == len(snapshot)
        snapshots = [s for s, _, _, _ in steps]
        assert read_scd2(engine) == scd2_model(snapshots)
        assert set(current_versions(engine).values()) <= {1}
        assert len(current_versions(engine)) == len(snapshots[-1])
        again = base.run(progress=False)
        assert (again.inserted, again.updated, again.closed) == (0, 0, 0)

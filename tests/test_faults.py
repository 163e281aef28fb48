"""Production faults: a killed run resumes to the same target, stop, Ctrl-C, retries, the lease."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from jobscript import EFFECTIVE, mapping

import mapperdsl as md
from mapperdsl.execute import faults

from conftest import Engine, _driver, _pg_database, pg_server_url
from helpers import CUSTOMER_DDL, load_snapshot

JOB = Path(__file__).resolve().parent / "jobscript.py"
BEFORE = {i: (f"n{i}", f"e{i}@x.org", ["a", "b"][i % 2]) for i in range(1, 201)}
AFTER = {**{k: v for k, v in BEFORE.items() if k % 17},
         **{k: (v[0] + "!", v[1], v[2]) for k, v in BEFORE.items() if k % 5 == 0 and k % 17},
         **{i: ("new", None, "c") for i in range(201, 221)}}
COLUMNS = "id, name, email, segment, valid_from, valid_to, is_current, row_hash"


_started: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_child_left() -> Iterator[None]:
    """A child a failing test left running (held at a failpoint, say) is killed with its
    process group when it has one of its own (``session``), workers and all."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.communicate()


def marks_folder(engine: Engine) -> Path:
    """A new folder for the child's failpoints to leave their marks in (``child(marks=...)``)."""
    marks = engine.folder / "marks"
    marks.mkdir()
    return marks


def child(engine: Engine, action: str, *args: str, failpoint: str | None = None,
          wait: bool = True, session: bool = False,
          marks: Path | None = None) -> subprocess.Popen[str] | dict[str, object]:
    """``jobscript.py ACTION`` in a child process; ``session``: in a process group of its own
    (with its workers), as a terminal would start it; ``marks``: where its failpoints
    leave a file as each is reached."""
    env = {**os.environ, "PYTHONPATH": str(JOB.parent)}
    env.pop("MAPPERDSL_FAILPOINT", None)
    if failpoint:
        env["MAPPERDSL_FAILPOINT"] = failpoint
    if marks:
        env["MAPPERDSL_FAILPOINT_MARKS"] = str(marks)
    proc = subprocess.Popen([sys.executable, str(JOB), action, engine.source, engine.target,
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=session)
    _started.append(proc)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=180)
    return {"returncode": proc.returncode, "stderr": err,
            **(json.loads(out.strip().splitlines()[-1]) if out.strip() else {})}


def rows(engine: Engine, table: str) -> list[tuple[object, ...]]:
    return engine.query(engine.target, f"SELECT {COLUMNS} FROM {table} ORDER BY id, valid_from")


def ledger(engine: Engine, job_id: str) -> list[tuple[int, str]]:
    return engine.query(engine.target, f"SELECT chunk, status FROM mapperdsl_chunks WHERE "
                                       f"job_id = '{job_id}' ORDER BY chunk")


def wait_for_running(engine: Engine) -> tuple[str, str]:
    """The (job id, host) of the child's job once it runs."""
    for _ in range(400):
        got = engine.query(engine.target, "SELECT job_id, host FROM mapperdsl_jobs WHERE status = "
                                          "'RUNNING'")
        if got:
            return got[0]
        time.sleep(0.05)
    raise AssertionError("the child's job never started")


def wait_for_mark(path: Path) -> None:
    """Until a failpoint of the child has left ``path`` (see ``child(marks=...)``)."""
    for _ in range(1000):
        if path.exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"the child never reached {path.name}")


def release(mark: Path) -> None:
    """Let a chunk held by a ``hold`` failpoint go on (once it is there: ``wait_for_mark``)."""
    wait_for_mark(mark)
    mark.unlink()


def wait_for_stop_request(engine: Engine, job_id: str) -> None:
    """Until the job row of ``job_id`` says a stop was asked for."""
    for _ in range(1000):
        if engine.query(engine.target, f"SELECT stop_requested FROM mapperdsl_jobs WHERE job_id "
                                       f"= '{job_id}'")[0][0]:
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id}: no stop request was recorded")


def wait_for_first_chunk(engine: Engine) -> str:
    """The child's job id once its first chunk is applied."""
    job_id, _ = wait_for_running(engine)
    for _ in range(400):
        if engine.query(engine.target, f"SELECT COUNT(*) FROM mapperdsl_chunks WHERE job_id = "
                                       f"'{job_id}'")[0][0]:
            return job_id
        time.sleep(0.02)
    raise AssertionError("the child's first chunk never finished")


def prepare_two_steps(engine: Engine, table: str) -> md.Mapping:
    """Source at BEFORE, loaded once into ``table``; source then changed to AFTER."""
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, BEFORE)
    dim = mapping(engine.source, engine.target, name=table, table=table, count=4)
    md.run(dim.plan(effective_time=EFFECTIVE - timedelta(days=1)), progress=False)
    load_snapshot(engine, AFTER)
    return dim


def reference(engine: Engine) -> tuple[list[tuple[object, ...]], dict[str, int]]:
    dim = mapping(engine.source, engine.target, name="dim_ref", table="dim_ref", count=4)
    load_snapshot(engine, BEFORE)
    md.run(dim.plan(effective_time=EFFECTIVE - timedelta(days=1)), progress=False)
    load_snapshot(engine, AFTER)
    result = md.run(dim.plan(effective_time=EFFECTIVE), progress=False)
    return rows(engine, "dim_ref"), result.counts()


@pytest.mark.parametrize("failpoint, jobs", [
    ("read:2", "1"), ("before_commit:2", "1"), ("after_commit:2", "1"),
    ("before_commit:5", "1"), ("before_commit:3", "2"),
])
def test_killed_run_resumes_to_the_same_target(engine: Engine, failpoint: str, jobs: str) -> None:
    prepare_two_steps(engine, "dim_kill")
    killed = child(engine, "run", "--jobs", jobs, failpoint=failpoint)
    if jobs == "1":
        assert killed["returncode"] == -signal.SIGKILL, killed
    else:  # a worker died; the coordinator ends the job FAILED, resumable
        assert killed["status"] == "FAILED", killed
        error = engine.query(engine.target, "SELECT c.error FROM mapperdsl_chunks c JOIN "
                             "mapperdsl_jobs j ON j.job_id = c.job_id WHERE c.chunk = 3 AND "
                             "j.status = 'FAILED'")  # (not "not started": killed in its write)
        assert error[0][0].startswith("not applied: the run broke off"), error
    status = engine.query(engine.target, "SELECT status FROM mapperdsl_jobs ORDER BY started_at")
    assert status[-1][0] in ("RUNNING", "FAILED")
    with pytest.raises((md.UnfinishedJobError, md.LeaseHeldError)):
        mapping(engine.source, engine.target, name="dim_kill", table="dim_kill",
                count=4).run(progress=False)
    resumed = child(engine, "resume", "--jobs", jobs)
    assert resumed["status"] == "SUCCEEDED", resumed
    expected_rows, expected_counts = reference(engine)
    assert rows(engine, "dim_kill") == expected_rows
    assert resumed["counts"] == expected_counts
    assert engine.query(engine.target, "SELECT COUNT(*) FROM dim_kill WHERE is_current") == \
        [(len(AFTER),)]


def test_stop_from_another_process_then_resume(engine: Engine) -> None:
    dim = prepare_two_steps(engine, "dim_kill")
    marks = marks_folder(engine)
    proc = child(engine, "run", failpoint="read:2:hold", wait=False, marks=marks)
    assert isinstance(proc, subprocess.Popen)
    job_id = wait_for_running(engine)[0]
    wait_for_mark(marks / "read-2")  # chunk 2 checked for a stop before; it is held now
    md.request_stop(job_id, engine.target)
    release(marks / "read-2")
    out, err = proc.communicate(timeout=120)
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["status"] == "STOPPED", (stopped, err)
    assert ledger(engine, job_id) == [(1, "SUCCEEDED"), (2, "SUCCEEDED"), (3, "CANCELLED"),
                                      (4, "CANCELLED"), (5, "CANCELLED")]  # chunk 2 finished
    with pytest.raises(md.CheckpointError, match="is not running"):
        md.request_stop(job_id, engine.target)
    finished = dim.resume(progress=False)
    assert finished.status == "SUCCEEDED" and finished.job_id == job_id
    assert rows(engine, "dim_kill") == reference(engine)[0]


def ctrl_c(engine: Engine, *args: str, sleeping: list[int], presses: int = 1,
           group: bool = False) -> tuple[str, dict[str, object], str]:
    """Run the job in a child whose ``sleeping`` chunks wait once read; once they all do,
    press Ctrl-C ``presses`` times (to the child's process group: ``group``, as a terminal
    does). One press: the chunks are held until the job row says a stop was asked for, then
    let go, so they finish after the press however slow the machine; two presses: they sleep
    long past the second. The job id, the child's result and its stderr."""
    marks = marks_folder(engine)
    proc = child(engine, "run", *args, wait=False, session=group, marks=marks,
                 failpoint=",".join(f"read:{n}:{'sleep-60' if presses > 1 else 'hold'}"
                                    for n in sleeping))
    assert isinstance(proc, subprocess.Popen)
    job_id = wait_for_running(engine)[0]
    for n in sleeping:
        wait_for_mark(marks / f"read-{n}")
    for press in range(presses):
        if press:  # the second press once the first is seen to (the job row asks to stop)
            wait_for_stop_request(engine, job_id)
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
    if presses == 1:
        wait_for_stop_request(engine, job_id)
        for n in sleeping:
            release(marks / f"read-{n}")
    out, err = proc.communicate(timeout=30)  # long before a 60 s sleep ends
    return job_id, json.loads(out.strip().splitlines()[-1]), err


def test_ctrl_c_stops_the_job_between_chunks(sqlite_engine: Engine) -> None:
    engine = sqlite_engine
    dim = prepare_two_steps(engine, "dim_kill")
    job_id, stopped, err = ctrl_c(engine, sleeping=[2])
    assert stopped["status"] == "STOPPED" and "Ctrl-C" in str(stopped["message"]), (stopped, err)
    assert "press Ctrl-C again to stop at once" in err
    assert ledger(engine, job_id) == [(1, "SUCCEEDED"), (2, "SUCCEEDED"), (3, "CANCELLED"),
                                      (4, "CANCELLED"), (5, "CANCELLED")]  # chunk 2 finished
    assert dim.resume(progress=False).status == "SUCCEEDED"
    assert rows(engine, "dim_kill") == reference(engine)[0]


def test_ctrl_c_twice_stops_at_once(sqlite_engine: Engine) -> None:
    engine = sqlite_engine
    dim = prepare_two_steps(engine, "dim_kill")
    job_id, stopped, err = ctrl_c(engine, sleeping=[2], presses=2)
    assert stopped["status"] == "STOPPED" and "stopped at once" in str(stopped["message"]), \
        (stopped, err)
    assert ledger(engine, job_id)[:2] == [(1, "SUCCEEDED"), (2, "CANCELLED")]
    assert dim.resume(progress=False).status == "SUCCEEDED"
    assert rows(engine, "dim_kill") == reference(engine)[0]


def test_ctrl_c_in_a_terminal_leaves_the_workers_to_the_coordinator(engine: Engine) -> None:
    # A terminal sends Ctrl-C to the whole process group: the workers running chunks 2 and 3
    # must finish them, not die of it, and the chunks not started cancel themselves.
    dim = prepare_two_steps(engine, "dim_kill")
    job_id, stopped, err = ctrl_c(engine, "--jobs", "2", sleeping=[2, 3], group=True)
    assert stopped["status"] == "STOPPED", (stopped, err)
    assert stopped["message"] == "interrupted (Ctrl-C): the running chunks finished", err
    assert ledger(engine, job_id) == [(1, "SUCCEEDED"), (2, "SUCCEEDED"), (3, "SUCCEEDED"),
                                      (4, "CANCELLED"), (5, "CANCELLED")]
    assert dim.resume(progress=False).status == "SUCCEEDED"
    assert rows(engine, "dim_kill") == reference(engine)[0]


def test_ctrl_c_in_a_terminal_spares_an_idle_worker(sqlite_engine: Engine) -> None:
    # Three workers, five chunks: chunks 2 and 3 are held while the first worker, done with 1,
    # 4 and 5, waits for work. Ctrl-C to the group must not stop it (a worker gone breaks the
    # pool, which kills the chunks running in the others).
    engine = sqlite_engine
    prepare_two_steps(engine, "dim_kill")
    marks = marks_folder(engine)
    proc = child(engine, "run", "--jobs", "3", wait=False, session=True, marks=marks,
                 failpoint="read:2:hold,read:3:hold")
    assert isinstance(proc, subprocess.Popen)
    job_id = wait_for_running(engine)[0]
    for _ in range(1000):
        if {n for n, _ in ledger(engine, job_id)} >= {1, 4, 5}:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"chunks 1, 4 and 5 did not finish: {ledger(engine, job_id)}")
    os.killpg(proc.pid, signal.SIGINT)
    wait_for_stop_request(engine, job_id)  # the press was taken; chunks 2 and 3 go on
    release(marks / "read-2")
    release(marks / "read-3")
    out, err = proc.communicate(timeout=60)
    finished = json.loads(out.strip().splitlines()[-1])
    assert finished["status"] == "SUCCEEDED", (finished, err)  # nothing was left to cancel
    assert ledger(engine, job_id) == [(n, "SUCCEEDED") for n in range(1, 6)]
    assert rows(engine, "dim_kill") == reference(engine)[0]


def test_a_second_run_is_refused_while_one_holds_the_lease(engine: Engine) -> None:
    dim = prepare_two_steps(engine, "dim_kill")
    marks = marks_folder(engine)
    proc = child(engine, "run", failpoint="read:1:hold", wait=False, marks=marks)
    assert isinstance(proc, subprocess.Popen)
    running = [wait_for_running(engine)]
    with pytest.raises(md.LeaseHeldError) as info:
        dim.run(progress=False)
    message = str(info.value)
    assert running[0][0] in message and running[0][1] in message and "started 20" in message
    release(marks / "read-1")
    out, _ = proc.communicate(timeout=120)
    assert json.loads(out.strip().splitlines()[-1])["status"] == "SUCCEEDED"
    assert dim.run(progress=False).status == "SUCCEEDED"  # free again afterwards


def test_transient_errors_are_retried_and_recorded(engine: Engine,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    dim = prepare_two_steps(engine, "dim_retry").retries(attempts=3, base_delay=0.01)
    monkeypatch.setenv("MAPPERDSL_FAILPOINT", "read:2:transient-2")
    result = md.run(dim.plan(), n_jobs=1, progress=False)
    assert result.status == "SUCCEEDED"
    chunk = result.chunks[1]
    assert chunk.attempts == 3 and chunk.retries and chunk.retries.count("retried after") == 2
    ledger = engine.query(engine.target, "SELECT attempts, retries FROM mapperdsl_chunks "
                                         f"WHERE job_id = '{result.job_id}' AND chunk = 2")
    assert ledger[0][0] == 3 and "connection reset (injected)" in ledger[0][1]


def test_retries_give_up_and_other_errors_fail_at_once(engine: Engine,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    dim = prepare_two_steps(engine, "dim_retry").retries(attempts=2, base_delay=0.01)
    monkeypatch.setenv("MAPPERDSL_FAILPOINT", "read:2:transient,read:3:raise")
    result = md.run(dim.plan(), n_jobs=1, progress=False)
    assert result.status == "FAILED"
    by_number = {c.number: c for c in result.chunks}
    assert (by_number[2].status, by_number[2].attempts) == ("FAILED", 2)
    assert (by_number[3].status, by_number[3].attempts) == ("FAILED", 1)
    assert by_number[1].status == by_number[4].status == "SUCCEEDED"  # the others went on
    assert "InjectedFault" in (by_number[3].error or "")
    assert result.read == by_number[1].read + by_number[4].read + by_number[5].read
    monkeypatch.delenv("MAPPERDSL_FAILPOINT")
    assert dim.resume(progress=False).status == "SUCCEEDED"


def test_fail_fast_cancels_the_rest(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    dim = prepare_two_steps(engine, "dim_ff").fail_fast()
    monkeypatch.setenv("MAPPERDSL_FAILPOINT", "read:1:raise")
    result = md.run(dim.plan(), n_jobs=1, progress=False)
    assert result.status == "FAILED"
    assert [c.status for c in result.chunks] == ["FAILED"] + ["CANCELLED"] * 4


def test_unfinished_job_must_be_resumed_or_abandoned(engine: Engine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    dim = prepare_two_steps(engine, "dim_ab")
    monkeypatch.setenv("MAPPERDSL_FAILPOINT", "read:3:raise")
    failed = md.run(dim.plan(), n_jobs=1, progress=False)
    monkeypatch.delenv("MAPPERDSL_FAILPOINT")
    with pytest.raises(md.UnfinishedJobError) as info:
        dim.run(progress=False)
    assert failed.job_id in str(info.value) and "dim.resume()" in str(info.value)
    assert "dim.abandon()" in str(info.value)
    assert dim.abandon() == failed.job_id
    status = engine.query(engine.target, f"SELECT status FROM mapperdsl_jobs WHERE job_id = "
                                         f"'{failed.job_id}'")
    assert status == [("ABANDONED",)]
    assert dim.run(progress=False).status == "SUCCEEDED"


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[tuple[Engine, str]]:
    """A PostgreSQL server of this test's own, and its folder: the test restarts it, and the
    tests on the shared server (in other pytest workers) must keep their connections."""
    pg_server_url()  # skips, or fails in CI, as every PostgreSQL test does
    script = JOB.parent.parent / "scripts" / "pg.sh"
    started = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True,
                             check=True, timeout=120)
    env = dict(line.removeprefix("export ").split("=", 1)
               for line in started.stdout.splitlines() if line.startswith("export "))
    try:
        for url in _pg_database(env["MAPPERDSL_TEST_PG_URL"]):
            yield Engine("postgresql", url, url, tmp_path), env["MAPPERDSL_PG_DIR"]
    finally:
        subprocess.run(["bash", str(script), "stop", env["MAPPERDSL_PG_DIR"]], timeout=120)


def restart_postgresql(folder: str, mode: str = "fast") -> None:
    """Restart the server; ``mode`` "immediate" is a crash (no shutdown checkpoint, sessions
    cut, what is in the WAL buffers lost)."""
    pg_ctl = [os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin") + "/pg_ctl", "-D",
              f"{folder}/data", "-l", f"{folder}/server.log", "-m", mode, "-w", "restart"]
    if os.geteuid() == 0:
        pg_ctl = ["runuser", "-u", "postgres", "--", *pg_ctl]
    # The new server must not inherit our pipes, or waiting for pg_ctl never ends.
    subprocess.run(pg_ctl, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=60)


def test_postgresql_restarted_during_a_run(own_pg: tuple[Engine, str]) -> None:
    engine, folder = own_pg
    prepare_two_steps(engine, "dim_kill")
    # Each chunk holds its write transaction open for a while: the restart cuts one off.
    slow = ",".join(f"before_commit:{n}:sleep-0.7" for n in range(1, 6))
    proc = child(engine, "run", "--attempts", "8", failpoint=slow, wait=False)
    assert isinstance(proc, subprocess.Popen)
    database = engine.target.rsplit("/", 1)[1]
    for _ in range(400):  # wait until a chunk holds its write transaction open
        open_txn = engine.query(engine.target, "SELECT COUNT(*) FROM pg_stat_activity WHERE "
                                               f"datname = '{database}' AND state = "
                                               "'idle in transaction' AND query LIKE "
                                               "'INSERT INTO mapperdsl_chunks%%'")
        if open_txn[0][0]:
            break
        time.sleep(0.02)
    restart_postgresql(folder)
    out, err = proc.communicate(timeout=180)
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    outcome = json.loads(last).get("status")
    if outcome != "SUCCEEDED":  # it may end FAILED (or die) instead: then resume completes it
        resumed = child(engine, "resume")
        assert resumed["status"] == "SUCCEEDED", (outcome, err[-2000:], resumed)
    assert rows(engine, "dim_kill") == reference(engine)[0]
    retried = engine.query(engine.target, "SELECT COUNT(*) FROM mapperdsl_chunks c JOIN "
                                          "mapperdsl_jobs j ON j.job_id = c.job_id WHERE "
                                          "j.mapping = 'dim_kill' AND c.attempts > 1")
    assert retried[0][0] >= 1 or outcome != "SUCCEEDED", err[-2000:]


def test_a_read_whose_server_process_dies_is_retried(own_pg: tuple[Engine, str]) -> None:
    # ConnectorX says only "connection closed" when its connection ends with no word from
    # the server: here its backend is killed (SIGKILL; the server then restarts every
    # session), as a crash or a dropped network would. The chunk is tried again, not failed.
    # The reads wait on an advisory lock in the source query, which planning passed and the
    # test holds once the plan is made.
    import threading

    import joblib
    import psycopg

    e, _ = own_pg
    e.execute(e.source, "CREATE TABLE src (id int, note text)",
              "INSERT INTO src VALUES (1, 'a'), (2, 'b')",
              "CREATE FUNCTION gate() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN "
              "PERFORM pg_advisory_lock_shared(4242); PERFORM pg_advisory_unlock_shared(4242); "
              "RETURN true; END $$")
    dim = (md.mapping("cut").source(e.source, query="SELECT id, note FROM src WHERE gate()")
           .key("id").scd1().retries(attempts=6, base_delay=1).chunks(count=2)
           .target(e.target, table="dim_cut"))
    assert dim.run(progress=False).inserted == 2
    e.execute(e.source, "UPDATE src SET note = 'c' WHERE id = 1")
    plain = e.source.replace("postgresql+psycopg", "postgresql")
    killed: list[int] = []
    holder = psycopg.connect(plain, autocommit=True)
    plan = dim.plan()
    holder.execute("SELECT pg_advisory_lock(4242)")

    def kill_a_waiting_read() -> None:
        with psycopg.connect(plain, autocommit=True) as watcher:
            for _ in range(1000):
                pids = [r[0] for r in watcher.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event = 'advisory' "
                    "AND datname = current_database()")]
                if pids:
                    os.kill(pids[0], signal.SIGKILL)  # (the lock goes with the holder's
                    killed.append(pids[0])            # session, which the server ends)
                    return
                time.sleep(0.01)

    thread = threading.Thread(target=kill_a_waiting_read)
    thread.start()
    try:  # chunks in threads: with n_jobs=1 a read that fails ahead is done again in turn,
        with joblib.parallel_config(backend="threading"):  # which hides the retry
            result = md.run(plan, n_jobs=2, progress=False)
    finally:
        thread.join(timeout=30)
        with contextlib.suppress(psycopg.Error):
            holder.close()
    assert killed, "no read waited on the lock"
    assert result.ok and result.updated == 1, result
    assert max(c.attempts for c in result.chunks) > 1, result.chunks
    assert "connection closed" in "".join(str(c.retries) for c in result.chunks), result.chunks


def test_a_server_crash_after_a_chunk_commits_loses_nothing(own_pg: tuple[Engine, str]) -> None:
    # The server crashes (an immediate shutdown) while chunk 2, committed, waits to report:
    # the job ends, now or when resumed, with the target a run without a crash leaves.
    engine, folder = own_pg
    prepare_two_steps(engine, "dim_kill")
    marks = marks_folder(engine)
    proc = child(engine, "run", "--attempts", "8", failpoint="after_commit:2:hold", wait=False,
                 marks=marks)
    assert isinstance(proc, subprocess.Popen)
    wait_for_mark(marks / "after_commit-2")
    restart_postgresql(folder, "immediate")
    (marks / "after_commit-2").unlink()
    out, err = proc.communicate(timeout=180)
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    if json.loads(last).get("status") != "SUCCEEDED":
        resumed = child(engine, "resume")
        assert resumed["status"] == "SUCCEEDED", (last, err[-2000:], resumed)
    assert rows(engine, "dim_kill") == reference(engine)[0]


def test_a_retry_after_a_lost_commit_answer_applies_nothing_twice(
        engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    dim = prepare_two_steps(engine, "dim_kill").retries(attempts=3, base_delay=0.01)
    expected_rows, expected_counts = reference(engine)  # leaves the source as prepared
    monkeypatch.setenv("MAPPERDSL_FAILPOINT", "after_commit:2:transient-1")
    result = md.run(dim.plan(effective_time=EFFECTIVE), n_jobs=1, progress=False)
    assert "chunk 2: attempt 1 of 3 failed" in caplog.text  # it was retried
    assert result.ok and result.counts() == expected_counts
    assert rows(engine, "dim_kill") == expected_rows


def test_a_lease_without_heartbeat_is_taken_over_and_logged(
        sqlite_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    engine = sqlite_engine
    dim = prepare_two_steps(engine, "dim_kill").lease(seconds=2)
    engine.execute(engine.target, "INSERT INTO mapperdsl_leases (lease, job_id, owner, host, pid, "
                                  "started_at, heartbeat_at) VALUES ('dim_kill -> dim_kill', "
                                  "'deadbeef0000', 'x', 'another-host', 1, '2026-01-01 00:00:00', "
                                  "'2026-01-01 00:00:00')")
    result = dim.run(progress=False)
    assert result.ok
    assert "took over the lease of job deadbeef0000 (host another-host" in caplog.text
    assert engine.query(engine.target, "SELECT COUNT(*) FROM mapperdsl_leases") == [(0,)]


def test_a_running_job_cannot_be_resumed_or_abandoned(engine: Engine) -> None:
    dim = prepare_two_steps(engine, "dim_kill")
    marks = marks_folder(engine)
    proc = child(engine, "run", failpoint="read:1:hold", wait=False, marks=marks)
    assert isinstance(proc, subprocess.Popen)
    job_id, _ = wait_for_running(engine)
    with pytest.raises(md.LeaseHeldError, match=job_id):
        dim.resume(progress=False)
    with pytest.raises(md.CheckpointError, match="is running on host"):
        md.abandon(job_id, engine.target)
    release(marks / "read-1")
    out, _ = proc.communicate(timeout=120)
    assert json.loads(out.strip().splitlines()[-1])["status"] == "SUCCEEDED"


@pytest.mark.parametrize("fail_fast", [False, True], ids=["", "fail-fast"])
def test_a_run_that_lost_its_lease_writes_nothing_more(engine: Engine, fail_fast: bool) -> None:
    # With fail-fast, the chunk fenced off fails: the run must not ask the job, now the new
    # owner's, to stop.
    prepare_two_steps(engine, "dim_kill")
    marks = marks_folder(engine)
    proc = child(engine, "run", *(["--fail-fast"] if fail_fast else []), failpoint="read:2:hold",
                 wait=False, marks=marks)
    assert isinstance(proc, subprocess.Popen)
    job_id = wait_for_first_chunk(engine)
    wait_for_mark(marks / "read-2")  # chunk 2 is held after its read
    # Another coordinator takes the job over (as after a presumed death) while chunk 2 reads.
    engine.execute(engine.target, "UPDATE mapperdsl_leases SET owner = 'someone-else'")
    release(marks / "read-2")
    out, err = proc.communicate(timeout=120)
    ended = json.loads(out.strip().splitlines()[-1])
    assert ended["status"] == "FAILED" and "lost the mapping's lease" in ended["message"], err
    ledger = dict(engine.query(engine.target, f"SELECT chunk, status FROM mapperdsl_chunks "
                                              f"WHERE job_id = '{job_id}'"))
    assert ledger == {1: "SUCCEEDED"}  # nothing more was written: not chunk 2, no CANCELLED
    status = engine.query(engine.target, f"SELECT status, stop_requested FROM mapperdsl_jobs "
                                         f"WHERE job_id = '{job_id}'")
    assert [(s, bool(stop)) for s, stop in status] == [("RUNNING", False)]  # the job row is
    # the new owner's, untouched


def test_two_first_runs_at_once_one_proceeds(engine: Engine) -> None:
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, BEFORE)
    marks = marks_folder(engine)
    procs = [child(engine, "run", failpoint="read:1:hold", wait=False, marks=marks)
             for _ in range(2)]
    wait_for_mark(marks / "read-1")  # one holds the lease and its first chunk: the other
    for _ in range(3000):  # has to give up meanwhile
        if any(isinstance(p, subprocess.Popen) and p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    else:
        raise AssertionError("neither run ended while the other held its first chunk")
    release(marks / "read-1")
    outcomes = []
    for proc in procs:
        assert isinstance(proc, subprocess.Popen)
        out, err = proc.communicate(timeout=120)
        outcomes.append(json.loads(out.strip().splitlines()[-1])["status"] if out.strip()
                        else "LeaseHeldError" if "LeaseHeldError" in err else err[-500:])
    assert sorted(outcomes) == ["LeaseHeldError", "SUCCEEDED"], outcomes


def vacuum_skipped(engine: Engine, table: str) -> bool:
    """Whether ``VACUUM (SKIP_LOCKED)`` of ``table`` skips it, as autovacuum does a table it
    cannot lock at once."""
    eng = sa.create_engine(_driver(engine.target))
    notices: list[str] = []
    with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        driver = conn.connection.driver_connection
        driver.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.exec_driver_sql(f"VACUUM (SKIP_LOCKED) {table}")
    eng.dispose()
    return any(f'skipping vacuum of "{table}"' in n for n in notices)


def held_first_load(engine: Engine) -> tuple[subprocess.Popen[str], Path]:
    """A child's first load of BEFORE, held before its second chunk (the first committed),
    with autovacuum held off its target; and the folder of its marks."""
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, BEFORE)
    marks = marks_folder(engine)
    proc = child(engine, "run", failpoint="read:2:hold", wait=False, marks=marks)
    assert isinstance(proc, subprocess.Popen)
    wait_for_mark(marks / "read-2")
    assert engine.query(engine.target, "SELECT COUNT(*) FROM dim_kill")[0][0] > 0
    assert vacuum_skipped(engine, "dim_kill")
    return proc, marks


def succeeded(proc: subprocess.Popen[str]) -> str:
    """The child's log, once it has ended with its job SUCCEEDED."""
    out, err = proc.communicate(timeout=120)
    assert json.loads(out.strip().splitlines()[-1])["status"] == "SUCCEEDED", err[-2000:]
    return err


@pytest.mark.parametrize("hold", ["kept", "lost", "frozen"])
def test_a_first_load_keeps_autovacuum_off_until_its_index_is_built(pg_engine: Engine,
                                                                    hold: str) -> None:
    # Autovacuum on the new rows took a core from the load, and CREATE INDEX waited a second
    # for it to give way. A hold lost (its session ended) leaves the index to be built anyway.
    engine = pg_engine
    proc, marks = held_first_load(engine)
    if hold == "lost":
        holders = engine.query(engine.target, "SELECT pg_terminate_backend(pid, 10000) FROM "
                                              "pg_locks "
                                              "WHERE relation = 'dim_kill'::regclass AND mode = "
                                              "'ShareUpdateExclusiveLock' AND granted")
        assert holders == [(True,)]
        assert not vacuum_skipped(engine, "dim_kill")
    if hold == "frozen":  # a coordinator stopped (then replaced): its hold ends with its lease
        os.kill(proc.pid, signal.SIGSTOP)
        for _ in range(200):  # the job's lease: 5 s
            if not vacuum_skipped(engine, "dim_kill"):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("a frozen coordinator still holds its target")
        proc.kill()
        proc.communicate()
        return
    release(marks / "read-2")
    err = succeeded(proc)
    assert "closing the job" not in err  # built on another connection, not retried
    if hold == "kept":  # the index built in the hold's transaction
        assert "on another connection" not in err and "lets autovacuum in" not in err
    assert engine.query(engine.target, "SELECT COUNT(*) FROM dim_kill")[0][0] == len(BEFORE)
    assert engine.query(engine.target, "SELECT indexname FROM pg_indexes WHERE tablename = "
                                       "'dim_kill'") == [("dim_kill_current_key",)]
    assert not vacuum_skipped(engine, "dim_kill")  # let go at the end


def test_a_first_load_goes_on_when_its_target_is_locked_against_the_hold(
        pg_engine: Engine) -> None:
    # A VACUUM of the user's on the empty target: the load does not wait for it to end.
    engine = pg_engine
    engine.execute(engine.source, CUSTOMER_DDL)
    assert child(engine, "run")["status"] == "SUCCEEDED"  # creates the target, loads nothing
    load_snapshot(engine, BEFORE)
    eng = sa.create_engine(_driver(engine.target))
    with eng.connect() as conn:
        conn.exec_driver_sql("LOCK TABLE dim_kill IN SHARE UPDATE EXCLUSIVE MODE")
        proc = child(engine, "run", wait=False)
        wait_for_first_chunk(engine)  # a load waiting for the lock would apply nothing
        conn.rollback()
    eng.dispose()
    assert isinstance(proc, subprocess.Popen)
    assert "goes on without holding autovacuum off" in succeeded(proc)
    assert engine.query(engine.target, "SELECT COUNT(*) FROM dim_kill")[0][0] == len(BEFORE)


def test_a_first_load_gives_its_hold_up_to_a_session_waiting_for_the_target(
        pg_engine: Engine) -> None:
    # A lock of the user's that waited for the hold would have the next chunk's write wait
    # behind it, and the hold wait for that chunk: the run would hang.
    engine = pg_engine
    proc, marks = held_first_load(engine)
    eng = sa.create_engine(_driver(engine.target))
    with eng.connect() as conn:  # granted once the hold gives way, not after the load
        conn.exec_driver_sql("SET lock_timeout = '20s'")
        conn.exec_driver_sql("LOCK TABLE dim_kill IN SHARE MODE")
        release(marks / "read-2")
        time.sleep(0.5)  # the next chunk waits for this lock meanwhile
        conn.rollback()
    eng.dispose()
    assert "lets autovacuum in: a session waits for a lock on it" in succeeded(proc)
    assert engine.query(engine.target, "SELECT COUNT(*) FROM dim_kill")[0][0] == len(BEFORE)
    assert engine.query(engine.target, "SELECT indexname FROM pg_indexes WHERE tablename = "
                                       "'dim_kill'") == [("dim_kill_current_key",)]


def test_a_hold_never_let_go_fails_its_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "HOLD_SECONDS", 0.2)
    monkeypatch.setenv("MAPPERDSL_FAILPOINT", "read:1:hold")
    monkeypatch.setenv("MAPPERDSL_FAILPOINT_MARKS", str(tmp_path))
    with pytest.raises(faults.InjectedFault, match="held 0.2 s and never let go"):
        faults.failpoint("read", 1, "job-1")
    assert (tmp_path / "read-1").exists()

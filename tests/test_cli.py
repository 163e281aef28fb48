"""The real ``mapperdsl`` console script, run in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from conftest import Engine
from helpers import CUSTOMER_DDL, load_snapshot

SCRIPT = Path(sys.executable).parent / "mapperdsl"
MAPPINGS = '''
import polars as pl
import mapperdsl as md

base = (md.mapping("dim_cli").source("sqlite:///${CLI_DIR}/src.db", table="customer").key("id")
        .columns(id="id", name=pl.col("name").str.to_uppercase(), email="email")
        .scd2(deletes="close").chunks(count=2))
dim = base.target("sqlite:///${CLI_DIR}/dw.db", table="dim_cli")
other = base.target("sqlite:///${CLI_DIR}/dw.db", table="dim_other")
'''


def cli(*args: str, folder: Path, failpoint: str | None = None, wait: bool = True,
        marks: Path | None = None) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    command = [str(SCRIPT) if SCRIPT.exists() else shutil.which("mapperdsl") or "mapperdsl",
               *args]
    env = {**os.environ, "CLI_DIR": str(folder)}
    env.pop("MAPPERDSL_FAILPOINT", None)
    if failpoint:
        env["MAPPERDSL_FAILPOINT"] = failpoint
    if marks:
        env["MAPPERDSL_FAILPOINT_MARKS"] = str(marks)
    if not wait:
        return subprocess.Popen(command, env=env, cwd=folder, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, env=env, cwd=folder, text=True, capture_output=True,
                          timeout=180)


@pytest.fixture
def project(sqlite_engine: Engine) -> tuple[Engine, Path]:
    engine = sqlite_engine
    engine.execute(engine.source, CUSTOMER_DDL)
    load_snapshot(engine, {i: (f"n{i}", f"e{i}", "a") for i in range(1, 21)})
    (engine.folder / "mappings.py").write_text(MAPPINGS)
    return engine, engine.folder


def test_plan_run_and_saved_plan(project: tuple[Engine, Path]) -> None:
    engine, folder = project
    several = cli("plan", "mappings.py", folder=folder)
    assert several.returncode == 2
    assert "holds 2 mappings" in several.stderr and "mappings.py:dim" in several.stderr
    planned = cli("plan", "mappings.py:dim", "--json", "plan.json", folder=folder)
    assert planned.returncode == 0, planned.stderr
    assert "Plan dim_cli: scd2, full, 3 chunks, ~20 rows" in planned.stdout
    assert json.loads((folder / "plan.json").read_text())["mapping"]["name"] == "dim_cli"
    ran = cli("run", "--plan", "plan.json", "--quiet", "--json", folder=folder)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["counts"]["inserted"] == 20
    again = cli("run", "mappings.py:dim", "--jobs", "2", "--backend", "threading", "--quiet",
                folder=folder)
    assert again.returncode == 0 and "unchanged 20" in again.stdout
    assert engine.query(engine.target, "SELECT COUNT(*) FROM dim_cli WHERE name = 'N1'") == [(1,)]


def test_read_commands_print_json(project: tuple[Engine, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    engine, folder = project
    engine.execute(engine.source, "INSERT INTO customer VALUES (NULL, 'x', 'y', 'z')")
    assert cli("run", "mappings.py:dim", "--quiet", folder=folder).returncode == 0
    target = engine.target
    jobs = json.loads(cli("history", "--target", target, "--json", folder=folder).stdout)
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] and jobs[0]["rejected"] == 1
    job_id = jobs[0]["job_id"]
    chunks = json.loads(cli("status", job_id, "--target", target, "--json", folder=folder).stdout)
    assert [c["chunk"] for c in chunks] == [1, 2, 3]
    bad = json.loads(cli("rejects", job_id, "--target", target, "--json", folder=folder).stdout)
    assert [b["reason"] for b in bad] == ["business key is NULL"]
    shown = cli("preview", "mappings.py:dim", "--json", folder=folder)
    assert json.loads(shown.stdout)["counts"]["unchanged"] == 20
    # Without --json, a table a terminal shows whole: the columns a person reads first.
    text = cli("history", "--target", target, folder=folder).stdout.splitlines()
    assert [c.strip() for c in text[0].split("|")[1:7]] == [
        "job_id", "mapping", "status", "started_at", "seconds", "chunks"]
    assert "host" not in text[0] and f"| {job_id} | dim_cli " in text[2] and "| 3/3 " in text[2]
    assert "business key is NULL" in cli("rejects", job_id, "--target", target,
                                          folder=folder).stdout
    from mapperdsl.cli import _frame_out  # a | or a line break in a cell keeps the table whole
    _frame_out(pl.DataFrame({"chunk": [1], "error": ["a | b\nc"]}), as_json=False)
    assert capsys.readouterr().out.splitlines()[2] == "| 1     | a \\| b / c |"
    listed = cli("status", job_id, "--target", target, folder=folder).stdout
    assert "| key_range " in listed and "| id IS NULL " in listed and "retries" not in listed


def test_wrong_mapping_exits_2_and_runs_nothing(project: tuple[Engine, Path]) -> None:
    engine, folder = project
    (folder / "broken.py").write_text(MAPPINGS.replace('email="email"', 'email="emial"'))
    done = cli("run", "broken.py:dim", folder=folder)
    assert done.returncode == 2
    assert "Column 'emial'" in done.stderr and "Columns: id, name, email, segment" in done.stderr
    assert not (folder / "dw.db").exists()
    assert cli("run", "nothere.py", folder=folder).returncode == 2
    assert cli("run", folder=folder).returncode == 2


def test_failed_stopped_refused_exit_codes(project: tuple[Engine, Path]) -> None:
    engine, folder = project
    failed = cli("run", "mappings.py:dim", "--quiet", folder=folder, failpoint="read:2:raise")
    assert failed.returncode == 1 and "FAILED" in failed.stdout
    refused = cli("run", "mappings.py:dim", folder=folder)
    assert refused.returncode == 4 and "resume it" in refused.stderr.lower()
    assert cli("resume", "mappings.py:dim", "--quiet", folder=folder).returncode == 0

    marks = folder / "marks"
    marks.mkdir()
    running = cli("run", "mappings.py:other", "--quiet", folder=folder,
                  failpoint="read:1:hold", wait=False, marks=marks)
    assert isinstance(running, subprocess.Popen)
    for _ in range(1000):  # chunk 1 is read and held open until its mark is deleted
        if (marks / "read-1").exists():
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the job never reached chunk 1's read")
    rows = engine.query(engine.target, "SELECT job_id FROM mapperdsl_jobs WHERE status = "
                                       "'RUNNING'")
    held = cli("run", "mappings.py:other", folder=folder)
    assert held.returncode == 4 and "already running as job" in held.stderr
    jobs = json.loads(cli("history", "--target", engine.target, "--json", folder=folder).stdout)
    running_job = next(j for j in jobs if j["status"] == "RUNNING")
    assert running_job["seconds"] > 0  # how long it has run so far
    assert cli("stop", rows[0][0], "--target", engine.target, folder=folder).returncode == 0
    (marks / "read-1").unlink()
    out, _ = running.communicate(timeout=120)
    assert running.returncode == 3, out
    finished = cli("resume", rows[0][0], "--target", engine.target, "--quiet", folder=folder)
    assert finished.returncode == 0, finished.stderr


PYTHON_CHECKPOINT = '''
import polars as pl
import mapperdsl as md
from settings import SOURCE  # a module beside the mapping file


def keep(batch, state):
    return batch.filter(pl.col("id") > (state or 0)), int(batch["id"].max() or state or 0)


dim = (md.mapping("dim_py").source(SOURCE, table="customer").key("id").scd1()
       .incremental(python=keep).target("sqlite:///${CLI_DIR}/dw.db", table="dim_py"))
'''


def test_a_saved_plan_finds_the_python_checkpoint_of_its_mapping_file(
        project: tuple[Engine, Path], tmp_path: Path) -> None:
    # The mapping file imports a module beside it (as `python file.py` would let it); its
    # checkpoint function is named in the saved plan by the file, so the plan runs from
    # anywhere (it named a module `mapperdsl_mappings` no import could find).
    engine, folder = project
    (folder / "settings.py").write_text(f"SOURCE = {engine.source!r}\n")
    (folder / "pymap.py").write_text(PYTHON_CHECKPOINT)
    planned = cli("plan", "pymap.py", "--json", "plan.json", folder=folder)
    assert planned.returncode == 0, planned.stderr
    saved = json.loads((folder / "plan.json").read_text())["mapping"]["checkpoint"]["python"]
    assert saved == f"{(folder / 'pymap.py').resolve()}:keep"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = cli("run", "--plan", str(folder / "plan.json"), "--quiet", folder=elsewhere)
    assert done.returncode == 0, done.stderr
    assert "inserted 20" in done.stdout and "checkpoint 20" in done.stdout
    # A function of a module beside it is named by that module: found from its folder (the
    # command puts its working folder on sys.path, as `python -m` does).
    (folder / "checks.py").write_text(PYTHON_CHECKPOINT.split("dim = ")[0].replace(
        "from settings import SOURCE  # a module beside the mapping file\n", ""))
    (folder / "beside.py").write_text(PYTHON_CHECKPOINT.replace(
        "def keep(", "from checks import keep\n\n\ndef unused(").replace('"dim_py"', '"dim_py2"'))
    assert cli("plan", "beside.py", "--json", "beside.json", folder=folder).returncode == 0
    assert "checks:keep" in (folder / "beside.json").read_text()
    done = cli("run", "--plan", "beside.json", "--quiet", folder=folder)
    assert done.returncode == 0, done.stderr


def test_job_ids_the_job_log_does_not_hold_are_a_wrong_command_line(
        project: tuple[Engine, Path]) -> None:
    engine, folder = project
    assert cli("run", "mappings.py:dim", "--quiet", folder=folder).returncode == 0
    for command in (["status", "nosuch"], ["rejects", "nosuch"], ["stop", "nosuch"],
                    ["abandon", "nosuch"], ["resume", "nosuch"]):
        done = cli(*command, "--target", engine.target, folder=folder)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "there is no job 'nosuch' in the job log of" in done.stderr
    without = cli("resume", "3f2a9c1b7d4e", folder=folder)  # a job id, but no --target
    assert without.returncode == 2 and "a job by its id needs --target URL" in without.stderr
    limit = cli("history", "--target", engine.target, "--limit", "0", folder=folder)
    assert limit.returncode == 2 and "`limit` must be a whole number >= 1, got 0" in limit.stderr
    template = cli("plan", "mappings.py:base", folder=folder)
    assert template.returncode == 2 and "is a template, not a whole mapping: `target(...)` " \
        "is not declared" in template.stderr
    assert cli("run", "mappings.py:dim", "--jobs", "0", folder=folder).returncode == 2


def test_abandon_gives_up_the_latest_unfinished_job(project: tuple[Engine, Path]) -> None:
    engine, folder = project
    failed = cli("run", "mappings.py:dim", "--quiet", folder=folder, failpoint="read:2:raise")
    assert failed.returncode == 1
    job_id = engine.query(engine.target, "SELECT job_id FROM mapperdsl_jobs")[0][0]
    assert cli("run", "mappings.py:dim", folder=folder).returncode == 4  # must be resumed first
    done = cli("abandon", "mappings.py:dim", folder=folder)
    assert done.returncode == 0 and f"job {job_id} abandoned" in done.stdout
    assert engine.query(engine.target, "SELECT status FROM mapperdsl_jobs") == [("ABANDONED",)]
    assert cli("run", "mappings.py:dim", "--quiet", folder=folder).returncode == 0

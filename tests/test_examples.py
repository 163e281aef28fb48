"""Every example script runs and asserts what it shows; the notebook runs in a real kernel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from sqlalchemy.engine import make_url

from conftest import Engine, pg_server_url

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def script(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quickstart_runs_and_prints_plan_and_results(tmp_path: Path) -> None:
    out = script("quickstart.py", str(tmp_path))
    assert "Plan dim_customer: scd2, full, 4 chunks, ~1,000 rows" in out
    assert "chunk 4/4  id >= 751" in out and "id is declared NOT NULL, so no chunk for" in out
    assert "SUCCEEDED" in out and "inserted 1,000" in out
    assert ("read 1,000: inserted 5, updated 30, unchanged 965, rejected 0; gone from the source: "
            "closed 5, deleted 0") in out
    assert "chunk 2/4 (251 <= id < 506) SUCCEEDED read 250: unchanged 250; gone from the source: " \
           "closed 5" in out  # the second run's own plan: ids 501 to 505 are gone
    assert "dim_customer holds 1035 versions, 1000 of them current" in out


def test_incremental_example(tmp_path: Path) -> None:
    out = script("scd2_incremental.py", str(tmp_path))
    assert "incremental on updated_at: after '2026-03-01 08:59:00'" in out
    assert "read 10: updated 10" in out and "third run" in out


def test_postgresql_example() -> None:
    out = script("postgresql.py", env={"MAPPERDSL_PG_URL": pg_server_url()})
    assert "inserted 20,000" in out and "example_dim_customer" in out


def test_notebook_runs_in_a_kernel_and_shows_tables() -> None:
    notebook = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    html, widgets = {}, set()
    for number, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", output
            if "text/html" in output.get("data", {}):
                html[number] = output["data"]["text/html"]
            if "application/vnd.jupyter.widget-view+json" in output.get("data", {}):
                widgets.add(number)
    assert "<b>Mapping dim_customer</b>" in html[1] and "&rarr;" in html[1]
    assert "chunk 1/3" in html[2] and "SQL of each chunk" in html[2]
    assert "<h4>chunk 1/3" in html[3] and "inserts" in html[3]
    assert "SUCCEEDED" in html[4] and "rows/s" in html[4]
    assert "segment (old)" in html[5] and "segment (new)" in html[5] and "removals" in html[5]
    assert "updated" in html[6]
    assert widgets == {6}  # the run with the default progress draws a widget, the others none
    assert "<table" in html[7] and "job_id" in html[7]


def test_the_benchmark_runs_end_to_end_on_a_small_table(tmp_path: Path) -> None:
    # Not a timing: the benchmark's own count checks must pass (in each of two repeats),
    # and it writes its JSON with the median and both runs.
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--rows", "2000",
                           "--db", "sqlite", "--jobs", "1", "--mode", "full", "--repeat", "2",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    rows = report["databases"]["sqlite"]["rows"]
    assert report["databases"]["sqlite"]["checkpoint_before_each_step"] is False  # (PostgreSQL's)
    assert [r["what"] for r in rows][-1] == "mapperdsl full n_jobs=1"
    assert rows[-1]["B"]["counts"]["updated"] == 20 and "| mapperdsl full n_jobs=1 |" in done.stdout
    assert len(rows[-1]["A"]["runs"]) == 2
    assert rows[-1]["A"]["cpu_seconds"]["client"] > 0 and "server" not in rows[-1]["A"]["cpu_seconds"]
    assert round(rows[-1]["A"]["seconds"], 3) == min(rows[-1]["A"]["runs"])  # (of two, the lower)
    assert "the median of 2 runs" in done.stdout


def test_the_benchmark_starts_a_stock_postgresql_of_its_own(tmp_path: Path) -> None:
    # Without a server given, the benchmark measures on a throwaway PostgreSQL 15 with the
    # settings it ships with (fsync on: the tests' server runs without), says so in its
    # JSON, and removes it at the end.
    pg_server_url()  # skips, or fails in CI, as every PostgreSQL test does
    out = tmp_path / "bench.json"
    servers = Path(tempfile.mkdtemp(prefix="mapperdsl-bench-test-"))  # where its server goes
    servers.chmod(0o755)  # (the server runs as the postgres user when the tests run as root)
    env = {k: v for k, v in os.environ.items() if k != "MAPPERDSL_BENCH_PG_URL"}
    env["TMPDIR"] = str(servers)
    try:
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--rows",
                               "2000", "--db", "postgresql", "--jobs", "1", "--mode", "full",
                               "--json", str(out)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        report = json.loads(out.read_text())["databases"]["postgresql"]
        assert report["server"]["fsync"] == "on"
        assert report["server"]["server_version"].startswith("15")
        assert report["checkpoint_before_each_step"] is True  # each step starts written out
        assert report["rows"][-1]["A"]["counts"]["inserted"] == 2000
        cpu = report["rows"][-1]["A"]["cpu_seconds"]  # its server runs here: its CPU counted
        assert cpu["client"] > 0 and cpu["server"] > 0
        assert not list(servers.iterdir())  # its server was stopped and its files removed
    finally:  # a benchmark killed or failed leaves no server running
        for left in servers.glob("mapperdsl-pg.*"):
            subprocess.run(["bash", str(ROOT / "scripts" / "pg.sh"), "stop", str(left)],
                           timeout=120)
        shutil.rmtree(servers, ignore_errors=True)


def test_the_stage_by_stage_benchmark_runs(pg_server: str) -> None:
    # Not a timing: benchmarks/stages.py, which docs/performance.md quotes, still reaches
    # the chunk's stages by their names (it broke once when they were renamed).
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stages.py"), "--rows", "1000",
                           "--repeat", "1", "--pg-url", pg_server],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "one chunk of 1,000 rows, the median of 1" in done.stdout
    for stage in ("| read (ConnectorX, to Polars) |", "| prepare: key checks, typing, column map, row hash |",
                  "| encode the binary COPY |", "| COPY: send, the server parses and writes |",
                  "| a worker's imports (n_jobs >= 2; in that process) |"):
        assert stage in done.stdout


def test_the_benchmark_goes_on_without_checkpoints_its_user_may_not_take(
        pg_engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    # A user who is neither a superuser nor in pg_checkpoint: CHECKPOINT is refused, the
    # benchmark says why and what would allow it, and goes on without (its JSON says so).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    role = "bench_no_checkpoint"
    pg_engine.execute(pg_engine.source, f"DROP ROLE IF EXISTS {role}", f"CREATE ROLE {role} LOGIN")
    try:
        url = make_url(pg_engine.source).set(username=role).render_as_string(hide_password=False)
        db = bench.Database("postgresql", url, url)
        db.settle()
        assert db.checkpoints is False
        assert "pg_checkpoint" in capsys.readouterr().err
        db.settle()  # not asked again
        assert capsys.readouterr().err == ""
    finally:
        pg_engine.execute(pg_engine.source, f"DROP ROLE {role}")


def test_the_benchmark_runs_a_python_column_map_in_workers(tmp_path: Path) -> None:
    # --column-map python: name and email through Python functions, in loky workers
    # (the functions travel with the plan), counts checked by the benchmark itself.
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--rows", "2000",
                           "--db", "sqlite", "--jobs", "2", "--mode", "full", "--chunk-rows", "500",
                           "--column-map", "python", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = json.loads(out.read_text())["databases"]["sqlite"]["rows"][-1]
    assert row["what"] == "mapperdsl full n_jobs=2 chunks of 500 rows (Python column map)"
    assert row["A"]["chunks"] >= 4 and row["B"]["counts"]["updated"] == 20
    assert row["A"]["mapped"] == ["name", "email"]  # the rest copied as they are

"""Every example script runs and asserts what it shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs_and_prints_plan_and_results(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Plan dim_customer: scd2, full, 5 chunks, ~1,000 rows" in out
    assert "chunk 5/5  id IS NULL" in out
    assert "SUCCEEDED" in out and "inserted 1,000" in out
    assert "inserted 5, updated 30, closed 5" in out
    assert "dim_customer holds 1035 versions, 1000 of them current" in out

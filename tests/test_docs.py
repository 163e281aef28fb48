"""The documentation site builds without a warning (links, API reference from docstrings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "Compile the dry run" in page and "request_stop" in page


def test_the_readmes_mapping_runs_as_written(tmp_path: Path) -> None:
    # The README's tour, top to bottom, on a shop.db of the columns it names: its saved
    # plan once ran after a newer run, which is refused (a plan older than the last job).
    import sqlite3

    text = (ROOT / "README.md").read_text()
    block = text.split("## A mapping", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    with sqlite3.connect(tmp_path / "shop.db") as con:
        con.execute("CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT, email TEXT, "
                    "segment TEXT, updated_at TIMESTAMP)")
        con.executemany("INSERT INTO customer VALUES (?, ?, ?, ?, ?)",
                        [(i, f" n{i} ", f"E{i}@X.ORG", "a", f"2026-01-01 00:00:{i:02d}")
                         for i in range(1, 31)])
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Plan dim_customer" in done.stdout

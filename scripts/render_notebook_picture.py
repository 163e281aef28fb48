"""Render the notebook's plan and preview to docs/img/notebook-plan-preview.png.

Runs examples/notebook.ipynb in a real kernel, puts the HTML the plan and the
preview cells displayed on one page, and photographs it with headless Chromium
(Debian's `chromium` package). A docs asset, made by hand: not part of the tests.

    python3 scripts/render_notebook_picture.py
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
STYLE = """<style>
body { font-family: system-ui, sans-serif; font-size: 13px; margin: 16px; color: #222; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; } h3 { margin: 18px 0 4px; color: #555; }
</style>"""


def main() -> None:
    notebook = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    parts = []
    shown = (("plan", code[2]),
             ("dim.plan().preview(chunks=[1, 3], limit=3), after a day of changes", code[5]))
    for title, cell in shown:
        html = next(o["data"]["text/html"] for o in cell.outputs
                    if "text/html" in o.get("data", {}))
        parts.append(f"<h3>In [{title}]</h3>{html}")
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "page.html"
        page.write_text(f"<html><head>{STYLE}</head><body>{''.join(parts)}</body></html>")
        out = ROOT / "docs" / "img" / "notebook-plan-preview.png"
        out.parent.mkdir(exist_ok=True)
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--no-first-run", f"--user-data-dir={folder}/profile",
                        f"--screenshot={out}", "--window-size=1100,760", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

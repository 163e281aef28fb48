"""The dbt peer of ``run.py --peers``: one ``dbt snapshot`` of the customer table, timed in process.

    DBT_PYTHON benchmarks/peer_dbt.py SPEC

Run by ``run.py`` with an interpreter that has ``dbt-postgres`` (``--dbt-python``; dbt's own
dependencies conflict with the benchmark's, so it usually lives in a virtualenv of its own),
on the project ``run.py`` wrote to ``SPEC["dbt_dir"]``: a YAML snapshot of ``customer`` with
the ``check`` strategy on all columns and ``hard_deletes: invalidate`` (dbt's SCD2 with
deletes closed, as mapperdsl's ``.scd2(deletes="close")``). The time is the snapshot alone,
dbt's imports excluded and its project parsing included (every ``dbt snapshot`` parses it).
The counts come from the versions of the last snapshot, as for the dlt peer. Prints
``SPEC["marker"]`` and the result as JSON, as ``run.py``'s children do.
"""

from __future__ import annotations

import json
import sys
import time

import psycopg2  # dbt-postgres's driver
from dbt.cli.main import dbtRunner


def main() -> int:
    spec = json.loads(sys.argv[1])
    project = spec["dbt_dir"]
    started = time.perf_counter()
    result = dbtRunner().invoke(["snapshot", "--project-dir", project, "--profiles-dir", project,
                                 "--quiet"])
    seconds = time.perf_counter() - started
    if not result.success:
        print(f"dbt snapshot failed: {result.exception}", file=sys.stderr)
        return 1
    snapshot = spec["dbt_table"]  # the profile's schema and the snapshot's name
    latest = f"(SELECT MAX(dbt_valid_from) FROM {snapshot})"
    with psycopg2.connect(spec["dw"]) as pg, pg.cursor() as cur:
        cur.execute(f"SELECT id FROM {snapshot} WHERE dbt_valid_from = {latest}")
        new = {row[0] for row in cur.fetchall()}
        cur.execute(f"SELECT id FROM {snapshot} WHERE dbt_valid_to = {latest}")
        gone = {row[0] for row in cur.fetchall()}
    counts = {"inserted": len(new - gone), "updated": len(new & gone), "closed": len(gone - new)}
    print(spec["marker"] + json.dumps({"seconds": seconds, "counts": counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A job run in a child process by the fault tests: python tests/jobscript.py ACTION SRC TGT.

ACTION is run or resume; options: --jobs N, --count N, --name NAME, --table TABLE,
--attempts N, --fail-fast. Prints the JobResult as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone

import mapperdsl as md

EFFECTIVE = datetime(2026, 5, 1, tzinfo=timezone.utc)


def mapping(source: str, target: str, *, name: str, table: str, count: int,
            attempts: int = 3) -> md.Mapping:
    return (md.mapping(name).source(source, table="customer").key("id")
            .columns(id="id", name="name", email="email", segment="segment")
            .scd2(deletes="close").chunks(count=count).retries(attempts=attempts, base_delay=0.2)
            .lease(seconds=5).target(target, table=table))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["run", "resume"])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--name", default="dim_kill")
    parser.add_argument("--table", default="dim_kill")
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument("--fail-fast", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    dim = mapping(args.source, args.target, name=args.name, table=args.table, count=args.count,
                  attempts=args.attempts)
    if args.fail_fast:
        dim = dim.fail_fast()
    if args.action == "run":
        result = md.run(dim.plan(effective_time=EFFECTIVE), n_jobs=args.jobs, progress=False)
    else:
        result = dim.resume(n_jobs=args.jobs, progress=False)
    print(json.dumps({"job_id": result.job_id, "status": result.status,
                      "counts": result.counts(), "message": result.message}))


if __name__ == "__main__":
    main()

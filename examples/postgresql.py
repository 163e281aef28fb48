"""A PostgreSQL source into a PostgreSQL dimension, in parallel, with a saved plan.

    MAPPERDSL_PG_URL='postgresql://user:${PGPASSWORD}@localhost/db' python examples/postgresql.py

(in single quotes, so that the shell leaves ``${PGPASSWORD}`` for mapperdsl)

The URL may name environment variables (``${PGPASSWORD}``): they are expanded when
the run starts and never written into the saved plan or the job log.
"""

from __future__ import annotations

import os
import sys

import polars as pl
import sqlalchemy as sa

import mapperdsl as md
from mapperdsl.dsl.url import Url


def main(url: str) -> md.JobResult:
    engine = sa.create_engine(Url.parse(url).sqlalchemy_url())  # ${VARS} expanded here
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS example_customer, example_dim_customer")
        conn.exec_driver_sql(
            "CREATE TABLE example_customer AS SELECT g AS id, 'Customer ' || g AS name, "
            "(g %% 1000)::numeric(12,2) AS balance, now() AS updated_at "
            "FROM generate_series(1, 20000) g")
    engine.dispose()

    dim = (md.mapping("example_dim_customer")
           .source(url, table="example_customer")
           .key("id")
           .columns(id="id", name=pl.col("name").str.to_uppercase(), balance="balance")
           .scd2(deletes="close")
           .chunks(count=4)
           .target(url, table="example_dim_customer"))
    saved = dim.plan().to_json()          # review it, keep it, run exactly that later
    result = md.run(md.Plan.from_json(saved), n_jobs=2, progress=False)
    print(result)
    assert result.ok and result.inserted == 20000
    print(md.history(url, "example_dim_customer", limit=3))
    return result


if __name__ == "__main__":
    pg_url = os.environ.get("MAPPERDSL_PG_URL") or (sys.argv[1] if len(sys.argv) > 1 else "")
    if not pg_url:
        sys.exit("set MAPPERDSL_PG_URL (or pass the URL) to a PostgreSQL database to write to")
    main(pg_url)

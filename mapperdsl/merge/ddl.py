"""Creating the target table when it is missing: typed columns and the index the merge uses."""

from __future__ import annotations

import polars as pl
import sqlalchemy as sa

from mapperdsl.connect import ddl_lock, execute
from mapperdsl.dialects import POSTGRES, key_expr, quote, quote_column, sql_type
from mapperdsl.dsl.parts import Scd2
from mapperdsl.errors import PlanError
from mapperdsl.plan.plan import Plan


def target_ddl(plan: Plan) -> list[str]:
    """CREATE statements for the target: mapped columns, history columns, and last a unique
    index on the key (SCD2: of the current versions only, so one current version per key
    is enforced)."""
    m = plan.mapping
    assert m.target_def and m.key_columns
    dialect, scd = m.target_def.url.dialect, m.scd
    aware = sql_type(pl.Datetime("us", "UTC"), dialect)
    cols = [f"{quote_column(n)} {sql_type(t, dialect)}" + (" NOT NULL" if n in m.key_columns else "")
            for n, t in plan.target_schema().items()]
    if isinstance(scd, Scd2):
        cols += [f"{quote_column(scd.valid_from)} {aware} NOT NULL",
                 f"{quote_column(scd.valid_to)} {aware}",
                 f"{quote_column(scd.is_current)} BOOLEAN NOT NULL"]
    elif scd.deletes == "close":
        cols.append(f"{quote_column(scd.deleted_flag)} BOOLEAN NOT NULL DEFAULT FALSE")
    cols.append(f"{quote_column(scd.hash_column)} BIGINT NOT NULL")
    table = m.target_def.table
    types = plan.target_schema()
    keys = ", ".join(key_expr(k, types[k], dialect, source=False) for k in m.key_columns)
    where = f" WHERE {quote_column(scd.is_current)}" if isinstance(scd, Scd2) else ""
    index = quote_column(key_index(plan))
    stmts = [f"CREATE TABLE IF NOT EXISTS {quote(table)} ({', '.join(cols)})",
             f"CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {quote(table)} ({keys}){where}"]
    if dialect == POSTGRES and "." in table:
        schema = table.rpartition(".")[0]
        stmts.insert(0, f"CREATE SCHEMA IF NOT EXISTS {quote(schema)}")
    return stmts


def key_index(plan: Plan) -> str:
    """The name of the target's unique key index (unquoted, without a schema)."""
    assert plan.mapping.target_def
    bare = plan.mapping.target_def.table.rpartition(".")[2]
    return f"{bare}_{'current_' if isinstance(plan.mapping.scd, Scd2) else ''}key"


def ensure_target(conn: sa.Connection, plan: Plan) -> None:
    """Create the target table if it is missing (idempotent); its index comes separately.
    On PostgreSQL, an index of the key index's name on another table (a renamed old
    dimension keeps its index's name) is an error: the target would never get its own,
    and its key lookups would scan it whole."""
    assert plan.mapping.target_def
    with conn.begin():
        ddl_lock(conn)
        for stmt in target_ddl(plan)[:-1]:
            execute(conn, stmt)
        if conn.dialect.name != POSTGRES:
            return
        table = plan.mapping.target_def.table
        schema = table.rpartition(".")[0]  # an index lives in its table's schema
        index = ".".join([quote(schema)] * bool(schema) + [quote_column(key_index(plan))])
        other = conn.execute(sa.text("SELECT indrelid::regclass::text FROM pg_index WHERE "
                                     "indexrelid = to_regclass(:i) AND indrelid <> "
                                     "CAST(:t AS regclass)"),
                             {"i": index, "t": quote(table)}).scalar()
        if other is not None:
            raise PlanError(f"index {index} belongs to table {other}, not to the target "
                            f"{table}: rename or drop it, so that mapperdsl can create the "
                            "target's key index")


def is_empty(conn: sa.Connection, plan: Plan) -> bool:
    """Whether the target table holds no row."""
    assert plan.mapping.target_def
    row = execute(conn, f"SELECT 1 FROM {quote(plan.mapping.target_def.table)} LIMIT 1").first()
    conn.rollback()
    return row is None


def ensure_index(conn: sa.Connection, plan: Plan) -> None:
    """Create the target's unique key index if it is missing (idempotent)."""
    with conn.begin():
        ddl_lock(conn)
        execute(conn, target_ddl(plan)[-1])

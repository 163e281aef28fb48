"""Test helpers: a customer source table, a pure-Python SCD reference model, readers."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from conftest import Engine

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
Snapshot = dict[int, tuple[Any, ...]]  # id -> (name, email, segment)

CUSTOMER_DDL = "CREATE TABLE customer (id INTEGER, name TEXT, email TEXT, segment TEXT)"


def step_time(step: int) -> datetime:
    return T0 + timedelta(days=step)


def load_snapshot(engine: Engine, snapshot: Snapshot, *, table: str = "customer") -> None:
    """Make the source table hold exactly ``snapshot``."""
    rows = [(k, *v) for k, v in snapshot.items()]
    engine.execute(engine.source, f"DELETE FROM {table}", rows=rows,
                   insert=f"INSERT INTO {table} VALUES ({engine.placeholders(4)})")


def scd2_model(snapshots: list[Snapshot], *, deletes: str = "close") -> list[tuple[Any, ...]]:
    """The SCD2 history the snapshots must give: (key, values, from step, to step or None)."""
    versions: list[dict[str, Any]] = []
    for step, snap in enumerate(snapshots):
        current = {v["key"]: v for v in versions if v["to"] is None}
        for key, values in snap.items():
            cur = current.get(key)
            if cur is not None and cur["values"] == values:
                continue
            if cur is not None:
                cur["to"] = step
            versions.append({"key": key, "values": values, "from": step, "to": None})
        if deletes == "close":
            for key, cur in current.items():
                if key not in snap:
                    cur["to"] = step
    return sorted(((v["key"], v["values"], v["from"], v["to"]) for v in versions), key=repr)


def scd1_model(snapshots: list[Snapshot], *, deletes: str = "delete") -> list[tuple[Any, ...]]:
    """The SCD1 table the snapshots must give: (key, values[, deleted flag])."""
    table: dict[int, tuple[Any, ...]] = {}
    flags: dict[int, bool] = {}
    for snap in snapshots:
        for key, values in snap.items():
            table[key], flags[key] = values, False
        for key in list(table):
            if key not in snap:
                if deletes == "delete":
                    del table[key], flags[key]
                elif deletes == "close":
                    flags[key] = True
    if deletes == "close":
        return sorted(((k, v, flags[k]) for k, v in table.items()), key=repr)
    return sorted(table.items(), key=repr)


def as_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(timezone.utc)


def read_scd2(engine: Engine, table: str = "dim_customer") -> list[tuple[Any, ...]]:
    """The target's history in the model's shape; each time becomes its step number."""
    steps = {step_time(i): i for i in range(100)}
    rows = engine.query(engine.target, "SELECT id, name, email, segment, valid_from, valid_to, "
                                       f"is_current FROM {table}")
    out = []
    for key, name, email, segment, frm, to, current in rows:
        valid_to = as_time(to)
        assert bool(current) == (valid_to is None), (key, frm, to, current)
        out.append((key, (name, email, segment), steps[as_time(frm)],
                    None if valid_to is None else steps[valid_to]))
    return sorted(out, key=repr)


def current_versions(engine: Engine, table: str = "dim_customer") -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for (key,) in engine.query(engine.target, f"SELECT id FROM {table} WHERE is_current"):
        counts[key] = counts.get(key, 0) + 1
    return counts

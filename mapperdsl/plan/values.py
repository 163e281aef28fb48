"""Typed JSON for the scalar values a plan carries (key bounds, checkpoint values)."""

from __future__ import annotations

from datetime import date, datetime, time
from decimal import Decimal
from typing import Any


def to_jsonable(value: Any) -> Any:
    """A JSON value that :func:`from_jsonable` turns back into the same Python value and type."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, Decimal):
        return {"decimal": format(value, "f")}
    if isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, date):
        return {"date": value.isoformat()}
    if isinstance(value, time):
        return {"time": value.isoformat()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, (tuple, list)):
        return {"tuple": [to_jsonable(v) for v in value]}
    raise TypeError(f"cannot keep a {type(value).__name__} value in a plan: {value!r}")


def from_jsonable(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    (kind, text), = data.items()
    if kind == "float":
        return float(text)
    if kind == "decimal":
        return Decimal(text)
    if kind == "datetime":
        return datetime.fromisoformat(text)
    if kind == "date":
        return date.fromisoformat(text)
    if kind == "time":
        return time.fromisoformat(text)
    if kind == "bytes":
        return bytes.fromhex(text)
    if kind == "tuple":
        return tuple(from_jsonable(v) for v in text)
    raise ValueError(f"unknown value kind in a plan: {kind!r}")


def show(value: Any) -> str:
    """A value as a person reads it in plan text."""
    if isinstance(value, tuple):
        return "(" + ", ".join(show(v) for v in value) + ")"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    return str(value)

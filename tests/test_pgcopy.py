"""The binary COPY encoder: PostgreSQL stores exactly the values of the frame, for every
type it encodes, NULLs and edge values included; other types go through CSV."""

from __future__ import annotations

from datetime import date, datetime, time, timezone
from decimal import Context, Decimal

import polars as pl
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapperdsl.merge import pgcopy
from mapperdsl.merge.write import bulk_load

COLUMNS = {
    "i2": ("smallint", pl.Int16(), [-32768, 0, 32767, None]),
    "i4": ("integer", pl.Int32(), [-2**31, 7, 2**31 - 1, None]),
    "i8": ("bigint", pl.Int64(), [-2**63, 0, 2**63 - 1, None]),
    "f4": ("real", pl.Float32(), [1.5, -0.25, float("inf"), None]),
    "f8": ("double precision", pl.Float64(), [1e300, -2.5e-300, 0.1, None]),
    "b": ("boolean", pl.Boolean(), [True, False, True, None]),
    "t": ("text", pl.String(), ["", "é ✓ 𝄞", "a\tb\nc\\d,\"e\"", None]),
    "v": ("varchar(10)", pl.String(), ["x", "", "1234567890", None]),
    "c": ("char(3)", pl.String(), ["ab", "abc", "", None]),
    "by": ("bytea", pl.Binary(), [b"", b"\x00\xff\\x", b"abc", None]),
    "d": ("date", pl.Date(), [date(1, 1, 1), date(1999, 12, 31), date(9999, 12, 31), None]),
    "ts": ("timestamp", pl.Datetime("us"),
           [datetime(1970, 1, 1), datetime(1999, 12, 31, 23, 59, 59, 999999),
            datetime(2038, 1, 19, 3, 14, 8, 1), None]),
    "tz": ("timestamptz", pl.Datetime("us", "UTC"),
           [datetime(1900, 1, 1, tzinfo=timezone.utc), datetime(2000, 1, 1, tzinfo=timezone.utc),
            datetime(2024, 2, 29, 12, 30, 0, 5, tzinfo=timezone.utc), None]),
    "tm": ("time", pl.Time(), [time(0, 0), time(23, 59, 59, 999999), time(12, 0, 0, 1), None]),
    "n0": ("numeric(5,0)", pl.Decimal(5, 0), [Decimal("-99999"), Decimal("0"), Decimal("10000"),
                                              None]),
    "n2": ("numeric(12,2)", pl.Decimal(12, 2),
           [Decimal("-1234567890.12"), Decimal("0.01"), Decimal("100.10"), None]),
    "n5": ("numeric(9,5)", pl.Decimal(9, 5), [Decimal("-0.00001"), Decimal("1234.56789"),
                                              Decimal("0"), None]),
    "n38": ("numeric(38,10)", pl.Decimal(38, 10),
            [Decimal("9999999999999999999999999999.9999999999"),
             Decimal("-9999999999999999999999999999.9999999999"), Decimal("-0.0000000001"),
             None]),
    "nf": ("numeric(4,4)", pl.Decimal(4, 4), [Decimal("0.9999"), Decimal("-0.5"), Decimal("0"),
                                              None]),
}


def _table(conn: sa.Connection, name: str, columns: dict[str, str]) -> None:
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    conn.exec_driver_sql(f"CREATE TABLE {name} ({', '.join(f'{c} {t}' for c, t in columns.items())})")


def _load(url: str, frame: pl.DataFrame, sql_types: dict[str, str]) -> list[tuple[object, ...]]:
    eng = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with eng.connect() as conn:
        with conn.begin():
            _table(conn, "loaded", sql_types)
            bulk_load(conn, "loaded", frame, "postgresql")
        rows = conn.exec_driver_sql("SELECT * FROM loaded").all()
    eng.dispose()
    return [tuple(r) for r in rows]


@pytest.mark.parametrize("rows", [slice(0, 4), slice(0, 3), slice(3, 4)],
                         ids=["some NULLs", "no NULL", "only NULLs"])
def test_every_encoded_type_round_trips(pg_engine, rows: slice) -> None:
    # Columns with some NULLs are joined row-wise, the others written as one block.
    frame = pl.DataFrame({c: pl.Series(c, v[rows], dtype=d) for c, (_, d, v) in COLUMNS.items()})
    sql_types = {c: t for c, (t, _, _) in COLUMNS.items()}
    eng = sa.create_engine(pg_engine.target.replace("postgresql://", "postgresql+psycopg://"))
    with eng.connect() as conn:
        _table(conn, "probe", sql_types)
        types = pgcopy.column_types(conn, "probe")
        conn.rollback()
    eng.dispose()
    assert pgcopy.encodable(frame.schema, types)
    loaded = _load(pg_engine.target, frame, sql_types)
    expected = list(zip(*[COLUMNS[c][2][rows] for c in COLUMNS], strict=True))
    for got, want in zip(loaded, expected, strict=True):
        for name, g, w in zip(COLUMNS, got, want, strict=True):
            if name == "c" and w is not None:
                w = w.ljust(3)  # char(n) pads
            if name == "f4" and w is not None:
                g = float(g)
            assert g == w, (name, g, w)


def test_types_without_an_encoder_go_through_csv(pg_engine) -> None:
    frame = pl.DataFrame({"u": ["0f8fad5b-d9cb-469f-a165-70867728950e", None],
                          "j": ['{"a": [1, 2]}', "null"], "n": [1, 2]})
    sql_types = {"u": "uuid", "j": "jsonb", "n": "integer"}
    rows = _load(pg_engine.target, frame, sql_types)
    assert [(str(u) if u else None, j, n) for u, j, n in rows] == [
        ("0f8fad5b-d9cb-469f-a165-70867728950e", {"a": [1, 2]}, 1), (None, None, 2)]


def test_a_frame_wider_than_an_integer_column_is_not_binary_encoded() -> None:
    assert not pgcopy.encodable(pl.Schema({"n": pl.Int64()}), {"n": "int4"})
    assert pgcopy.encodable(pl.Schema({"n": pl.Int32()}), {"n": "int8"})
    assert not pgcopy.encodable(pl.Schema({"n": pl.Int32()}), {})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(precision=st.integers(1, 38), data=st.data())
def test_any_decimal_round_trips(pg_engine, precision: int, data: st.DataObject) -> None:
    scale = data.draw(st.integers(0, precision))
    digits = st.integers(-(10 ** precision - 1), 10 ** precision - 1)
    values = [Decimal(v).scaleb(-scale, Context(prec=60)) for v in data.draw(st.lists(digits, min_size=1,
                                                                   max_size=20))]
    frame = pl.DataFrame({"n": pl.Series(values, dtype=pl.Decimal(precision, scale))})
    rows = _load(pg_engine.target, frame, {"n": f"numeric({precision},{scale})"})
    assert [r[0] for r in rows] == values


@pytest.mark.parametrize("rows", [0, 1, pgcopy.SLICE_ROWS + 3])
def test_row_counts_across_slices(pg_engine, rows: int) -> None:
    frame = pl.DataFrame({"n": pl.Series(range(rows), dtype=pl.Int64()),
                          "s": pl.Series([str(i) for i in range(rows)], dtype=pl.String())})
    got = _load(pg_engine.target, frame, {"n": "bigint", "s": "text"})
    assert len(got) == rows
    assert sorted(got)[-1:] == ([(rows - 1, str(rows - 1))] if rows else [])

"""PostgreSQL's binary COPY format, made from Arrow buffers with no Python loop per row.

Binary COPY spares the server the text parsing of every value (dates, times
and decimals cost the most), which makes it several times faster than CSV.
Each value is encoded the way the column's receive function reads it, so the
encoder needs the column's real type: :func:`column_types` reads it from the
catalogue. A frame with a column this module cannot encode (uuid, json,
intervals, arrays, …) is not binary-encodable and goes through CSV instead.

A row is ``int16`` field count, then per field ``int32`` length (-1 for NULL)
and the value's bytes, all big-endian. Fields are built per column (a
fixed-width numpy block, or length prefixes joined to variable-length bytes)
and joined row-wise with Arrow's ``binary_join_element_wise``; the joined
array's value buffer is the COPY data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"
SLICE_ROWS = 65_536  # rows encoded at a time: memory stays a few MiB whatever the chunk

_EPOCH_DAYS = 10_957  # 2000-01-01, PostgreSQL's epoch, in days after 1970-01-01
_EPOCH_US = _EPOCH_DAYS * 86_400 * 1_000_000
_NULL = pa.scalar(b"\xff\xff\xff\xff", pa.large_binary())
_EMPTY = pa.scalar(b"", pa.large_binary())


def column_types(conn: sa.Connection, table: str) -> dict[str, str]:
    """The type name (``pg_type.typname``) of each column of ``table`` (quoted name)."""
    rows = conn.execute(sa.text(
        "SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE a.attrelid = CAST(:t AS regclass) AND a.attnum > 0 AND NOT a.attisdropped"),
        {"t": table}).all()
    return {name: typname for name, typname in rows}


def encodable(schema: pl.Schema, types: dict[str, str]) -> bool:
    """Whether every column of ``schema`` has a binary encoder for its target type."""
    for name, dtype in schema.items():
        accepts = _ACCEPTS.get(types.get(name, ""))
        if accepts is None or not accepts(dtype):
            return False
    return True


def copy_data(frame: pl.DataFrame, types: dict[str, str]) -> Iterator[memoryview | bytes]:
    """The COPY ... (FORMAT binary) stream of ``frame``, in pieces, header and trailer included."""
    yield HEADER
    for part in frame.iter_slices(SLICE_ROWS):
        yield _rows(part, types)
    yield TRAILER


def _rows(frame: pl.DataFrame, types: dict[str, str]) -> memoryview:
    n = frame.height
    count = _fixed_block(np.full(n, frame.width, ">i2").view(np.uint8).reshape(n, 2))
    fields = [_ENCODERS[types[name]](frame.get_column(name)) for name in frame.columns]
    rows = pc.binary_join_element_wise(count, *fields, _EMPTY)
    offsets = np.frombuffer(rows.buffers()[1], np.int64)[rows.offset:rows.offset + n + 1]
    return memoryview(rows.buffers()[2])[offsets[0]:offsets[-1]]  # type: ignore[index]


def _fixed_block(block: np.ndarray) -> pa.Array:
    """Rows of a (n, width) uint8 block as a large_binary array."""
    n, width = block.shape
    data = pa.py_buffer(np.ascontiguousarray(block))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, data]).cast(
        pa.large_binary())


def _with_nulls(series: pl.Series, fields: pa.Array) -> pa.Array:
    if series.null_count() == 0:
        return fields
    return pc.if_else(series.is_not_null().to_arrow(), fields, _NULL)


def _fixed(series: pl.Series, values: np.ndarray) -> pa.Array:
    """Fields of a fixed-width type: the length, then ``values`` big-endian."""
    n, width = len(values), values.dtype.itemsize
    block = np.empty((n, 4 + width), np.uint8)
    block[:, :4] = np.array([width], ">i4").view(np.uint8)
    block[:, 4:] = values.astype(values.dtype.newbyteorder(">")).view(np.uint8).reshape(n, width)
    return _with_nulls(series, _fixed_block(block))


def _ints(numpy_type: type) -> Callable[[pl.Series], pa.Array]:
    def encode(series: pl.Series) -> pa.Array:
        values: np.ndarray = series.fill_null(0).to_numpy().astype(numpy_type)
        return _fixed(series, values)
    return encode


def _bool(series: pl.Series) -> pa.Array:
    return _fixed(series, series.fill_null(False).to_numpy().astype(np.uint8))


def _date(series: pl.Series) -> pa.Array:
    days = series.cast(pl.Int32).fill_null(_EPOCH_DAYS).to_numpy()
    return _fixed(series, (days - _EPOCH_DAYS).astype(np.int32))


def _timestamp(series: pl.Series) -> pa.Array:
    # An aware Polars time is UTC underneath, as timestamptz; a naive one is wall time.
    micros = series.dt.cast_time_unit("us").cast(pl.Int64).fill_null(_EPOCH_US).to_numpy()
    return _fixed(series, micros - _EPOCH_US)


def _time(series: pl.Series) -> pa.Array:
    nanos = series.cast(pl.Int64).fill_null(0).to_numpy()
    return _fixed(series, nanos // 1000)


def _bytes(series: pl.Series) -> pa.Array:
    """Variable-length fields: a length prefix joined to the value's bytes (text as UTF-8)."""
    raw = series.cast(pl.Binary) if series.dtype == pl.String() else series
    data = raw.to_arrow().cast(pa.large_binary())
    lengths = pc.binary_length(data).fill_null(0).to_numpy().astype(">i4")
    prefix = _fixed_block(lengths.view(np.uint8).reshape(-1, 4))
    return _with_nulls(series, pc.binary_join_element_wise(prefix, data.fill_null(b""), _EMPTY))


def _numeric(series: pl.Series) -> pa.Array:
    """``numeric`` from decimal128: base-10000 digit groups around the decimal point.

    Every value of the column gets the same number of groups (leading and trailing
    zero groups included), which ``numeric_recv`` accepts and strips.
    """
    dtype = series.dtype
    assert isinstance(dtype, pl.Decimal)
    precision, scale = dtype.precision or 38, dtype.scale
    arrow = series.fill_null(0).to_arrow()
    words = np.frombuffer(arrow.buffers()[1], np.uint64)  # type: ignore[arg-type]
    words = words[arrow.offset * 2:(arrow.offset + len(arrow)) * 2].reshape(-1, 2)
    low, high = words[:, 0].copy(), words[:, 1].copy()
    negative = (high >> np.uint64(63)).astype(bool)
    neg_low = ~low + np.uint64(1)  # two's complement of the 128-bit value
    neg_high = ~high + (neg_low == 0).astype(np.uint64)
    low, high = np.where(negative, neg_low, low), np.where(negative, neg_high, high)
    mask = np.uint64(0xFFFFFFFF)
    limbs = [high >> np.uint64(32), high & mask, low >> np.uint64(32), low & mask]

    def divide(divisor: int) -> np.ndarray:  # limbs //= divisor, returning the remainder
        rest = np.zeros_like(low)
        for i, limb in enumerate(limbs):
            current = (rest << np.uint64(32)) | limb
            limbs[i], rest = current // np.uint64(divisor), current % np.uint64(divisor)
        return rest

    fraction_groups = -(-scale // 4)
    integer_groups = -(-max(precision - scale, 0) // 4)
    ndigits = max(integer_groups + fraction_groups, 1)
    groups = []  # least significant first
    if scale % 4:
        partial = scale % 4
        groups.append(divide(10 ** partial) * np.uint64(10 ** (4 - partial)))
    while len(groups) < ndigits:
        groups.append(divide(10_000))
    n = len(low)
    head = np.empty((n, 4), ">i2")
    head[:, 0] = ndigits
    head[:, 1] = integer_groups - 1  # the weight of the first group
    head[:, 2] = np.where(negative, 0x4000, 0)
    head[:, 3] = scale
    digits = np.stack(groups[::-1], axis=1).astype(">i2")
    width = 8 + 2 * ndigits
    block = np.empty((n, 4 + width), np.uint8)
    block[:, :4] = np.array([width], ">i4").view(np.uint8)
    block[:, 4:12] = head.view(np.uint8).reshape(n, 8)
    block[:, 12:] = digits.view(np.uint8).reshape(n, 2 * ndigits)
    return _with_nulls(series, _fixed_block(block))


def _is_int(dtype: pl.DataType) -> bool:
    return dtype.is_integer()


_ENCODERS: dict[str, Callable[[pl.Series], pa.Array]] = {
    "int2": _ints(np.int16), "int4": _ints(np.int32), "int8": _ints(np.int64),
    "float4": lambda s: _fixed(s, s.fill_null(0).to_numpy().astype(np.float32)),
    "float8": lambda s: _fixed(s, s.fill_null(0).to_numpy().astype(np.float64)),
    "bool": _bool, "date": _date, "timestamp": _timestamp, "timestamptz": _timestamp,
    "time": _time, "numeric": _numeric,
    "text": _bytes, "varchar": _bytes, "bpchar": _bytes, "bytea": _bytes,
}
_ACCEPTS: dict[str, Callable[[pl.DataType], bool]] = {
    "int2": lambda d: d in (pl.Int8(), pl.Int16(), pl.UInt8()),
    "int4": lambda d: d in (pl.Int8(), pl.Int16(), pl.Int32(), pl.UInt8(), pl.UInt16()),
    "int8": lambda d: _is_int(d) and d != pl.UInt64(),
    "float4": lambda d: d == pl.Float32(), "float8": lambda d: d.is_float(),
    "bool": lambda d: d == pl.Boolean(), "date": lambda d: d == pl.Date(),
    "timestamp": lambda d: isinstance(d, pl.Datetime) and d.time_zone is None,
    "timestamptz": lambda d: isinstance(d, pl.Datetime) and d.time_zone is not None,
    "time": lambda d: d == pl.Time(), "numeric": lambda d: isinstance(d, pl.Decimal),
    "text": lambda d: d == pl.String(), "varchar": lambda d: d == pl.String(),
    "bpchar": lambda d: d == pl.String(), "bytea": lambda d: d == pl.Binary(),
}

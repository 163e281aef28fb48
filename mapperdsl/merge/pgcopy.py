"""PostgreSQL's binary COPY format, made from Arrow buffers with no Python loop per row.

Binary COPY spares the server the text parsing of every value (dates, times
and decimals cost the most), which makes it several times faster than CSV.
Each value is encoded the way the column's receive function reads it, so the
encoder needs the column's real type: :func:`column_types` reads it from the
catalogue. A frame with a column this module cannot encode (uuid, json,
intervals, arrays, …) is not binary-encodable and goes through CSV instead.

A row is ``int16`` field count, then per field ``int32`` length (-1 for NULL)
and the value's bytes, all big-endian. The fields of fixed-width columns are
written into one numpy block per slice; text, bytes and columns with some
NULLs are joined to it row-wise with Arrow's ``binary_join_element_wise``, whose
value buffer is then the COPY data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from mapperdsl.dialects import INFINITY_DAYS, INFINITY_US, MINUS_INFINITY_DAYS, MINUS_INFINITY_US

HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"
SLICE_ROWS = 65_536  # rows encoded at a time: memory stays a few MiB whatever the chunk

_EPOCH_DAYS = 10_957  # 2000-01-01, PostgreSQL's epoch, in days after 1970-01-01
_EPOCH_US = _EPOCH_DAYS * 86_400 * 1_000_000
_EMPTY = pl.Series([b""]).to_arrow()[0]  # pa.scalar would import pandas: 0.3 s a process


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


def copy_data(frame: pl.DataFrame, types: dict[str, str]) -> tuple[list[str],
                                                                   Iterator[memoryview | bytes]]:
    """The column order to COPY in, and the COPY ... (FORMAT binary) stream of ``frame`` in
    pieces, header and trailer included.

    Columns of a fixed width with no NULL (or only NULLs) come first: their fields are
    one numpy block per slice, written column by column. The rest (text, bytes, values
    with some NULLs) are joined to it row by row.
    """
    fixed = [c for c in frame.columns if types[c] in _WIDTHS
             and frame.get_column(c).null_count() in (0, frame.height)]
    variable = [c for c in frame.columns if c not in fixed]

    def pieces() -> Iterator[memoryview | bytes]:
        yield HEADER
        for part in frame.iter_slices(SLICE_ROWS):
            yield _rows(part, fixed, variable, types)
        yield TRAILER

    return [*fixed, *variable], pieces()


def _rows(frame: pl.DataFrame, fixed: list[str], variable: list[str],
          types: dict[str, str]) -> memoryview:
    n = frame.height
    values = {c: None if frame.get_column(c).null_count() else
              _ENCODERS[types[c]](frame.get_column(c)) for c in fixed}
    # What every row has alike (the field count, the lengths) is one template row, copied
    # to every row at once; then each column's values go in (twice as fast as field by field).
    template: list[bytes] = [np.array([frame.width], ">i2").tobytes()]
    places: list[tuple[int, np.ndarray]] = []
    at = 2
    for value in values.values():
        if value is None:  # a column of NULLs: length -1, no bytes
            template.append(b"\xff" * 4)
            at += 4
            continue
        template.append(np.array([value.shape[1]], ">i4").tobytes() + bytes(value.shape[1]))
        places.append((at + 4, value))
        at += 4 + value.shape[1]
    block = np.empty((n, at), np.uint8)
    block[:] = np.frombuffer(b"".join(template), np.uint8)
    for start, value in places:
        block[:, start:start + value.shape[1]] = value
    if not variable:
        return memoryview(block.data).cast("B")
    parts = [_as_binary(block)]
    for name in variable:
        parts.extend(_variable(frame.get_column(name), types[name]))
    rows = pc.binary_join_element_wise(*parts, _EMPTY)
    offsets = np.frombuffer(rows.buffers()[1], np.int64)[rows.offset:rows.offset + n + 1]
    return memoryview(rows.buffers()[2])[offsets[0]:offsets[-1]]  # type: ignore[index]


def _as_binary(block: np.ndarray) -> pa.Array:
    """Rows of a (n, width) uint8 block as a large_binary array."""
    n, width = block.shape
    data = pa.py_buffer(np.ascontiguousarray(block))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, data]).cast(
        pa.large_binary())


def _variable(series: pl.Series, typname: str) -> list[pa.Array]:
    """A length prefix (-1 for NULL) and the value's bytes, as two arrays to join."""
    if typname in _WIDTHS:
        data = _as_binary(_ENCODERS[typname](series))
    else:  # text as UTF-8, bytea as is
        raw = series.cast(pl.Binary) if series.dtype == pl.String() else series
        data = raw.to_arrow().cast(pa.large_binary())
    offsets = np.frombuffer(data.buffers()[1], np.int64)  # type: ignore[arg-type]
    lengths = np.diff(offsets[data.offset:data.offset + len(data) + 1])  # (pandas-free)
    valid = series.is_not_null()
    lengths = np.where(valid.to_numpy(), lengths, -1).astype(">i4")
    prefix = _as_binary(lengths.view(np.uint8).reshape(-1, 4))
    if series.null_count():
        data = pc.if_else(valid.to_arrow(), data, _EMPTY)
    return [prefix, data]


def _big_endian(values: np.ndarray) -> np.ndarray:
    """(n,) numbers as their (n, itemsize) big-endian bytes."""
    n = len(values)
    return values.astype(values.dtype.newbyteorder(">")).view(np.uint8).reshape(n, -1)


def _numbers(numpy_type: type) -> Callable[[pl.Series], np.ndarray]:
    def encode(series: pl.Series) -> np.ndarray:
        return _big_endian(series.fill_null(0).to_numpy().astype(numpy_type))
    return encode


def _bool(series: pl.Series) -> np.ndarray:
    return series.fill_null(False).to_numpy().astype(np.uint8).reshape(-1, 1)


def _date(series: pl.Series) -> np.ndarray:
    days = series.cast(pl.Int32).fill_null(_EPOCH_DAYS).to_numpy()
    return _big_endian(_to_infinity(days, INFINITY_DAYS, MINUS_INFINITY_DAYS, days - _EPOCH_DAYS))


def _timestamp(series: pl.Series) -> np.ndarray:
    # An aware Polars time is UTC underneath, as timestamptz; a naive one is wall time.
    micros = series.dt.cast_time_unit("us").cast(pl.Int64).fill_null(_EPOCH_US).to_numpy()
    return _big_endian(_to_infinity(micros, INFINITY_US, MINUS_INFINITY_US, micros - _EPOCH_US))


def _to_infinity(values: np.ndarray, infinity: int, minus_infinity: int,
                 finite: np.ndarray) -> np.ndarray:
    """``finite``, with PostgreSQL's own infinities (the type's largest and smallest number)
    where ``values`` lie on or past what ConnectorX reads them as (dialects.INFINITY_DAYS)."""
    if not len(values) or minus_infinity < values.min() and values.max() < infinity:
        return finite  # (a min and a max: a third of the time of the comparisons)
    limits = np.iinfo(finite.dtype)
    return np.where(values >= infinity, limits.max,
                    np.where(values <= minus_infinity, limits.min, finite)).astype(finite.dtype)


def _time(series: pl.Series) -> np.ndarray:
    nanos = series.cast(pl.Int64).fill_null(0).to_numpy()
    return _big_endian(nanos // 1000)


def _numeric(series: pl.Series) -> np.ndarray:
    """``numeric`` from decimal128: base-10000 digit groups around the decimal point.

    Every value of the column gets the same number of groups (leading and trailing
    zero groups included), which ``numeric_recv`` accepts and strips. Up to 18 digits
    the unscaled value is one int64; beyond, a 128-bit value divided in 32-bit limbs.
    """
    dtype = series.dtype
    assert isinstance(dtype, pl.Decimal)
    precision, scale = dtype.precision or 38, dtype.scale
    arrow = series.fill_null(0).to_arrow()
    words = np.frombuffer(arrow.buffers()[1], np.uint64)  # type: ignore[arg-type]
    words = words[arrow.offset * 2:(arrow.offset + len(arrow)) * 2].reshape(-1, 2)
    divide: Callable[[int], np.ndarray]
    if precision <= 18:
        signed = words[:, 0].view(np.int64)
        negative = signed < 0
        rest = [np.abs(signed)]

        def divide(divisor: int) -> np.ndarray:  # rest //= divisor, returning the remainder
            rest[0], remainder = np.divmod(rest[0], divisor)
            return remainder
    else:
        low, high = words[:, 0].copy(), words[:, 1].copy()
        negative = (high >> np.uint64(63)).astype(bool)
        neg_low = ~low + np.uint64(1)  # two's complement of the 128-bit value
        neg_high = ~high + (neg_low == 0).astype(np.uint64)
        low, high = np.where(negative, neg_low, low), np.where(negative, neg_high, high)
        mask = np.uint64(0xFFFFFFFF)
        limbs = [high >> np.uint64(32), high & mask, low >> np.uint64(32), low & mask]

        def divide(divisor: int) -> np.ndarray:  # limbs //= divisor, returning the remainder
            remainder = np.zeros_like(low)
            for i, limb in enumerate(limbs):
                current = (remainder << np.uint64(32)) | limb
                limbs[i], remainder = current // np.uint64(divisor), current % np.uint64(divisor)
            return remainder

    fraction_groups = -(-scale // 4)
    integer_groups = -(-max(precision - scale, 0) // 4)
    ndigits = max(integer_groups + fraction_groups, 1)
    groups = []  # least significant first
    if scale % 4:
        partial = scale % 4
        groups.append(divide(10 ** partial) * 10 ** (4 - partial))
    while len(groups) < ndigits:
        groups.append(divide(10_000))
    n = len(words)
    out = np.empty((n, 4 + ndigits), ">i2")
    out[:, 0] = ndigits
    out[:, 1] = integer_groups - 1  # the weight of the first group
    out[:, 2] = np.where(negative, 0x4000, 0)
    out[:, 3] = scale
    out[:, 4:] = np.stack(groups[::-1], axis=1)
    return out.view(np.uint8).reshape(n, -1)


_ENCODERS: dict[str, Callable[[pl.Series], np.ndarray]] = {
    "int2": _numbers(np.int16), "int4": _numbers(np.int32), "int8": _numbers(np.int64),
    "float4": _numbers(np.float32), "float8": _numbers(np.float64),
    "bool": _bool, "date": _date, "timestamp": _timestamp, "timestamptz": _timestamp,
    "time": _time, "numeric": _numeric,
}
_WIDTHS = set(_ENCODERS)  # fixed width for a given column type; text and bytea are not
_ACCEPTS: dict[str, Callable[[pl.DataType], bool]] = {
    "int2": lambda d: d in (pl.Int8(), pl.Int16(), pl.UInt8()),
    "int4": lambda d: d in (pl.Int8(), pl.Int16(), pl.Int32(), pl.UInt8(), pl.UInt16()),
    "int8": lambda d: d.is_integer() and d != pl.UInt64(),
    "float4": lambda d: d == pl.Float32(), "float8": lambda d: d.is_float(),
    "bool": lambda d: d == pl.Boolean(), "date": lambda d: d == pl.Date(),
    "timestamp": lambda d: isinstance(d, pl.Datetime) and d.time_zone is None,
    "timestamptz": lambda d: isinstance(d, pl.Datetime) and d.time_zone is not None,
    "time": lambda d: d == pl.Time(), "numeric": lambda d: isinstance(d, pl.Decimal),
    "text": lambda d: d == pl.String(), "varchar": lambda d: d == pl.String(),
    "bpchar": lambda d: d == pl.String(), "bytea": lambda d: d == pl.Binary(),
}

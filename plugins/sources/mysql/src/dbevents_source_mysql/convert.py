"""Column values in binlog row images -> JSON-ready Python values.

One reader per column is chosen once per table definition (tables.py), so decoding
a row costs one call per column and no type dispatch. A reader takes the event's
bytes and an offset and returns ``(value, offset after the value)``.

The mapping (also in docs/source-mysql.md):

| MySQL / MariaDB type            | JSON                                              |
|---------------------------------|---------------------------------------------------|
| TINYINT .. BIGINT (un)signed    | number (BIGINT UNSIGNED up to 18446744073709551615)|
| DECIMAL / NUMERIC               | string, exact, with the column's scale ("12.30")  |
| FLOAT                           | number, shortest decimal that is the stored float |
| DOUBLE                          | number                                            |
| CHAR, VARCHAR, TEXT, ENUM       | string                                            |
| SET                             | array of strings, in definition order             |
| BINARY, VARBINARY, BLOB, GEOM.  | string, base64                                    |
| BIT(n)                          | number (the bits as an unsigned integer)          |
| DATE                            | "2024-01-31"                                      |
| DATETIME(n)                     | "2024-01-31T12:34:56.123456" (n fraction digits)  |
| TIMESTAMP(n)                    | "2024-01-31T12:34:56.123Z" (UTC)                  |
| TIME(n)                         | "-838:59:59.000000" .. "838:59:59"                |
| YEAR                            | number                                            |
| JSON                            | the JSON value itself                             |
| NULL                            | null                                              |

Zero dates ("0000-00-00") and dates with a zero month or day become null.
"""

from __future__ import annotations

import base64
import codecs
import json
import struct
import time
from collections.abc import Callable
from datetime import date, datetime
from datetime import time as dtime
from decimal import Decimal
from typing import Any

from dbevents import RawJSON, SetupError
from pymysqlreplication.column import Column
from pymysqlreplication.constants import FIELD_TYPE
from pymysqlreplication.json_binary import parse_json

Reader = Callable[[bytes, int], tuple[Any, int]]

_DIG2BYTES = (0, 1, 1, 2, 2, 3, 3, 4, 4, 4)
_from = int.from_bytes
_b64 = base64.b64encode


def _fixed(fmt: str) -> Reader:
    st = struct.Struct(fmt)
    unpack, size = st.unpack_from, st.size

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        return unpack(data, pos)[0], pos + size

    return read


def _tiny(unsigned: bool) -> Reader:
    if unsigned:
        def read_u(data: bytes, pos: int) -> tuple[int, int]:
            return data[pos], pos + 1
        return read_u

    def read_s(data: bytes, pos: int) -> tuple[int, int]:
        v = data[pos]
        return (v - 256 if v > 127 else v), pos + 1
    return read_s


def _int24(unsigned: bool) -> Reader:
    signed = not unsigned

    def read(data: bytes, pos: int) -> tuple[int, int]:
        return _from(data[pos:pos + 3], "little", signed=signed), pos + 3
    return read


def _year(data: bytes, pos: int) -> tuple[int, int]:
    v = data[pos]
    return (v + 1900 if v else 0), pos + 1


_f32 = struct.Struct("<f")


def float32(raw: bytes) -> float:
    """The shortest decimal that reads back as the same 4-byte float (what repr()
    does for doubles), so FLOAT 1.1 is 1.1 and not 1.100000023841858."""
    value: float = _f32.unpack(raw)[0]
    for digits in range(1, 9):
        short = float(f"{value:.{digits}g}")
        try:
            if _f32.pack(short) == raw:
                return short
        except OverflowError:  # rounded up past the largest float
            continue
    return float(f"{value:.9g}")  # 9 significant digits always round-trip


def _float(data: bytes, pos: int) -> tuple[float, int]:
    return float32(data[pos:pos + 4]), pos + 4


def decimal_reader(precision: int, scale: int) -> Reader:
    """MySQL's packed DECIMAL: base-10**9 groups, big-endian, the sign in the top bit
    and negative numbers stored inverted. Exact: returned as a string with the
    column's scale, as MySQL shows it ("12.30", "-0.05", "7")."""
    intg0, intg0x = divmod(precision - scale, 9)
    frac0, frac0x = divmod(scale, 9)
    lead, trail = _DIG2BYTES[intg0x], _DIG2BYTES[frac0x]
    size = lead + 4 * intg0 + 4 * frac0 + trail
    sign_bit = 1 << (8 * size - 1)
    flip_negative = ((1 << (8 * size)) - 1) ^ sign_bit
    # The magnitude's fields after the leading partial group, most significant
    # first: (shift, mask, 10**digits).
    widths = [(32, 9)] * (intg0 + frac0) + ([(8 * trail, frac0x)] if trail else [])
    fields = []
    shift = 8 * size - 8 * lead
    for bits, digits in widths:
        shift -= bits
        fields.append((shift, (1 << bits) - 1, 10 ** digits))
    top = 8 * size - 8 * lead
    pad = scale + 1

    def read(data: bytes, pos: int) -> tuple[str, int]:
        n = _from(data[pos:pos + size], "big")
        negative = not n & sign_bit
        n ^= flip_negative if negative else sign_bit
        # Base-10**9 groups -> one integer holding every digit, the scale implied.
        value = n >> top
        for shift, mask, scale_up in fields:
            value = value * scale_up + (n >> shift & mask)
        text = str(value)
        if scale:
            if len(text) < pad:
                text = text.rjust(pad, "0")
            text = f"{text[:-scale]}.{text[-scale:]}"
        return ("-" + text if negative else text), pos + size

    return read


def _fraction(fsp: int) -> tuple[int, int]:
    """(bytes holding a temporal fraction of ``fsp`` digits, their scale to µs)."""
    nbytes = (fsp + 1) // 2
    return nbytes, 10 ** (6 - 2 * nbytes)


def _frac_text(micro: int, fsp: int) -> str:
    return f".{micro:06d}"[:fsp + 1] if fsp else ""


def _date_text(y: int, m: int, d: int) -> str | None:
    if not m or not d:
        return None
    return f"{y:04d}-{m:02d}-{d:02d}"


def _date(data: bytes, pos: int) -> tuple[str | None, int]:
    v = _from(data[pos:pos + 3], "little")
    return _date_text(v >> 9, (v >> 5) & 15, v & 31), pos + 3


def datetime2_reader(fsp: int) -> Reader:
    nbytes, scale = _fraction(fsp)
    size = 5 + nbytes
    frac_bits = 8 * nbytes
    frac_mask = (1 << frac_bits) - 1
    last: list[Any] = [None, None]  # the last seconds part and its text: rows cluster

    def read(data: bytes, pos: int) -> tuple[str | None, int]:
        v = _from(data[pos:pos + size], "big")
        whole = v >> frac_bits
        if whole == last[0]:
            text = last[1]
        else:
            v2 = whole - 0x8000000000
            ymd, hms = v2 >> 17, v2 & 0x1FFFF
            ym, day = ymd >> 5, ymd & 31
            month = ym % 13
            if not month or not day:
                text = None  # zero dates
            else:
                text = (f"{ym // 13:04d}-{month:02d}-{day:02d}T{hms >> 12:02d}:"
                        f"{(hms >> 6) & 63:02d}:{hms & 63:02d}")
            last[0], last[1] = whole, text
        if fsp and text is not None:
            text = f"{text}.{(v & frac_mask) * scale:06d}"[:len(text) + 1 + fsp]
        return text, pos + size

    return read


def _datetime1(data: bytes, pos: int) -> tuple[str | None, int]:
    v = _from(data[pos:pos + 8], "little")
    ymd, hms = divmod(v, 1_000_000)
    day = _date_text(ymd // 10000, ymd // 100 % 100, ymd % 100)
    if day is None:
        return None, pos + 8
    return f"{day}T{hms // 10000:02d}:{hms // 100 % 100:02d}:{hms % 100:02d}", pos + 8


def _utc_text(seconds: int, micro: int, fsp: int) -> str | None:
    if not seconds and not micro:
        return None  # the zero TIMESTAMP, "0000-00-00 00:00:00"
    t = time.gmtime(seconds)
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:"
            f"{t.tm_min:02d}:{t.tm_sec:02d}{_frac_text(micro, fsp)}Z")


def timestamp2_reader(fsp: int) -> Reader:
    nbytes, scale = _fraction(fsp)
    size = 4 + nbytes

    def read(data: bytes, pos: int) -> tuple[str | None, int]:
        seconds = _from(data[pos:pos + 4], "big")
        micro = _from(data[pos + 4:pos + size], "big") * scale if nbytes else 0
        return _utc_text(seconds, micro, fsp), pos + size

    return read


def _timestamp1(data: bytes, pos: int) -> tuple[str | None, int]:
    return _utc_text(_from(data[pos:pos + 4], "little"), 0, 0), pos + 4


def _time_text(negative: bool, hours: int, minutes: int, seconds: int, micro: int,
               fsp: int) -> str:
    return (f"{'-' if negative else ''}{hours:02d}:{minutes:02d}:{seconds:02d}"
            f"{_frac_text(micro, fsp)}")


def time2_reader(fsp: int) -> Reader:
    """TIME(n): a packed (hms << 24 | µs) integer with an offset; negative values
    borrow from the fraction, as in MySQL's my_time_packed_from_binary."""
    nbytes = (fsp + 1) // 2
    size = 3 + nbytes

    def read(data: bytes, pos: int) -> tuple[str, int]:
        if nbytes == 3:
            packed = _from(data[pos:pos + 6], "big") - 0x800000000000
        else:
            whole = _from(data[pos:pos + 3], "big") - 0x800000
            frac = _from(data[pos + 3:pos + size], "big") if nbytes else 0
            if whole < 0 and frac:
                whole += 1
                frac -= 1 << (8 * nbytes)
            packed = (whole << 24) + frac * (10_000 if nbytes == 1 else 100)
        negative = packed < 0
        packed = abs(packed)
        hms, micro = packed >> 24, packed & 0xFFFFFF
        return _time_text(negative, (hms >> 12) & 0x3FF, (hms >> 6) & 63, hms & 63, micro,
                          fsp), pos + size

    return read


def _time1(data: bytes, pos: int) -> tuple[str, int]:
    v = _from(data[pos:pos + 3], "little", signed=True)
    negative, v = v < 0, abs(v)
    return _time_text(negative, v // 10000, v // 100 % 100, v % 100, 0, 0), pos + 3


def _bit_reader(nbytes: int) -> Reader:
    def read(data: bytes, pos: int) -> tuple[int, int]:
        return _from(data[pos:pos + nbytes], "big"), pos + nbytes
    return read


def _length_prefixed(size: int, finish: Callable[[bytes], Any]) -> Reader:
    """A value preceded by its length in ``size`` little-endian bytes."""
    if size == 1:
        def read1(data: bytes, pos: int) -> tuple[Any, int]:
            end = pos + 1 + data[pos]
            return finish(data[pos + 1:end]), end
        return read1

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        start = pos + size
        end = start + _from(data[pos:start], "little")
        return finish(data[start:end]), end
    return read


def _base64(raw: bytes) -> str:
    return _b64(raw).decode("ascii")


def _text_decoder(encoding: str | None) -> Callable[[bytes], str]:
    name = encoding or "utf8"
    try:
        codecs.lookup(name)
    except LookupError:
        name = "utf8"  # a charset Python lacks: best effort rather than a stop
    if name in ("utf8", "utf-8"):
        return lambda raw: raw.decode("utf-8", "surrogateescape")
    return lambda raw: raw.decode(name, "replace")


def _json_text(decode: Callable[[bytes], str]) -> Callable[[bytes], Any]:
    """MariaDB's JSON is LONGTEXT with a json_valid check: the text as written
    (parsing it would round numbers through float), once it is known to be JSON."""
    def finish(raw: bytes) -> Any:
        text = decode(raw)
        try:
            json.loads(text)
        except ValueError:
            return text  # the check can be dropped: invalid text stays a string
        return RawJSON(text)
    return finish


def jsonable(value: Any) -> Any:
    """MySQL binary JSON as the library parses it (bytes keys and strings,
    Decimal, dates) -> plain JSON values."""
    if isinstance(value, dict):
        return {(k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else str(k)):
                jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, Decimal):
        # A DECIMAL inside binary JSON: the number with every digit, not a string.
        return RawJSON(str(value)) if value.is_finite() else str(value)
    if isinstance(value, datetime | date | dtime):
        return value.isoformat()
    return value


def _mysql_json(raw: bytes) -> Any:
    if not raw:
        return None
    return jsonable(parse_json(raw[0], raw[1:]))


def _enum_reader(size: int, labels: list[str] | None) -> Reader:
    names = list(labels or [])

    def read(data: bytes, pos: int) -> tuple[Any, int]:
        index = _from(data[pos:pos + size], "little")
        return (names[index] if index < len(names) else index), pos + size
    return read


def _set_reader(size: int, labels: list[str] | None) -> Reader:
    names = list(labels or [])

    def read(data: bytes, pos: int) -> tuple[list[str], int]:
        mask = _from(data[pos:pos + size], "little")
        return [n for i, n in enumerate(names) if mask >> i & 1], pos + size
    return read


def _is_binary(column: Column) -> bool:
    return getattr(column, "character_set_name", None) == "binary"


def reader_for(column: Column, *, is_json_text: bool = False, where: str = "") -> Reader:
    """The reader for one column as the library parsed it from a TABLE_MAP event
    (with binlog_row_metadata=FULL: names, signedness, charsets, ENUM/SET labels)."""
    t = column.type
    unsigned = bool(getattr(column, "unsigned", False))
    if t == FIELD_TYPE.TINY:
        return _tiny(unsigned)
    if t == FIELD_TYPE.SHORT:
        return _fixed("<H" if unsigned else "<h")
    if t == FIELD_TYPE.INT24:
        return _int24(unsigned)
    if t == FIELD_TYPE.LONG:
        return _fixed("<I" if unsigned else "<i")
    if t == FIELD_TYPE.LONGLONG:
        return _fixed("<Q" if unsigned else "<q")
    if t == FIELD_TYPE.YEAR:
        return _year
    if t == FIELD_TYPE.FLOAT:
        return _float
    if t == FIELD_TYPE.DOUBLE:
        return _fixed("<d")
    if t == FIELD_TYPE.NEWDECIMAL:
        return decimal_reader(column.precision, column.decimals)
    if t in (FIELD_TYPE.VARCHAR, FIELD_TYPE.VAR_STRING, FIELD_TYPE.STRING):
        size = 2 if column.max_length > 255 else 1
        if _is_binary(column):
            if t == FIELD_TYPE.STRING:
                # BINARY(n): the binlog drops trailing zero bytes; SELECT returns them.
                width = column.max_length
                return _length_prefixed(size, lambda raw: _base64(raw.ljust(width, b"\0")))
            return _length_prefixed(size, _base64)
        return _length_prefixed(size, _text_decoder(column.character_set_name))
    if t == FIELD_TYPE.BLOB:
        if _is_binary(column):
            return _length_prefixed(column.length_size, _base64)
        decode = _text_decoder(column.character_set_name)
        return _length_prefixed(column.length_size,
                                _json_text(decode) if is_json_text else decode)
    if t == FIELD_TYPE.JSON:
        return _length_prefixed(column.length_size, _mysql_json)
    if t == FIELD_TYPE.GEOMETRY:
        return _length_prefixed(column.length_size, _base64)
    if t == FIELD_TYPE.ENUM:
        return _enum_reader(column.size, column.enum_values)
    if t == FIELD_TYPE.SET:
        return _set_reader(column.size, column.set_values)
    if t == FIELD_TYPE.BIT:
        return _bit_reader(column.bytes)
    if t == FIELD_TYPE.DATE:
        return _date
    if t == FIELD_TYPE.DATETIME2:
        return datetime2_reader(column.fsp)
    if t == FIELD_TYPE.DATETIME:
        return _datetime1
    if t == FIELD_TYPE.TIMESTAMP2:
        return timestamp2_reader(column.fsp)
    if t == FIELD_TYPE.TIMESTAMP:
        return _timestamp1
    if t == FIELD_TYPE.TIME2:
        return time2_reader(column.fsp)
    if t == FIELD_TYPE.TIME:
        return _time1
    raise SetupError(
        f"column {where or column.name!s} has binlog type {t}, which this source cannot "
        f"decode (e.g. the DECIMAL format of MySQL before 5.0): rebuild the table with "
        f"ALTER TABLE ... FORCE so it uses the current formats"
    )


# -- inlined decoding --------------------------------------------------------------
# The commonest column types are decoded by statements pasted into a per-table
# function (tables.compile_decoder) instead of a call each. A snippet reads the value
# at `pos` from `data` into `{v}` and advances `pos`; it may use the names below.

INLINE_NAMESPACE: dict[str, Any] = {
    "_h": struct.Struct("<h").unpack_from, "_H": struct.Struct("<H").unpack_from,
    "_i": struct.Struct("<i").unpack_from, "_I": struct.Struct("<I").unpack_from,
    "_q": struct.Struct("<q").unpack_from, "_Q": struct.Struct("<Q").unpack_from,
    "_d": struct.Struct("<d").unpack_from,
}
_UTF8 = "data[{start}:end].decode('utf-8', 'surrogateescape')"


def inline_snippet(column: Column) -> str | None:
    """Statements decoding ``column`` in place, or None to call its reader."""
    t = column.type
    unsigned = bool(getattr(column, "unsigned", False))
    fixed = {FIELD_TYPE.SHORT: ("_H" if unsigned else "_h", 2),
             FIELD_TYPE.LONG: ("_I" if unsigned else "_i", 4),
             FIELD_TYPE.LONGLONG: ("_Q" if unsigned else "_q", 8),
             FIELD_TYPE.DOUBLE: ("_d", 8)}
    if t in fixed:
        fn, size = fixed[t]
        return f"{{v}} = {fn}(data, pos)[0]; pos += {size}"
    if t == FIELD_TYPE.TINY and unsigned:
        return "{v} = data[pos]; pos += 1"
    text = t in (FIELD_TYPE.VARCHAR, FIELD_TYPE.VAR_STRING, FIELD_TYPE.STRING)
    encoding = getattr(column, "character_set_name", None)
    if text and encoding in ("utf8", "utf-8", "utf8mb4", "utf8mb3") and not _is_binary(column):
        if column.max_length > 255:
            return ("end = pos + 2 + data[pos] + (data[pos + 1] << 8); {v} = "
                    + _UTF8.format(start="pos + 2") + "; pos = end")
        return "end = pos + 1 + data[pos]; {v} = " + _UTF8.format(start="pos + 1") + "; pos = end"
    return None

"""PostgreSQL values, as pgoutput sends them in text format, to JSON-ready values.

The replication connection pins the settings that shape text output (DateStyle
ISO, IntervalStyle iso_8601, TimeZone UTC, bytea_output hex; see
``replication.OUTPUT_SETTINGS``), so each converter here parses one known form.

A converter takes the value's text and returns what goes into the payload; None
in place of a converter means "the text itself", which keeps text columns (the
commonest) free of a function call. Types without a converter, built-in or not,
arrive as their PostgreSQL text.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from dbevents.values import RawJSON

Converter = Callable[[str], Any]

# Built-in type OIDs (pg_type.dat; stable across PostgreSQL versions).
BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
JSON, XML, FLOAT4, FLOAT8, MONEY = 114, 142, 700, 701, 790
BPCHAR, VARCHAR, DATE, TIME, TIMESTAMP, TIMESTAMPTZ = 1042, 1043, 1082, 1083, 1114, 1184
INTERVAL, TIMETZ, NUMERIC, UUID, JSONB = 1186, 1266, 1700, 2950, 3802


def to_int(text: str) -> int:
    return int(text)


def to_bool(text: str) -> bool:
    return text == "t"


def to_float(text: str) -> float | str:
    # JSON has no NaN or infinities: 'NaN', 'Infinity' and '-Infinity' stay strings.
    return text if text[-1] in "Ny" else float(text)


def to_json(text: str) -> RawJSON:
    # As the server wrote it: json.loads would round numbers through float.
    return RawJSON(text)


def to_bytea(text: str) -> str:
    """base64 of the bytes; the hex form (\\x0a0b) or, defensively, the escape form."""
    raw = bytes.fromhex(text[2:]) if text.startswith("\\x") else _unescape_bytea(text)
    return base64.b64encode(raw).decode("ascii")


def _unescape_bytea(text: str) -> bytes:
    out = bytearray()
    data = text.encode("latin-1", "surrogateescape")
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c == 0x5C:  # backslash: \\ or \ooo
            if data[i + 1] == 0x5C:
                out.append(0x5C)
                i += 2
            else:
                out.append(int(data[i + 1:i + 4], 8))
                i += 4
        else:
            out.append(c)
            i += 1
    return bytes(out)


def _zone(text: str) -> str:
    # PostgreSQL writes a whole-hour offset as "+02"; ISO 8601 wants "+02:00".
    if text[-3] in "+-":
        return text + ":00"
    return text


def to_timestamp(text: str) -> str:
    """'2024-01-02 03:04:05.5' -> '2024-01-02T03:04:05.5'. 'infinity', '-infinity'
    and BC dates ('0044-03-15 12:00:00 BC') have no ISO 8601 form and stay as
    PostgreSQL writes them."""
    if text[-1] in "yC":
        return text
    return text.replace(" ", "T", 1)


def to_timestamptz(text: str) -> str:
    """'2024-01-02 03:04:05.5+00' -> '2024-01-02T03:04:05.5+00:00' (always UTC)."""
    if text[-3] == "+" and text[10] == " ":  # the common case, spelled out: every row
        return f"{text[:10]}T{text[11:]}:00"
    if text[-1] in "yC":
        return text
    return _zone(text.replace(" ", "T", 1))


def to_timetz(text: str) -> str:
    return _zone(text)


SCALARS: dict[int, Converter | None] = {
    BOOL: to_bool,
    BYTEA: to_bytea,
    CHAR: None,
    NAME: None,
    INT8: to_int,
    INT2: to_int,
    INT4: to_int,
    OID: to_int,
    TEXT: None,
    JSON: to_json,
    XML: None,
    FLOAT4: to_float,
    FLOAT8: to_float,
    MONEY: None,  # formatted by lc_monetary: not a number a receiver could trust
    BPCHAR: None,  # blank-padded to its length, as PostgreSQL stores it
    VARCHAR: None,
    DATE: None,  # already ISO 8601 (or 'infinity')
    TIME: None,
    TIMESTAMP: to_timestamp,
    TIMESTAMPTZ: to_timestamptz,
    INTERVAL: None,  # ISO 8601 duration under IntervalStyle iso_8601, e.g. P1DT2H
    TIMETZ: to_timetz,
    NUMERIC: None,  # exact: a string, never a float
    UUID: None,
    JSONB: to_json,
}

# Expressions that pgoutput.compile_row writes into its generated row readers in
# place of a call, for converters that run for every row of a busy table (a
# Python call costs more than the conversion). ``{b}`` is the value's bytes,
# ``{t}`` its text, ``{f}`` the converter itself (for the uncommon forms).
INLINE: dict[Converter, str] = {
    to_int: "int({b})",
    to_bool: "({b} == b't')",
    to_json: "RawJSON({t})",
    to_float: "({t} if {t}[-1] in 'Ny' else float({t}))",
    to_timestamp: "({t} if {t}[-1] in 'yC' else {t}.replace(' ', 'T', 1))",
    to_timestamptz: "(f'{{{t}[:10]}}T{{{t}[11:]}}:00' if {t}[-3] == '+' and {t}[10] == ' '"
                    " else {f}({t}))",
}

# Built-in array types -> element type (pg_type.typarray of the above).
BUILTIN_ARRAYS: dict[int, int] = {
    1000: BOOL, 1001: BYTEA, 1002: CHAR, 1003: NAME, 1016: INT8, 1005: INT2, 1007: INT4,
    1028: OID, 1009: TEXT, 199: JSON, 143: XML, 1021: FLOAT4, 1022: FLOAT8, 791: MONEY,
    1014: BPCHAR, 1015: VARCHAR, 1182: DATE, 1183: TIME, 1115: TIMESTAMP,
    1185: TIMESTAMPTZ, 1187: INTERVAL, 1270: TIMETZ, 1231: NUMERIC, 2951: UUID,
    3807: JSONB,
}


# -- arrays ------------------------------------------------------------------------


def parse_array(text: str, delim: str = ",") -> list[Any]:
    """A PostgreSQL array literal to nested lists of element texts (None for NULL).

    Handles quoting and backslash escapes, multiple dimensions and the
    '[0:1]={...}' prefix PostgreSQL writes when a lower bound is not 1.
    """
    if text.startswith("["):
        text = text[text.index("=") + 1:]
    return _parse_level(text, 0, delim)[0]


def _parse_level(text: str, pos: int, delim: str) -> tuple[list[Any], int]:
    if text[pos] != "{":
        raise ValueError(f"malformed array literal at {pos}: {text!r}")
    pos += 1
    out: list[Any] = []
    n = len(text)
    if text[pos] == "}":
        return out, pos + 1
    while pos < n:
        c = text[pos]
        if c == "{":
            sub, pos = _parse_level(text, pos, delim)
            out.append(sub)
        elif c == '"':
            pos += 1
            buf: list[str] = []
            while True:
                end = text.find('"', pos)
                if end < 0:
                    raise ValueError(f"unterminated quoted element: {text!r}")
                chunk = text[pos:end]
                if "\\" in chunk:
                    # Take everything up to the first backslash, then the escaped char.
                    slash = text.index("\\", pos)
                    buf.append(text[pos:slash])
                    buf.append(text[slash + 1])
                    pos = slash + 2
                    continue
                buf.append(chunk)
                pos = end + 1
                break
            out.append("".join(buf))
        else:
            end = pos
            while text[end] != delim and text[end] != "}":
                end += 1
            item = text[pos:end].strip()
            out.append(None if item.upper() == "NULL" else item)
            pos = end
        c = text[pos]
        if c == delim:
            pos += 1
        elif c == "}":
            return out, pos + 1
        else:
            raise ValueError(f"malformed array literal at {pos}: {text!r}")
    raise ValueError(f"unterminated array literal: {text!r}")


def array_converter(element: Converter | None, delim: str = ",") -> Converter:
    def convert_items(items: list[Any]) -> list[Any]:
        return [
            convert_items(v) if isinstance(v, list)
            else (v if v is None or element is None else element(v))
            for v in items
        ]

    def convert(text: str) -> list[Any]:
        return convert_items(parse_array(text, delim))

    return convert


# -- the registry ------------------------------------------------------------------


@attrs.frozen
class TypeInfo:
    """A row of pg_type, as far as converting values needs it."""

    oid: int
    typtype: str  # b base, d domain, e enum, c composite, r range, m multirange, p pseudo
    category: str  # typcategory: A for arrays
    element: int  # typelem (arrays), else 0
    base: int  # typbasetype (domains), else 0
    delim: str = ","


class TypeRegistry:
    """Converters by type OID: the built-ins above, plus types looked up in the
    catalog (domains take their base type's converter, arrays their element's,
    enums and everything else stay text)."""

    def __init__(self) -> None:
        self._converters: dict[int, Converter | None] = dict(SCALARS)
        for array, element in BUILTIN_ARRAYS.items():
            self._converters[array] = array_converter(SCALARS[element])
        self._infos: dict[int, TypeInfo] = {}
        self._waiting: set[int] = set()

    def converter(self, oid: int) -> Converter | None:
        return self._converters.get(oid)

    def unknown(self, oids: Iterable[int]) -> set[int]:
        """OIDs worth a catalog look-up: neither built in nor looked up yet."""
        return {oid for oid in oids if oid not in self._converters and oid not in self._infos}

    def learn(self, infos: Iterable[TypeInfo]) -> set[int]:
        """Record looked-up types; return the OIDs they depend on (an array's
        element, a domain's base) that still need a look-up. Until those arrive the
        dependent types convert to text."""
        fresh = []
        for info in infos:
            self._infos[info.oid] = info
            fresh.append(info.oid)
        missing: set[int] = set()
        for oid in [*fresh, *self._waiting]:
            self._resolve(oid, missing, 0)
        return missing

    def _resolve(self, oid: int, missing: set[int], depth: int) -> bool:
        if oid in self._converters:
            return True
        info = self._infos.get(oid)
        if info is None or depth > 8:
            missing.add(oid)
            return False
        array = info.category == "A" and info.element != 0
        dep = info.element if array else (info.base if info.typtype == "d" else 0)
        if dep and not self._resolve(dep, missing, depth + 1):
            self._waiting.add(oid)
            return False
        if array:
            self._converters[oid] = array_converter(self._converters[dep], info.delim)
        elif dep:
            self._converters[oid] = self._converters[dep]
        else:
            self._converters[oid] = None  # enums, composites, ranges, ...: their text
        self._waiting.discard(oid)
        return True

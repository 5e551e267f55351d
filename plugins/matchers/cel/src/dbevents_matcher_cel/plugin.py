"""The `condition` trigger key: a CEL expression over the changed row.

Compiled and type-checked once, when the config loads (an Options validator),
so a syntax or type error is a config error at ``triggers[N].condition`` that
names the trigger and the column. At run time a change is kept only when the
condition gives ``true``; an evaluation error (a missing key, a string compared
to a number) raises, and the core then drops the change for that trigger with a
rate-limited warning naming the trigger and the error. A change with no row
(TRUNCATE) whose condition cannot be judged just does not match.

Variables: ``doc`` and ``old`` (maps; ``{}`` when the change has none), ``op``
("insert", "update", "delete", "truncate"), ``table`` and ``db`` (the
``[databases.NAME]`` the change came from).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from cel_expr_python import cel
from cel_expr_python.ext.ext_strings import ExtStrings
from dbevents import Change, RawJSON, hookimpl

_T = cel.Type
_ROW = _T.Map(_T.STRING, _T.DYN)
VARIABLES: Mapping[str, Any] = {"doc": _ROW, "old": _ROW, "op": _T.STRING,
                                "table": _T.STRING, "db": _T.STRING}
# One environment for every condition: declared variables make a typo (`dco.x`)
# or a type error (`op > 1`) a compile error; ExtStrings adds lowerAscii(),
# split(), replace() and friends to the standard string functions.
_ENV = cel.NewEnv(variables=VARIABLES, extensions=[ExtStrings()])
_WHERE = re.compile(r"<input>:(\d+):(\d+): ([^\n]*)((?:\n \|[^\n]*)*)")
_EMPTY: dict[str, Any] = {}


class ConditionError(ValueError):
    """A condition could not be judged for one change."""


def compile_condition(source: str) -> Any:
    """The compiled expression; ValueError naming the column when it is wrong."""
    if not source.strip():
        raise ValueError("is empty; write an expression such as doc.amount > 100, "
                         "or leave the key out")
    try:
        expr = _ENV.compile(source)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(_describe(str(exc), source)) from None
    result = expr.return_type()
    if not (result == _T.BOOL or result == _T.DYN):
        raise ValueError(f"must give a bool (true keeps the change), but gives "
                         f"{result.name().lower()}: {source}")
    return expr


def _describe(message: str, source: str) -> str:
    """The library's first error, as 'column C' (or 'line L, column C') with a caret."""
    found = _WHERE.search(message)
    if found is None:
        return f"not a valid CEL expression: {message.strip()}"
    line, col, what, snippet = found.groups()
    where = f"column {col}" if line == "1" and "\n" not in source else \
        f"line {line}, column {col}"
    what = re.sub(r" \[INVALID_ARGUMENT\]$", "", what)
    snippet = re.sub(r" \[INVALID_ARGUMENT\]$", "", snippet)
    return f"CEL error at {where}: {what}{snippet}"


def _check(inst: CelOptions, attribute: attrs.Attribute[Any], value: str | None) -> None:
    # The compiled expression lives on the Options instance (one per trigger),
    # so the shared matcher keeps no per-trigger state and compiles nothing.
    object.__setattr__(inst, "_expr", None if value is None else compile_condition(value))


@attrs.frozen(slots=False)
class CelOptions:
    # A CEL expression; the trigger takes a change only when it gives true.
    condition: str | None = attrs.field(default=None, validator=_check)


def _plain(value: Any) -> Any:
    """A JSON column as CEL maps and lists (numbers as int or double)."""
    if type(value) is RawJSON:
        return json.loads(value.text)
    return value


def _row(doc: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if doc is None:
        return _EMPTY
    # Most rows carry no JSON column: hand them over as they are, uncopied.
    for v in doc.values():
        if type(v) is RawJSON:
            return {k: _plain(v) for k, v in doc.items()}
    return doc


def variables(change: Change) -> dict[str, Any]:
    """What a condition sees of ``change``."""
    return {"doc": _row(change.doc), "old": _row(change.extra.get("old")),
            "op": change.operation.value, "table": change.table, "db": change.database}


class CelCondition:
    """Keeps a change for a trigger when the trigger's `condition` gives true."""

    Options = CelOptions

    def matches(self, change: Change, options: CelOptions) -> bool:
        expr = getattr(options, "_expr", None)
        if expr is None:
            return True
        out = expr.eval(data=variables(change))
        if out.type() == _T.ERROR:  # errors come back as values, not raised
            if change.doc is None:
                # A TRUNCATE has no row to judge: expected, not worth a warning.
                return False
            raise ConditionError(f"{out.value()} (condition: {options.condition})")
        value = out.value()
        if value is True or value is False:
            return value
        raise ConditionError(f"gave {value!r}, not a bool (condition: {options.condition})")


@hookimpl
def register_matchers(register: Callable[[str, Any], None]) -> None:
    register("cel", CelCondition)

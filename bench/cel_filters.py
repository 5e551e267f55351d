"""CEL libraries for row filters: which is correct, and what a filter costs per change.

    uv run python bench/cel_filters.py                     # every installed candidate
    uv run python bench/cel_filters.py --rows 20000 --rounds 5

Candidates (measured only when installed; this bench installs nothing):

    uv pip install cel-expr-python common-expression-language cel-python

For each candidate: first a table of expressions with the answer the CEL
specification gives (comparisons, &&/||, `in`, string functions, a missing key,
null, a JSON column as a map), then the same filters over the same rows, rounds
interleaved with "no filter" (the conversion a matcher must do anyway is not
done there) so a neighbour's load hits them alike. Per candidate: changes/s and
µs per change, best and median round. The plugin (dbevents-matcher-cel) uses the
library that passes the table and is fastest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

ERROR = "error"
Vars = dict[str, Any]
Compiled = Callable[[Vars], Any]


def plain(value: Any) -> Any:
    """JSON-ready row values (RawJSON parsed, Decimal as float) for a CEL library."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, Decimal):
        return float(value)
    if type(value).__name__ == "RawJSON":
        return plain(value.value)
    return value


class RawJSON:
    """What dbevents hands over for a JSON column (dbevents.RawJSON's interface)."""

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def value(self) -> Any:
        return json.loads(self.text, parse_float=Decimal)


def _cel_expr_python() -> Callable[[str], Compiled]:
    from cel_expr_python import cel

    t = cel.Type
    dyn_map = t.Map(t.STRING, t.DYN)
    env = cel.NewEnv(variables={"doc": dyn_map, "old": dyn_map, "op": t.STRING,
                                "table": t.STRING, "db": t.STRING})

    def compile_(src: str) -> Compiled:
        expr = env.compile(src)

        def run(v: Vars) -> Any:
            out = expr.eval(data=v)
            if out.type() == t.ERROR:  # errors come back as values, not raised
                raise ValueError(out.value())
            return out.value()
        return run
    return compile_


def _common_expression_language() -> Callable[[str], Compiled]:
    import cel

    def compile_(src: str) -> Compiled:
        prog = cel.compile(src)
        return prog.execute
    return compile_


def _cel_python() -> Callable[[str], Compiled]:
    import celpy

    env = celpy.Environment()

    def compile_(src: str) -> Compiled:
        prog = env.program(env.compile(src))

        def run(v: Vars) -> Any:
            out = prog.evaluate({k: celpy.json_to_cel(x) for k, x in v.items()})
            if isinstance(out, celpy.CELEvalError):
                raise ValueError(out)
            return bool(out) if isinstance(out, celpy.celtypes.BoolType) else out
        return run
    return compile_


CANDIDATES: dict[str, Callable[[], Callable[[str], Compiled]]] = {
    "cel-expr-python": _cel_expr_python,
    "common-expression-language": _common_expression_language,
    "cel-python": _cel_python,
}

ROW = {"id": 7, "amount": 150, "price": 99.5, "status": "paid", "email": "ann@example.com",
       "name": "Ann", "tags": ["vip", "new"], "note": None,
       "payload": RawJSON('{"amount": 2.5, "items": [1, 2]}')}
OLD = {"id": 7, "amount": 150, "status": "draft"}
VARS = {"doc": ROW, "old": OLD, "op": "update", "table": "orders", "db": "shop"}

# (expression, expected answer under the CEL spec); ERROR: evaluation must fail.
TABLE: list[tuple[str, Any]] = [
    ("doc.amount > 100", True),
    ("doc.price > 100", False),                       # double against int
    ("doc.price < 100 && doc.amount >= 150", True),
    ("doc.amount > 100 && old.status != doc.status", True),
    ("op == 'insert' || op == 'update'", True),
    ("doc.status in ['paid', 'shipped']", True),
    ("'vip' in doc.tags", True),
    ("size(doc.tags) == 2", True),
    ("doc.email.endsWith('@example.com')", True),
    ("doc.name.startsWith('A') && doc.email.contains('@')", True),
    ("doc.email.matches('^[a-z]+@')", True),
    ("doc.note == null", True),
    ("has(doc.missing)", False),
    ("has(doc.missing) && doc.missing > 1", False),   # short-circuit guards the error
    ("doc.missing > 1", ERROR),
    ("doc.status > 1", ERROR),                        # no string/int overload
    ("doc.status > 1 || true", True),                 # errors absorbed by ||
    ("doc.payload.amount > 1", True),                 # JSON column as a map
    ("doc.payload.items.size() == 2", True),
    ("table == 'orders' && db == 'shop'", True),
    ("doc.amount + 1 == 151", True),
    ("int(doc.price) == 99", True),
]

# The example: one filter per change, as one trigger with a condition.
FILTERS = ["doc.amount > 100 && old.status != doc.status"]


def check(compile_: Callable[[str], Compiled]) -> list[str]:
    """The rows of TABLE the candidate gets wrong."""
    wrong = []
    variables = {k: plain(v) for k, v in VARS.items()}
    for src, want in TABLE:
        try:
            got: Any = compile_(src)(variables)
        except Exception:
            got = ERROR
        if got != want or type(got) is not type(want):
            wrong.append(f"{src}: got {got!r}, want {want!r}")
    return wrong


def rows(n: int) -> list[Vars]:
    out = []
    for i in range(n):
        doc = {"id": i, "amount": i % 300, "price": i * 0.5, "email": f"u{i}@example.com",
               "status": ("paid", "draft", "shipped")[i % 3], "note": None,
               "payload": RawJSON(f'{{"amount": {i % 5}.5, "items": [{i}]}}')}
        old = {"id": i, "status": "draft"}
        out.append({"doc": doc, "old": old, "op": "update", "table": "orders", "db": "shop"})
    return out


def run(compiled: list[Compiled] | None, data: list[Vars]) -> float:
    """Seconds to judge every row (None: no filter, every change is kept)."""
    start = time.perf_counter()
    kept = 0
    if compiled is None:
        for _ in data:
            kept += 1
    else:
        for v in data:
            variables = {k: plain(x) for k, x in v.items()}
            for prog in compiled:
                with contextlib.suppress(Exception):  # an error: not kept
                    kept += prog(variables) is True
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--filter", action="append", help="a condition (repeatable); "
                        f"default: {FILTERS[0]}")
    args = parser.parse_args()
    filters = args.filter or FILTERS
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; "
          f"{len(filters)} filter(s) per change, {args.rows} changes per round")
    compiled: dict[str, list[Compiled] | None] = {"no filter": None}
    for name, make in CANDIDATES.items():
        try:
            compile_ = make()
        except ImportError:
            print(f"{name}: not installed, skipped")
            continue
        wrong = check(compile_)
        print(f"{name}: {len(TABLE) - len(wrong)}/{len(TABLE)} of the table right")
        for w in wrong:
            print(f"    {w}")
        compiled[name] = [compile_(f) for f in filters]
    data = rows(args.rows)
    times: dict[str, list[float]] = {name: [] for name in compiled}
    names = list(compiled)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(run(compiled[name], data))
    print(f"{'':<28}{'changes/s':>12}{'µs/change':>11}{'median µs':>11}  (best round)")
    for name, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        print(f"{name:<28}{args.rows / best:>12,.0f}{best / args.rows * 1e6:>11.2f}"
              f"{med / args.rows * 1e6:>11.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")


if __name__ == "__main__":
    main()

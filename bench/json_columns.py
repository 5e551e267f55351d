"""Cost of a JSON column per row: decoding it and writing it into the payload.

    uv run python bench/json_columns.py [--rows 200000] [--rounds 3]

Compares, in the same run and interleaved, the two ways a json/jsonb value can
travel from the decoder into the CloudEvents payload:

- parsed: ``json.loads`` of the column text, then the payload encoder writes the
  Python value (numbers rounded through float: what dbevents did before RawJSON);
- raw: ``RawJSON(text)``, embedded by the payload encoder as written.

Prints rows/s for each (best of the rounds) and the ratio raw/parsed.
"""

from __future__ import annotations

import argparse
import json
import time

from dbevents.envelope import dumps
from dbevents.values import RawJSON

DOC = ('{"sku": "A-1042", "qty": 3, "price": 1299.95, "tags": ["new", "sale"], '
       '"shipping": {"method": "express", "cost": 12.5, "eta_days": 2}, '
       '"discount": 0.15, "notes": null, "gift": false}')


def run(rows: int, raw: bool) -> float:
    texts = [DOC] * rows
    started = time.perf_counter()
    for i, text in enumerate(texts):
        value = RawJSON(text) if raw else json.loads(text)
        dumps({"id": i, "customer": "customer-7", "doc": value})
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    best = {"parsed": 0.0, "raw": 0.0}
    for r in range(args.rounds):
        for name in ("parsed", "raw") if r % 2 == 0 else ("raw", "parsed"):
            rate = run(args.rows, raw=name == "raw")
            best[name] = max(best[name], rate)
            print(f"round {r + 1}: {name:<6} {rate:>10,.0f} rows/s", flush=True)
    print(f"best: parsed {best['parsed']:,.0f} rows/s, raw {best['raw']:,.0f} rows/s, "
          f"raw/parsed {best['raw'] / best['parsed']:.2f}")


if __name__ == "__main__":
    main()

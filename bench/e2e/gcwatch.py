"""`python -m bench.e2e.gcwatch ARGS` runs `dbevents ARGS` exactly as
`python -m dbevents.cli` does, and writes every pause of Python's cyclic garbage
collector to $BENCH_GC_LOG (wall-clock end, generation, milliseconds), so the
latency scenario can tell whether its slowest changes met a GC pause."""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Any


def _install(path: str) -> None:
    out = open(path, "a", buffering=1)  # noqa: SIM115 -- open for the process's life
    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            out.write(f"{time.time():.6f} {info['generation']} "
                      f"{(time.perf_counter() - started[0]) * 1000:.3f}\n")

    gc.callbacks.append(callback)


def main() -> None:
    path = os.environ.get("BENCH_GC_LOG")
    if path:
        _install(path)
    from dbevents.cli import main as dbevents_main

    dbevents_main(sys.argv[1:])


if __name__ == "__main__":
    main()

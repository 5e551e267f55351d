"""End-to-end benchmarks: a private database -> `dbevents run` (its own process,
SQLite store) -> an aiohttp receiver (its own process), each figure next to a
ceiling measured in the same run."""

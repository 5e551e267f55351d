"""Naming a dbevents command in a message so that it works where the user is."""

from __future__ import annotations

import os
from collections.abc import Mapping


def command(args: str = "", environ: Mapping[str, str] | None = None) -> str:
    """``dbevents ARGS`` as the user would type it here: ``uv run dbevents ARGS``
    when this process was started by ``uv run`` (uv sets ``UV`` to its own path
    for the commands it runs), where a bare ``dbevents`` is usually not on PATH."""
    env = os.environ if environ is None else environ
    prefix = "uv run dbevents" if env.get("UV") else "dbevents"
    return f"{prefix} {args}".rstrip()

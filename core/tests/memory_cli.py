"""`dbevents` with the in-memory plugins, as a separate process for signal tests.
Not a test module: test_signals.py runs it."""

import sys

from dbevents.cli import build
from dbevents.testing import database, isolated_plugins

if __name__ == "__main__":
    plugins = isolated_plugins()
    db = database("db")
    for i in range(int(sys.argv[1])):
        db.commit(("users", "insert", str(i), {"id": i}))
    build(plugins).main(args=sys.argv[2:], obj=plugins, prog_name="dbevents")

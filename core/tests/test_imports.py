"""The boundary between the core and its plugins, read from the source (ast):
the core imports no plugin, and a plugin imports from `dbevents` only the modules
docs/plugins.md declares public, so the core can change its internals freely."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORE_SRC = REPO / "core" / "src"


def modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def plugin_srcs() -> list[Path]:
    # plugins/<kind>/<name>/src, and plugins/<name>/src for a plugin of its own kind.
    return sorted({*REPO.glob("plugins/*/*/src"), *REPO.glob("plugins/*/src")})


def imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, absolute module, names taken from it) for every import statement."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]


def core_modules() -> set[str]:
    out = set()
    for path in modules(CORE_SRC / "dbevents"):
        parts = path.relative_to(CORE_SRC).with_suffix("").parts
        out.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def declared_public() -> set[str]:
    """The modules named in docs/plugins.md's "Import only from ..." paragraph."""
    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    [paragraph] = [p for p in text.split("\n\n") if "Import only from" in p]
    return set(re.findall(r"`(dbevents(?:\.\w+)*)`", paragraph.split("Import only from")[1]))


def is_private(module: str) -> bool:
    return any(part.startswith("_") for part in module.split("."))


def test_the_docs_declare_the_public_modules() -> None:
    public = declared_public()
    assert {"dbevents", "dbevents.protocols", "dbevents.values"} <= public
    assert public <= core_modules(), "the docs name a module the core does not have"


def test_the_core_imports_no_plugin() -> None:
    found = modules(CORE_SRC)
    assert len(found) > 10
    bad = [f"{path.relative_to(REPO)}:{line}: {module}"
           for path in found for line, module, _ in imports(path)
           if module.split(".")[0].startswith("dbevents_")]
    assert bad == []


def test_plugins_import_only_the_public_core() -> None:
    public, internal = declared_public(), core_modules()
    srcs = plugin_srcs()
    assert len(srcs) >= 6  # the sources, sinks and stores are all looked at
    bad = []
    for src in srcs:
        for path in modules(src):
            for line, module, names in imports(path):
                if module != "dbevents" and not module.startswith("dbevents."):
                    continue
                # `from dbevents import engine` reaches a module as surely as
                # `import dbevents.engine`: check the names that are modules too.
                reached = [module] + [f"{module}.{n}" for n in names
                                      if f"{module}.{n}" in internal]
                for target in reached:
                    if target not in public or is_private(target):
                        bad.append(f"{path.relative_to(REPO)}:{line}: {target}")
    assert bad == []

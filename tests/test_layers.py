"""The packages' layering (issue 19): no package reaches into another's private modules or names, and
methods/ and metrics/ import nothing from bench/ (the runner sits on top of them, never under)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "methods", "metrics")
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imports(source: str) -> list[tuple[str, str | None]]:
    """(module, name) of every absolute import in `source`; name is None for `import module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, a.name) for a in node.names]
    return found


def crossings(own: str, source: str) -> list[str]:
    """Imports in `source`, a file of package `own`, that break the layering: another package's private
    module or name, or bench/ from below."""
    bad = []
    for module, name in imports(source):
        top = module.split(".")[0]
        if top not in PACKAGES or top == own:
            continue
        if top == "bench":
            bad.append(f"{module} (bench/ sits on top of {own}/)")
        elif any(part.startswith("_") for part in module.split(".")) or (name or "").startswith("_"):
            bad.append(f"{module}{'.' + name if name else ''} (private to {top}/)")
    return bad


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_crosses_a_layer(path):
    assert crossings(path.relative_to(ROOT).parts[0], path.read_text()) == []


def test_the_check_sees_each_kind_of_crossing():
    source = "from metrics._sweep import pixel_sweep\nfrom metrics.batching import _x\nimport metrics.sweep\nimport bench.run\n"
    assert crossings("bench", source) == ["metrics._sweep.pixel_sweep (private to metrics/)",
                                          "metrics.batching._x (private to metrics/)"]
    assert crossings("methods", source)[-1] == "bench.run (bench/ sits on top of methods/)"
    assert crossings("metrics", source) == ["bench.run (bench/ sits on top of metrics/)"]

"""The house rules of docs/ARCHITECTURE.md, checked on the source: districts import one way, no import circles,
model/ and layer/ hold no kernel, config/ and accounting/ need no torch, modules stay readable in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "moelab"
# Each district may import from the districts listed for it (and from itself); the rank order of docs/ARCHITECTURE.md.
ALLOWED = {
    "config": set(),
    "data": {"config"},
    "accounting": {"config"},
    "layer": {"config"},
    "model": {"layer", "config"},
    "parallel": {"model", "layer", "config"},
    "inference": {"model", "layer", "config"},
    "hf": {"inference", "model", "layer", "config", "data"},
    "runs": {"hf", "inference", "model", "layer", "config", "data"},
    "analysis": {"runs", "inference", "model", "layer", "config", "data", "accounting"},
    "training": {"analysis", "runs", "hf", "inference", "parallel", "model", "layer", "config", "data"},
    "serve": {"runs", "inference", "model", "layer", "config", "data", "analysis", "accounting"},
    "cli": None,  # the top: anything; nothing imports it
}
TOP_LEVEL = {"__init__", "__main__", "generate", "rundir"}  # the package's public names and re-exports
MAX_LINES = 420


def _modules() -> dict[str, Path]:  # noqa: D103
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(path: Path) -> set[str]:
    """Every moelab module this file imports, at module level or inside functions (type-checking-only imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("moelab"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            found.update(subs)  # `from pkg import submodule` depends on the submodule
            if len(subs) < len(node.names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("moelab"))
    return found


def _district(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moelab"


MODULES = _modules()
GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_every_module_is_in_a_district():
    stray = [m for m in MODULES if m != "moelab" and _district(m) not in ALLOWED and m.split(".")[1] not in TOP_LEVEL]
    assert not stray, f"modules outside the districts: {stray}"


@pytest.mark.parametrize("district", [d for d, allowed in ALLOWED.items() if allowed is not None])
def test_imports_point_one_way(district):
    wrong = sorted(f"{m} -> {i}" for m, deps in GRAPH.items() if _district(m) == district for i in deps
                   if _district(i) not in ALLOWED[district] | {district} and i != "moelab")
    assert not wrong, f"{district}/ imports what it may not: {wrong}"


def test_nothing_imports_the_cli():
    assert not [m for m, deps in GRAPH.items() if _district(m) != "cli" and any(_district(i) == "cli" for i in deps)
                and m != "moelab.__main__"]


def test_no_import_circle():
    """Depth-first search over the module graph (package __init__ re-exports included)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(GRAPH):
        if m not in state:
            circle = visit(m)
            assert circle is None, " -> ".join(circle)


def test_no_module_is_too_long_to_read_in_one_sitting():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_checks_see_a_planted_violation(tmp_path):
    """The graph walk finds an import inside a function (how a kernel call would sneak into model/)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from moelab.inference import native\n")
    assert "moelab.inference.native" in _imports(f)

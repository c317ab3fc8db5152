"""The rooms of chromobatch and the one direction data flows between them (docs/architecture.md).

cli -> service / registry / review / report -> ml / training / karyotype / intake / synth -> store -> the
bottom (the package root, errors, config, files, csvio, faults). A module may import its own layer or a
lower one, never a higher one, and no import (lazy ones included) may close a cycle, between packages or
between modules.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "chromobatch"
BOTTOM = {"", "errors", "config", "files", "csvio", "faults"}
LAYERS = {"store": 1, "intake": 2, "ml": 2, "training": 2, "karyotype": 2, "synth": 2, "segment": 2,
          "service": 3, "registry": 3, "review": 3, "report": 3, "web": 3, "cli": 4}


def room(module: str) -> str:
    """chromobatch.ml.predict -> ml; chromobatch.errors -> errors; chromobatch -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def rank(name: str) -> int:
    return 0 if name in BOTTOM else LAYERS[name]


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Every chromobatch module this file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] == "chromobatch":
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_room_is_known_and_says_what_it_holds() -> None:
    for path in sorted(PKG.glob("*/__init__.py")):
        name = path.parent.name
        if name in ("data", "migrations"):
            continue
        assert name in LAYERS, f"chromobatch/{name}/ is not a known room: add it to LAYERS and docs/architecture.md"
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert doc.startswith(f"{name}:") and "May import" in doc, f"{path}: docstring must say what it holds"


def test_no_upward_import() -> None:
    wrong = []
    for mod, deps in graph().items():
        for dep in deps:
            if dep == "chromobatch.cli.main" and mod.startswith("chromobatch.cli"):
                continue
            if rank(room(dep)) > rank(room(mod)):
                wrong.append(f"{mod} imports {dep} ({room(mod) or 'root'} is below {room(dep)})")
    assert not wrong, "imports against the data flow:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    edges = graph()
    rooms: dict[str, set[str]] = defaultdict(set)
    for mod, deps in edges.items():
        for dep in deps:
            if room(dep) != room(mod):
                rooms[room(mod)].add(room(dep))
    assert cycles(dict(rooms)) == [], "packages that import each other"
    assert cycles(edges) == [], "modules that import each other"


def test_the_checks_catch_what_they_are_for() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert rank(room("chromobatch.store.db")) < rank(room("chromobatch.ml.predict")) < rank(
        room("chromobatch.service.watch")) < rank(room("chromobatch.cli.main"))
    assert "chromobatch.store.db" in imports(PKG / "store" / "jobs.py", set(modules()))

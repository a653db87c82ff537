"""The package's shape, read from its source: no import that runs back up, models that import only their base and
the ops, no file a reader cannot hold (DESIGN.md's layout; README "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

KILN = Path(__file__).resolve().parent.parent / "kiln"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(KILN.rglob("*.py")):
        parts = p.relative_to(KILN.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _type_checking(node) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    """The kiln modules `name` imports anywhere in its file (module level or inside functions; not under
    `if TYPE_CHECKING:`, which never runs). `from pkg import sub` names the submodule, not the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name in mods)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([child.module] if child.module else []))
                subs = {f"{base}.{a.name}" for a in child.names} & mods.keys()
                out.update(subs)
                if len(subs) < len(child.names) and base in mods:
                    out.add(base)
            visit(child)

    visit(ast.parse(path.read_text()))
    out.discard(name)
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
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
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_the_import_graph_finds_a_cycle_it_is_shown(tmp_path):
    """The walker itself: a cycle through a function-level import is found, a TYPE_CHECKING one is not."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\n"
                                   "def g():\n    import a\n")
    mods = {m: tmp_path / f"{m}.py" for m in "abc"}
    edges = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert edges == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    assert _cycles({m: _imports(m, p, mods) for m, p in mods.items()}) == []


def test_no_import_runs_back_up():
    """No kiln module imports (at import time or inside a function) one that imports it back, directly or
    through others: every module sits above the ones it uses."""
    mods = _modules()
    edges = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert "kiln.generate" in edges["kiln.engine"] or "kiln.decoder" in edges["kiln.engine"]  # the walk sees imports
    assert _cycles(edges) == []


def test_models_import_only_their_base_and_the_ops():
    """A model file reads like the paper: it imports models/base.py, the ops, and a family it extends."""
    mods = _modules()
    for name, path in mods.items():
        if name.startswith("kiln.models.") and name != "kiln.models.base":
            used = _imports(name, path, mods)
            assert all(m == "kiln.models.base" or m == "kiln.ops" or m.startswith("kiln.ops.")
                       or (m.startswith("kiln.models.") and m != "kiln.models") for m in used), (name, used)


def test_no_file_is_longer_than_a_reader_holds():
    long = {str(p.relative_to(KILN.parent)): n for p in KILN.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}

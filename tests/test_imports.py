"""The package's import structure: every module imports on its own, and no module imports (even lazily, inside a
function) one that imports it back (DESIGN §15)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"alphatoken": ROOT / "alphatoken", "alphatoken.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package (kernels/ is installed as alphatoken.kernels)."""
    out = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if prefix == "alphatoken" and rel[0] == "kernels":
                continue
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            out[".".join((prefix, *parts))] = path
    return out


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package modules `name` imports anywhere in its file (top level, functions, lazy __getattr__)."""
    pkg = _package(name, path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import submodule` imports the submodule; any other name comes from `base` itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycle(graph: dict[str, set]) -> list:
    """One import cycle of `graph` as a list of names, or [] if it has none."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_import_graph_is_acyclic():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # a module's own package __init__ runs before it: the package's lazy imports of its modules are not a cycle
    # through the parent, so only edges the modules spell out themselves are counted
    assert len(graph) > 40
    cycle = _cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_every_module_imports_in_isolation():
    """Each module imported into an interpreter holding no other module of the package (torch stays loaded)."""
    names = [n for n in _modules() if n != "alphatoken.cli.__main__"]
    script = (
        "import sys, importlib, torch\n"
        f"names = {names!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for key in [k for k in sys.modules if k == 'alphatoken' or k.startswith('alphatoken.')]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    run = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, cwd="/", timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr

"""The layout a newcomer relies on: every ``idmbench`` module imports on its own (a fresh interpreter each,
so no module works only because another was imported first), no import cycle among ``idmbench`` modules
(deferred imports inside functions count: a cycle held together by a deferred import is still a cycle),
files of one job (over ~400 lines only when the docstring says the file is one cohesive thing), and the
README's "Layout" section matches the tree."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PKG = REPO / "idmbench"
MAX_LINES = 400


def module_files() -> dict[str, Path]:
    """``idmbench.x.y`` -> file, for every module of the package (``__main__`` modules excluded: importing
    one runs a program)."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``module -> {idmbench modules it imports}``: every ``import`` statement anywhere in the file (module
    level or inside functions), except under ``if TYPE_CHECKING:``. ``from pkg import name`` counts as an
    import of ``pkg.name`` when that is a module, else of ``pkg``."""
    edges: dict[str, set[str]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if _in_type_checking(node, parents):
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                names = []
                for a in node.names:
                    full = f"{base_name}.{a.name}"
                    names.append(full if full in modules else base_name)
            else:
                continue
            for n in names:
                # the longest idmbench module the name refers to
                parts = n.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                if parts and parts[0] == "idmbench" and ".".join(parts) != mod:
                    targets.add(".".join(parts))
        edges[mod] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_deferred_cycle(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from idmbench import b\n")
    b.write_text("def f():\n    from . import a\n")
    mods = {"idmbench.a": a, "idmbench.b": b}
    assert cycles(import_edges(mods)) == [["idmbench.a", "idmbench.b"]]
    b.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    assert cycles(import_edges(mods)) == []


def test_no_import_cycle_among_idmbench_modules():
    found = cycles(import_edges(module_files()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


_ISOLATED = r"""
import importlib, json, os, sys, traceback
# third-party packages first (the expensive part, shared through fork); no idmbench module is loaded here
for dep in ("torch", "numpy", "monai", "pandas", "matplotlib", "rich", "codecarbon"):
    try:
        importlib.import_module(dep)
    except Exception:
        pass
assert not [m for m in sys.modules if m == "idmbench" or m.startswith("idmbench.")]
failures = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc(limit=3).encode()[-1500:])
            code = 1
        os._exit(code)
    os.close(w)
    msg = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        msg += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failures[name] = msg.decode(errors="replace")
print(json.dumps(failures))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork to import each module in a fresh process")
def test_every_module_imports_on_its_own():
    """Each module in a process of its own that has loaded no other idmbench module (forked from one that
    loaded only the third-party packages, so this takes seconds, not minutes)."""
    names = sorted(module_files())
    r = subprocess.run([sys.executable, "-c", _ISOLATED, json.dumps(names)], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    failures = json.loads(r.stdout.strip().splitlines()[-1])
    by_error: dict[str, list[str]] = {}
    for name, tb in failures.items():  # one line per distinct error, naming the modules it stops
        by_error.setdefault(tb.strip().splitlines()[-1], []).append(name)
    assert not failures, "\n".join(f"{err}: {', '.join(mods)}" for err, mods in by_error.items())


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_files_hold_one_job():
    """No file in idmbench/ over ~400 lines unless its docstring says it is one cohesive thing."""
    long = {str(f.relative_to(REPO)): n for f in PKG.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_LINES and "cohesive" not in _docstring(f).lower()}
    assert not long, f"files over {MAX_LINES} lines without a docstring saying why they are one cohesive thing: {long}"


def _layout_paths() -> list[str]:
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Layout\s*\n+```[^\n]*\n(.*?)\n```", text, flags=re.S | re.M)
    assert m, "README.md has no '## Layout' section with a code block"
    return [line.split()[0] for line in m.group(1).splitlines() if line.strip() and not line.startswith(" ")]


def test_readme_layout_matches_the_tree():
    listed = _layout_paths()
    missing = [p for p in listed if not (REPO / p).exists()]
    assert not missing, f"README Layout lists paths that do not exist: {missing}"
    # every module and sub-package of idmbench/ is named, so a newcomer finds where a thing lives
    entries = sorted(
        (f"idmbench/{p.name}/" if p.is_dir() else f"idmbench/{p.name}")
        for p in PKG.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"))
    )
    named = [e for e in entries if not any(lp.rstrip("/") == e.rstrip("/") for lp in listed)]
    assert not named, f"README Layout does not name: {named}"

"""The house rules of the code's layout: utils.py is the method, lore/ holds the rest by concern,
imports run one way (lore never imports utils, no cycle among lore's modules), every file stays
readable in one sitting, and every `utils.NAME` the scripts, tools and docs use exists."""

import ast
import glob
import os
import re

from conftest import REPO

import utils


def lore_modules():
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "lore", "*.py"))
                  if not p.endswith("__init__.py"))


def imports_of(path):
    """The top-level modules and lore submodules a file imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "lore":
                found |= {f"lore.{alias.name}" for alias in node.names}
    return found


def test_lore_never_imports_utils_and_has_no_cycle():
    graph = {}
    for name in lore_modules():
        deps = imports_of(os.path.join(REPO, "lore", f"{name}.py"))
        assert "utils" not in deps, f"lore/{name}.py imports utils: imports must run utils -> lore only"
        graph[name] = {d.split(".")[1] for d in deps if d.startswith("lore.")}
    order, state = [], {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        state[node] = "done"
        order.append(node)
    for node in graph:
        visit(node, [])
    assert sorted(order) == lore_modules()


def test_file_sizes():
    assert sum(1 for _ in open(os.path.join(REPO, "utils.py"))) <= 1500
    for path in glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, REPO)
        if rel.startswith(("tests", ".venv")) or "/." in rel or rel == "utils.py":   # utils.py: <= 1500 above
            continue
        assert sum(1 for _ in open(path)) <= 900, f"{rel} is over 900 lines: split it by concern"


def used_utils_names():
    """Every utils.NAME written in the scripts, tools, benchmarks and docs."""
    files = [p for pattern in ("*/*.py", "README.md", "docs/*.md") for p in glob.glob(os.path.join(REPO, pattern))
             if not os.path.relpath(p, REPO).startswith(("tests", "lore", ".venv"))]
    names = set()
    for path in files:
        names |= set(re.findall(r"\butils\.([A-Za-z_][A-Za-z0-9_]*)", open(path).read()))
    return names - {"py"}   # "utils.py", the file's name in prose


def test_every_name_in_use_is_reachable_as_utils_name():
    names = used_utils_names()
    assert len(names) > 50   # the scan found the scripts and docs
    missing = sorted(n for n in names if not hasattr(utils, n))
    assert not missing, f"used in the scripts or docs as utils.NAME but missing from utils: {missing}"


def test_the_registry_lists_every_method_once_by_name():
    assert list(utils.METHODS) == sorted(utils.METHODS)
    assert {"lore", "lore_regularized", "pal", "vpl"} <= set(utils.METHODS)
    assert all(cls.name == name for name, cls in utils.METHODS.items())

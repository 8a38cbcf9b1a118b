"""The house rules of the code's layout: utils.py is the method, lore/ holds the rest by concern,
imports run one way (lore never imports utils, no cycle among lore's modules), every file stays
readable in one sitting, and every `utils.NAME` the scripts, tools and docs use exists."""

import ast
import glob
import importlib
import os
import re

import pytest

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


def lore_graph():
    """{module: the lore modules it imports}."""
    return {name: {d.split(".")[1] for d in imports_of(os.path.join(REPO, "lore", f"{name}.py"))
                   if d.startswith("lore.")} for name in lore_modules()}


def test_lore_never_imports_utils_and_has_no_cycle():
    for name in lore_modules():
        deps = imports_of(os.path.join(REPO, "lore", f"{name}.py"))
        assert "utils" not in deps, f"lore/{name}.py imports utils: imports must run utils -> lore only"
    graph = lore_graph()
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
        if rel == "utils.py" or rel.startswith(("tests", ".venv")) or "/." in rel:
            continue
        assert sum(1 for _ in open(path)) <= 900, f"{rel} is over 900 lines: split it by concern"


def used_utils_names():
    """Every utils.NAME written in the scripts, tools, benchmarks and docs."""
    files = [p for pattern in ("*/*.py", "README.md", "docs/*.md") for p in glob.glob(os.path.join(REPO, pattern))
             if not os.path.relpath(p, REPO).startswith(("tests", "lore", ".venv"))]
    names = set()
    for path in files:
        names |= set(re.findall(r"\butils\.([A-Za-z_][A-Za-z0-9_]*)", open(path).read()))
    return names - {"py", "NAME"}   # "utils.py" and "utils.NAME" in prose


def test_every_name_in_use_is_reachable_as_utils_name():
    names = used_utils_names()
    assert len(names) > 50   # the scan found the scripts and docs
    missing = sorted(n for n in names if not hasattr(utils, n))
    assert not missing, f"used in the scripts or docs as utils.NAME but missing from utils: {missing}"


def test_the_registry_lists_every_method_once_by_name():
    assert list(utils.METHODS) == sorted(utils.METHODS)
    assert {"lore", "lore_regularized", "pal", "vpl"} <= set(utils.METHODS)
    assert all(cls.name == name for name, cls in utils.METHODS.items())


def test_the_docs_table_of_names_is_true():
    """docs/method.md's "Where each name lives": every name listed is in that module and in utils."""
    text = open(os.path.join(REPO, "docs", "method.md")).read()
    rows = re.findall(r"^\| `((?:utils|lore\.\w+))` \| (.*) \|$", text, re.M)
    assert len(rows) >= 10
    for module, names in rows:
        for name in re.findall(r"`(\w+)`", names):
            assert hasattr(importlib.import_module(module), name), f"docs/method.md: {module}.{name} does not exist"
            assert hasattr(utils, name), f"docs/method.md: {name} is not re-exported as utils.{name}"


@pytest.mark.parametrize("page, pattern", [("lore/__init__.py", r"^    (\w+) .*?-> ?(.*)$"),
                                           ("README.md", r"^  (\w+)\.py .*?-> ?(.*)$")])
def test_the_drawn_layout_is_the_real_one(page, pattern):
    """The module lists of lore/__init__.py and the README: every module, each with its real imports."""
    drawn = {name: {d.strip() for d in deps.split(",") if d.strip() not in ("", "(none)")}
             for name, deps in re.findall(pattern, open(os.path.join(REPO, page)).read(), re.M)}
    assert drawn == lore_graph(), f"{page} draws another layout than the imports"

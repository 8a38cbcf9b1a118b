"""The house rules of the code's layout: utils.py is the method, lore/ holds the rest by concern,
imports run one way (lore never imports utils, no cycle among lore's modules), one door for each
name (a name is imported from the module that defines it, once; utils exports the method, not
lore's names; no private name crosses a module), the registry does not depend on what was imported
first, and every file stays readable in one sitting."""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

from lore.methods import METHODS

PROJECT_PY = sorted(p for p in glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True)
                    if not os.path.relpath(p, REPO).startswith((".", "shared")) and "/." not in p)
MAX_FOREIGN_IN_UTILS = 40   # names utils.py imports from lore (what it uses; none is passed on)


def lore_modules():
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "lore", "*.py"))
                  if not p.endswith("__init__.py"))


def tree_of(path):
    return ast.parse(open(path).read(), path)


def imports_of(path):
    """The top-level modules and lore submodules a file imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(tree_of(path)):
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


def top_level_names(path):
    """The names a module defines itself (def, class, assignment at its top level)."""
    names = set()
    for node in tree_of(path).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def project_module(name):
    return name == "utils" or name == "lore" or name.startswith("lore.")


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


def test_no_name_is_imported_twice():
    """In every file: a (module, name) imported once, one `from M import` per project module M, and a lore
    module either imported as a module (`from lore import cli`) or its names taken, not both."""
    for path in PROJECT_PY:
        rel, seen, froms, as_module = os.path.relpath(path, REPO), set(), {}, set()
        for node in tree_of(path).body:
            if isinstance(node, ast.ImportFrom) and node.module and project_module(node.module):
                assert node.module not in froms, f"{rel}: two `from {node.module} import` lines ({froms[node.module]}, {node.lineno})"
                froms[node.module] = node.lineno
                for alias in node.names:
                    key = (node.module, alias.name)
                    assert key not in seen, f"{rel}:{node.lineno}: {alias.name} of {node.module} imported twice"
                    seen.add(key)
                    if node.module == "lore":
                        as_module.add(alias.name)
        both = sorted(m for m in as_module if f"lore.{m}" in froms)
        assert not both, f"{rel}: imports lore.{both[0]} both as a module and by its names"


def test_utils_exports_the_method_not_lores_names():
    """utils imports at most MAX_FOREIGN_IN_UTILS names from lore, all of them used by utils itself,
    and nothing in the project reaches a lore name through utils (utils.NAME for a NAME utils does
    not define)."""
    path = os.path.join(REPO, "utils.py")
    tree = tree_of(path)
    foreign = [a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module
               and n.module.startswith("lore") for a in n.names]
    assert len(foreign) <= MAX_FOREIGN_IN_UTILS, f"utils.py imports {len(foreign)} names from lore"
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
           {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    assert not sorted(set(foreign) - used), f"utils.py imports names it does not use: {sorted(set(foreign) - used)}"
    own = top_level_names(path)
    files = PROJECT_PY + [os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "docs", "*.md"))
    for f in files:
        text = open(f).read()
        through = sorted(set(re.findall(r"(?<![\w.])utils\.([A-Za-z_]\w*)", text)) - own - {"py", "NAME"})
        assert not through, f"{os.path.relpath(f, REPO)} reaches {through} through utils: import them from lore"
        if f.endswith(".py") and f != path:
            for node in ast.walk(tree_of(f)):
                if isinstance(node, ast.ImportFrom) and node.module == "utils":
                    bad = [a.name for a in node.names if a.name not in own]
                    assert not bad, f"{os.path.relpath(f, REPO)}: `from utils import {bad[0]}`: import it from lore"


def test_no_private_name_crosses_a_module():
    for path in PROJECT_PY:
        rel, modules = os.path.relpath(path, REPO), set()
        tree = tree_of(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and project_module(node.module):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{rel}: imports the private {private[0]} from {node.module}"
                if node.module == "lore":
                    modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                modules |= {(a.asname or a.name).split(".")[0] for a in node.names if project_module(a.name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in modules:
                    raise AssertionError(f"{rel}:{node.lineno}: uses the private {node.attr} of another module")


def test_the_registry_does_not_depend_on_what_was_imported_first():
    """A fresh process that imports one lore module and nothing else sees the same METHODS, and pca
    (which fits new users with LoRe's few-shot model) fits without utils imported first."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import torch; import lore.pca as pca\n"
            "from lore.methods import METHODS; from lore.pairs import Pairs\n"
            "assert 'utils' not in sys.modules\n"
            "torch.manual_seed(0); X = torch.randn(40, 6); user = torch.arange(4).repeat_interleave(10)\n"
            "m = METHODS['pca'](2, fewshot_iters=5); U = m.fit(Pairs(user, 4, X=X))\n"
            "print(tuple(U.shape), ' '.join(f'{n}={c.__module__}.{c.__name__}' for n, c in METHODS.items()))\n")
    out = subprocess.run([sys.executable, "-c", code, REPO], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = " ".join(f"{n}={c.__module__}.{c.__name__}" for n, c in METHODS.items())
    assert out.stdout.strip() == f"(4, 2) {expected}"


def test_the_registry_lists_every_method_once_by_name():
    assert list(METHODS) == ["lore", "lore_regularized", "pal", "pca", "vpl"]
    assert all(cls.name == name for name, cls in METHODS.items())


def test_file_sizes():
    assert sum(1 for _ in open(os.path.join(REPO, "utils.py"))) <= 1000
    for path in PROJECT_PY:
        rel = os.path.relpath(path, REPO)
        if rel == "utils.py" or rel.startswith("tests"):
            continue
        assert sum(1 for _ in open(path)) <= 900, f"{rel} is over 900 lines: split it by concern"


@pytest.mark.parametrize("page, pattern", [("lore/__init__.py", r"^    (\w+) .*?-> ?(.*)$"),
                                           ("README.md", r"^  (\w+)\.py .*?-> ?(.*)$")])
def test_the_drawn_layout_is_the_real_one(page, pattern):
    """The module lists of lore/__init__.py and the README: every module, each with its real imports."""
    drawn = {name: {d.strip() for d in deps.split(",") if d.strip() not in ("", "(none)")}
             for name, deps in re.findall(pattern, open(os.path.join(REPO, page)).read(), re.M)}
    assert drawn == lore_graph(), f"{page} draws another layout than the imports"

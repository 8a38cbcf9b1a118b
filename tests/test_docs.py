"""The manual cannot drift from the code: every ```python block of README.md and docs/*.md runs here,
a page's blocks in order in one namespace, in a folder where PersonalLLM/data is a tiny synthetic
prepared dataset (the path the snippets name). Every relative link of the docs resolves. Every table
of measured numbers carries a marker (tools/tables.py), and every generated table equals its JSON."""

import glob
import os
import re

import pytest

from conftest import REPO, load_script

from lore.methods import METHODS

tables = load_script(os.path.join(REPO, "tools", "tables.py"), "docs_tables")

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))


def python_blocks(page):
    return re.findall(r"```python\n(.*?)```", open(os.path.join(REPO, page)).read(), re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with PersonalLLM/data prepared by prepare.py --synthetic at a tiny size."""
    root = tmp_path_factory.mktemp("docs")
    prepare = load_script(os.path.join(REPO, "PersonalLLM", "prepare.py"), "docs_prepare")
    prepare.main(prepare.parse_args(["--synthetic", "--out", str(root / "PersonalLLM" / "data"),
                                     "--prompts-train", "300", "--prompts-test", "60", "--features", "16",
                                     "--n-users", "40", "--n-unseen", "20", "--train-frac", "0.1",
                                     "--pool-frac", "0.1"]))
    return root


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_snippets_run(page, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace, registered = {"__name__": f"snippets of {page}"}, set(METHODS)
    try:
        for i, block in enumerate(python_blocks(page)):
            try:
                exec(compile(block, f"{page} python block {i + 1}", "exec"), namespace)
            except Exception as e:   # name the page and block, not only the line inside it
                raise AssertionError(f"{page}, python block {i + 1} fails: {type(e).__name__}: {e}") from e
    finally:   # a page's own methods do not outlive it
        for name in set(METHODS) - registered:
            del METHODS[name]


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    text = open(os.path.join(REPO, page)).read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = os.path.normpath(os.path.join(REPO, os.path.dirname(page), target))
        assert os.path.exists(path), f"{page} links to {target}, which does not exist"


def markdown_tables(text):
    """-> [(first line index, [the table's lines])] of a page, indented ones (in a list item) too:
    tools/tables.py generates only unindented tables, so a measured one must not hide in a list."""
    lines, found, i = text.split("\n"), [], 0
    row = lambda line: line.lstrip().startswith("|")
    while i < len(lines):
        if row(lines[i]):
            j = i
            while j < len(lines) and row(lines[j]):
                j += 1
            found.append((i, lines[i:j]))
            i = j
        else:
            i += 1
    return found


MEASURED = re.compile(r"\d\.\d{2,}|\d ?ms\b|\d s\b|\d%|\d ?×|\d\.\d\b")   # a cell with a measured number


@pytest.mark.parametrize("page", PAGES)
def test_tables_are_marked_and_match_their_json(page):
    text = open(os.path.join(REPO, page)).read()
    lines = text.split("\n")
    for i, table in markdown_tables(text):
        if any(MEASURED.search(line) for line in table[2:]):
            assert i > 0 and tables.MARKER.match(lines[i - 1]), \
                f"{page}:{i + 1}: a table of measured numbers without a <!-- table: ... --> marker above it"
    assert tables.check_page(page) == []


def test_tables_tool_renders_checks_and_rewrites(tmp_path):
    data = tmp_path / "r.json"
    data.write_text('{"rows": [{"m": "a", "x": 0.12345, "ci": [0.1, 0.2]}, {"m": "b", "x": 0.5, "ci": [0.4, 0.6]}]}')
    spec = f"{data}#rows where m=b | method = {{m}} | x [CI] = {{x:.2f}} [{{ci[0]:.1f}}, {{ci[1]:.1f}}]"
    assert tables.render(spec) == ["| method | x [CI] |", "|---|---|", "| b | 0.50 [0.4, 0.6] |"]
    data.write_text('{"rows": [{"m": "c", "x": null, "ci": [0.1, 0.2]}]}')   # a missing value: '-'
    assert tables.render(spec.replace("m=b", "m=c"))[2] == "| c | - [0.1, 0.2] |"
    data.write_text('{"rows": [{"m": "a", "x": 0.12345, "ci": [0.1, 0.2]}, {"m": "b", "x": 0.5, "ci": [0.4, 0.6]}]}')
    page = tmp_path / "page.md"
    page.write_text(f"text\n<!-- table: {spec} -->\n| method | x [CI] |\n|---|---|\n| b | 0.51 [0.4, 0.6] |\nafter\n")
    assert tables.check_page(str(page)) == [f"{page}:3: the table differs from {data}#rows where m=b"]
    tables.check_page(str(page), write=True)
    assert tables.check_page(str(page)) == [] and page.read_text().endswith("| b | 0.50 [0.4, 0.6] |\nafter\n")
    page.write_text("<!-- table: not generated: measured once by hand -->\n| a |\n|---|\n| 0.123 |\n")
    assert tables.check_page(str(page)) == []
    with pytest.raises(ValueError, match="HEADER = TEMPLATE"):
        tables.render(f"{data} | no template here")


def test_tables_tool_groups_rows_by_keys(tmp_path):
    data = tmp_path / "r.json"
    data.write_text('[{"m": "a", "s": "r", "n": 1, "x": 0.1}, {"m": "a", "s": "r", "n": 5, "x": 0.2},'
                    ' {"m": "a", "s": "q", "n": 1, "x": 0.3}, {"m": "b", "s": "r", "n": 1, "x": 0.4},'
                    ' {"m": "a", "s": "q", "n": 5, "x": 0.5}]')
    spec = f"{data} where m=a by m,s | m, s = {{m}}, {{s}} | {{n[0]}} = {{x[0]:.1f}} | {{n[1]}} = {{x[1]:.1f}}"
    assert tables.render(spec) == ["| m, s | 1 | 5 |", "|---|---|---|", "| a, r | 0.1 | 0.2 |", "| a, q | 0.3 | 0.5 |"]

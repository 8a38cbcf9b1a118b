"""The manual cannot drift from the code: every ```python block of README.md and docs/*.md runs here,
a page's blocks in order in one namespace, in a folder where PersonalLLM/data is a tiny synthetic
prepared dataset (the path the snippets name). Every relative link of the docs resolves."""

import glob
import os
import re

import pytest

from conftest import REPO, load_script

from lore.methods import METHODS

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

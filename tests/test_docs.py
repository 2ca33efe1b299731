"""Every code example of the documentation site runs: doctest over each page of docs/.

Docstrings shown through autodoc are run by ``--doctest-modules`` over the package;
this file runs the ``>>>`` examples written in the ``.rst`` pages themselves, and makes
sure no page hides an example in a block doctest cannot see.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_pages_exist() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    for page in (
        "index.rst",
        "getting_started.rst",
        "transforms.rst",
        "fisher.rst",
        "migrating.rst",
        "architecture.rst",
        "api/core.rst",
        "api/approximations.rst",
    ):
        assert page in names


# pages whose examples need an optional extra: page -> module to import
OPTIONAL = {"laplace.rst": "laplace"}


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_page_examples_run(page: Path) -> None:
    if page.name in OPTIONAL:
        pytest.importorskip(OPTIONAL[page.name], reason=f"{page.name} needs an optional extra")
    text = page.read_text(encoding="utf-8")
    # Python code only as doctests: a code-block would be rendered but never run.
    assert not re.search(r"^\s*\.\. (code-block|code|sourcecode)::\s*python", text, re.MULTILINE), page
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {}, page.name, str(page), 0)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {page}"


def test_readme_python_blocks_run() -> None:
    """The README's Python examples run as written (in one namespace, in order)."""
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "the README has Python examples"
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert "diag" in namespace and "est" in namespace

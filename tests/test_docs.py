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
    # the task page, the gallery and the performance page are one click from the index
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    toctree = index[index.index(".. toctree::") :]
    for page in ("tasks", "gallery", "performance"):
        assert f"\n   {page}\n" in toctree, page
    for page in (
        "index.rst",
        "tasks.rst",
        "gallery.rst",
        "performance.rst",
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


def test_readme_examples_run_and_show_their_outputs() -> None:
    """The README's examples are doctests (``pycon`` blocks, outputs shown) and pass as written."""
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    assert not re.findall(r"```python\n", readme), "README examples are pycon blocks with outputs"
    blocks = re.findall(r"```pycon\n(.*?)```", readme, re.S)
    assert blocks, "the README has examples"
    parser = doctest.DocTestParser()
    globs: dict[str, object] = {}
    for block in blocks:  # one namespace, in order
        test = parser.get_doctest(block, globs, "README.md", "README.md", 0)
        runner = doctest.DocTestRunner(optionflags=FLAGS)
        runner.run(test, clear_globs=False)
        result = runner.summarize(verbose=False)
        assert result.failed == 0, f"{result.failed} of {result.attempted} README examples failed"
        globs = test.globs
    shown = sum(1 for ex in parser.get_examples("".join(blocks)) if ex.want)
    assert shown >= 8, f"the README shows only {shown} outputs"


GALLERY = sorted((DOCS / "gallery").glob("*.py"))


@pytest.mark.parametrize("script", GALLERY, ids=[p.stem for p in GALLERY])
def test_gallery_script_runs_and_draws(script: Path) -> None:
    """Each gallery script is shown on the gallery page, runs, and draws data into a figure."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert f".. plot:: gallery/{script.name}" in (DOCS / "gallery.rst").read_text(encoding="utf-8")
    plt.close("all")
    try:
        exec(compile(script.read_text(encoding="utf-8"), str(script), "exec"), {"__name__": "__gallery__"})
        figs = [plt.figure(n) for n in plt.get_fignums()]
        assert figs, f"{script.name} drew no figure"
        for fig in figs:
            for ax in fig.axes:
                if getattr(ax, "_colorbar", None) is not None:  # a colorbar: its image's axes is checked
                    continue
                data = (
                    [line.get_xydata() for line in ax.lines]
                    + [c.get_offsets() for c in ax.collections]
                    + [im.get_array().ravel() for im in ax.images]
                )
                assert any(len(d) > 1 for d in data), f"{script.name}: an empty axes"
    finally:
        plt.close("all")


def test_performance_page_carries_every_result() -> None:
    """The performance page is generated from benchmarks/RESULTS.md and loses no section or number."""
    import sys

    sys.path.insert(0, str(DOCS))
    try:
        from _results_page import results_to_rst
    finally:
        sys.path.remove(str(DOCS))
    markdown = (DOCS.parent / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    rst = results_to_rst(markdown)
    sections = re.findall(r"<!-- (\w+):start -->", markdown)
    assert len(sections) >= 5
    assert rst.count(".. list-table::") == sum(
        1
        for a, b in zip(markdown.splitlines(), markdown.splitlines()[1:])
        if a.startswith("|") and b.startswith("|---")
    )
    for row in (
        line for line in markdown.splitlines() if line.startswith("|") and not line.startswith("|---")
    ):
        for cell in row.strip().strip("|").split("|"):
            words = re.findall(r"\d[\d.,]*(?:e[+-]\d+)?", cell)
            for w in words:
                assert w in rst, f"{w!r} of {cell.strip()!r} missing from the performance page"
    # the machine, date and versions of every section reach the page
    for stamp in re.findall(r"^\d{4}-\d{2}-\d{2} · .*$", markdown, re.MULTILINE):
        assert stamp in rst
    assert ".. include:: _generated/results.rst" in (DOCS / "performance.rst").read_text(encoding="utf-8")


# The narrowest page layout (furo at 1280 px with both sidebars) shows about 90 characters
# of code; longer lines are clipped behind a scroll bar.
CODE_WIDTH = 88


def _shown_code_lines() -> list[tuple[str, int, str]]:
    """Code lines readers see: doctest lines of the pages and of rendered docstrings, gallery scripts."""
    lines = []
    package = DOCS.parent / "secorder"
    public = [
        p
        for p in package.rglob("*.py")
        if not any(part.startswith("_") for part in p.relative_to(package).parts[:-1])
        and not p.name.startswith("_")
    ]
    for path in [*PAGES, *public, package / "__init__.py"]:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith((">>> ", "... ")):
                lines.append((str(path), i, stripped))
    for path in GALLERY:
        lines += [
            (str(path), i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        ]
    return lines


def test_shown_code_fits_the_page() -> None:
    too_long = [f"{p}:{i} ({len(s)} chars)" for p, i, s in _shown_code_lines() if len(s) > CODE_WIDTH]
    assert not too_long, f"code lines wider than {CODE_WIDTH} characters: {too_long}"


def test_no_object_reprs_in_examples() -> None:
    """Examples print values, not '<... object at 0x...>' (assign the result to _ instead)."""
    for page in PAGES:
        assert " object at " not in page.read_text(encoding="utf-8"), page

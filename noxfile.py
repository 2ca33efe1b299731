"""Developer sessions: ``nox -s tests``, ``demo``, ``lint``, ``docs``, ``benchmarks``.

Every session pins the CPU build of torch (``torch==2.13.0``), which installs from
local disk; an unpinned ``torch`` would pull a multi-GB CUDA build. The package's own
requirement stays a range (pyproject.toml).
"""

from __future__ import annotations

import nox

TORCH = "torch==2.13.0"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, doctests of the package and docs included."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def explore(session: nox.Session) -> None:
    """The property tests with many fresh hypothesis examples (a scheduled or local hunt)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "tests/test_hessian.py",
        "tests/test_sweep_properties.py",
        "tests/test_taylor_ops.py",
        *session.posargs,
        env={"HYPOTHESIS_PROFILE": "explore"},
    )


@nox.session
def demo(session: nox.Session) -> None:
    """A few-second demo on a small model."""
    session.install(TORCH)
    session.install("-e", ".")
    session.run("python", "examples/demo.py")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and mypy."""
    session.install(TORCH)
    session.install("-e", ".[lint]")
    session.run("ruff", "check", "secorder", "tests", "benchmarks", "examples", "docs")
    session.run("ruff", "format", "--check", "secorder", "tests", "benchmarks", "examples", "docs")
    session.run("mypy", "secorder")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (Sphinx: autodoc, napoleon, intersphinx, furo), warnings as errors.

    Its examples are executed by the test suite (tests/test_docs.py and the doctests of
    the package), not here.
    """
    session.install(TORCH)
    session.install("-e", ".[docs]")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Benchmarks against the competitors (optional extra ``bench``); BackPACK runs in its own venv."""
    session.install(TORCH)
    session.install("-e", ".[bench]", "-c", "benchmarks/constraints.txt")
    for script in session.posargs or ["benchmarks/bench_hessian.py"]:
        session.run("python", script)

"""Sphinx configuration: autodoc, napoleon, intersphinx, MathJax, furo, gallery, performance page.

Build (warnings are errors): ``nox -s docs``, or
``python -m sphinx -W --keep-going -b html docs docs/_build/html``.

Intersphinx: each inventory is fetched online first; offline (CI machines, sandboxes)
the small fallback inventories in ``_inventories/`` (written by
``_inventories/make_inventories.py``, listing the objects these pages link to) are
used instead, so the build neither fails nor depends on the network.

Math is rendered in the browser by MathJax (no LaTeX needed at build time).

The gallery's figures are drawn at build time by matplotlib's plot directive, which runs
the scripts in ``gallery/``. The performance page includes ``_generated/results.rst``,
written here from ``benchmarks/RESULTS.md`` (the one source of the numbers) together with
the figures the benchmarks wrote.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import secorder

project = "secorder"
author = "secorder developers"
copyright = "2026, secorder developers"
release = secorder.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "matplotlib.sphinxext.plot_directive",  # figures drawn at build time (gallery, pinn.rst)
]

exclude_patterns = ["_build", "_inventories", "_generated", "gallery/*.py", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path: list[str] = []
html_theme = "furo"
html_title = f"secorder {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", (None, "_inventories/python.inv")),
    "torch": ("https://docs.pytorch.org/docs/stable", (None, "_inventories/torch.inv")),
}
intersphinx_timeout = 5

# Gallery: the plot directive runs each script once per build and shows its figures.
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 100)]
plot_rcparams = {"figure.figsize": (6.4, 3.6)}
plot_apply_rcparams = True

# --- performance page: generated from benchmarks/RESULTS.md (docs/_results_page.py) ----

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _results_page import write_generated  # noqa: E402

write_generated()

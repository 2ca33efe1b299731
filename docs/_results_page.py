"""The performance page's tables and figures, generated from the benchmarks' own output.

``benchmarks/RESULTS.md`` (rewritten section by section by the benchmark scripts) is the
one source of the numbers: :func:`results_to_rst` converts it to reStructuredText at
docs build time (``conf.py`` calls :func:`write_generated`), and the figures the
benchmarks wrote are copied next to it, into ``docs/_generated/`` (not under version
control).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"
# Figures written by the benchmark scripts (never drawn by hand), shown on the performance page.
BENCH_FIGURES = {
    "scale.png": ROOT / "benchmarks" / "scale.png",
    "estimators_error_vs_budget.png": ROOT / "benchmarks" / "figures" / "estimators_error_vs_budget.png",
    "hessian_density.png": ROOT / "benchmarks" / "figures" / "hessian_density.png",
}


def _inline(text: str) -> str:
    """Markdown inline markup to reStructuredText: code spans, and characters rST would parse."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"``{part[1:-1]}``")
        else:
            # characters rST would parse as markup (emphasis, roles, substitutions) stay literal,
            # so that no benchmark's prose can break the docs build
            for ch in ("\\", "*", "`", "|"):
                part = part.replace(ch, "\\" + ch)
            part = re.sub(r"(?<=\w)_(?=\W|$)", r"\_", part)  # a trailing _ would be a link
            out.append(part)
    return "".join(out)


def _table(rows: list[str]) -> list[str]:
    cells = [[_inline(c.strip()) or r"\ " for c in r.strip().strip("|").split("|")] for r in rows]
    header, body = cells[0], [c for c in cells[2:]]
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *body]:
        for i, cell in enumerate(row):
            lines.append(("   * - " if i == 0 else "     - ") + cell)
    return [*lines, ""]


def results_to_rst(markdown: str) -> str:
    """Convert benchmarks/RESULTS.md (headings, paragraphs, pipe tables) to reStructuredText."""
    out: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if (
            line.startswith("<!--")
            or line.startswith("# Benchmark results")
            or line.startswith("Each section")
        ):
            i += 1
        elif line.startswith("### "):
            raw = line[4:].strip()
            # a bare command line as the heading: literal, so "--" stays two hyphens
            title = f"``{raw}``" if re.match(r"bench_\w+\.py", raw) else _inline(raw)
            out += [title, "-" * (len(title) + 4), ""]
            i += 1
        elif line.startswith("#"):
            out += [f"**{_inline(line.lstrip('#').strip())}**", ""]
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            out += _table(rows)
        elif line.strip():
            out += [_inline(line), ""]
            i += 1
        else:
            i += 1
    return "\n".join(out) + "\n"


def write_generated() -> None:
    GENERATED.mkdir(exist_ok=True)
    rst = results_to_rst((ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8"))
    target = GENERATED / "results.rst"
    if not target.exists() or target.read_text(encoding="utf-8") != rst:  # keep Sphinx's cache valid
        target.write_text(rst, encoding="utf-8")
    for name, source in BENCH_FIGURES.items():
        dest = GENERATED / name
        if not dest.exists() or dest.read_bytes() != source.read_bytes():
            shutil.copyfile(source, dest)

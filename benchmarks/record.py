"""Run a benchmark script and record its printed tables in RESULTS.md.

Usage: ``python benchmarks/record.py bench_fisher.py [script arguments]``. The script's
standard output is echoed and written, under a header with the date, machine and torch
version, as the script's own section of ``benchmarks/RESULTS.md`` (replacing the previous
one). Scripts that write their own section (``bench_hessian.py``) need no wrapper.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import _common as C  # noqa: N812 - short alias for the shared helpers


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    script = Path(__file__).resolve().parent / sys.argv[1]
    proc = subprocess.run(
        [sys.executable, str(script), *sys.argv[2:]], capture_output=True, text=True, check=False
    )
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{script.name} failed with exit code {proc.returncode}; RESULTS.md left alone")
    args = " ".join(sys.argv[2:])
    title = f"{script.name} {args}".strip()
    C.write_section(script.stem, C.header(title) + "\n" + proc.stdout.strip() + "\n")


if __name__ == "__main__":
    main()

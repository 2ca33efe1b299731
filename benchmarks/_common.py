"""Shared benchmark utilities: timing with warm-up, machine facts, RESULTS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def timeit(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time in seconds over ``repeat`` runs after ``warmup`` runs, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def header(title: str) -> str:
    today = datetime.date.today().isoformat()
    return f"### {title}\n\n{today} · {machine()} · Python {platform.python_version()}\n"


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def table(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_section(name: str, text: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``text``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text}\n{end}"
    content = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nEach section is rewritten by its script.\n"
    )
    if start in content:
        content = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, content, flags=re.S)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(content)


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss(fn: Callable[[], Any]) -> int | None:
    """Peak resident memory added by one call of ``fn`` in bytes (Linux; None elsewhere).

    The process's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` after
    freed heap memory is handed back (``malloc_trim``), so the figure is the peak of the pages
    the call touched beyond what was resident before it: its live tensors plus allocator
    overhead (CPU only; the result of ``fn`` is kept until the peak is read).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    before = _status_bytes("VmRSS:")
    out = fn()
    peak = _status_bytes("VmHWM:")
    del out
    if before is None or peak is None:
        return None
    return max(0, peak - before)


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"

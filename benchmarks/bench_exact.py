"""Exact curvature on a language model and on ResNet-18: which route runs and what it costs.

Models:

* ``gpt2``: ``tests/_zoo.py`` with ``bench=True`` — Hugging Face GPT-2, vocabulary 256, width 32,
  2 layers, 16 tokens, batch 4, per-token cross-entropy (the ``bench_models.py`` size). An exact
  curvature quantity needs one column per vocabulary entry and position (256 · 16 = 4,096 per
  sample) against P one-hot Hessian-vector products.
* ``resnet18``: torchvision's ResNet-18 layout (``tests/_zoo.py``'s ``ResNet18``, 11.7M
  parameters with a 1,000-way head, here ``--classes`` (default 10) so that a column per class
  stays affordable on a CPU), eval mode, batch 8, 32×32 images.

Each quantity is timed once (no warm-up; these are the slow calls) with the route it took
(``method_info`` for the Hessian diagonal, ``path_info`` for the GGN): for the GGN the default
route of an ``nn.Module`` (per-layer fast path), ``path="generic"`` (per-sample ``torch.func``
columns) and "(engine)", the same model as a plain function ``module_forward(model)[0]``, which
takes the structured sweep over a tape of the whole batch. A call longer than
``--limit`` seconds is stopped and reported as such (run in a subprocess).

Usage: ``PYTHONPATH=. python benchmarks/record.py bench_exact.py [--models gpt2,resnet18]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import _common as C  # noqa: N812 - short alias for the shared helpers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _zoo

import secorder
from secorder.modules import module_forward

warnings.filterwarnings("ignore")
QUANTITIES = [
    "GGN trace", "GGN trace (generic)", "GGN trace (engine)",
    "GGN diagonal", "GGN diagonal (generic)", "GGN diagonal (engine)",
    "H diagonal",
]  # fmt: skip


def _case(name: str, classes: int) -> Any:
    if name == "resnet18":
        return _zoo.resnet18_case(batch=8, img=32, classes=classes)
    return _zoo.build(name, torch.float32, batch=4, bench=True)


def worker(name: str, what: str, classes: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    case = _case(name, classes)
    model, x, y = case.model, case.inputs, case.targets
    f, params = secorder.module_loss(model, _zoo.loss_of(case))
    generic = {"path": "generic"} if what.endswith("(generic)") else {}
    # "(engine)": the model as a plain function, which takes the structured sweep over a tape of
    # the whole batch (engine_output_diagonal) instead of the module's per-layer fast path
    target: Any = module_forward(model)[0] if what.endswith("(engine)") else model
    if what.startswith("GGN trace"):
        fn: Any = secorder.fisher_trace(target, "cross_entropy", **generic)
    elif what.startswith("GGN diagonal"):
        fn = secorder.fisher_diagonal(target, "cross_entropy", **generic)
    else:
        fn = secorder.hessian_diagonal(f)
    t0 = time.perf_counter()
    out = fn(params, x, y)
    sec = time.perf_counter() - t0
    total = out if isinstance(out, torch.Tensor) else sum(v.sum() for v in out.values())
    info = getattr(fn, "method_info", None) or getattr(fn, "path_info", None)
    route = ""
    if info is not None and hasattr(info, "reason"):
        route = f"{info.method}: {info.reason}"
    elif info is not None and hasattr(info, "path"):
        route = info.path + (" (engine sweep)" if what.endswith("(engine)") and info.path == "fast" else "")
    return {
        "seconds": sec,
        "value": float(total),
        "route": route,
        "P": sum(p.numel() for p in params.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,resnet18")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--limit", type=float, default=600.0)
    ap.add_argument("--worker", nargs=2, default=None)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.classes)))
        return
    rows, notes = [], []
    for name in a.models.split(","):
        for what in QUANTITIES:
            cmd = [sys.executable, __file__, "--worker", name, what, "--classes", str(a.classes)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.limit, check=False)
            except subprocess.TimeoutExpired:
                rows.append([name, what, f"> {a.limit:.0f} s", "–", "stopped"])
                continue
            if proc.returncode != 0:
                rows.append([name, what, "fails", "–", "–"])
                notes.append(f"{name} {what}: {proc.stderr.strip().splitlines()[-1][:200]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append([name, what, C.fmt_time(r["seconds"]), f"{r['value']:.6g}", r["route"][:160]])
            print(f"... {name} {what} done", file=sys.stderr, flush=True)
    print(
        "float32, 1 thread, one timed call each (fresh process). gpt2: vocabulary 256, width 32, "
        f"2 layers, 16 tokens, batch 4. resnet18: eval mode, {a.classes} classes, batch 8, 32×32.\n"
    )
    print(C.table(rows, ["model", "quantity", "time", "value", "route"]))
    if notes:
        print("\nNotes:\n")
        print("\n".join(f"* {m}" for m in notes))


if __name__ == "__main__":
    main()

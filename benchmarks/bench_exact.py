"""Exact curvature on language models and ResNet-18: the route ``auto`` takes, the cost model's
estimates behind it, and the time.

Models:

* ``gpt2``: ``tests/_zoo.py`` with ``bench=True`` — Hugging Face GPT-2, vocabulary 256, width 32,
  2 layers, 16 tokens, batch 4, per-token cross-entropy (the ``bench_models.py`` size). An exact
  GGN needs one column per vocabulary entry and position (256 · 16 = 4,096 per sample) against
  P one-hot Hessian-vector products.
* ``gpt2_50k``: the GPT-2 shape of ``bench_memory.py`` (vocabulary 50,257, width 32, 2 layers,
  batch 4 × 64 tokens, 1.6M parameters): every exact route exceeds the default exact budget
  (:func:`secorder.set_exact_budget`), so each cell shows the refusal (taken before any product)
  with the estimates, and the randomized rows show the road the refusal names.
* ``resnet18``: torchvision's ResNet-18 layout (``tests/_zoo.py``'s ``ResNet18``, 11.2M
  parameters with ``--classes`` (default 10) classes), eval mode, batch 8, 32×32 images.

Each quantity is timed once (no warm-up; these are the slow calls) in a fresh process, with the
route it took (``method_info`` for the Hessian, ``path_info`` for the GGN) and the cost model's
estimates in products (``info.cost``: P one-hot HVPs, R sweep column walks, N·R generic VJPs;
:mod:`secorder._cost`). A call longer than ``--limit`` seconds is stopped and reported as such.

Usage: ``PYTHONPATH=. python benchmarks/record.py bench_exact.py [--models gpt2,gpt2_50k,resnet18]``
(``--estimates-only``: the decisions and refusals without the long exact calls).
"""

from __future__ import annotations

import argparse
import json
import re
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
from secorder._cost import ExactBudgetError

warnings.filterwarnings("ignore")
EXACT = ["GGN trace", "GGN trace (generic)", "GGN diagonal", "H diagonal", "H trace (hvp)"]
RANDOMIZED = ["H trace (Hutchinson K=8)", "GGN trace (Hutchinson K=8)", "GGN trace (MC K=8)"]


def _case(name: str, classes: int) -> Any:
    if name == "resnet18":
        return _zoo.resnet18_case(batch=8, img=32, classes=classes)
    if name == "gpt2_50k":
        transformers = _zoo.transformers_or_none()
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64)
        torch.manual_seed(0)
        model = _zoo.LogitsOnly(transformers.GPT2LMHeadModel(cfg), per_token=True).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (4, 64), generator=g)
        targets = torch.randint(0, cfg.vocab_size, (4, 64), generator=g)
        return _zoo.Case(name, model, ids, targets, "cross_entropy")
    return _zoo.build(name, torch.float32, batch=4, bench=True)


def _estimates(text: str) -> str:
    """The cost model's estimates, short: ``sweep 4,096 · hvp 34,176``."""
    found = re.findall(r"(?:estimated |; )([^:;()]+?): ([\d,]+) products", text)
    return " · ".join(f"{name} {count}" for name, count in found)


def worker(name: str, what: str, classes: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    case = _case(name, classes)
    model, x, y = case.model, case.inputs, case.targets
    f, params = secorder.module_loss(model, _zoo.loss_of(case))
    params = {k: v.detach() for k, v in params.items()}
    gen = torch.Generator().manual_seed(0)
    fn: Any
    if what.startswith("GGN trace (Hutchinson"):
        fn = secorder.fisher_trace(model, "cross_entropy", num_probes=8, with_stderr=True)
    elif what.startswith("GGN trace (MC"):
        fn = secorder.fisher_trace(model, "cross_entropy", kind="mc", num_probes=8, with_stderr=True)
    elif what.startswith("H trace (Hutchinson"):
        fn = secorder.hessian_trace(f, num_probes=8, with_stderr=True)
    elif what.startswith("GGN trace"):
        fn = secorder.fisher_trace(
            model, "cross_entropy", **({"path": "generic"} if "generic" in what else {})
        )
    elif what.startswith("GGN diagonal"):
        fn = secorder.fisher_diagonal(model, "cross_entropy")
    elif what == "H diagonal":
        fn = secorder.hessian_diagonal(f)
    else:
        fn = secorder.hessian_trace(f, exact="hvp")
    t0 = time.perf_counter()
    try:
        out = fn(params, x, y, generator=gen)
    except ExactBudgetError as exc:
        return {
            "seconds": time.perf_counter() - t0,
            "value": "–",
            "route": "refused (exact budget)",
            "estimates": _estimates(str(exc).split("For an estimate")[0]),
        }
    sec = time.perf_counter() - t0
    err = None
    if isinstance(out, tuple):
        out, err = out
    total = out if isinstance(out, torch.Tensor) else sum(v.sum() for v in out.values())
    value = f"{float(total):.6g}" + (f" ± {float(err):.2g}" if err is not None else "")
    info = getattr(fn, "method_info", None) or getattr(fn, "path_info", None)
    route = getattr(info, "method", None) or getattr(info, "path", "") or "hutchinson"
    if route == "sweep":
        route += f" (R={info.num_columns:,})"
    return {
        "seconds": sec,
        "value": value,
        "route": route,
        "estimates": _estimates(getattr(info, "cost", "")),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,gpt2_50k,resnet18")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--limit", type=float, default=600.0)
    ap.add_argument("--estimates-only", action="store_true")
    ap.add_argument("--worker", nargs=2, default=None)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.classes)))
        return
    rows, notes = [], []
    budget = secorder.exact_budget()
    for name in a.models.split(","):
        if name.startswith("gpt2") and _zoo.transformers_or_none() is None:
            notes.append(f"{name}: transformers is not installed")
            continue
        cells = EXACT + (RANDOMIZED if name == "gpt2_50k" else [])
        for what in cells:
            if a.estimates_only and name != "gpt2_50k" and what in EXACT:
                continue
            cmd = [sys.executable, __file__, "--worker", name, what, "--classes", str(a.classes)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.limit, check=False)
            except subprocess.TimeoutExpired:
                rows.append([name, what, f"> {a.limit:.0f} s", "–", "stopped", "–"])
                continue
            if proc.returncode != 0:
                rows.append([name, what, "fails", "–", "–", "–"])
                notes.append(f"{name} {what}: {proc.stderr.strip().splitlines()[-1][:200]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append([name, what, C.fmt_time(r["seconds"]), r["value"], r["route"], r["estimates"]])
            print(f"... {name} {what} done", file=sys.stderr, flush=True)
    print(
        "float32, 1 thread, one timed call each (fresh process). gpt2: vocabulary 256, width 32, "
        "2 layers, 16 tokens, batch 4. gpt2_50k: vocabulary 50,257, width 32, 2 layers, 64 tokens, "
        f"batch 4. resnet18: eval mode, {a.classes} classes, batch 8, 32×32. Estimates: the cost "
        "model's products per route (hvp/one_hot: P; sweep/fast: R column walks; generic: N·R "
        f"VJPs); exact budget {budget:,} products.\n"
    )
    print(C.table(rows, ["model", "quantity", "time", "value", "route", "estimated products"]))
    if notes:
        print("\nNotes:\n")
        print("\n".join(f"* {m}" for m in notes))


if __name__ == "__main__":
    main()

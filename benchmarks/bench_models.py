"""Every quantity on real model architectures: secorder against curvlinops and PyHessian.

Models: ``tests/_zoo.py`` with ``bench=True`` (float32, batch 4): Hugging Face GPT-2 (vocabulary
256, width 32, 2 layers, 16 tokens; default ``"sdpa"`` attention) and BERT (same widths, a
``[PAD]`` token per sequence), ``nn.LSTM``/``nn.GRU`` classifiers (width 32, 16 steps),
``nn.MultiheadAttention`` and plain ``F.scaled_dot_product_attention`` (width 32, 16 tokens), a
timm-layout ViT (16×16 images, patch 4, width 32) and a torchvision-layout ResNet (BasicBlocks,
BatchNorm in eval mode, width 16, 16×16 images).

Timed (median of ``--repeats`` after one warm-up, whole calls):

* Hutchinson trace of the Hessian, K = 16 Rademacher probes: ``secorder.hessian_trace(f,
  num_probes=K)`` (default strategy), curvlinops ``hutchinson_trace(HessianLinearOperator, K)``,
  PyHessian ``hessian(...).trace(maxIter=K, tol=float("-inf"))`` (all K probes: its stopping test
  ``abs(mean - trace) / (trace + 1e-6) < tol`` is negative whenever the running mean is, so with
  ``tol=0`` it stopped after 2 probes on every model here, and the table compared 2 of its
  Hessian-vector products with 16 of ours; the run now checks that K samples came back);
* Hutchinson trace of the GGN, K = 16: ``secorder.fisher_trace(model, "cross_entropy",
  num_probes=K)``, curvlinops ``hutchinson_trace(GGNLinearOperator, K)``;
* secorder only: exact GGN trace, exact Hessian diagonal (``hessian_diagonal(f)``, whatever
  ``exact`` route the default takes; one run without warm-up);
* the largest Hessian eigenvalue, in a second table: ``secorder.hessian_eigenvalues(f, k=1,
  tol=1e-3)`` (Lanczos; also with ``certify=False``, without the deflated run) against
  PyHessian's power iteration ``eigenvalues(top_n=1, tol=1e-3)``.
  The two ``tol`` differ in meaning: ours bounds the residual ‖Hx − θx‖ ≤ tol · abs(θ) of the
  returned Ritz pair (and a deflated run certifies that no larger eigenvalue was missed);
  PyHessian stops when the estimate changes by less than tol (relative) between two power
  steps, which can stop far from the eigenvalue, and power iteration finds the eigenvalue of
  largest *magnitude* (a negative one where it dominates). So each side also reports its number
  of Hessian-vector products (counted in a separate, untimed call with the same seed) and the
  relative error of its eigenvalue against a reference: Lanczos with ``tol=1e-10`` on a float64
  copy of the model and data (a residual ≤ 1e-10 · abs(θ) bounds that error by 1e-10; the float32
  Hessian differs from the float64 one by float32 rounding, ~1e-6 relative, the floor of the
  errors shown).

The exact quantities by route (module fast path, ``path="generic"``, the structured sweep) on
GPT-2 and on torchvision's full ResNet-18 are in ``bench_exact.py``.

curvlinops and PyHessian need double backward (and curvlinops' GGN forward mode) through the
model, which PyTorch's fused attention and RNN kernels do not provide: they run under
``sdpa_kernel(SDPBackend.MATH)`` with the MHA fast path off (what secorder does internally),
and fail on the float32 LSTM/GRU (mkldnn kernels) — reported as "fails". Construction of the
curvlinops operators is included in their time (secorder's calls include theirs too).

Usage: ``PYTHONPATH=. python benchmarks/record.py bench_models.py [--repeats 3] [--models gpt2,lstm]
[--tables all|main|eig]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as C  # noqa: N812 - short alias for the shared helpers
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _zoo

import secorder

warnings.filterwarnings("ignore")
K = 16


def _competitor(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return fn()
        finally:
            torch.backends.mha.set_fastpath_enabled(True)

    return run


def _time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float | None, Any, str]:
    try:
        t, out = C.timeit(fn, repeat=repeats, warmup=warmup)
        return t, out, ""
    except Exception as exc:  # report, do not hide: the table says "fails"
        return None, None, f"{type(exc).__name__}: {str(exc)[:120]}"


class _Counted:
    """Count the Hessian-vector products of one call: secorder's ``HessianOperator.matmat`` rows,
    PyHessian's ``hessian_vector_product`` calls (patched for the call, restored after)."""

    def __init__(self) -> None:
        self.n = 0

    def __enter__(self) -> _Counted:
        from secorder.operators import HessianOperator

        self._saved: list[tuple[Any, str, Any]] = [(HessianOperator, "matmat", HessianOperator.matmat)]
        mm = HessianOperator.matmat

        def matmat(op: Any, V: torch.Tensor) -> torch.Tensor:
            self.n += V.shape[0]
            return mm(op, V)

        HessianOperator.matmat = matmat  # type: ignore[method-assign]
        ph = sys.modules.get("pyhessian.hessian")
        if ph is not None:
            hvp = ph.hessian_vector_product
            self._saved.append((ph, "hessian_vector_product", hvp))

            def counted(*a: Any) -> Any:
                self.n += 1
                return hvp(*a)

            ph.hessian_vector_product = counted
        return self

    def __exit__(self, *exc: object) -> None:
        for obj, attr, value in self._saved:
            setattr(obj, attr, value)


def _reference_top_eigenvalue(case: Any) -> float:
    """λ_max by Lanczos with tol=1e-10 on a float64 copy of the model and data."""
    model = copy.deepcopy(case.model).double()
    x = case.inputs.double() if case.inputs.is_floating_point() else case.inputs
    f, params = secorder.module_loss(model, _zoo.loss_of(case))
    gen = torch.Generator().manual_seed(1)
    return float(secorder.hessian_eigenvalues(f, k=1, tol=1e-10)(params, x, case.targets, generator=gen)[0])


def bench(name: str, repeats: int, tables: str) -> tuple[list[str] | None, list[str] | None, list[str]]:
    case = _zoo.build(name, torch.float32, batch=4, bench=True)
    model, x, y = case.model, case.inputs, case.targets
    f, params = secorder.module_loss(model, _zoo.loss_of(case))
    P = sum(p.numel() for p in params.values())
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    crit = nn.CrossEntropyLoss()
    plist = [p for p in model.parameters() if p.requires_grad]
    notes = []
    main, eig = tables in ("all", "main"), tables in ("all", "eig")

    ours: dict[str, Callable[[], Any]] = {}
    if main:
        ours |= {
            "H hutch": lambda: secorder.hessian_trace(f, num_probes=K)(params, x, y, generator=gen()),
            "GGN hutch": lambda: secorder.fisher_trace(model, "cross_entropy", num_probes=K)(
                params, x, y, generator=gen()
            ),
            "GGN exact": lambda: secorder.fisher_trace(model, "cross_entropy")(params, x, y),
            "H diag exact": lambda: secorder.hessian_diagonal(f)(params, x, y),
        }
    if eig:
        ours["H top eig"] = lambda: float(
            secorder.hessian_eigenvalues(f, k=1, tol=1e-3)(params, x, y, generator=gen())[0]
        )
        ours["H top eig uncertified"] = lambda: float(
            secorder.hessian_eigenvalues(f, k=1, tol=1e-3, certify=False)(params, x, y, generator=gen())[0]
        )
    theirs: dict[str, Callable[[], Any]] = {}
    try:
        import curvlinops

        def cl(cls: str) -> Callable[[], Any]:
            def run() -> Any:
                torch.manual_seed(0)
                A = getattr(curvlinops, cls)(model, crit, plist, [(x, y)], check_deterministic=False)
                return curvlinops.hutchinson_trace(A, K)

            return _competitor(run)

        if main:
            theirs["H hutch curvlinops"] = cl("HessianLinearOperator")
            theirs["GGN hutch curvlinops"] = cl("GGNLinearOperator")
    except ImportError:
        notes.append("curvlinops not importable")
    try:
        from pyhessian import hessian as pyh

        def ph(what: str) -> Callable[[], Any]:
            def run() -> Any:
                torch.manual_seed(0)
                H = pyh(model, crit, data=(x, y), cuda=False)
                if what == "trace":  # tol=-inf: tol=0 stops as soon as the running mean is negative
                    out = H.trace(maxIter=K, tol=float("-inf"))
                    if len(out) != K:
                        raise RuntimeError(f"PyHessian returned {len(out)} samples, not {K}")
                else:
                    out = float(H.eigenvalues(top_n=1, tol=1e-3)[0][0])
                model.zero_grad(set_to_none=True)
                return out

            return _competitor(run)

        if main:
            theirs["H hutch PyHessian"] = ph("trace")
        if eig:
            theirs["H top eig PyHessian"] = ph("eig")
    except ImportError:
        notes.append("PyHessian not importable")

    before = _zoo.state_snapshot(model)
    slow = ("H diag exact",)  # P one-hot products (or the sweep): timed once, no warm-up
    t = {k: _time(fn, 1, 0) if k in slow else _time(fn, repeats) for k, fn in {**ours, **theirs}.items()}
    products: dict[str, int] = {}
    for key in ("H top eig", "H top eig uncertified", "H top eig PyHessian"):  # untimed, same seeds
        if key in t and t[key][0] is not None:
            with _Counted() as c:
                ({**ours, **theirs})[key]()
            products[key] = c.n
    after = _zoo.state_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), f"{name}: model mutated"

    def cell(key: str) -> str:
        if key not in t:
            return "n/a"
        sec, _, err = t[key]
        if sec is None:
            notes.append(f"{key}: {err}")
            return "fails"
        return C.fmt_time(sec)

    def ratio(a: str, b: str) -> str:
        ta, tb = t[a][0], t.get(b, (None,))[0]
        return f"{tb / ta:.2f}×" if ta and tb else "–"

    row = None
    if main:
        row = [
            name, f"{P:,}",
            cell("H hutch"), cell("H hutch curvlinops"), ratio("H hutch", "H hutch curvlinops"),
            cell("H hutch PyHessian"), ratio("H hutch", "H hutch PyHessian"),
            cell("GGN hutch"), cell("GGN hutch curvlinops"), ratio("GGN hutch", "GGN hutch curvlinops"),
            cell("GGN exact"), cell("H diag exact"),
        ]  # fmt: skip
    erow = None
    if eig:
        ref = _reference_top_eigenvalue(case)

        def err(key: str) -> str:
            if key not in t or t[key][0] is None:
                return "–"
            return f"{abs(t[key][1] - ref) / abs(ref):.1e}"

        theirs_val = t.get("H top eig PyHessian", (None, None))[1]
        if theirs_val is not None and theirs_val * ref < 0:
            notes.append(
                f"PyHessian's top eigenvalue {theirs_val:.4g}: power iteration converges to the "
                "eigenvalue of largest magnitude, here a negative one"
            )
        erow = [name, f"{P:,}", f"{ref:.6g}"]
        for key in ("H top eig", "H top eig uncertified", "H top eig PyHessian"):
            erow += [cell(key), str(products.get(key, "–")), err(key)]
        erow += [
            ratio("H top eig", "H top eig PyHessian"),
            ratio("H top eig uncertified", "H top eig PyHessian"),
        ]
    return row, erow, notes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--models", default=",".join(n for n in _zoo.NAMES if not n.endswith(("_eager", "_train")))
    )
    ap.add_argument(
        "--tables",
        choices=("all", "main", "eig"),
        default="all",
        help="main: traces and diagonals; eig: the top eigenvalue (time, products, error); all: both",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows, erows, notes = [], [], []
    for name in a.models.split(","):
        if name.startswith(("gpt2", "bert")) and _zoo.transformers_or_none() is None:
            notes.append(f"{name}: transformers not installed")
            continue
        r, e, n = bench(name, a.repeats, a.tables)
        if r is not None:
            rows.append(r)
        if e is not None:
            erows.append(e)
        notes += [f"{name}: {m}" for m in n]
        print(f"... {name} done", file=sys.stderr, flush=True)
    print(
        f"float32, batch 4, 1 thread; median of {a.repeats} after a warm-up. speed-up = their time / ours.\n"
    )
    if rows:
        head = [
            "model", "P", "H Hutch (K=16)", "curvlinops", "speed-up", "PyHessian", "speed-up",
            "GGN Hutch (K=16)", "curvlinops", "speed-up", "GGN exact", "H diag exact",
        ]  # fmt: skip
        print(C.table(rows, head))
    if erows:
        print(
            "Largest Hessian eigenvalue: secorder `hessian_eigenvalues(f, k=1, tol=1e-3)` (Lanczos, "
            "residual ≤ tol·abs(θ), certified by a deflated run) vs PyHessian `eigenvalues(top_n=1, "
            "tol=1e-3)` (power iteration, stops when the estimate changes by < tol). HVPs: "
            "Hessian-vector products of one call. rel. error: against λ_max from Lanczos at tol=1e-10 "
            "on a float64 copy of the model and data. `certify=False`: the same call without the "
            "deflated certification run (same residual guarantee). speed-up: PyHessian's time / ours "
            "(certified, uncertified).\n"
        )
        head = [
            "model", "P", "λ_max (float64)", "secorder", "HVPs", "rel. error", "certify=False", "HVPs",
            "rel. error", "PyHessian", "HVPs", "rel. error", "speed-up", "speed-up (certify=False)",
        ]  # fmt: skip
        print(C.table(erows, head))
    if notes:
        print("Notes:\n")
        print("\n".join(f"* {m}" for m in notes))


if __name__ == "__main__":
    main()

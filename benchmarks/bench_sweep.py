"""Exact Hessian diagonal by the structured sweep vs BackPACK DiagHessian and one-hot HVPs.

Workloads (seeded weights and data, float32, cross-entropy with mean reduction):

* MLP 784-128-128-10 (tanh), batch 128 — BackPACK ``DiagHessian`` vs ``method="sweep"``;
* deeper MLP 784-128-128-128-10 (tanh), batch 128 — the same (the last activation's columns
  reach the first layer as dense per-sample columns, not in closed form);
* small CNN Conv2d(3,16,3,p=1)-ReLU-Conv2d(16,16,3,p=1)-ReLU-Flatten-Linear(16384,10),
  batch 64 — BackPACK vs sweep (ReLU: the Hessian diagonal equals the GGN diagonal here);
* a small residual MLP (64-32, one tanh residual block, head 10; BackPACK refuses residual
  adds), batch 32 — sweep vs batched one-hot HVPs (``secorder.hessian_diagonal``);
* a one-block transformer (T=8 positions, width 16, single-head attention, LayerNorm, GELU
  MLP, mean-pooled head 10), batch 16 — the sweep (softmax and LayerNorm rows, closed-form
  columns of the attention products) vs batched one-hot HVPs.

``module_hessian_diagonal`` is a thin wrapper over ``hessian_diagonal`` of the plain function
(one engine, :mod:`secorder._engine.sweep`); its column adds the wrapper's checks (and one
forward pass that checks the targets) to the same sweep.

Each row also times ``secorder.hessian_diagonal(f)`` with default options on the plain function
``f = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)`` (``exact="auto"``:
the structured sweep over a tape of the whole batch when it applies, else one-hot HVPs; the
method and R are shown). Each row reports the median time, the ratio to one gradient (forward + backward of the same
loss) and the largest relative difference from the reference (BackPACK, or one-hot HVPs), and the
peak memory of one call of ``hessian_diagonal(f)`` and of BackPACK (``_common.peak_rss``: the
process's peak resident memory over what was resident before the call, Linux ``VmHWM`` reset
through ``/proc/self/clear_refs`` after ``malloc_trim``; live tensors plus allocator overhead).
BackPACK is imported in the same process (run with an interpreter that has it, e.g.
/work/main/.benchvenv); it extends a deep copy of the model, never the one secorder uses.

Usage::

    PYTHONPATH=. python benchmarks/bench_sweep.py                   # full run
    PYTHONPATH=. python benchmarks/bench_sweep.py --repeats 1 --warmup 0   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from _common import fmt_bytes, fmt_time, header, peak_rss, table, timeit, write_section
from torch import Tensor, nn

import secorder


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.b1 = nn.Linear(32, 32)
        self.b2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = h + self.b2(torch.tanh(self.b1(h)))
        return self.head(torch.tanh(h))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 8)
        h = self.emb(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 4.0, dim=-1)
        h = self.ln(h + att @ self.v(h))
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(h.mean(1))


def workloads() -> list[tuple[str, nn.Module, Tensor, Tensor, bool]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    deep = nn.Sequential(
        nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
        nn.Linear(128, 10),
    )  # fmt: skip
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16384, 10),
    )
    return [
        ("MLP 784-128-128-10 tanh, N=128", mlp, torch.randn(128, 784), torch.randint(0, 10, (128,)), True),
        ("MLP 784-128×3-10 tanh, N=128", deep, torch.randn(128, 784), torch.randint(0, 10, (128,)), True),
        ("CNN 2×conv3x3 + linear, N=64", cnn, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)), True),
        (
            "residual MLP 64-32-32-10 tanh, N=32",
            ResidualMLP(),
            torch.randn(32, 64),
            torch.randint(0, 10, (32,)),
            False,
        ),
        (
            "transformer block T=8 d=16, N=16",
            TinyTransformer(),
            torch.randn(16, 8, 8),
            torch.randint(0, 10, (16,)),
            False,
        ),
    ]


def backpack_diag(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], dict[str, Tensor]] | None:
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagHessian
    except ImportError:
        return None
    bp_model = extend(copy.deepcopy(model))
    bp_loss = extend(nn.CrossEntropyLoss())

    def run() -> dict[str, Tensor]:
        bp_model.zero_grad()
        loss = bp_loss(bp_model(x), y)
        with backpack(DiagHessian()):
            loss.backward()
        return {k: p.diag_h.detach().clone() for k, p in bp_model.named_parameters()}

    return run


def rel(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    fa = torch.cat([a[k].reshape(-1) for k in sorted(a)]).double()
    fb = torch.cat([b[k].reshape(-1) for k in sorted(b)]).double()
    return float((fa - fb).norm() / fb.norm())


def measure(
    name: str, model: nn.Module, x: Tensor, y: Tensor, bp_ok: bool, args: argparse.Namespace
) -> tuple[list[str], dict[str, Tensor]]:
    params = {k: p.detach() for k, p in model.named_parameters()}

    def gradient() -> Any:
        return torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))

    t_grad, _ = timeit(gradient, repeat=args.repeats, warmup=args.warmup)
    sweep = secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep")
    t_sweep, d_sweep = timeit(lambda: sweep(params, x, y), repeat=args.repeats, warmup=args.warmup)
    info = sweep.method_info
    # the plain-function route with default options (exact="auto": the structured sweep)
    plain_f = lambda p, x, y: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)  # noqa: E731
    plain = secorder.hessian_diagonal(plain_f)
    t_plain, d_plain = timeit(lambda: plain(params, x, y), repeat=args.repeats, warmup=args.warmup)
    plain_method = plain.method_info.method
    mem_plain, mem_ref = peak_rss(lambda: plain(params, x, y)), None
    if bp_ok:
        bp = backpack_diag(model, x, y)
        if bp is None:
            ref_name, t_ref, err = "BackPACK DiagHessian", None, "n/a (BackPACK not importable)"
        else:
            t_ref, d_ref = timeit(bp, repeat=args.repeats, warmup=args.warmup)
            ref_name, err = "BackPACK DiagHessian", f"{rel(d_sweep, d_ref):.1e}"
            mem_ref = peak_rss(bp)
    else:
        f, _ = secorder.module_loss(model, F.cross_entropy)
        hvp = secorder.hessian_diagonal(f, exact="hvp")
        t_ref, d_ref = timeit(lambda: hvp(params, x, y), repeat=1, warmup=0)
        ref_name, err = "one-hot HVPs (hessian_diagonal)", f"{rel(d_sweep, d_ref):.1e}"
    return [
        name,
        f"{info.num_params:,}",
        str(info.num_columns),
        fmt_time(t_grad),
        f"{fmt_time(t_sweep)} ({t_sweep / t_grad:.0f}×)",
        f"{fmt_time(t_plain)} ({t_plain / t_grad:.0f}×, {plain_method}, R={plain.method_info.num_columns})",
        ref_name,
        "n/a" if t_ref is None else f"{fmt_time(t_ref)} ({t_ref / t_grad:.0f}×)",
        "n/a" if t_ref is None else f"{t_ref / t_sweep:.1f}×",
        "n/a" if t_ref is None else f"{t_ref / t_plain:.1f}×",
        err,
        f"{rel(d_plain, d_sweep):.1e}",
        f"{fmt_bytes(mem_plain)} / {fmt_bytes(mem_ref)}",
    ], d_sweep


def estimators(
    name: str, model: nn.Module, x: Tensor, y: Tensor, exact: dict[str, Tensor], args: argparse.Namespace
) -> list[str]:
    """Curvature propagation against Hutchinson's diagonal at the same K, over ``args.seeds`` seeds:
    relative error of the diagonal ‖d̂ − d‖/‖d‖ and of the trace (RMS over seeds), time per estimate."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    k = args.probes
    cp = secorder.module_hessian_diagonal(
        model, "cross_entropy", method="curvature_propagation", num_probes=k
    )
    f, _ = secorder.module_loss(model, F.cross_entropy)
    hutch = secorder.hessian_diagonal(f, num_probes=k)
    d_ref = torch.cat([exact[n].reshape(-1) for n in sorted(exact)]).double()
    row = [name, str(k)]
    for label, fn in (("cp", cp), ("hutchinson", hutch)):
        diag_errs, trace_errs, times = [], [], []
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            est = fn(params, x, y, generator=gen)
            times.append(time.perf_counter() - t0)
            flat = torch.cat([est[n].reshape(-1) for n in sorted(est)]).double()
            diag_errs.append(float((flat - d_ref).norm() / d_ref.norm()))
            trace_errs.append(float((flat.sum() - d_ref.sum()) / d_ref.sum().abs()))
        rms = lambda v: (sum(e * e for e in v) / len(v)) ** 0.5  # noqa: E731
        row += [f"{rms(diag_errs):.2e}", f"{rms(trace_errs):.2e}", fmt_time(sorted(times)[len(times) // 2])]
        if label == "cp":
            info = cp.method_info
    row.append(info.reason.split(";")[0])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--probes", type=int, default=10, help="K for the estimator comparison")
    parser.add_argument("--seeds", type=int, default=10, help="seeds for the estimator comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [(w, measure(*w, args)) for w in workloads()]
    rows = [row for _, (row, _) in results]
    est_rows = [estimators(w[0], w[1], w[2], w[3], exact, args) for w, (_, exact) in results]
    head = [
        "workload",
        "P",
        "R/sample",
        "gradient",
        "module sweep (×grad)",
        "hessian_diagonal(f) (×grad)",
        "reference",
        "ref (×grad)",
        "ref / module sweep",
        "ref / hessian_diagonal(f)",
        "rel. diff",
        "f vs module",
        "peak memory: hessian_diagonal(f) / ref",
    ]
    est_head = [
        "workload",
        "K",
        "CP diag rel. err",
        "CP trace rel. err",
        "CP time",
        "Hutchinson diag rel. err",
        "Hutchinson trace rel. err",
        "Hutchinson time",
        "CP engine",
    ]
    text = (
        header("Exact Hessian diagonal: structured sweep (bench_sweep.py)")
        + "\n"
        + table(rows, head)
        + f"\nCurvature propagation against Hutchinson's diagonal at K probes each (RMS over {args.seeds} "
        + "seeds of the relative error against the exact diagonal; median time per estimate):\n\n"
        + table(est_rows, est_head)
    )
    print(text)
    if not args.no_write:
        write_section("bench_sweep", text)


if __name__ == "__main__":
    main()

"""Per-sample curvature (``per_sample=True``) vs BackPACK's per-sample extensions.

Workloads (seeded weights and data, float32, cross-entropy with mean reduction; those of
``bench_sweep.py``):

* MLP 784-128-128-10 (tanh), batch 128;
* CNN Conv2d(3,16,3,p=1)-ReLU-Conv2d(16,16,3,p=1)-ReLU-Flatten-Linear(16384,10), batch 64.

Rows: the per-sample GGN diagonal — ``secorder.fisher_diagonal(model, "cross_entropy",
per_sample=True)`` against BackPACK ``BatchDiagGGNExact`` — and the per-sample Hessian
diagonal — ``secorder.hessian_diagonal(f, per_sample=True)`` on the plain function
``f = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)`` against BackPACK
``BatchDiagHessian``. Both sides return (N, *shape) per parameter, each row carrying the
mean's 1/N (rows sum to the batch diagonal). Each row reports the median time, the ratio to
one gradient, BackPACK's time over secorder's, and the relative difference
‖a − b‖ / ‖b‖ over all entries. BackPACK extends a deep copy of the model.

Usage::

    PYTHONPATH=. python benchmarks/bench_persample.py                       # full run
    PYTHONPATH=. python benchmarks/bench_persample.py --repeats 1 --warmup 0   # smoke run
    python benchmarks/record.py bench_persample.py                          # into RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from _common import fmt_time, timeit
from torch import Tensor, nn

import secorder

# BackPACK's hooks on a first layer whose input needs no grad: harmless, silenced for clean tables
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def workloads() -> list[tuple[str, nn.Module, Tensor, Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16384, 10),
    )
    return [
        ("MLP 784-128-128-10 tanh, N=128", mlp, torch.randn(128, 784), torch.randint(0, 10, (128,))),
        ("CNN 2×conv3x3 + linear, N=64", cnn, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))),
    ]


def backpack_rows(model: nn.Module, x: Tensor, y: Tensor, ext: str) -> Callable[[], dict[str, Tensor]] | None:
    try:
        from backpack import backpack, extend
        from backpack import extensions as bx
    except ImportError:
        return None
    bp_model = extend(copy.deepcopy(model))
    bp_loss = extend(nn.CrossEntropyLoss())
    extension = getattr(bx, ext)()
    attr = {"BatchDiagGGNExact": "diag_ggn_exact_batch", "BatchDiagHessian": "diag_h_batch"}[ext]

    def run() -> dict[str, Tensor]:
        bp_model.zero_grad()
        loss = bp_loss(bp_model(x), y)
        with backpack(extension):
            loss.backward()
        return {k: getattr(p, attr).detach().clone() for k, p in bp_model.named_parameters()}

    return run


def rel(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    fa = torch.cat([a[k].reshape(-1) for k in sorted(a)]).double()
    fb = torch.cat([b[k].reshape(-1) for k in sorted(b)]).double()
    return float((fa - fb).norm() / fb.norm())


def measure(name: str, model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace) -> list[list[str]]:
    params = {k: p.detach() for k, p in model.named_parameters()}

    def gradient() -> Any:
        return torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))

    t_grad, _ = timeit(gradient, repeat=args.repeats, warmup=args.warmup)
    plain_f = lambda p, x, y: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)  # noqa: E731
    ours: dict[str, Callable[[], dict[str, Tensor]]] = {
        "BatchDiagGGNExact": lambda: secorder.fisher_diagonal(model, "cross_entropy", per_sample=True)(
            params, x, y
        ),
        "BatchDiagHessian": lambda: secorder.hessian_diagonal(plain_f, per_sample=True)(params, x, y),
    }
    labels = {"BatchDiagGGNExact": "GGN diagonal", "BatchDiagHessian": "Hessian diagonal"}
    rows = []
    for ext, fn in ours.items():
        t_ours, d_ours = timeit(fn, repeat=args.repeats, warmup=args.warmup)
        n_rows = next(iter(d_ours.values())).shape[0]
        bp = backpack_rows(model, x, y, ext)
        if bp is None:
            t_bp, err = None, "n/a (BackPACK not importable)"
        else:
            t_bp, d_bp = timeit(bp, repeat=args.repeats, warmup=args.warmup)
            err = f"{rel(d_ours, d_bp):.1e}"
        rows.append(
            [
                name,
                labels[ext],
                str(n_rows),
                fmt_time(t_grad),
                f"{fmt_time(t_ours)} ({t_ours / t_grad:.0f}×)",
                "n/a" if t_bp is None else f"{fmt_time(t_bp)} ({t_bp / t_grad:.0f}×)",
                "n/a" if t_bp is None else f"{t_bp / t_ours:.1f}×",
                err,
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    head = [
        "workload",
        "quantity",
        "rows",
        "gradient",
        "secorder per_sample (×grad)",
        "BackPACK Batch* (×grad)",
        "BackPACK / secorder",
        "rel. diff",
    ]
    rows = [row for w in workloads() for row in measure(*w, args)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()

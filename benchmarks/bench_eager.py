"""Eager exact Hessian trace: secorder.core vs torch_secorder 0.0.1 vs torch.func.hessian.

Workloads (one run, same data for every column):

* ``mlp-B``: an MLP 16-32-32-8 with tanh (1,864 parameters), cross-entropy over a
  batch of B samples; the trace of the Hessian with respect to all parameters.
* ``laplacian``: the input Hessian of a scalar MLP 256-256-256-1 with tanh at one
  point x ∈ R^256 (the Laplacian Δf(x) = tr ∇²_x f).

Columns: torch_secorder's ``core.hessian_trace.hessian_trace`` (one backward pass
per entry), ours ``secorder.core.hessian_trace.hessian_trace`` (same call, batched
one-hot products block by block), the ``torch.func`` transform
``secorder.hessian_trace`` (exact; with its automatic strategy and with
``strategy="rev_rev"``), and ``torch.func.hessian(...)`` followed by
``.diagonal().sum()`` (the full P×P matrix). ``--strategies`` also times the raw
batching routes the eager operator chose between (autograd's ``is_grads_batched``,
``torch.func.vmap`` over ``torch.autograd.grad``, a Python loop; whole Hessian vs
diagonal blocks).

Run: ``PYTHONPATH=. python benchmarks/bench_eager.py [--threads N] [--repeats R] [--strategies]``
(torch_secorder is the optional extra ``bench``; its column is skipped if absent).
Timings are the minimum wall time over the repeats, after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

import secorder
from secorder.core.hessian_trace import hessian_trace as eager_trace

try:
    from torch_secorder.core.hessian_trace import hessian_trace as ts_trace
except ImportError:  # optional extra
    ts_trace = None


def timeit(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), out


class Workload:
    def __init__(self, name: str, func: Callable[[], Tensor], params: list[Tensor], fn_of_flat: Callable):
        self.name = name
        self.func = func
        self.params = params
        self.fn_of_flat = fn_of_flat  # f(flat params) for torch.func.hessian and the transform
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])


def mlp_workload(batch: int) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    x, y = torch.randn(batch, 16), torch.randint(0, 8, (batch,))
    params = list(model.parameters())
    names = [k for k, _ in model.named_parameters()]
    sizes = [p.numel() for p in params]

    def func() -> Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def of_flat(theta: Tensor) -> Tensor:
        ps = {k: c.reshape(p.shape) for k, c, p in zip(names, torch.split(theta, sizes), params)}
        return nn.functional.cross_entropy(functional_call(model, ps, (x,)), y)

    return Workload(f"MLP {sum(sizes):,} params, batch {batch}", func, params, of_flat)


def laplacian_workload(dim: int = 256) -> Workload:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(dim, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(dim, requires_grad=True)

    def func() -> Tensor:
        return net(x).squeeze()

    return Workload(f"Laplacian, d={dim}", func, [x], lambda z: net(z).squeeze())


def columns(w: Workload) -> dict[str, Callable[[], Tensor] | None]:
    transform = secorder.hessian_trace(w.fn_of_flat)
    rev_rev = secorder.hessian_trace(w.fn_of_flat, strategy="rev_rev")
    return {
        "torch_secorder 0.0.1": (lambda: ts_trace(w.func, w.params)) if ts_trace is not None else None,
        "secorder.core (eager)": lambda: eager_trace(w.func, w.params),
        "secorder.hessian_trace (transform, auto)": lambda: transform(w.flat),
        'transform, strategy="rev_rev"': lambda: rev_rev(w.flat),
        "torch.func.hessian + diagonal": lambda: torch.func.hessian(w.fn_of_flat)(w.flat).diagonal().sum(),
    }


# -- the batching routes the eager operator chose between ----------------------------------
def raw_route(w: Workload, route: str, blocks: bool) -> Tensor:
    """Exact trace through one retained graph, by a given batching route."""
    params = [p for p in w.params if p.requires_grad]
    grads = torch.autograd.grad(w.func(), params, create_graph=True)
    groups = [([g], [p]) for g, p in zip(grads, params)] if blocks else [(list(grads), params)]
    total = torch.zeros(())
    for outs, ins in groups:
        n = sum(p.numel() for p in ins)
        eye = torch.eye(n, dtype=ins[0].dtype)
        rows = [r.reshape(n, *p.shape) for r, p in zip(torch.split(eye, [p.numel() for p in ins], 1), ins)]
        if route == "is_grads_batched":
            res = torch.autograd.grad(outs, ins, rows, retain_graph=True, is_grads_batched=True)
        elif route == "vmap(autograd.grad)":
            res = torch.func.vmap(
                lambda *vs, outs=outs, ins=ins: torch.autograd.grad(outs, ins, vs, retain_graph=True)
            )(*rows)
        else:
            per = [torch.autograd.grad(outs, ins, [r[i] for r in rows], retain_graph=True) for i in range(n)]
            res = tuple(torch.stack([q[j] for q in per]) for j in range(len(ins)))
        total = total + torch.cat([r.reshape(n, -1) for r in res], 1).diagonal().sum()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="MLP batch sizes")
    parser.add_argument("--strategies", action="store_true", help="also time the raw batching routes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, min of {args.repeats} runs\n")

    workloads = [mlp_workload(b) for b in args.batches] + [laplacian_workload()]
    names = list(columns(workloads[0]))
    print("| workload | " + " | ".join(names) + " | torch_secorder / ours | torch.func.hessian / ours |")
    print("|---" * (len(names) + 3) + "|")
    for w in workloads:
        times: dict[str, float] = {}
        values: list[float] = []
        for name, fn in columns(w).items():
            if fn is None:
                continue
            t, v = timeit(fn, args.repeats if name != "torch_secorder 0.0.1" else max(1, args.repeats // 2))
            times[name] = t
            values.append(float(v))
        spread = (max(values) - min(values)) / max(abs(statistics.fmean(values)), 1e-30)
        assert spread < 1e-4, f"{w.name}: the columns disagree: {values}"
        ours = times["secorder.core (eager)"]
        cells = [f"{times[n] * 1e3:.1f} ms" if n in times else "n/a" for n in names]
        ts = f"{times['torch_secorder 0.0.1'] / ours:.1f}x" if "torch_secorder 0.0.1" in times else "n/a"
        fh = f"{times['torch.func.hessian + diagonal'] / ours:.1f}x"
        print(f"| {w.name} | " + " | ".join(cells) + f" | {ts} | {fh} |")

    if args.strategies:
        print("\nBatching routes for the exact trace on one retained graph (ms):\n")
        routes = ["is_grads_batched", "vmap(autograd.grad)", "loop"]
        print("| workload | " + " | ".join(f"{r}, {k}" for r in routes for k in ("whole", "blocks")) + " |")
        print("|---" * (2 * len(routes) + 1) + "|")
        for w in workloads:
            cells = []
            for r in routes:
                for blocks in (False, True):
                    reps = args.repeats if r != "loop" else 1
                    t, _ = timeit(lambda w=w, r=r, blocks=blocks: raw_route(w, r, blocks), reps)
                    cells.append(f"{t * 1e3:.1f}")
            print(f"| {w.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

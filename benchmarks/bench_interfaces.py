"""Parameter interfaces on tape nodes vs vmap(grad) per-sample squares.

For one layer at a time (seeded weights, data and cotangent columns, float32), each row times
Σ_c Σ_n (per-sample gradient of ⟨δ_c|_n, layer(x)⟩ w.r.t. weight and bias)^⊙2 for R columns
δ_c at the layer output, computed two ways from the same columns:

* ``tape``: :func:`secorder._engine.interfaces.param_squares` on the layer's tape node
  (``addmm``, ``convolution``, ``embedding``, ``native_layer_norm``), weight and bias;
* ``vmap(grad)``: ``torch.func.vmap`` over samples of ``torch.func.grad`` per column, squared
  and summed (the generic per-sample route).

Workloads: Linear 784→128 and 128→128 (batch 128, one row per sample) with R = 9 (a
cross-entropy factor) and R = 265 (the Hessian sweep's columns of the MLP); Linear 32→32 and
128→32 on a sequence (batch 16, T = 16; R = 9 and 265: the Gram form of the rows); Conv2d 3→16 and 16→16 (3×3, padding 1, batch 64 of 32×32);
Embedding (vocabulary 100, width 32, batch 16, T = 16); LayerNorm(32) on (16, 16, 32).
The last column is the largest relative difference of ``tape`` from ``vmap(grad)``. (The
module-hook layer classes of ``secorder._layers`` this compared with until issue 11 are gone:
every route takes the tape's interfaces.)

Usage::

    PYTHONPATH=. python benchmarks/bench_interfaces.py                       # full run
    PYTHONPATH=. python benchmarks/bench_interfaces.py --repeats 1 --warmup 0  # smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from _common import fmt_time, table, timeit
from torch import Tensor, nn
from torch.func import functional_call

from secorder._engine import interfaces
from secorder._engine.interfaces import param_squares
from secorder._engine.tape import record

aten = torch.ops.aten


def _tape_node(module: nn.Module, x: Tensor, func: Any) -> tuple[Any, list[Any], list[str]]:
    names = [n for n, _ in module.named_parameters()]
    leaves = [p.detach() for _, p in module.named_parameters()]
    tape = record(lambda lv: functional_call(module, dict(zip(names, lv)), (x,)), leaves)
    node = next(nd for nd in tape.nodes if nd.func == func)
    return node, tape.replay(leaves), names


def _new(
    node: Any, values: list[Any], positions: list[tuple], axes: dict, out_axis: tuple, n: int
) -> Callable:
    def run(cols: Tensor) -> list[Tensor]:
        interfaces._SQ_CACHE[0] = None  # no column squares from the previous repeat
        out = []
        for pos in positions:
            res = param_squares(node, values, pos, axes, out_axis, cols, None, n)
            assert res is not None
            out.append(res)
        return out

    return run


def _vmap(module: nn.Module, x: Tensor) -> Callable:
    params = {k: p.detach() for k, p in module.named_parameters()}
    out_shape = module(x).shape

    def one(p: dict, xn: Tensor, dn: Tensor) -> Tensor:
        return (functional_call(module, p, (xn.unsqueeze(0),)) * dn.unsqueeze(0)).sum()

    per_sample = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))

    def run(cols: Tensor) -> list[Tensor]:
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        for c in range(cols.shape[0]):
            g = per_sample(params, x, cols[c].reshape(x.shape[0], *out_shape[1:]))
            for k in total:
                total[k] += (g[k] ** 2).sum(0)
        return list(total.values())

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    rows = []
    workloads: list[tuple[str, nn.Module, Tensor, Any, list[tuple], dict, tuple, int]] = []
    for d_in in (784, 128):
        for r in (9, 265):
            workloads.append(
                (f"Linear {d_in}→128, N=128", nn.Linear(d_in, 128), randn(128, d_in), aten.addmm.default,
                 [(0, 2), (0, 0)], {(0, 1): (0, 1)}, (0, 1), r)
            )  # fmt: skip
    for d_in, d_out in ((32, 32), (128, 32)):
        for r in (9, 265):
            workloads.append(
                (f"Linear {d_in}→{d_out}, N=16, T=16", nn.Linear(d_in, d_out), randn(16, 16, d_in),
                 aten.addmm.default, [(0, 2), (0, 0)], {(0, 1): (0, 16)}, (0, 16), r)
            )  # fmt: skip
    for c_in in (3, 16):
        workloads.append(
            (f"Conv2d {c_in}→16 3×3, N=64", nn.Conv2d(c_in, 16, 3, padding=1), randn(64, c_in, 32, 32),
             aten.convolution.default, [(0, 1), (0, 2)], {(0, 0): (0, 1)}, (0, 1), 9)
        )  # fmt: skip
    idx = torch.randint(0, 100, (16, 16), generator=gen)
    workloads.append(
        ("Embedding 100×32, N=16, T=16", nn.Embedding(100, 32), idx, aten.embedding.default, [(0, 0)],
         {(0, 1): (0, 1)}, (0, 1), 9)
    )  # fmt: skip
    workloads.append(
        ("LayerNorm(32), N=16, T=16", nn.LayerNorm(32), randn(16, 16, 32), aten.native_layer_norm.default,
         [(0, 2), (0, 3)], {(0, 0): (0, 1)}, (0, 1), 9)
    )  # fmt: skip
    with torch.no_grad():
        for p in (p for w in workloads for p in w[1].parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    for name, module, x, func, positions, axes, out_axis, r in workloads:
        node, values, _ = _tape_node(module, x, func)
        out_shape = values[node.outputs[0]].shape
        cols = randn(r, *out_shape)
        n = x.shape[0]
        new = _new(node, values, positions, axes, out_axis, n)
        vm = _vmap(module, x)
        t_new, res_new = timeit(lambda f=new, c=cols: f(c), repeat=args.repeats, warmup=args.warmup)
        t_vm, res_vm = timeit(lambda f=vm, c=cols: f(c), repeat=max(1, args.repeats // 2), warmup=args.warmup)
        # addmm's weight argument is weight.t(): its squares are transposed back (an injective view)
        res_new = [
            a.T if func == aten.addmm.default and pos == (0, 2) else a for a, pos in zip(res_new, positions)
        ]
        diff = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(res_new, res_vm)
        )
        rows.append(
            [name, str(r), fmt_time(t_new), fmt_time(t_vm), f"{t_vm / t_new:.1f}×", f"{diff:.1e}"]
        )  # fmt: skip
        print(rows[-1], flush=True)
    print()
    print(
        table(
            rows,
            [
                "layer",
                "R",
                "tape",
                "vmap(grad)",
                "vmap / tape",
                "rel. diff vs vmap(grad)",
            ],
        )
    )


if __name__ == "__main__":
    main()

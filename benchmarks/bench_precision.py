"""Half precision: time and rounding error of bfloat16/float16 curvature against float32 and float64.

Workload: an MLP 64-256-256-10 (tanh, 85,002 parameters), batch 64, cross-entropy; the
parameters and inputs are drawn once and rounded to each dtype; the reference is float64 on
the same rounded values (so the error is the rounding of the computation in that dtype,
not of its inputs). Timed (median of ``--repeat`` calls after a warm-up): one Hessian-vector
product, Hutchinson's Hessian trace and the GGN trace with ``--probes`` Rademacher probes
(the same probes in every dtype: the error is the products' rounding, not Monte-Carlo
noise), and the largest Hessian eigenvalue (Lanczos). Errors are relative to the float64
value (for the HVP, ‖Hv − Hv₆₄‖ / ‖Hv₆₄‖). Half-precision results are accumulated and
returned in float32 (docs/transforms.rst, "Precision").

Usage::

    PYTHONPATH=. python benchmarks/bench_precision.py
    PYTHONPATH=. python benchmarks/record.py bench_precision.py
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import _common as C  # noqa: N812 - short alias for the shared helpers
import torch
from torch.nn import functional

import secorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--probes", type=int, default=50)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    sizes = [64, 256, 256, 10]
    base = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        base[f"w{i}"] = torch.randn(b, a, generator=g, dtype=torch.float64) / a**0.5
        base[f"b{i}"] = torch.zeros(b, dtype=torch.float64)
    x64 = torch.randn(64, sizes[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (64,), generator=g)
    v64 = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in base.items()}

    def model(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        for i in range(len(sizes) - 1):
            x = x @ p[f"w{i}"].T + p[f"b{i}"]
            if i < len(sizes) - 2:
                x = torch.tanh(x)
        return x

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(model(p, x), t)

    def flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tree[k].reshape(-1).double() for k in sorted(tree)])

    hvp = secorder.hvp(loss)
    htrace = secorder.hessian_trace(loss, num_probes=args.probes)
    gtrace = secorder.fisher_trace(model, "cross_entropy", num_probes=args.probes)
    eig = secorder.hessian_eigenvalues(loss, k=1)

    def quantities(
        p: dict[str, torch.Tensor], x: torch.Tensor, v: dict[str, torch.Tensor]
    ) -> dict[str, Callable[[], torch.Tensor]]:
        """The timed calls at one point (the same generator seeds in every dtype)."""
        return {
            "HVP": lambda: flat(hvp(v, p, x, y)),
            "Hessian trace (Hutchinson)": lambda: htrace(p, x, y, generator=torch.Generator().manual_seed(1)),
            "GGN trace (Hutchinson)": lambda: gtrace(p, x, y, generator=torch.Generator().manual_seed(1)),
            "top eigenvalue (Lanczos)": lambda: eig(p, x, y, generator=torch.Generator().manual_seed(2)),
        }

    results: dict[str, dict[str, tuple[float, float]]] = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        p = {k: t.to(dtype) for k, t in base.items()}
        x, v = x64.to(dtype), {k: t.to(dtype) for k, t in v64.items()}
        # the float64 reference at this dtype's rounded point
        p_ref, x_ref, v_ref = (
            {k: t.double() for k, t in p.items()},
            x.double(),
            {k: t.double() for k, t in v.items()},
        )
        ref = {name: fn() for name, fn in quantities(p_ref, x_ref, v_ref).items()}
        calls = quantities(p, x, v)
        row = {}
        for name, fn in calls.items():
            t, out = C.timeit(fn, repeat=args.repeat)
            r = ref[name]
            err = float(torch.linalg.vector_norm(out.double() - r) / torch.linalg.vector_norm(r))
            row[name] = (t, err)
        results[str(dtype).removeprefix("torch.")] = row
    dtypes = list(results)
    rows = [
        [name] + [f"{C.fmt_time(results[d][name][0])} ({results[d][name][1]:.1e})" for d in dtypes]
        for name in results[dtypes[0]]
    ]
    print(f"MLP {'-'.join(map(str, sizes))} (85,002 parameters), batch 64, {args.probes} probes; ")
    print("time (relative error against float64 at the same rounded point)\n")
    print(C.table(rows, ["quantity", *dtypes]))
    units = ", ".join(f"{d} u = {torch.finfo(getattr(torch, d)).eps / 2:.1e}" for d in dtypes)
    print(f"unit roundoff: {units}")


if __name__ == "__main__":
    main()

"""The cost of secorder's input policies (issue 12): NaN/Inf checks and the random-f guard.

Times the same calls with ``secorder.set_check_finite(True)`` (the default) and ``False``
on the MLP used elsewhere in the benchmarks, and the global-RNG snapshot taken around every
evaluation of ``f`` on its own. Run with ``python benchmarks/record.py bench_policies.py``.
"""

from __future__ import annotations

import time

import _common as C  # noqa: N812 - short alias for the shared helpers
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import nn

import secorder
from secorder._validate import _rng_snapshot, _same_states


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    f, params = secorder.module_loss(model, F.cross_entropy)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    P = sum(p.numel() for p in params.values())
    calls = {
        "hessian_trace Hutchinson K=20": lambda: secorder.hessian_trace(f, num_probes=20)(
            params, x, y, generator=torch.Generator().manual_seed(0)
        ),
        "hessian_diagonal Hutchinson K=20": lambda: secorder.hessian_diagonal(f, num_probes=20)(
            params, x, y, generator=torch.Generator().manual_seed(0)
        ),
        "fisher_trace exact GGN": lambda: secorder.fisher_trace(model, "cross_entropy")(params, x, y),
        "hessian_eigenvalues k=1": lambda: secorder.hessian_eigenvalues(f, k=1, tol=1e-4)(
            params, x, y, generator=torch.Generator().manual_seed(0)
        ),
    }
    print(f"MLP 64-128-128-10, P={P}, batch 128, float32, 1 thread\n")
    print("| call | checks on | checks off | overhead |")
    print("| --- | --- | --- | --- |")
    for name, fn in calls.items():
        on, _ = C.timeit(fn, repeat=5)
        secorder.set_check_finite(False)
        try:
            off, _ = C.timeit(fn, repeat=5)
        finally:
            secorder.set_check_finite(True)
        print(f"| {name} | {C.fmt_time(on)} | {C.fmt_time(off)} | {100 * (on - off) / off:+.1f}% |")
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        _same_states(_rng_snapshot(set()), _rng_snapshot(set()))
    per = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(20):
        f(params, x, y)
    forward = (time.perf_counter() - t0) / 20
    print(
        f"\nglobal-RNG check (two snapshots and a comparison per evaluation of f): {per * 1e6:.1f} µs; "
        f"one evaluation of f: {forward * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()

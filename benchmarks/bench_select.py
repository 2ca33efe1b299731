"""Last-layer curvature with ``select=`` against the whole model's (cost scales with the selection).

Workload: a deep MLP 784-1024-1024-1024-1024-10 (tanh, about 3.99M parameters), batch 128,
cross-entropy. Timed (median of ``--repeat`` calls after a warm-up): the exact GGN diagonal
(``fisher_diagonal``), the exact Hessian diagonal (``module_hessian_diagonal``) and the
exact GGN trace, of all parameters and of the last layer only (``select="8.*"``, 10,250
parameters). The last layer's entries are checked against the full result.

Usage::

    PYTHONPATH=. python benchmarks/bench_select.py
    PYTHONPATH=. python benchmarks/record.py bench_select.py
"""

from __future__ import annotations

import argparse

import _common as C  # noqa: N812 - short alias for the shared helpers
import torch
from torch import nn

import secorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    w = args.width
    model = nn.Sequential(
        nn.Linear(784, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(),
        nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 10),
    )  # fmt: skip
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    params = {k: p.detach() for k, p in model.named_parameters()}
    last = "8.*"
    n_all = sum(p.numel() for p in params.values())
    n_last = sum(p.numel() for k, p in params.items() if k.startswith("8."))
    rows = []
    for label, make in [
        (
            "GGN diagonal (fisher_diagonal)",
            lambda s: secorder.fisher_diagonal(model, "cross_entropy", select=s),
        ),
        (
            "Hessian diagonal (module_hessian_diagonal)",
            lambda s: secorder.module_hessian_diagonal(model, "cross_entropy", select=s),
        ),
        ("GGN trace (fisher_trace)", lambda s: secorder.fisher_trace(model, "cross_entropy", select=s)),
    ]:
        full_fn, last_fn = make(None), make(last)
        t_full, full = C.timeit(lambda f=full_fn: f(params, x, y), repeat=args.repeat)
        t_last, part = C.timeit(lambda f=last_fn: f(params, x, y), repeat=args.repeat)
        if isinstance(part, dict):
            equal = (
                "yes" if all(torch.allclose(part[k], full[k], rtol=1e-4, atol=1e-7) for k in part) else "NO"
            )
        else:
            equal = "n/a (a scalar)"
        rows.append([label, C.fmt_time(t_full), C.fmt_time(t_last), f"{t_last / t_full:.3f}", equal])
    print(
        f"MLP 784-{w}x4-10 (tanh), {n_all:,} parameters; last layer {n_last:,} ({n_last / n_all:.2%}); batch 128, {torch.get_num_threads()} threads\n"
    )
    print(
        C.table(
            rows, ["quantity", "all parameters", 'last layer (select="8.*")', "cost ratio", "entries equal"]
        )
    )


if __name__ == "__main__":
    main()

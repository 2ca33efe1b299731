"""Hessian trace (Hutchinson, 100 probes) and exact Hessian diagonals against other libraries.

Run: ``PYTHONPATH=. python benchmarks/bench_hessian.py`` in an environment with the ``bench``
extra (PyHessian, curvlinops, torch_secorder). Missing competitors are skipped. The
script times everything in one run on the same data, prints markdown tables and rewrites
its section of benchmarks/RESULTS.md. Use a quiet machine.
"""

from __future__ import annotations

import argparse

import _common as C  # noqa: N812 - short alias for the shared helpers
import torch
from torch import nn

import secorder
import secorder.modules
import secorder.testing

K = 100


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    )
    return model, torch.randn(128, 784), torch.randint(0, 10, (128,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 32 * 32, 10),
    )
    return model, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


def loop_hvp_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The PyHessian way, written out: one retained double-backward graph, a loop of HVPs."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    total = 0.0
    for _ in range(K):
        vs = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, vs, retain_graph=True)
        total += sum((h * v).sum() for h, v in zip(hv, vs)).item()
    return total / K


def _quiet_pyhessian_warning() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*create_graph=True will create a reference cycle.*")


def trace_competitors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, callable]:
    crit = nn.CrossEntropyLoss()
    out: dict[str, callable] = {
        "autograd loop (PyHessian's method, hand-written)": lambda: loop_hvp_trace(model, x, y)
    }
    try:
        from pyhessian import hessian

        def pyh() -> float:
            model.zero_grad(set_to_none=True)
            samples = hessian(model, crit, data=(x, y), cuda=False).trace(maxIter=K, tol=float("-inf"))
            model.zero_grad(set_to_none=True)
            return sum(samples) / len(samples)

        out["PyHessian hessian(...).trace"] = pyh
    except ImportError:
        pass
    try:
        from curvlinops import HessianLinearOperator, hutchinson_trace

        params = [p for p in model.parameters() if p.requires_grad]

        def cl() -> float:
            H = HessianLinearOperator(model, crit, params, [(x, y)], check_deterministic=False)
            return float(hutchinson_trace(H, K))

        out["curvlinops hutchinson_trace"] = cl
    except ImportError:
        pass
    try:
        from torch_secorder.core.hvp import hessian_trace as ts_trace

        params = [p for p in model.parameters() if p.requires_grad]
        out["torch_secorder core.hvp.hessian_trace"] = lambda: float(
            ts_trace(lambda: crit(model(x), y), params, num_samples=K)
        )
    except ImportError:
        pass
    return out


def bench_trace(name: str, build, repeat: int) -> tuple[str, dict[str, float]]:
    model, x, y = build()
    f, params = secorder.module_loss(model, nn.functional.cross_entropy)
    grad_time, _ = C.timeit(lambda: torch.func.grad(f)(params, x, y), repeat=20)
    times: dict[str, float] = {}
    values: dict[str, float] = {}
    op, _ = secorder.hessian_operator(f, params, x, y)
    op.quadform(torch.ones(1, op.size))
    settled = op.quadform_strategy  # what "auto" runs for Hutchinson's quadratic forms
    for strategy in ["auto", "rev_rev", "autograd"]:
        fn = secorder.hessian_trace(f, num_probes=K, strategy=strategy)
        label = f"secorder hessian_trace (strategy={strategy!r})"
        if strategy == "auto":
            label = f"secorder hessian_trace (strategy='auto' → {settled!r})"
        t, v = C.timeit(
            lambda fn=fn: fn(params, x, y, generator=torch.Generator().manual_seed(0)), repeat=repeat
        )
        times[label], values[label] = t, float(v)
    for label, fn in trace_competitors(model, x, y).items():
        t, v = C.timeit(fn, repeat=repeat)
        times[label], values[label] = t, float(v)
    ours = times[f"secorder hessian_trace (strategy='auto' → {settled!r})"]
    anchors = {
        k: v for k, v in times.items() if not k.startswith("secorder") and not k.startswith("autograd loop")
    }
    fastest = min(anchors.values()) if anchors else float("nan")
    nparams = sum(p.numel() for p in params.values())
    rows = [
        [label, C.fmt_time(t), f"{t / ours:.2f}×", f"{t / (K * grad_time):.2f}", f"{values[label]:.2f}"]
        for label, t in sorted(times.items(), key=lambda kv: kv[1])
    ]
    text = (
        f"**{name}** ({nparams} parameters; one gradient = {C.fmt_time(grad_time)}; K = {K} Rademacher probes)\n\n"
        + C.table(rows, ["method", "time", "time / secorder auto", "cost per probe (gradients)", "estimate"])
        + f"\nsecorder auto is **{fastest / ours:.2f}×** faster than the fastest competitor.\n"
    )
    return text, times


# -- exact diagonals -------------------------------------------------------------------------------


def small_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 10))
    return model, torch.randn(64, 32), torch.randint(0, 10, (64,))


def laplacian_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    return net, torch.randn(256)


def bench_diagonals(repeat: int) -> str:
    out = []
    # 1.8k-parameter MLP, w.r.t. parameters.
    model, x, y = small_mlp()
    f, params = secorder.module_loss(model, nn.functional.cross_entropy)
    flat_f, theta = secorder.testing.flat_function(f, (params, x, y))
    nparams = theta.numel()
    cases: dict[str, callable] = {
        "secorder hessian_diagonal (exact)": lambda: secorder.hessian_diagonal(f)(params, x, y),
        "torch.func.hessian(f)(θ).diagonal()": lambda: torch.func.hessian(flat_f)(theta).diagonal(),
    }
    try:
        from torch_secorder.core.hessian_diagonal import hessian_diagonal as ts_diag

        plist = [p for p in model.parameters()]
        cases["torch_secorder hessian_diagonal (per-element loop)"] = lambda: ts_diag(
            lambda: nn.functional.cross_entropy(model(x), y), plist
        )
    except ImportError:
        pass
    out.append(
        _diag_table(
            f"Exact Hessian diagonal, MLP 32-32-16-10 tanh ({nparams} parameters, batch 64)", cases, repeat
        )
    )
    # Laplacian: input Hessian of a scalar MLP, d = 256.
    net, x0 = laplacian_net()
    fwd, p = secorder.modules.module_forward(net)

    def u(p, x):
        return fwd(p, x.unsqueeze(0)).squeeze()

    cases = {
        "secorder hessian_diagonal(u, argnums=1) (exact)": lambda: secorder.hessian_diagonal(u, argnums=1)(
            p, x0
        ),
        "torch.func.hessian(u)(x).diagonal()": lambda: torch.func.hessian(lambda z: u(p, z))(x0).diagonal(),
    }
    try:
        from torch_secorder.core.hessian_diagonal import hessian_diagonal as ts_diag

        def ts_lap():
            xr = x0.clone().requires_grad_(True)
            return ts_diag(lambda: net(xr.unsqueeze(0)).squeeze(), [xr])

        cases["torch_secorder hessian_diagonal (per-element loop)"] = ts_lap
    except ImportError:
        pass
    out.append(
        _diag_table("Laplacian: input-Hessian diagonal of a 256-256-256-1 tanh MLP (d = 256)", cases, repeat)
    )
    return "\n".join(out)


def _diag_table(title: str, cases: dict[str, callable], repeat: int) -> str:
    times = {label: C.timeit(fn, repeat=repeat)[0] for label, fn in cases.items()}
    ours = next(t for k, t in times.items() if k.startswith("secorder"))
    rows = [[k, C.fmt_time(t), f"{t / ours:.2f}×"] for k, t in sorted(times.items(), key=lambda kv: kv[1])]
    return f"**{title}**\n\n" + C.table(rows, ["method", "time", "time / secorder"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    _quiet_pyhessian_warning()
    parts = [C.header("Hessian trace and diagonal (bench_hessian.py)")]
    for name, build in [
        ("MLP 784-128-128-10 tanh, batch 128, cross-entropy", mlp),
        ("CNN 2×conv3×3(16) + linear, 3×32×32, batch 64", cnn),
    ]:
        text, _ = bench_trace(name, build, args.repeat)
        print(text, flush=True)
        parts.append(text)
    text = bench_diagonals(args.repeat)
    print(text)
    parts.append(text)
    if not args.no_write:
        C.write_section("bench_hessian", "\n".join(parts))


if __name__ == "__main__":
    main()

"""Error versus number of matrix-vector products for secorder's trace/diagonal estimators, and a
side-by-side comparison with curvlinops (hutchpp_trace, xtrace, xdiag) and PyHessian (eigenvalues,
density) at equal budget. Not a test: it prints tables and writes PNG plots.

Workload (the issue's): MLP 784-128-128-10, tanh, batch 128, cross-entropy (P = 118,282), the
same weights and data as ``/work/main/.benchvenv/snippets/common.py``. ``--small`` swaps in an
MLP 784-16-10 (P = 12,730) for smoke runs.

Operators (each row of ``OPERATORS``, pluggable: any secorder operator and its exact diagonal): the
Hessian (``secorder.hessian_operator``) and the GGN of the same loss (``secorder.fisher_operator``).
Exact references: the Hessian diagonal from secorder's exact diagonal (P HVPs: slow on the full
MLP, so cached under ``benchmarks/_cache``), the GGN diagonal from ``secorder.fisher_diagonal``;
both cross-checked against BackPACK's DiagHessian / DiagGGNExact where importable.

Run (competitors live in the bench venv, which needs optree; matplotlib for the plots)::

    PYTHONPATH=. /work/main/.benchvenv/bin/python benchmarks/bench_estimators.py [--small]

If the bench venv lacks optree/matplotlib, add ``--extra-site /work/main/.venv/lib/python3.11/site-packages``
(appended to ``sys.path``, so the bench venv's own torch keeps priority).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="smoke run: MLP 784-16-10, few seeds and budgets")
    p.add_argument("--seeds", type=int, default=None, help="seeds per (method, budget)")
    p.add_argument("--budgets", type=str, default=None, help="comma-separated budgets (matvecs)")
    p.add_argument("--equal-budget", type=int, default=None, help="budget of the head-to-head comparison")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (median reported)")
    p.add_argument("--operators", type=str, default="hessian,ggn")
    p.add_argument("--no-competitors", action="store_true")
    p.add_argument("--no-curves", action="store_true", help="skip the error-versus-budget curves")
    p.add_argument("--out", type=Path, default=HERE / "_out")
    p.add_argument("--cache", type=Path, default=HERE / "_cache")
    p.add_argument("--extra-site", type=str, default=None, help="site-packages dir appended to sys.path")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p.parse_args()


ARGS = _parse()
if ARGS.extra_site:
    sys.path.append(ARGS.extra_site)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

try:
    import secorder
    from secorder.estimators import DIAGONAL_ESTIMATORS, TRACE_ESTIMATORS
    from secorder.operators import LinearOperator
    from secorder.spectra import lanczos_eigenvalues, slq_nodes_weights
except ImportError as exc:  # pragma: no cover - environment problem
    sys.exit(
        f"cannot import secorder ({exc}). Run from the repository root with PYTHONPATH=. and make sure "
        "optree is importable (pass --extra-site <a site-packages with optree>)."
    )

if ARGS.threads:
    torch.set_num_threads(ARGS.threads)

# -- workload ----------------------------------------------------------------------------------


def make_model(small: bool) -> nn.Module:
    torch.manual_seed(0)
    if small:
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    )


def make_data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)


@dataclass
class Workload:
    model: nn.Module
    x: Tensor
    y: Tensor
    f: Callable[..., Tensor]
    params: dict[str, Tensor]
    size: int
    tag: str


def workload(small: bool) -> Workload:
    model = make_model(small)
    x, y = make_data()
    f, params = secorder.module_loss(model, nn.functional.cross_entropy)
    size = sum(p.numel() for p in params.values())
    arch = str(model).encode() + str(size).encode() + str(torch.__version__).encode()
    tag = ("small-" if small else "mlp-") + hashlib.sha1(arch + x[:2].numpy().tobytes()).hexdigest()[:10]
    return Workload(model, x, y, f, params, size, tag)


# -- operators ----------------------------------------------------------------------------------


def hessian_operator(wl: Workload) -> LinearOperator:
    op, _ = secorder.hessian_operator(wl.f, wl.params, wl.x, wl.y)
    return op


def ggn_operator(wl: Workload) -> LinearOperator:
    op, _ = secorder.fisher_operator(wl.model, "cross_entropy")(wl.params, wl.x, wl.y)
    return op


def exact_hessian_diagonal(wl: Workload, cache: Path) -> Tensor:
    path = cache / f"hessian_diag_{wl.tag}.pt"
    if path.exists():
        return torch.load(path)
    print(f"computing the exact Hessian diagonal ({wl.size} HVPs; cached to {path}) ...", flush=True)
    t0 = time.perf_counter()
    diag = secorder.hessian_diagonal(wl.f)(wl.params, wl.x, wl.y)
    flat = torch.cat([diag[k].reshape(-1) for k in sorted(diag)])
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(flat, path)
    return flat


def exact_ggn_diagonal(wl: Workload, cache: Path) -> Tensor:
    """secorder's exact GGN diagonal (per-layer fast path: one backward pass per class)."""
    diag = secorder.fisher_diagonal(wl.model, "cross_entropy")(wl.params, wl.x, wl.y)
    return torch.cat([diag[k].reshape(-1) for k in sorted(diag)])


@dataclass
class OperatorSpec:
    name: str
    build: Callable[[Workload], Any]
    exact_diag: Callable[[Workload, Path], Tensor]
    psd: bool
    curvlinops_class: str  # name of the matching curvlinops linear operator
    backpack_extension: str | None  # BackPACK extension giving the exact diagonal (cross-check)


OPERATORS = {
    "hessian": OperatorSpec(
        "hessian", hessian_operator, exact_hessian_diagonal, False, "HessianLinearOperator", "DiagHessian"
    ),
    "ggn": OperatorSpec("ggn", ggn_operator, exact_ggn_diagonal, True, "GGNLinearOperator", "DiagGGNExact"),
}


def backpack_diagonal(wl: Workload, extension: str) -> Tensor | None:
    try:
        import backpack
        import backpack.extensions
    except ImportError:
        return None
    model = backpack.extend(make_model(ARGS.small))
    crit = backpack.extend(nn.CrossEntropyLoss())
    loss = crit(model(wl.x), wl.y)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack.backpack(getattr(backpack.extensions, extension)()):
            loss.backward()
    attr = {"DiagHessian": "diag_h", "DiagGGNExact": "diag_ggn_exact"}[extension]
    named = {k: getattr(p, attr).detach().reshape(-1) for k, p in model.named_parameters()}
    return torch.cat([named[k] for k in sorted(named)])


# -- measurement helpers ------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


@dataclass
class Curve:
    label: str
    budgets: list[int] = field(default_factory=list)
    rel_error: list[float] = field(default_factory=list)  # RMS relative error over seeds
    seconds: list[float] = field(default_factory=list)  # mean time per estimate


def trace_curve(op: Any, method: str, budgets: list[int], seeds: int, exact: float) -> Curve:
    est = TRACE_ESTIMATORS[method]
    curve = Curve(f"secorder {method}")
    for m in budgets:
        errs, times = [], []
        for s in range(seeds):
            t0 = time.perf_counter()
            e, _ = est(op, m, generator=torch.Generator().manual_seed(s))
            times.append(time.perf_counter() - t0)
            errs.append((float(e) - exact) / abs(exact))
        curve.budgets.append(m)
        curve.rel_error.append(math.sqrt(sum(x * x for x in errs) / len(errs)))
        curve.seconds.append(sum(times) / len(times))
    return curve


def diag_curve(op: Any, method: str, budgets: list[int], seeds: int, exact: Tensor) -> Curve:
    est = DIAGONAL_ESTIMATORS[method]
    curve = Curve(f"secorder {method} diag")
    for m in budgets:
        errs, times = [], []
        for s in range(seeds):
            t0 = time.perf_counter()
            d, _ = est(op, m, generator=torch.Generator().manual_seed(s))
            times.append(time.perf_counter() - t0)
            errs.append(float(torch.linalg.vector_norm(d - exact) / torch.linalg.vector_norm(exact)))
        curve.budgets.append(m)
        curve.rel_error.append(math.sqrt(sum(x * x for x in errs) / len(errs)))
        curve.seconds.append(sum(times) / len(times))
    return curve


# -- competitors ----------------------------------------------------------------------------------


def curvlinops_rows(
    wl: Workload, spec: OperatorSpec, m: int, seeds: int, exact: float, exact_diag: Tensor, sec_op: Any
) -> list[dict[str, Any]]:
    try:
        import curvlinops
    except ImportError:
        print("  curvlinops not importable: skipped")
        return []
    model = make_model(ARGS.small)
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    A = getattr(curvlinops, spec.curvlinops_class)(
        model, nn.CrossEntropyLoss(), params, [(wl.x, wl.y)], check_deterministic=False
    )
    build = time.perf_counter() - t0
    # curvlinops' flat order is named_parameters() order; ours sorts the keys.
    names = [k for k, _ in model.named_parameters()]
    perm_sizes = [dict(model.named_parameters())[k].numel() for k in names]
    rows = []
    pairs = [("hutchinson", "hutchinson_trace"), ("hutch++", "hutchpp_trace"), ("xtrace", "xtrace")]
    for ours, theirs in pairs:
        mm = m - m % 3 if ours == "hutch++" else m
        fn = getattr(curvlinops, theirs)
        theirs_err, ours_err = [], []
        for s in range(seeds):
            torch.manual_seed(s)
            theirs_err.append((float(fn(A, mm)) - exact) / abs(exact))
            e, _ = TRACE_ESTIMATORS[ours](sec_op, mm, generator=torch.Generator().manual_seed(s))
            ours_err.append((float(e) - exact) / abs(exact))
        torch.manual_seed(0)
        _, t_theirs = timed(lambda fn=fn, mm=mm: fn(A, mm), ARGS.repeats)
        _, t_ours = timed(lambda ours=ours, mm=mm: transform_trace(wl, spec, ours, mm), ARGS.repeats)
        rows.append(
            dict(
                method=ours,
                budget=mm,
                ours_s=t_ours,
                theirs_s=t_theirs,
                ours_err=rms(ours_err),
                theirs_err=rms(theirs_err),
                build_s=build,
            )
        )
    # xdiag: compare in our flat order.
    theirs_err, ours_err = [], []
    for s in range(seeds):
        torch.manual_seed(s)
        d = curvlinops.xdiag(A, m)
        d = torch.cat([part for _, part in sorted(zip(names, torch.split(d, perm_sizes)))])
        theirs_err.append(
            float(torch.linalg.vector_norm(d - exact_diag) / torch.linalg.vector_norm(exact_diag))
        )
        ours, _ = DIAGONAL_ESTIMATORS["xdiag"](sec_op, m, generator=torch.Generator().manual_seed(s))
        ours_err.append(
            float(torch.linalg.vector_norm(ours - exact_diag) / torch.linalg.vector_norm(exact_diag))
        )
    _, t_theirs = timed(lambda: curvlinops.xdiag(A, m), ARGS.repeats)
    _, t_ours = timed(lambda: transform_diag(wl, spec, m), ARGS.repeats)
    rows.append(
        dict(
            method="xdiag",
            budget=m,
            ours_s=t_ours,
            theirs_s=t_theirs,
            ours_err=rms(ours_err),
            theirs_err=rms(theirs_err),
            build_s=build,
        )
    )
    return rows


def rms(xs: list[float]) -> float:
    return math.sqrt(sum(x * x for x in xs) / len(xs))


def transform_trace(wl: Workload, spec: OperatorSpec, method: str, m: int) -> Tensor:
    """What a user times: the whole transform call, operator construction included."""
    if spec.name == "hessian":
        return secorder.hessian_trace(wl.f, num_probes=m, method=method)(wl.params, wl.x, wl.y)
    if spec.name == "ggn":
        fn = secorder.fisher_trace(wl.model, "cross_entropy", num_probes=m, method=method)
        return fn(wl.params, wl.x, wl.y)
    return TRACE_ESTIMATORS[method](spec.build(wl), m)[0]


def transform_diag(wl: Workload, spec: OperatorSpec, m: int) -> Any:
    if spec.name == "hessian":
        return secorder.hessian_diagonal(wl.f, num_probes=m, method="xdiag")(wl.params, wl.x, wl.y)
    if spec.name == "ggn":
        fn = secorder.fisher_diagonal(wl.model, "cross_entropy", num_probes=m, method="xdiag")
        return fn(wl.params, wl.x, wl.y)
    return DIAGONAL_ESTIMATORS["xdiag"](spec.build(wl), m)[0]


def pyhessian_rows(wl: Workload, steps: int, runs: int, top_n: int) -> dict[str, Any]:
    try:
        from pyhessian import hessian as pyh
    except ImportError:
        print("  PyHessian not importable: skipped")
        return {}
    import warnings

    # PyHessian's density() calls torch.eig, removed from torch 2: shim it (T is symmetric tridiagonal).
    def _eig(T: Tensor, eigenvectors: bool = True) -> tuple[Tensor, Tensor]:
        w, V = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], dim=1), V

    torch.eig = _eig  # type: ignore[attr-defined]
    model = make_model(ARGS.small)
    crit = nn.CrossEntropyLoss()
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")

        def run_eigs() -> list[float]:
            H = pyh(model, crit, data=(wl.x, wl.y), cuda=False)
            vals, _ = H.eigenvalues(maxIter=100, tol=1e-3, top_n=top_n)
            model.zero_grad(set_to_none=True)
            return sorted(vals, reverse=True)

        def run_density() -> tuple[list[list[float]], list[list[float]]]:
            H = pyh(model, crit, data=(wl.x, wl.y), cuda=False)
            eigs, weights = H.density(iter=steps, n_v=runs)
            model.zero_grad(set_to_none=True)
            return eigs, weights

        torch.manual_seed(0)
        out["pyh_eigs"], out["pyh_eigs_s"] = timed(run_eigs, ARGS.repeats)
        torch.manual_seed(0)
        out["pyh_density"], out["pyh_density_s"] = timed(run_density, 1)
    return out


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    small = ARGS.small
    seeds = ARGS.seeds or (3 if small else 10)
    budgets = (
        [int(b) for b in ARGS.budgets.split(",")]
        if ARGS.budgets
        else ([12, 24, 48] if small else [12, 24, 48, 96, 192, 384])
    )
    equal = ARGS.equal_budget or (24 if small else 96)
    wl = workload(small)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; model P = {wl.size} ({wl.tag})")
    ARGS.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"P": wl.size, "small": small, "seeds": seeds, "operators": {}}
    curves_by_op: dict[str, list[Curve]] = {}

    for name in ARGS.operators.split(","):
        spec = OPERATORS[name]
        print(f"\n=== {name} ===")
        exact_diag = spec.exact_diag(wl, ARGS.cache)
        exact = float(exact_diag.double().sum())
        ref = backpack_diagonal(wl, spec.backpack_extension) if spec.backpack_extension else None
        line = f"exact trace {exact:.6g}"
        if ref is not None:
            rel = float(torch.linalg.vector_norm(ref - exact_diag) / torch.linalg.vector_norm(exact_diag))
            line += f"; BackPACK {spec.backpack_extension} trace {float(ref.sum()):.6g} (diag rel. diff {rel:.1e})"
        print(line)
        op = spec.build(wl)
        methods = ["hutchinson", "hutch++", "xtrace"] + (["xnystrace"] if spec.psd else [])
        curves = []
        print(
            f"{'method':<22}" + "".join(f"{m:>10}" for m in budgets) + "   (RMS relative error; s/estimate)"
        )
        for method in [] if ARGS.no_curves else methods:
            c = trace_curve(op, method, budgets, seeds, exact)
            curves.append(c)
            print(f"{c.label:<22}" + "".join(f"{e:>10.2e}" for e in c.rel_error))
            print(f"{'':<22}" + "".join(f"{t:>10.3f}" for t in c.seconds))
        for method in [] if ARGS.no_curves else ["hutchinson", "xdiag"]:
            c = diag_curve(op, method, budgets, seeds, exact_diag)
            curves.append(c)
            print(f"{c.label:<22}" + "".join(f"{e:>10.2e}" for e in c.rel_error))
        curves_by_op[name] = curves
        entry: dict[str, Any] = {"exact_trace": exact, "curves": [c.__dict__ for c in curves]}

        if not ARGS.no_competitors:
            print(
                f"\n--- curvlinops at equal budget (m = {equal}, {seeds} seeds, time: median of {ARGS.repeats}) ---"
            )
            rows = curvlinops_rows(wl, spec, equal, seeds, exact, exact_diag, op)
            if rows:
                print(
                    f"{'method':<12}{'m':>5}{'secorder s':>12}{'curvlinops s':>14}{'speed-up':>10}"
                    f"{'secorder err':>14}{'curvlinops err':>16}"
                )
                for r in rows:
                    print(
                        f"{r['method']:<12}{r['budget']:>5}{r['ours_s']:>12.3f}{r['theirs_s']:>14.3f}"
                        f"{r['theirs_s'] / r['ours_s']:>9.2f}x{r['ours_err']:>14.2e}{r['theirs_err']:>16.2e}"
                    )
                print(f"(curvlinops operator construction, not included: {rows[0]['build_s']:.3f} s)")
            entry["curvlinops"] = rows
        results["operators"][name] = entry

        if name == "hessian" and not ARGS.no_competitors:
            spectra_comparison(wl, results)

    (ARGS.out / "bench_estimators.json").write_text(json.dumps(results, indent=1, default=str))
    plot(curves_by_op, results, ARGS.out / "estimators_error_vs_budget.png")


def spectra_comparison(wl: Workload, results: dict[str, Any]) -> None:
    steps, runs, top_n = (30, 3, 3) if ARGS.small else (80, 10, 3)
    print(f"\n--- spectra: top-{top_n} eigenvalues, SLQ density ({runs} runs × {steps} steps) ---")
    op, _ = secorder.hessian_operator(wl.f, wl.params, wl.x, wl.y)
    tight = lanczos_eigenvalues(
        op, top_n, tol=1e-10, max_steps=min(wl.size, 600), generator=torch.Generator().manual_seed(1)
    )
    ref = torch.tensor(tight.eigenvalues.tolist(), dtype=torch.float64)
    print(f"reference (Lanczos, tol 1e-10, {tight.num_products} HVPs): {[round(v, 6) for v in ref.tolist()]}")

    def rel_err(vals: list[float]) -> float:
        return float((torch.tensor(vals, dtype=torch.float64) - ref).abs().max() / ref.abs().max())

    entry: dict[str, Any] = {"reference": ref.tolist(), "secorder": {}}
    for tol in (None, 1e-2):  # the default (√ε residual) and a loose one closer to PyHessian's
        fn = secorder.hessian_eigenvalues(wl.f, k=top_n, tol=tol)
        vals, t = timed(
            lambda fn=fn: fn(wl.params, wl.x, wl.y, generator=torch.Generator().manual_seed(0)), ARGS.repeats
        )
        res = lanczos_eigenvalues(op, top_n, tol=tol, generator=torch.Generator().manual_seed(0))
        print(
            f"secorder hessian_eigenvalues(tol={tol}): {[round(v, 6) for v in vals.tolist()]}  {t:.3f} s, "
            f"{res.num_products} HVPs, max rel. error {rel_err(vals.tolist()):.1e}"
        )
        entry["secorder"][str(tol)] = dict(
            values=vals.tolist(), seconds=t, hvps=res.num_products, rel_error=rel_err(vals.tolist())
        )
    t_ours = entry["secorder"]["None"]["seconds"]
    timings = {}
    for reorth in (True, False):
        dens = secorder.hessian_spectral_density(wl.f, num_runs=runs, num_steps=steps, reorthogonalize=reorth)
        out, timings[reorth] = timed(
            lambda dens=dens: dens(wl.params, wl.x, wl.y, generator=torch.Generator().manual_seed(0)), 1
        )
        if reorth:
            grid, density = out
    # Compare densities on one grid with one σ: secorder's default σ is 1% of the node spread
    # and its grid spans the nodes ± 6σ.
    sigma = 0.01 * float(grid[-1] - grid[0]) / (1 + 12 * 0.01)

    def broaden(nodes: Tensor, weights: Tensor) -> Tensor:
        g = torch.exp(-0.5 * ((grid[:, None, None] - nodes.to(grid.dtype)) / sigma) ** 2)
        return (g * weights.to(grid.dtype)).sum((1, 2)) / (nodes.shape[0] * sigma * math.sqrt(2 * math.pi))

    def l1(a: Tensor, b: Tensor) -> float:
        return float(torch.trapezoid((a - b).abs(), grid))

    plain = broaden(
        *slq_nodes_weights(
            op,
            num_runs=runs,
            num_steps=steps,
            reorthogonalize=False,
            generator=torch.Generator().manual_seed(0),
        )
    )
    print(
        f"SLQ density ({runs} runs x {steps} steps): secorder {timings[True]:.3f} s with full "
        f"reorthogonalization, {timings[False]:.3f} s without; L1 distance between the two "
        f"{l1(plain, density):.3f} (0 = identical, 2 = disjoint)"
    )
    entry.update(
        secorder_density_s=timings[True],
        secorder_density_plain_s=timings[False],
        density_l1_plain=l1(plain, density),
        sigma=sigma,
    )
    pyh = pyhessian_rows(wl, steps, runs, top_n)
    if pyh:
        print(
            f"PyHessian eigenvalues (power iteration, tol 1e-3): {[round(v, 6) for v in pyh['pyh_eigs']]}  "
            f"{pyh['pyh_eigs_s']:.3f} s, max rel. error {rel_err(pyh['pyh_eigs']):.1e} "
            f"(secorder default speed-up {pyh['pyh_eigs_s'] / t_ours:.2f}x)"
        )
        eigs, weights = pyh["pyh_density"]
        theirs = broaden(torch.tensor(eigs), torch.tensor(weights))
        print(
            f"PyHessian density: {pyh['pyh_density_s']:.3f} s (secorder speed-up "
            f"{pyh['pyh_density_s'] / timings[True]:.2f}x with, {pyh['pyh_density_s'] / timings[False]:.2f}x "
            f"without reorthogonalization); L1 distance to secorder's {l1(theirs, density):.3f} "
            f"(same σ = {sigma:.3g}; both random)"
        )
        entry.update(
            pyhessian=pyh["pyh_eigs"],
            pyhessian_s=pyh["pyh_eigs_s"],
            pyhessian_density_s=pyh["pyh_density_s"],
            density_l1_pyhessian=l1(theirs, density),
        )
    results["spectra"] = entry
    try:
        secorder.plot_spectral_density(
            grid,
            density,
            ARGS.out / "hessian_density.png",
            eigenvalues=ref,
            title="MLP Hessian spectral density (SLQ)",
        )
    except ImportError as exc:
        print(f"  no density plot: {exc}")


def plot(curves_by_op: dict[str, list[Curve]], results: dict[str, Any], path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib not importable: no plot ({path})")
        return
    fig = Figure(figsize=(8.5 * len(curves_by_op), 4.5))
    colors = {
        "hutchinson": "tab:blue",
        "hutch++": "tab:orange",
        "xtrace": "tab:green",
        "xnystrace": "tab:red",
        "hutchinson diag": "tab:purple",
        "xdiag diag": "tab:brown",
        "xdiag": "tab:brown",
    }
    for i, (name, curves) in enumerate(curves_by_op.items()):
        ax = fig.add_subplot(1, len(curves_by_op), i + 1)
        for c in curves:
            method = c.label.removeprefix("secorder ")
            style = "--" if "diag" in c.label else "-"
            ax.loglog(c.budgets, c.rel_error, style, marker="o", color=colors.get(method), label=c.label)
        for r in results["operators"][name].get("curvlinops", []):
            ax.loglog(
                [r["budget"]],
                [r["theirs_err"]],
                "x",
                markersize=10,
                mew=2,
                color=colors.get(r["method"]),
                label=f"curvlinops {r['method']}",
            )
        budgets = curves[0].budgets if curves else []
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("matrix-vector products")
        ax.set_ylabel("RMS relative error (trace; diagonal: ‖d̂−d‖/‖d‖)")
        ax.set_title(f"{name}, P = {results['P']}, {results['seeds']} seeds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

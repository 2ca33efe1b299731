"""Exact empirical-Fisher and GGN traces/diagonals: secorder's fast and generic paths vs BackPACK.

Workloads (one run, the same seeded weights and data for every contender):

* MLP 784-128-128-10 (tanh), batch 128, cross-entropy (mean);
* small CNN Conv2d(3,16,3,p=1)-ReLU-Conv2d(16,16,3,p=1)-ReLU-Flatten-Linear(16384,10), batch 64;
* a residual MLP with LayerNorm (784-128, two pre-LN residual blocks, head 10), batch 128,
  which BackPACK cannot handle: only secorder's generic/fast ratio is reported (and
  BackPACK's error).

Quantities: exact tr/diag of the empirical Fisher E = (1/N) Σ ∇l_n ∇l_nᵀ and of the GGN
G = Jᵀ ∇²_z L J. BackPACK: ``SumGradSquared`` (= (1/N²) Σ_n g_n², so E's diagonal is N times
it) and ``DiagGGNExact`` (the GGN of the mean loss); each timing is forward + backward with
the extension, one extension at a time. secorder: ``fisher_trace``/``fisher_diagonal`` with
``path="fast"`` and ``path="generic"``, the whole call, and the same transforms of a plain
``model_fn`` (``functional_call``; the structured sweep over a tape of the whole batch).

BackPACK runs in its own environment (it may need a different torch) as a subprocess of this
same script (``--backpack-worker``), on the weights and data saved by the parent; its
diagonals come back through a file and are compared entry by entry with secorder's.

Usage::

    PYTHONPATH=. python benchmarks/bench_fisher.py                     # full run
    PYTHONPATH=. python benchmarks/bench_fisher.py --repeats 1 --warmup 0   # smoke run
    PYTHONPATH=. python benchmarks/bench_fisher.py --backpack-python /path/to/venv/bin/python

BackPACK is optional: without an interpreter that imports it, its columns read "n/a".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
QUANTITIES = [("empirical", "trace"), ("empirical", "diag"), ("ggn", "trace"), ("ggn", "diag")]


# --------------------------------------------------------------------------- models and data


class ResidualLN(nn.Module):
    """784-128, two pre-LayerNorm residual blocks (LN-Linear-tanh-Linear), head 128-10."""

    def __init__(self, width: int = 128, blocks: int = 2) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Flatten(), nn.Linear(784, width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def make_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 32 * 32, 10),
        )
    if name == "resmlp_ln":
        return ResidualLN()
    raise ValueError(name)


def make_data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        return torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    return torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)


MODELS = ["mlp", "cnn", "resmlp_ln"]


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, Any]:
    """Median wall time in ms over ``repeats`` calls after ``warmup`` calls, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


# --------------------------------------------------------------------------- BackPACK worker


def backpack_worker(workdir: Path, repeats: int, warmup: int) -> None:
    """Runs under BackPACK's interpreter: time SumGradSquared and DiagGGNExact, save diagonals."""
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, SumGradSquared

    report: dict[str, Any] = {"torch": torch.__version__}
    for name in MODELS:
        problem = torch.load(workdir / f"problem_{name}.pt")
        try:
            model = make_model(name)
            model.load_state_dict(problem["state"])
            model = extend(model)
            crit = extend(nn.CrossEntropyLoss())
            x = problem["x"]
            entry: dict[str, Any] = {}
            diags: dict[str, list[torch.Tensor]] = {}
            for ext, attr, key in (
                (SumGradSquared, "sum_grad_squared", "empirical"),
                (DiagGGNExact, "diag_ggn_exact", "ggn"),
            ):

                def run(
                    ext: Any = ext, model: nn.Module = model, crit: nn.Module = crit, data: Any = problem
                ) -> None:
                    model.zero_grad()
                    loss = crit(model(data["x"]), data["y"])
                    with backpack(ext()):
                        loss.backward()

                ms, _ = timed(run, repeats, warmup)
                scale = x.shape[0] if key == "empirical" else 1  # SumGradSquared = (1/N²) Σ g_n²
                diags[key] = [getattr(p, attr).detach() * scale for p in model.parameters()]
                entry[key] = ms
            torch.save(diags, workdir / f"backpack_{name}.pt")
            report[name] = entry
        except Exception as exc:
            report[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    (workdir / "backpack.json").write_text(json.dumps(report))


def run_backpack(python: str | None, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    if python is None:
        return {"error": "no BackPACK interpreter found (pass --backpack-python)"}
    cmd = [python, str(Path(__file__).resolve()), "--backpack-worker", str(workdir)]
    cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env.pop("PYTHONPATH", None)  # the worker needs only torch and BackPACK
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"BackPACK worker failed: {tail[0][:200]}"}
    return json.loads((workdir / "backpack.json").read_text())


def find_backpack_python(requested: str | None) -> str | None:
    if requested == "none":
        return None
    candidates = [requested, os.environ.get("SECORDER_BACKPACK_PYTHON")]
    candidates += [str(ROOT / ".backpackvenv/bin/python"), str(ROOT / ".benchvenv/bin/python")]
    for cand in candidates:
        if not cand or not Path(cand).exists():
            continue
        ok = subprocess.run([cand, "-c", "import backpack"], capture_output=True, check=False).returncode == 0
        if ok:
            return cand
    return None


# --------------------------------------------------------------------------- secorder side


def run_secorder(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> dict[tuple[str, str, str], tuple[float, Any]]:
    import secorder

    params = {k: v.detach() for k, v in model.named_parameters()}
    results: dict[tuple[str, str, str], tuple[float, Any]] = {}
    for kind, what in QUANTITIES:
        transform = secorder.fisher_trace if what == "trace" else secorder.fisher_diagonal
        for path in ("fast", "generic"):
            fn = transform(model, "cross_entropy", kind=kind, path=path)
            # the generic route (whole-batch VJPs, seconds on the CNN) is a reference: timed once
            reps, warm = (args.repeats, args.warmup) if path == "fast" else (1, 0)
            ms, out = timed(lambda fn=fn: fn(params, x, y), reps, warm)
            assert fn.path_info.path == path, fn.path_info
            results[(kind, what, path)] = (ms, out)
        # the same quantity for a plain model_fn (the structured sweep over a tape of the batch)
        model_fn = lambda p, inp, model=model: torch.func.functional_call(model, p, (inp,))  # noqa: E731
        fn = transform(model_fn, "cross_entropy", kind=kind)
        ms, out = timed(lambda fn=fn: fn(params, x, y), args.repeats, args.warmup)
        results[(kind, what, "plain")] = (ms, out)
        results[(kind, what, "plain_path")] = (0.0, fn.path_info.path)
    return results


def _flat(values: Any) -> torch.Tensor:
    if isinstance(values, dict):
        values = list(values.values())
    return torch.cat([v.reshape(-1).double() for v in values])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def fmt(ms: float | None) -> str:
    return "n/a" if ms is None else (f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}")


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--backpack-python", default=None, help="interpreter with BackPACK, or 'none'")
    parser.add_argument("--backpack-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backpack_worker:
        backpack_worker(Path(args.backpack_worker), args.repeats, args.warmup)
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        problems = {}
        for name in MODELS:
            torch.manual_seed(0)
            model = make_model(name)
            x, y = make_data(name)
            problems[name] = (model, x, y)
            torch.save({"state": model.state_dict(), "x": x, "y": y}, workdir / f"problem_{name}.pt")
        ours = {name: run_secorder(name, *problems[name], args) for name in MODELS}
        python = find_backpack_python(args.backpack_python)
        bp = run_backpack(python, workdir, args)
        bp_diags = {
            name: torch.load(workdir / f"backpack_{name}.pt")
            for name in MODELS
            if (workdir / f"backpack_{name}.pt").exists()
        }

    threads = torch.get_num_threads()
    print(f"# Exact Fisher/GGN: secorder vs BackPACK (torch {torch.__version__}, {threads} threads)")
    print(f"BackPACK: {python or 'not available'} ({bp.get('torch', bp.get('error', '?'))})\n")
    print(
        "median ms (generic: one call) over",
        args.repeats,
        "calls; ratios < 1 mean secorder's fast path is faster\n",
    )
    print(
        "| model | quantity | fast (ms) | plain model_fn (ms) | generic (ms) | BackPACK (ms) | fast / BackPACK "
        "| plain / BackPACK | plain / fast | generic / fast | value | max rel. diff vs BackPACK |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        entry = bp.get(name, {}) if isinstance(bp.get(name), dict) else {}
        for kind, what in QUANTITIES:
            fast_ms, fast_out = ours[name][(kind, what, "fast")]
            gen_ms, gen_out = ours[name][(kind, what, "generic")]
            bp_ms = entry.get(kind)
            label = f"{'EF' if kind == 'empirical' else 'GGN'} {what}"
            value = float(fast_out) if what == "trace" else float(_flat(fast_out).sum())
            # fast and generic must agree whatever BackPACK does
            agree = rel_err(
                _flat([fast_out]) if what == "trace" else _flat(fast_out),
                _flat([gen_out]) if what == "trace" else _flat(gen_out),
            )
            assert agree < 1e-3, f"{name} {label}: fast and generic differ by {agree:.2e}"
            if name in bp_diags:
                ref = _flat(bp_diags[name][kind])
                got = _flat(fast_out) if what == "diag" else _flat([fast_out])
                diff = rel_err(got, ref if what == "diag" else ref.sum().reshape(1))
                diff_s = f"{diff:.1e}"
            else:
                diff_s = "n/a" if "error" not in entry else "BackPACK: " + entry["error"]
            plain_ms, plain_out = ours[name][(kind, what, "plain")]
            plain_path = ours[name][(kind, what, "plain_path")][1]
            agree_plain = rel_err(
                _flat([plain_out]) if what == "trace" else _flat(plain_out),
                _flat([fast_out]) if what == "trace" else _flat(fast_out),
            )
            assert agree_plain < 1e-3, f"{name} {label}: plain model_fn and fast differ by {agree_plain:.2e}"
            cells = [name, label, fmt(fast_ms), f"{fmt(plain_ms)} ({plain_path})", fmt(gen_ms), fmt(bp_ms)]
            cells += [ratio(fast_ms, bp_ms), ratio(plain_ms, bp_ms), ratio(plain_ms, fast_ms)]
            cells += [ratio(gen_ms, fast_ms), f"{value:.4f}", diff_s]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

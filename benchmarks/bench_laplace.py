"""Diagonal Laplace fits in laplace-torch: secorder's backend vs laplace-torch's own backends.

Workload: the MLP 784-128-128-10 (tanh), cross-entropy (``"classification"``), 512 random
points in batches of 128, ``Laplace(model, "classification", subset_of_weights="all",
hessian_structure="diag", backend=...)``; ``la.fit(loader)`` is timed (median of ``--repeat`` fits). Contenders:
``secorder.laplace.SecorderGGN``, laplace-torch's ``CurvlinopsGGN`` (its default backend,
whose ``diag`` falls back to the full batch × outputs × parameters Jacobian), ``BackPackGGN``
(``DiagGGNExact``) and ``AsdlGGN``. Each contender runs in a fresh subprocess (this script
with ``--worker NAME``): peak = the extra resident memory (``ru_maxrss``) over the process
after the model, data and imports are set up and a warm-up fit on 2 points (one-time costs:
torch's lazy imports on the first autograd call take about 0.5 s) has run. The workers' diagonals come back through a
file and are compared with secorder's (max relative difference).

Usage::

    PYTHONPATH=. python benchmarks/bench_laplace.py                 # full run
    PYTHONPATH=. python benchmarks/bench_laplace.py --points 256    # quicker
    PYTHONPATH=. python benchmarks/record.py bench_laplace.py       # and record in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ["SecorderGGN", "CurvlinopsGGN", "BackPackGGN", "AsdlGGN"]


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def worker(name: str, points: int, batch: int, repeat: int, out: str) -> None:
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    import laplace.curvature as lc
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    import secorder.laplace as sl

    backend = getattr(sl, name, None) or getattr(lc, name)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(points, 784, generator=g), torch.randint(0, 10, (points,), generator=g)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch)
    # warm-up: one fit on 2 points (one-time costs such as torch's lazy imports on the first
    # autograd call), small enough to leave the memory peak to the timed fit
    warm = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="diag", backend=backend
    )
    warm.fit(DataLoader(TensorDataset(X[:2], y[:2]), batch_size=2))
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", backend=backend)
    base = peak_bytes()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        la.fit(loader)
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            extra = max(0, peak_bytes() - base)
    seconds = statistics.median(times)
    torch.save(la.H.detach(), out + ".pt")
    Path(out + ".json").write_text(json.dumps({"seconds": seconds, "peak": extra}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="timed fits per contender (median)")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.points, args.batch, args.repeat, args.out)
        return

    results, diags = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONTENDERS:
            out = str(Path(tmp) / name)
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--out",
                out,
                "--points",
                str(args.points),
                "--batch",
                str(args.batch),
                "--repeat",
                str(args.repeat),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                lines = proc.stderr.strip().splitlines()
                results[name] = {"error": lines[-1][:120] if lines else f"exit {proc.returncode}"}
                continue
            results[name] = json.loads(Path(out + ".json").read_text())
            diags[name] = torch.load(out + ".pt")

    ref = diags.get("SecorderGGN")
    ours = results.get("SecorderGGN", {})
    print(
        f"Diagonal GGN Laplace fit, MLP 784-128-128-10 (tanh), {args.points} points in batches of "
        f"{args.batch}, float32, {torch.get_num_threads()} threads\n"
    )
    print(
        "| backend | fit time | peak extra memory | time / secorder | memory / secorder | max rel. diff to secorder |"
    )
    print("|---|---|---|---|---|---|")
    for name in CONTENDERS:
        r = results[name]
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
            continue
        rel = "—"
        if ref is not None and name != "SecorderGGN":
            rel = f"{float(((diags[name] - ref).abs() / ref.abs().clamp_min(1e-12 * float(ref.abs().max()))).max()):.1e}"
        t_ratio = f"{r['seconds'] / ours['seconds']:.3g}×" if "seconds" in ours else "n/a"
        m_ratio = f"{r['peak'] / max(ours['peak'], 1):.3g}×" if "peak" in ours else "n/a"
        print(
            f"| {name} | {r['seconds']:.3f} s | {r['peak'] / 2**20:.0f} MiB | {t_ratio} | {m_ratio} | {rel} |"
        )
    print(
        "\npeak = extra ru_maxrss of the first timed fit over the set-up process (resolution: one page; a fit that stays "
        "inside already-touched memory reads 0 MiB, and the ratio divides by max(peak, 1 byte))."
    )


if __name__ == "__main__":
    main()

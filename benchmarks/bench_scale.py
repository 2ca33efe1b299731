"""Scaling: time and peak memory of Hutchinson traces and exact diagonals vs parameters, batches, probes.

Run: ``PYTHONPATH=. python benchmarks/bench_scale.py`` on a quiet machine (``--small`` for a
quick smoke run at tiny sizes, which does not touch RESULTS.md unless ``--write``).

Times are the median of up to 3 runs after a warm-up run (one run when it takes over 5 s).
Each measurement runs in a fresh subprocess, so the peak resident memory
(``resource.getrusage(...).ru_maxrss``; on CUDA ``torch.cuda.max_memory_allocated``) belongs
to that measurement alone; the baseline (imports, model, data) is measured in the same
process before the timed call and reported separately, so the table shows the extra peak.

Model: an MLP ``Linear(100, h) → tanh → Linear(h, 10)`` with cross-entropy on batches of 64
samples, h chosen for ~10k, 100k and 1M parameters.

* Hutchinson trace: ``secorder.hessian_trace(f, num_probes=K)`` (automatic chunks).
* Exact diagonal: P one-hot Hessian-vector products, ``default_chunk_size`` rows at a time.
  The full diagonal is run where it takes under a minute; for larger P one chunk is timed
  and the total is projected as (time per chunk) × (number of chunks), marked "projected".
  The peak memory of one chunk *is* the peak of the whole computation, since chunks are
  independent and freed in turn: that is what automatic chunking bounds.
* Data: ``secorder.dataset_hessian_trace`` over B batches (cost should be linear in B).
* Probes: Hutchinson with K probes (cost should be linear in K).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C  # noqa: N812 - short alias for the shared helpers
import torch
from torch import nn

import secorder
from secorder._chunking import default_chunk_size
from secorder.estimators import exact_diagonal

D_IN, D_OUT, BATCH = 100, 10, 64


def hidden_for(params: int) -> int:
    return max(1, round((params - D_OUT) / (D_IN + 1 + D_OUT)))


def problem(params: int, batches: int, device: str) -> tuple[Any, dict[str, torch.Tensor], list[Any]]:
    torch.manual_seed(0)
    h = hidden_for(params)
    model = nn.Sequential(nn.Linear(D_IN, h), nn.Tanh(), nn.Linear(h, D_OUT)).to(device)
    f, p = secorder.module_loss(model, nn.functional.cross_entropy)
    data = [
        (torch.randn(BATCH, D_IN, device=device), torch.randint(0, D_OUT, (BATCH,), device=device))
        for _ in range(batches)
    ]
    return f, p, data


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One measurement (runs in its own process)."""
    torch.set_num_threads(cfg["threads"]) if cfg["threads"] else None
    device = cfg["device"]
    f, p, data = problem(cfg["params"], cfg["batches"], device)
    P = sum(v.numel() for v in p.values())
    gen = torch.Generator(device).manual_seed(0)
    # warm-up on a tiny problem of the same kind (first-call overheads), then the baseline
    fw, pw, dw = problem(200, 1, device)
    secorder.hessian_trace(fw, num_probes=2)(pw, *dw[0], generator=torch.Generator(device).manual_seed(0))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = peak_bytes(device)
    out: dict[str, Any] = {"P": P}

    def run() -> None:
        if cfg["what"] == "hutchinson":
            secorder.dataset_hessian_trace(f, p, data, num_probes=cfg["probes"], generator=gen)
        elif cfg["what"] == "exact_diagonal":
            op, _ = secorder.hessian_operator(f, p, *data[0])
            chunk = default_chunk_size(P, P, 4)
            out["chunk"], out["chunks"] = chunk, math.ceil(P / chunk)
            if cfg["full"]:
                exact_diagonal(op, chunk_size=chunk)
            else:  # one chunk of one-hot rows, the unit the full computation repeats
                rows = torch.arange(chunk, device=device)
                basis = torch.zeros(chunk, P, device=device)
                basis[rows, rows] = 1
                op.matmat(basis)
        if device == "cuda":
            torch.cuda.synchronize()

    # median of up to 3 timed runs after one warm-up run (a single run when it takes > 5 s)
    times: list[float] = []
    for i in range(4):
        t0 = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t0
        if i > 0:
            times.append(elapsed)
        if elapsed > 5:
            times = times or [elapsed]
            break
    out["seconds"] = sorted(times)[len(times) // 2]
    if cfg["what"] == "exact_diagonal" and not cfg["full"]:
        out["projected_seconds"] = out["seconds"] * out["chunks"]
    out["peak_extra_bytes"] = max(0, peak_bytes(device) - base)
    out["baseline_bytes"] = base
    return out


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**cfg, **result}


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md even with --small")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.threads:
        torch.set_num_threads(args.threads)  # the workers get the same count; the header reports it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = [1_000, 5_000] if args.small else [10_000, 100_000, 1_000_000]
    full_limit = 5_000 if args.small else 10_000
    mid = sizes[len(sizes) // 2]
    batch_counts = [1, 2] if args.small else [1, 2, 4, 8]
    probe_counts = [5, 10] if args.small else [10, 20, 40]
    K = 5 if args.small else 20
    base = {"device": device, "threads": args.threads, "batches": 1, "probes": K, "full": False}

    rows_p, rows_b, rows_k = [], [], []
    for P in sizes:
        hut = measure({**base, "what": "hutchinson", "params": P})
        ex = measure({**base, "what": "exact_diagonal", "params": P, "full": full_limit >= P})
        rows_p.append((hut, ex))
        print(P, hut["seconds"], ex.get("projected_seconds", ex["seconds"]), flush=True)
    for B in batch_counts:
        rows_b.append(measure({**base, "what": "hutchinson", "params": mid, "batches": B}))
    for k in probe_counts:
        rows_k.append(measure({**base, "what": "hutchinson", "params": mid, "probes": k}))

    t1 = C.table(
        [
            [
                f"{h['P']:,}",
                C.fmt_time(h["seconds"]),
                mib(h["peak_extra_bytes"]),
                C.fmt_time(e.get("projected_seconds", e["seconds"])) + ("" if e["full"] else " (projected)"),
                f"{e['chunk']} × {e['chunks']}",
                mib(e["peak_extra_bytes"]),
            ]
            for h, e in rows_p
        ],
        ["parameters", f"Hutchinson K={K}", "peak", "exact diagonal", "chunk × chunks", "peak (one chunk)"],
    )
    t2 = C.table(
        [[str(r["batches"]), C.fmt_time(r["seconds"]), mib(r["peak_extra_bytes"])] for r in rows_b],
        [f"batches of {BATCH} ({rows_b[0]['P']:,} parameters, K={K})", "time", "peak"],
    )
    t3 = C.table(
        [[str(r["probes"]), C.fmt_time(r["seconds"]), mib(r["peak_extra_bytes"])] for r in rows_k],
        [f"probes K ({rows_k[0]['P']:,} parameters, 1 batch)", "time", "peak"],
    )
    png = Path(__file__).resolve().parent / ("scale_small.png" if args.small else "scale.png")
    plot(rows_p, rows_b, rows_k, png)
    text = (
        C.header("Scaling: parameters, batches, probes")
        + f"\nDevice {device}; peak = extra peak memory over the process baseline "
        + "(ru_maxrss on CPU, max_memory_allocated on CUDA). Plot: "
        + f"`benchmarks/{png.name}`.\n\n"
        + t1
        + "\n"
        + t2
        + "\n"
        + t3
    )
    print(text)
    if not args.small or args.write:
        C.write_section("scale", text)


def plot(rows_p: list[Any], rows_b: list[Any], rows_k: list[Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    Ps = [h["P"] for h, _ in rows_p]
    ax[0].loglog(Ps, [h["seconds"] for h, _ in rows_p], "o-", label="Hutchinson trace")
    ax[0].loglog(
        Ps, [e.get("projected_seconds", e["seconds"]) for _, e in rows_p], "s--", label="exact diagonal"
    )
    ax[0].set(xlabel="parameters P", ylabel="seconds", title="time vs parameters")
    ax[0].legend()
    ax[1].plot([r["batches"] for r in rows_b], [r["seconds"] for r in rows_b], "o-")
    ax[1].set(xlabel="batches", ylabel="seconds", title="Hutchinson trace vs batches")
    ax[2].plot([r["probes"] for r in rows_k], [r["seconds"] for r in rows_k], "o-")
    ax[2].set(xlabel="probes K", ylabel="seconds", title="Hutchinson trace vs probes")
    for a in ax[1:]:
        a.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

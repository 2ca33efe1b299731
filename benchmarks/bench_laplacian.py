"""Per-point Laplacians and biharmonics of a network: secorder.laplacian / biharmonic vs nested AD.

Workloads (issue 14), float32, one thread by default, N = 64 points:

* ``tanh D``: an MLP D→256→256→1 with tanh, D = 16, 64, 256; the exact Laplacian at every point
  and the Hutchinson estimate with 16 Rademacher probes per point;
* ``gelu+ln D``: D→256→LayerNorm→GELU→256→LayerNorm→GELU→1 (ops the Taylor-mode reference
  ``jet-for-pytorch`` has no rule for), exact;
* ``biharmonic D=5``: the tanh MLP 5→256→256→1, exact Δ²u at every point.

Contenders:

* ``secorder``: :func:`secorder.laplacian` / :func:`secorder.biharmonic` (collapsed Taylor mode);
* ``static``: the same with ``static=True`` (the tape recorded on the first call is replayed:
  no recording and no independence proof per call);
* ``torch.func``: ``vmap(hessian(u_point))`` then the trace (exact), or
  ``vmap(vmap(jvp(jacrev(u_point))))`` over points and probes (stochastic), or
  ``vmap(hessian(x ↦ tr hessian(u_point)(x)))`` (biharmonic);
* ``today``: ``vmap(secorder.hessian_trace(u_point, argnums=1))`` over the points (what secorder
  offered before ``laplacian``; exact, or ``num_probes=16``);
* ``jet``: the reference ``jet-for-pytorch`` 1.0.0 ``laplacian`` (collapsed; ``vmap`` over the
  points), when importable: set ``JET_PATH`` to an unpacked copy of the wheel (it declares
  Python ≥ 3.12 for one ``type`` alias; replace that line by a plain assignment to run it on 3.11).
  Its column is skipped when it is absent or cannot run the network.

Time: the minimum wall time over ``--repeats`` calls after one warm-up, contenders alternated.
Flops: each contender's floating-point operations in one call (after a warm-up, so ``static``
counts its replay only), counted once with :class:`torch.utils.flop_counter.FlopCounterMode`,
which counts only matrix products and convolutions (``mm``, ``addmm``, ``bmm``, ``baddbmm``,
convolutions, attention; 2 flops per multiply-add) and no elementwise op (tanh, products, sums).
The column ``torch.func flops / secorder flops`` next to the time ratio shows how much of a
speed-up the matmul work alone allows (a time ratio far above it comes from elsewhere, e.g.
per-op overhead; a target above it needs fewer flops, not less overhead). The flops of a
``torch.func`` contender are those its ``vmap`` runs batched, as the dispatcher sees them.

Memory (``--memory``): the peak of the tensor memory allocated during one call (after a warm-up),
from ``torch.profiler``'s allocation and free events (``profile_memory=True``) summed in time
order; inputs and parameters are not counted. (Peak RSS was tried first: after a warm-up the
allocator reuses freed pages and the growth reads as 0, so it measures nothing on CPU.)

Run: ``PYTHONPATH=. python benchmarks/bench_laplacian.py [--repeats R] [--threads T] [--memory]
[--cpu-time] [--no-flops]`` (``--cpu-time``: the thread's CPU time instead of wall time, on a
loaded machine; ``--no-flops``: no flop count);
``python benchmarks/record.py bench_laplacian.py --memory`` writes the tables into RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch's conventional alias)
from torch.func import hessian, jacrev, jvp, vmap
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import secorder

N_POINTS, WIDTH, PROBES = 64, 256, 16


def _jet() -> Any:
    path = os.environ.get("JET_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    try:
        import jet  # type: ignore[import-not-found]
    except Exception:
        return None
    return jet


def params(d: int, ln: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = {
        "w1": torch.randn(WIDTH, d, generator=g) / math.sqrt(d),
        "b1": torch.randn(WIDTH, generator=g) * 0.1,
        "w2": torch.randn(WIDTH, WIDTH, generator=g) / math.sqrt(WIDTH),
        "b2": torch.randn(WIDTH, generator=g) * 0.1,
        "w3": torch.randn(1, WIDTH, generator=g) / math.sqrt(WIDTH),
    }
    if ln:
        p.update(
            {
                "g1": torch.ones(WIDTH),
                "h1": torch.zeros(WIDTH),
                "g2": torch.ones(WIDTH),
                "h2": torch.zeros(WIDTH),
            }
        )
    return p


def net_tanh(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.linear(x, p["w1"], p["b1"]))
    h = torch.tanh(F.linear(h, p["w2"], p["b2"]))
    return F.linear(h, p["w3"])  # (..., 1): jet needs no indexing op


def net_gelu_ln(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = F.gelu(F.layer_norm(F.linear(x, p["w1"], p["b1"]), (WIDTH,), p["g1"], p["h1"]))
    h = F.gelu(F.layer_norm(F.linear(h, p["w2"], p["b2"]), (WIDTH,), p["g2"], p["h2"]))
    return F.linear(h, p["w3"])


def contenders(kind: str, net: Callable[..., torch.Tensor], d: int) -> dict[str, Callable[[], Any]]:
    p = params(d, net is net_gelu_ln)
    x = torch.randn(N_POINTS, d, generator=torch.Generator().manual_seed(1))
    u = lambda p, x: net(p, x).squeeze(-1)  # noqa: E731
    u_point = lambda p, xn: net(p, xn)[0]  # noqa: E731
    out: dict[str, Callable[[], Any]] = {}
    jet = _jet()
    if kind == "exact":
        lap = secorder.laplacian(u)
        lap_static = secorder.laplacian(u, static=True)
        today = vmap(secorder.hessian_trace(u_point, argnums=1), in_dims=(None, 0))
        out["secorder"] = lambda: lap(p, x)
        out["static"] = lambda: lap_static(p, x)
        out["torch.func"] = lambda: (
            vmap(hessian(lambda xn: u_point(p, xn)))(x).diagonal(dim1=-2, dim2=-1).sum(-1)
        )
        out["today"] = lambda: today(p, x)
        if jet is not None:
            try:
                jl = jet.laplacian(lambda xn: net(p, xn), (x[0],))
                vmap(jl)(x)
                out["jet"] = lambda: vmap(jl)(x)
            except Exception:
                pass
    elif kind == "stochastic":
        gen = torch.Generator().manual_seed(0)
        lap = secorder.laplacian(u, num_probes=PROBES)
        today = vmap(
            secorder.hessian_trace(u_point, argnums=1, num_probes=PROBES),
            in_dims=(None, 0),
            randomness="different",
        )
        v = torch.randint(0, 2, (N_POINTS, PROBES, d), generator=gen).float() * 2 - 1

        def nested() -> torch.Tensor:
            g = jacrev(lambda xn: u_point(p, xn))
            quad = lambda xn, vk: (jvp(g, (xn,), (vk,))[1] * vk).sum()  # noqa: E731
            return vmap(vmap(quad, in_dims=(None, 0)))(x, v).mean(1)

        lap_static = secorder.laplacian(u, num_probes=PROBES, static=True)
        out["secorder"] = lambda: lap(p, x, generator=gen)
        out["static"] = lambda: lap_static(p, x, generator=gen)
        out["torch.func"] = nested
        out["today"] = lambda: today(p, x)
        if jet is not None:
            try:
                jl = jet.laplacian(lambda xn: net(p, xn), (x[0],), randomization=("rademacher", PROBES))
                vmap(jl, randomness="different")(x)
                out["jet"] = lambda: vmap(jl, randomness="different")(x)
            except Exception:
                pass
    else:  # biharmonic
        bih = secorder.biharmonic(u)

        def lap_point(xn: torch.Tensor) -> torch.Tensor:
            return hessian(lambda z: u_point(p, z))(xn).trace()

        bih_static = secorder.biharmonic(u, static=True)
        out["secorder"] = lambda: bih(p, x)
        out["static"] = lambda: bih_static(p, x)
        out["torch.func"] = lambda: vmap(lambda xn: hessian(lap_point)(xn).trace())(x)
        if jet is not None and hasattr(jet, "bilaplacian"):
            try:
                jb = jet.bilaplacian(lambda xn: net(p, xn), (x[0],))
                vmap(jb)(x)
                out["jet"] = lambda: vmap(jb)(x)
            except Exception:
                pass
    return out


WORKLOADS: list[tuple[str, str, Callable[..., torch.Tensor], int]] = [
    *[(f"tanh D={d}", "exact", net_tanh, d) for d in (16, 64, 256)],
    *[(f"tanh D={d}", "stochastic", net_tanh, d) for d in (16, 64, 256)],
    *[(f"gelu+ln D={d}", "exact", net_gelu_ln, d) for d in (16, 64)],
    ("tanh D=5", "biharmonic", net_tanh, 5),
]


FAILURES: list[str] = []
CLOCK = time.perf_counter  # --cpu-time: time.thread_time (CPU time of this thread, for a loaded machine)


def _time(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    for k, f in list(fns.items()):
        try:
            f()
        except Exception as exc:
            print(f"{k} fails: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            msg = f"{type(exc).__name__}: {str(exc)[:160]}…".replace("`", "'")
            FAILURES.append(f"{k} cannot run this workload: `{msg}`")  # code span: no rST markup
            del fns[k]
    best = {k: math.inf for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():  # alternated
            t0 = CLOCK()
            f()
            best[k] = min(best[k], CLOCK() - t0)
    return best


def _flops(fn: Callable[[], Any]) -> int:
    """Matrix-product and convolution flops of one call of ``fn`` (after a warm-up), by
    :class:`torch.utils.flop_counter.FlopCounterMode` (elementwise ops are not counted)."""
    fn()
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _peak_mib(fn: Callable[[], Any]) -> float:
    """Peak of the tensor memory allocated during one call of ``fn`` (after a warm-up), from the
    allocation and free events of ``torch.profiler`` (``profile_memory=True``) in time order."""
    fn()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start
    )
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


def _table(head: list[str], rows: list[list[str]], lead: str = "\n") -> None:
    """Print a markdown table (``lead`` before its header line)."""
    print(lead + "| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--no-time", action="store_true", help="memory only (with --memory)")
    ap.add_argument("--no-flops", action="store_true", help="skip the flop count")
    ap.add_argument("--only", default=None, help="run workloads whose label contains this")
    ap.add_argument(
        "--cpu-time", action="store_true", help="CPU time of the thread instead of wall time (loaded machine)"
    )
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    names = ["secorder", "static", "torch.func", "today", "jet"]
    head = [
        "workload",
        "kind",
        *[f"{n} (ms)" for n in names],
        "torch.func / secorder",
        "torch.func flops / secorder flops",
        "torch.func / static",
        "today / secorder",
        "jet / secorder",
    ]
    rows, mem_rows, flop_rows = [], [], []
    for label, kind, net, d in WORKLOADS:
        if args.only and args.only not in label:
            continue
        fns = contenders(kind, net, d)
        t = _time(fns, 0 if args.no_time else args.repeats)
        fl = {} if args.no_flops else {n: _flops(f) for n, f in fns.items()}
        fr = f"{fl['torch.func'] / fl['secorder']:.2f}×" if fl.get("secorder") and "torch.func" in fl else "—"
        if fl:
            flop_rows.append([label, kind, *[f"{fl[n] / 1e6:.0f}" if n in fl else "—" for n in names], fr])
        if not args.no_time:
            ours = t["secorder"]
            cells = [f"{t[n] * 1e3:.1f}" if n in t else "—" for n in names]
            ratios = [f"{t[n] / ours:.2f}×" if n in t else "—" for n in ("torch.func", "today", "jet")]
            st = f"{t['torch.func'] / t['static']:.2f}×" if "static" in t and "torch.func" in t else "—"
            rows.append([label, kind, *cells, ratios[0], fr, st, *ratios[1:]])
            print(" | ".join(rows[-1]), file=sys.stderr)
        if args.memory:
            m = {n: _peak_mib(f) for n, f in fns.items()}
            share = f"{m['secorder'] / m['today']:.2f}" if m.get("today") else "—"
            mem_rows.append([label, kind, *[f"{m[n]:.1f}" if n in m else "—" for n in names], share])
    if rows:
        _table(head, rows, "")
        clock = "thread CPU time" if args.cpu_time else "wall time"
        print(f"\nTimes ({clock}): minimum over {args.repeats} alternated calls after a warm-up, {args.threads} thread(s), "
          f"float32, N = {N_POINTS} points; ratios > 1: secorder is faster.")  # fmt: skip
    if flop_rows:
        _table(["workload", "kind", *[f"{n} (MFlop)" for n in names], "torch.func / secorder"], flop_rows)
        print("\nFlops: matrix products and convolutions of one call (torch.utils.flop_counter.FlopCounterMode, "
              "after a warm-up; elementwise ops not counted).")  # fmt: skip
    for note in dict.fromkeys(FAILURES):
        print(f"\n{note}")
    if mem_rows:
        _table(["workload", "kind", *[f"{n} (MiB)" for n in names], "secorder / today"], mem_rows)
        print("\nMemory: peak tensor memory allocated during one call (torch.profiler, after a warm-up).")


if __name__ == "__main__":
    main()

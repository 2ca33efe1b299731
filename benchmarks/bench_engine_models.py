"""Exact Hessian diagonal through the engine on a transformer block and a residual LayerNorm MLP,
against the old op-level per-sample sweep (issue 11).

Workloads (seeded weights and data, float32, cross-entropy with mean reduction):

* transformer block: token embedding (vocabulary 64) plus a position parameter, pre-LayerNorm
  causal two-head self-attention (qkv and output projections with biases), pre-LayerNorm GELU
  MLP (32-128-32), residuals, final LayerNorm, mean pooling over the T = 16 positions, linear
  head to 10 classes; width d = 32, batch 16 (15,658 parameters);
* residual LayerNorm MLP: 784-128, two pre-LayerNorm residual blocks (LN-Linear-tanh-Linear),
  head LN-Linear 128-10 (the model of bench_fisher.py), batch 128 (168,586 parameters).

Each row times ``secorder.hessian_diagonal(f)`` with default options on the plain function
``f = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)`` (the engine route,
``method_info`` shown), one gradient of the same loss (forward + backward), and the old op-level
per-sample sweep ``graph_sweep_diagonal`` of ``secorder/_graph_sweep.py``, which this round
deletes: the script loads that file from git revision ``c2ef9e2`` (``git show``) into a
throwaway module. When git or the revision is not available, or the old file no longer imports
against the current package, the old sweep's column shows the figure recorded on the
development machine, labelled "recorded". On the residual MLP the old sweep forms every
per-sample, per-column gradient of all 168,586 parameters and takes minutes: it runs only with
``--old-residual`` (otherwise the recorded figure is shown). Peak memory is the peak of the
tensor memory allocated during one call (``torch.profiler`` allocation and free events; the
engine after a warm-up call, the old sweep without one).

Flops: one engine call and one gradient counted with ``torch.utils.flop_counter.FlopCounterMode``,
which counts matrix products and convolutions only (mm/addmm/bmm/baddbmm/convolution and their
backward; elementwise ops, reductions, ``eigh``/``svd`` are not counted), so "flop ×grad" is the
engine's matmul work in gradients' matmul work, next to "measured ×grad" (wall time in
gradients): the gap between them is the engine's non-matmul work and overhead. The old op-level
sweep's flops are counted the same way (one call, where it runs): "op-level flops (/ engine)"
next to the time ratio says how much of that ratio fewer matrix products explain.

Usage::

    PYTHONPATH=. python benchmarks/bench_engine_models.py                    # full run
    PYTHONPATH=. python benchmarks/bench_engine_models.py --repeats 1 --warmup 0 --no-write
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from _common import ROOT, fmt_time, header, table, timeit, write_section
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

import secorder

OLD_REVISION = "c2ef9e2"
# Fallback when the old op-level sweep cannot be loaded: seconds (CPU time, one thread) measured
# on the shared development machine on 2026-12-04 with this script's workloads (noisy).
RECORDED_OLD = {"transformer": 4.3, "residual": 27.6}


class TransformerBlock(nn.Module):
    """Token + position embedding, pre-LN causal attention, pre-LN GELU MLP, final LN, mean pool."""

    def __init__(self, vocab: int = 64, t: int = 16, d: int = 32, heads: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(t, d))
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx: Tensor) -> Tensor:
        n, t = idx.shape
        h = self.emb(idx) + self.pos
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)

        def split(z: Tensor) -> Tensor:
            return z.reshape(n, t, self.heads, -1).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        att = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=idx.device), 1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(n, t, -1))
        h = h + self.out(F.gelu(self.fc(self.ln2(h))))
        return self.head(self.lnf(h).mean(1))


class ResidualLN(nn.Module):
    """784-128, two pre-LayerNorm residual blocks (LN-Linear-tanh-Linear), head LN-Linear 128-10."""

    def __init__(self, width: int = 128, blocks: int = 2) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Flatten(), nn.Linear(784, width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 10))

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def workloads() -> list[tuple[str, str, nn.Module, Tensor, Tensor]]:
    torch.manual_seed(0)
    block = TransformerBlock()
    idx, y1 = torch.randint(0, 64, (16, 16)), torch.randint(0, 10, (16,))
    res = ResidualLN()
    x, y2 = torch.randn(128, 784), torch.randint(0, 10, (128,))
    return [
        ("transformer", "transformer block T=16 d=32 (2 heads, vocab 64), N=16", block, idx, y1),
        ("residual", "residual LN MLP 784-128 (2 blocks)-10, N=128", res, x, y2),
    ]


def load_old_sweep() -> tuple[Any, str]:
    """``graph_sweep_diagonal`` from ``secorder/_graph_sweep.py`` at OLD_REVISION, or (None, why)."""
    try:
        src = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{OLD_REVISION}:secorder/_graph_sweep.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        mod = types.ModuleType("_old_graph_sweep")
        sys.modules[mod.__name__] = mod  # dataclasses resolve annotations through sys.modules
        exec(compile(src, f"{OLD_REVISION}:secorder/_graph_sweep.py", "exec"), mod.__dict__)
        return mod.graph_sweep_diagonal, ""
    except Exception as exc:  # any failure to load the old file: fall back, with the reason
        return None, f"{type(exc).__name__}: {exc}"


def peak_mib(fn: Callable[[], Any], warm: bool = True) -> float:
    """Peak of the tensor memory allocated during one call of ``fn`` (after a warm-up call when
    ``warm``), from the allocation and free events of ``torch.profiler`` in time order."""
    if warm:
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


def flops(fn: Callable[[], Any]) -> int:
    """Matmul and convolution flops of one call of ``fn`` (``FlopCounterMode``)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def rel(a: list[Tensor], b: list[Tensor]) -> float:
    fa = torch.cat([t.reshape(-1) for t in a]).double()
    fb = torch.cat([t.reshape(-1) for t in b]).double()
    return float((fa - fb).norm() / fb.norm())


def measure(
    key: str, name: str, model: nn.Module, x: Tensor, y: Tensor, old: Any, why: str, args: argparse.Namespace
) -> list[str]:
    names = [k for k, _ in model.named_parameters()]
    params = {k: p.detach() for k, p in model.named_parameters()}
    leaves = [params[k] for k in names]

    def gradient() -> Any:
        return torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))

    t_grad, _ = timeit(gradient, repeat=max(args.repeats, 5), warmup=max(args.warmup, 1))
    f = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)  # noqa: E731
    fn = secorder.hessian_diagonal(f)
    t_eng, d_eng = timeit(lambda: fn(params, x, y), repeat=args.repeats, warmup=args.warmup)
    info = fn.method_info
    m_eng = peak_mib(lambda: fn(params, x, y)) if args.memory else None
    f_grad, f_eng = flops(gradient), flops(lambda: fn(params, x, y))
    row = [
        name,
        f"{info.num_params:,}",
        f"{info.method}, R={info.num_columns}",
        fmt_time(t_grad),
        f"{fmt_time(t_eng)} ({t_eng / t_grad:.0f}×)",
        f"{f_grad / 1e6:.1f} / {f_eng / 1e6:.0f} MFLOP",
        f"{f_eng / f_grad:.0f}×",
    ]
    if old is not None and (key != "residual" or args.old_residual):

        def loss_fn(ls: list[Tensor], sample: list[Tensor]) -> Tensor:
            return F.cross_entropy(functional_call(model, dict(zip(names, ls)), (sample[0],)), sample[1])

        with torch.no_grad():
            batch_loss = loss_fn(leaves, [x, y])

        def run_old() -> list[Tensor]:
            return old(loss_fn, leaves, [x, y], scale=None, batch_loss=batch_loss, chunk_size=64)[0]  # type: ignore[no-any-return]

        t_old, d_old = timeit(run_old, repeat=args.old_repeats, warmup=0)
        m_old = peak_mib(run_old, warm=False) if args.memory else None
        f_old = flops(run_old)
        row += [
            f"{fmt_time(t_old)} ({t_old / t_grad:.0f}×)",
            f"{t_old / t_eng:.1f}×",
            f"{f_old / 1e6:.0f} MFLOP ({f_old / f_eng:.1f}×)",
            f"{rel([d_eng[k] for k in names], d_old):.1e}",
        ]
    else:
        rec = RECORDED_OLD.get(key)
        row += [
            "n/a" if rec is None else f"{fmt_time(rec)} (recorded, CPU time)",
            "n/a" if rec is None else f"{rec / t_eng:.1f}× (vs recorded)",
            "n/a",
            f"n/a ({why or 'not run: --old-residual'})",
        ]
        m_old = None
    if args.memory:
        row += [f"{m_eng:.1f} MiB", "n/a" if m_old is None else f"{m_old:.1f} MiB"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--old-repeats", type=int, default=1, help="timed runs of the old op-level sweep")
    parser.add_argument(
        "--old-residual", action="store_true", help="run the old sweep on the residual MLP (minutes)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    old, why = load_old_sweep()
    rows = [measure(*w, old, why, args) for w in workloads()]
    head = [
        "workload",
        "P",
        "engine route",
        "gradient",
        "hessian_diagonal(f) (measured ×grad)",
        "flops gradient / engine",
        "flop ×grad",
        f"op-level sweep @{OLD_REVISION} (×grad)",
        "op-level / engine",
        "op-level flops (/ engine)",
        "rel. diff",
    ]
    if args.memory:
        head += ["peak memory engine", "peak memory op-level"]
    text = (
        header("Exact Hessian diagonal: engine vs the old op-level sweep (bench_engine_models.py)")
        + "\n"
        + table(rows, head)
        + "\nMedian wall time; peak = tensor memory allocated during one call (torch.profiler events);"
        " flops = matmul and convolution flops only (torch.utils.flop_counter.FlopCounterMode).\n"
    )
    print(text)
    if not args.no_write:
        write_section("bench_engine_models", text)


if __name__ == "__main__":
    main()

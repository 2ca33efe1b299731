"""Where the Hutchinson Hessian trace's time goes on the small real models (K = 16 probes).

Models: ``tests/_zoo.py`` with ``bench=True`` (float32, batch 4, 1 thread), the sizes of
``bench_models.py``. Columns (median of ``--repeats`` after one warm-up, whole calls):

* ``auto`` / ``rev_rev`` / ``autograd``: ``secorder.hessian_trace(f, num_probes=K,
  strategy=...)`` on ``f = secorder.module_loss(model, loss)``;
* hand-written reverse over reverse (``vmap`` of ``torch.func.vjp(torch.func.grad(loss))``
  over the K probes, probes drawn inline), once with no mode (the fused attention kernels
  under ``sdpa_kernel(SDPBackend.MATH)``, as PyHessian needs), once inside
  :func:`secorder._kernels.decomposed_kernels` and
  :func:`secorder._losses.closed_form_losses` (what secorder's products run under): their
  difference is the cost of the two modes (the decomposed RNN loop, the closed-form
  cross-entropy's ``autograd.Function`` under ``torch.func``, the Python intercept);
* hand-written loop over one retained double-backward graph (PyHessian's method), no mode;
* PyHessian ``hessian(...).trace(maxIter=K, tol=float("-inf"))`` (all K probes; ``tol=0``
  stops as soon as the running mean is negative).

Usage: ``PYTHONPATH=. python benchmarks/record.py bench_hutch_overhead.py [--repeats 5]
[--models bert,rnn]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common as C  # noqa: N812 - short alias for the shared helpers
import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _zoo

import secorder
from secorder._kernels import decomposed_kernels
from secorder._losses import closed_form_losses

warnings.filterwarnings("ignore")
K = 16
MODELS = ("bert", "rnn", "mha", "vit", "resnet_eval")


@contextlib.contextmanager
def _math_kernels() -> Iterator[None]:
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@contextlib.contextmanager
def _secorder_modes() -> Iterator[None]:
    with decomposed_kernels(), closed_form_losses():
        yield


def _probes(leaves: list[Tensor], gen: torch.Generator, batch: bool) -> list[Tensor]:
    shape = (K,) if batch else ()
    return [torch.randint(0, 2, shape + x.shape, generator=gen).to(x.dtype) * 2 - 1 for x in leaves]


def bench(name: str, repeats: int) -> list[str]:
    case = _zoo.build(name, torch.float32, batch=4, bench=True)
    model, x, y = case.model, case.inputs, case.targets
    f, params = secorder.module_loss(model, _zoo.loss_of(case))
    names = list(params)
    crit = nn.CrossEntropyLoss()

    def loss(leaves: list[Tensor]) -> Tensor:
        return crit(torch.func.functional_call(model, dict(zip(names, leaves)), (x,)), y)

    def rev_rev(modes: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            with _math_kernels(), modes():
                leaves = [p.detach() for p in params.values()]
                V = _probes(leaves, torch.Generator().manual_seed(0), batch=True)
                HV = vmap(vjp(grad(loss), leaves)[1])(V)[0]
                return sum(float((hv * v).sum()) for hv, v in zip(HV, V)) / K

        return run

    def loop() -> float:
        with _math_kernels():
            leaves = [p.detach().requires_grad_(True) for p in params.values()]
            grads = torch.autograd.grad(loss(leaves), leaves, create_graph=True)
            gen, total = torch.Generator().manual_seed(0), 0.0
            for _ in range(K):
                v = _probes(leaves, gen, batch=False)
                hv = torch.autograd.grad(grads, leaves, v, retain_graph=True)
                total += sum(float((a * b).sum()) for a, b in zip(hv, v))
            return total / K

    def pyhessian() -> float:
        from pyhessian import hessian as pyh

        with _math_kernels():
            torch.manual_seed(0)
            samples = pyh(model, crit, data=(x, y), cuda=False).trace(maxIter=K, tol=float("-inf"))
            model.zero_grad(set_to_none=True)
        if len(samples) != K:
            raise RuntimeError(f"PyHessian returned {len(samples)} samples, not {K}")
        return sum(samples) / K

    def ours(strategy: str) -> Callable[[], Any]:
        trace = secorder.hessian_trace(f, num_probes=K, strategy=strategy)
        return lambda: trace(params, x, y, generator=torch.Generator().manual_seed(0))

    fns: dict[str, Callable[[], Any]] = {
        "auto": ours("auto"),
        "rev_rev": ours("rev_rev"),
        "autograd": ours("autograd"),
        "rr plain": rev_rev(contextlib.nullcontext),
        "rr modes": rev_rev(_secorder_modes),
        "loop plain": loop,
        "PyHessian": pyhessian,
    }
    row = [name]
    for fn in fns.values():
        try:
            row.append(C.fmt_time(C.timeit(fn, repeat=repeats)[0]))
        except Exception as exc:  # report, do not hide: the table says "fails"
            row.append(f"fails ({type(exc).__name__})")
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in a.models.split(","):
        if name.startswith(("gpt2", "bert")) and _zoo.transformers_or_none() is None:
            continue
        rows.append(bench(name, a.repeats))
        print(f"... {name} done", file=sys.stderr, flush=True)
    head = [
        "model", "auto", "rev_rev", "autograd", "rev_rev by hand, no mode", "rev_rev by hand, secorder's modes",
        "autograd loop by hand, no mode", "PyHessian (all K)",
    ]  # fmt: skip
    print(f"float32, batch 4, 1 thread, K = {K}; median of {a.repeats} after a warm-up.\n")
    print(C.table(rows, head))


if __name__ == "__main__":
    main()

"""What recording a tape costs (``secorder._engine.tape.record``): the recorder's overhead per
ATen op, and the recording of the MLP of ``bench_fisher.py`` against its plain forward pass.

* per op: a chain of 300 pointwise ops on a 4x4 tensor (``tanh``, ``mul``, ``add``: the op's
  own arithmetic is negligible), recorded minus evaluated plainly (under ``no_grad``), divided
  by the number of ops: the ``TorchDispatchMode`` itself, ``secorder._kernels``'
  ``TorchFunctionMode`` and the recorder's Python (arguments to Refs, per-value flags);
* fixed: the recording of a one-op function (the modes' entry and exit, the tape);
* the MLP 784-128-128-10 (tanh, batch 128) recorded as the exact Fisher records it (the
  parameters as leaves, the batch a constant), against ``functional_call`` without recording;
* the plan of the MLP's tape: the per-sample proof and interfaces analyzed afresh, and taken
  from the plan cache (its structural fingerprint computed, the entry found).

Medians over ``--repeats`` calls after ``--warmup``. Prints a table (record it with
``python benchmarks/record.py bench_recorder.py``).

Usage::

    PYTHONPATH=. python benchmarks/bench_recorder.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: N812 - short alias for the shared helpers
from bench_fisher import make_data, make_model  # the same model and batch

from secorder._engine import sweep
from secorder._engine.tape import record

OPS = 300


def _chain(ls: list[torch.Tensor]) -> torch.Tensor:
    h = ls[0]
    for _ in range(OPS // 3):
        h = torch.tanh(h) * 1.01 + 0.1
    return h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def us(fn: object) -> float:
        seconds, _ = C.timeit(fn, repeat=args.repeats, warmup=args.warmup)  # type: ignore[arg-type]
        return seconds * 1e6

    small = [torch.randn(4, 4, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        plain = us(lambda: _chain(small))
    recorded = us(lambda: record(_chain, small))
    fixed = us(lambda: record(lambda ls: ls[0].sum(), small))

    model = make_model("mlp")
    x, _ = make_data("mlp")
    params = {k: v.detach() for k, v in model.named_parameters()}
    names, leaves = list(params), list(params.values())

    def model_fn(ls: list[torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ls)), (x,))

    with torch.no_grad():
        forward = us(lambda: model_fn(leaves))
    mlp = us(lambda: record(model_fn, leaves))
    tape = record(model_fn, leaves)
    assert tape.values is not None
    n = x.shape[0]
    values = tape.values

    def fresh() -> object:
        sweep._PLANS.clear()
        return sweep._plan(tape, values, [x], n, True)

    analyzed = us(fresh)
    sweep._plan(tape, values, [x], n, True)
    cached = us(lambda: sweep._plan(tape, values, [x], n, True))
    sweep._PLANS.clear()

    rows = [
        [f"per op ({OPS} pointwise ops, 4x4)", f"{(recorded - plain) / OPS:.1f}"],
        ["fixed (a one-op function)", f"{fixed:.0f}"],
        [f"MLP: plain forward ({len(tape.nodes)} ATen ops)", f"{forward:.0f}"],
        ["MLP: recorded", f"{mlp:.0f}"],
        ["MLP: plan analyzed afresh", f"{analyzed:.0f}"],
        ["MLP: plan from the cache (fingerprint + lookup)", f"{cached:.0f}"],
    ]
    print(f"# Recording a tape ({C.machine()})\n")
    print(C.table(rows, ["what", "µs"]))


if __name__ == "__main__":
    main()

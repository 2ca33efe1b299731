"""The structured sweep's per-leaf fallback (``secorder._engine.leafvjp``) on models whose
parameters no interface covers: exact GGN and empirical-Fisher traces through the sweep
(``path="fast"``) against the generic route (``path="generic"``, vector-Jacobian products of the
whole batch), which ``path="auto"`` takes on these models because it measured faster here.

Models from ``tests/_zoo.py`` with ``bench=True`` (float32): ``nn.LSTM``/``nn.GRU`` classifiers
(width 32, 16 steps; the decomposed kernels' bmm of weight stacks), Hugging Face GPT-2 and BERT
(vocabulary 256, width 32, 2 layers, 16 tokens; token + position embeddings added, a tied head).
Timed: median of ``--repeats`` after one warm-up, whole calls; the route taken and the relative
difference of the two results are printed.

Usage: ``PYTHONPATH=. python benchmarks/record.py bench_leafvjp.py [--repeats 3] [--batch 32]
[--models lstm,gru,gpt2]``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from functools import partial
from pathlib import Path

import _common as C  # noqa: N812 - short alias for the shared helpers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _zoo

import secorder

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", default="lstm,gru,gpt2,bert")
    args = ap.parse_args()
    print(f"batch {args.batch}, float32, median of {args.repeats}\n")
    print("| model | quantity | sweep (fallback) | generic | speed-up | route | rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        if name.startswith(("gpt2", "bert")) and _zoo.transformers_or_none() is None:
            print(f"| {name} | - | - | - | - | transformers not installed | - |")
            continue
        case = _zoo.build(name, torch.float32, batch=args.batch, bench=True)
        model, x, y = case.model, case.inputs, case.targets
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
        for kind in ("ggn", "empirical"):
            auto = secorder.fisher_trace(model, "cross_entropy", kind=kind, path="fast")
            generic = secorder.fisher_trace(model, "cross_entropy", kind=kind, path="generic")
            ta, a = C.timeit(partial(auto, params, x, y), repeat=args.repeats)
            tg, b = C.timeit(partial(generic, params, x, y), repeat=args.repeats)
            route = auto.path_info.path + (
                "" if auto.path_info.path == "fast" else f" ({auto.path_info.reason[:60]})"
            )
            diff = float((a - b).abs() / b.abs())
            print(
                f"| {name} | {kind} trace | {C.fmt_time(ta)} | {C.fmt_time(tg)} | {tg / ta:.1f}x | {route} | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()

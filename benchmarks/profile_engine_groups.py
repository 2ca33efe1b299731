"""Where one exact ``hessian_diagonal(f)`` call on the engine goes, per curvature group: the
transformer block and the residual LayerNorm MLP of ``bench_engine_models.py`` (issue 11).

For each group of curvature columns (``secorder._engine.sweep``: softmax rows, LayerNorm rows,
pointwise regions such as GELU, attention's bilinear products, cross-entropy, and the columns
compressed at a row cut by the row packing) the script prints the op that made it, its columns
per sample as formed, the columns it walks (summed over its walks: after the row packing, or
explicit columns below a closed-form transport), the walks (chunks) it takes, the wall time of
those walks, and their matrix-product flops (``torch.utils.flop_counter.FlopCounterMode``:
mm/addmm/bmm/convolution only). Stages outside the walks: ``groups`` (forming the columns:
``eigh``/``svd`` of the local Hessians), ``row packing`` (the packed walks through row-local
ops and the per-row compression, ``_pack_rows``), ``squares`` (the deferred Linear squares,
``_Walker.result``). Times come from ``time.perf_counter`` around the wrapped private functions
(the wrappers add microseconds); the ``whole call`` row is timed without them.

Usage::

    PYTHONPATH=. python benchmarks/profile_engine_groups.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine_models import workloads

import secorder
from secorder._engine import sweep


def _name(plan: Any, group: Any) -> tuple[Any, str]:
    """(key, description) of a group: the value its columns start at and the op producing it."""
    value = getattr(group, "value", None)
    if value is None:
        value = getattr(group, "values_", (None,))[0]
    node = plan.producer.get(value) if value is not None else None
    op = str(plan.tape.nodes[node].func).replace("aten.", "") if node is not None else "a leaf"
    kind = type(group).__name__.lstrip("_").replace("Group", "")
    if not kind:  # sweep._Group: one-hot (pointwise, LayerNorm's α I) or eigen/vector columns
        kind = "one-hot" if getattr(group, "vecs", None) is None else "vectors"
    key = (kind, str(getattr(group, "values_", value)))
    return key, f"{kind} at value {value} ({op})"


def profile(fn: Any, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, repeats: int) -> str:
    stats: dict[Any, dict[str, Any]] = defaultdict(lambda: {"walks": 0, "time": 0.0, "flops": 0, "cols": 0})
    before: dict[Any, int] = {}
    names: dict[Any, str] = {}
    stages: dict[str, float] = defaultdict(float)
    plan_box: list[Any] = [None]
    orig = {
        "groups": sweep._groups,
        "pack": sweep._pack_rows,
        "walk": sweep._Walker.walk,
        "result": sweep._Walker.result,
        "closed": sweep._Walker.closed_form,
    }

    def groups(plan: Any, *a: Any) -> list[Any]:
        plan_box[0] = plan
        t = time.perf_counter()
        res = orig["groups"](plan, *a)
        stages["groups"] += time.perf_counter() - t
        for g in res:
            key, desc = _name(plan, g)
            before[key] = before.get(key, 0) + g.count
            names[key] = desc
        return res  # type: ignore[no-any-return]

    def pack(walker: Any, groups_: list[Any], *a: Any) -> list[Any]:
        t = time.perf_counter()
        res = orig["pack"](walker, groups_, *a)
        stages["row packing"] += time.perf_counter() - t
        for g in res:
            key, desc = _name(walker.plan, g)
            names.setdefault(key, desc + " [row cut]")
        return res  # type: ignore[no-any-return]

    def walk(self: Any, group: Any, cols: Any, signs: torch.Tensor, *a: Any, **k: Any) -> None:
        key, desc = _name(self.plan, group)
        names.setdefault(key, desc)
        with FlopCounterMode(display=False) as counter:
            t = time.perf_counter()
            orig["walk"](self, group, cols, signs, *a, **k)
            dt = time.perf_counter() - t
        s = stats[key]
        s["walks"] += 1
        s["cols"] += int(signs.shape[0])
        s["time"] += dt
        s["flops"] += counter.get_total_flops()

    def closed(self: Any, group: Any, step: int) -> bool:
        t = time.perf_counter()
        res = orig["closed"](self, group, step)
        if res:
            stages["closed-form transport (incl. its walks)"] += time.perf_counter() - t
        return res  # type: ignore[no-any-return]

    def result(self: Any) -> list[torch.Tensor]:
        t = time.perf_counter()
        res = orig["result"](self)
        stages["squares"] += time.perf_counter() - t
        return res  # type: ignore[no-any-return]

    fn(params, x, y)  # warm-up
    whole = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(params, x, y)
        whole.append(time.perf_counter() - t)
    sweep._groups, sweep._pack_rows = groups, pack
    sweep._Walker.walk, sweep._Walker.result = walk, result  # type: ignore[method-assign]
    sweep._Walker.closed_form = closed  # type: ignore[method-assign]
    try:
        fn(params, x, y)
    finally:
        sweep._groups, sweep._pack_rows = orig["groups"], orig["pack"]
        sweep._Walker.walk, sweep._Walker.result = orig["walk"], orig["result"]  # type: ignore[method-assign]
        sweep._Walker.closed_form = orig["closed"]  # type: ignore[method-assign]
    lines = [
        "| group | columns per sample (formed) | columns walked | walks | walk time | walk matmul flops |",
        "|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys([*before, *stats]))
    for key in keys:
        s = stats.get(key, {"walks": 0, "time": 0.0, "flops": 0, "cols": 0})
        walked = s["cols"]
        lines.append(
            f"| {names[key]} | {before.get(key, '-')} | {walked or '-'} | {s['walks']} | "
            f"{s['time'] * 1e3:.1f} ms | {s['flops'] / 1e6:.0f} MFLOP |"
        )
    for stage, t in stages.items():
        lines.append(f"| stage: {stage} | | | | {t * 1e3:.1f} ms | |")
    lines.append(
        f"| whole call (median of {repeats}, unwrapped) | {fn.method_info.num_columns} | | | "
        f"{statistics.median(whole) * 1e3:.1f} ms | |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["transformer", "residual"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for key, name, model, x, y in workloads():
        if args.only and key != args.only:
            continue
        params = {k: p.detach() for k, p in model.named_parameters()}
        f = lambda p, x, y, model=model: F.cross_entropy(functional_call(model, p, (x,)), y)  # noqa: E731
        fn = secorder.hessian_diagonal(f)
        print(f"\n### {name}\n")
        print(profile(fn, params, x, y, args.repeats))


if __name__ == "__main__":
    main()

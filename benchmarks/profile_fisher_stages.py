"""Where the time of one exact Fisher call goes: a stage breakdown of ``fisher_trace`` /
``fisher_diagonal`` of a plain ``model_fn`` on the MLP of ``bench_fisher.py`` (issue 11).

Each stage is timed by wrapping the function that implements it (``time.perf_counter`` around
the call; medians over the calls after the warm-up) for the four quantities (empirical Fisher
and GGN, trace and diagonal), next to reference times of the same batch without secorder: the
plain forward pass, forward plus one autograd gradient, and the dense products a diagonal
needs at its widest Linear layer ((x^⊙2)ᵀ δ^⊙2, 784x128 by 128x128). The stages:

* ``checks``: the call-time policies (``check_module_call``: parameter names, empty batches,
  non-finite parameters and data), and the outputs' check (``_check_outputs``);
* ``record``: the forward pass recorded on the tape (``secorder._engine.tape.record``, under
  ``secorder._kernels``' TorchFunctionMode and the recorder's TorchDispatchMode);
* ``loss``: the loss's closed forms (targets check, per-sample gradients or GGN factor);
* ``plan``: the per-sample proof and the interfaces (``_plan``, ``batch.analyze`` inside it);
* ``walk``: the columns walked back from the outputs (``_Walker.walk``);
* ``squares``: the squares at the Linear interfaces (``_Walker.result``);
* ``rest``: the whole call minus the stages above (the wrappers, the cost model, the sums).

The wrappers add a few microseconds per stage; the ``whole call`` row is timed without them.
Prints a table (record it with ``python benchmarks/record.py profile_fisher_stages.py``).

Usage::

    PYTHONPATH=. python benchmarks/profile_fisher_stages.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: N812 - short alias for the shared helpers
from bench_fisher import make_data, make_model  # the same model and batch

STAGES = {
    "checks": [("secorder.fisher", "check_module_call"), ("secorder.fisher", "_check_outputs")],
    "record": [("secorder._engine.tape", "record")],
    "loss": [
        ("secorder._losses", "CrossEntropyLoss.check"),
        ("secorder._losses", "CrossEntropyLoss.per_sample_grads"),
        ("secorder._losses", "CrossEntropyLoss.factor"),
    ],
    "plan": [("secorder._engine.sweep", "_plan")],
    "walk": [("secorder._engine.sweep", "_Walker.walk")],
    "squares": [("secorder._engine.sweep", "_Walker.result")],
}


@contextmanager
def timed_stages(times: dict[str, list[float]]) -> Iterator[None]:
    """Within the block, every function of :data:`STAGES` adds its call's seconds to ``times``."""
    import importlib

    undo: list[tuple[Any, str, Any]] = []
    for stage, targets in STAGES.items():
        for module, qualname in targets:
            owner: Any = importlib.import_module(module)
            *path, name = qualname.split(".")
            for part in path:
                owner = getattr(owner, part)
            orig = owner.__dict__[name]

            def wrapper(*args: Any, _orig: Any = orig, _stage: str = stage, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _orig(*args, **kwargs)
                finally:
                    times.setdefault(_stage, []).append(time.perf_counter() - t0)

            setattr(owner, name, wrapper)
            undo.append((owner, name, orig))
    try:
        yield
    finally:
        for owner, name, orig in reversed(undo):
            setattr(owner, name, orig)


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    seconds, _ = C.timeit(fn, repeat=repeats, warmup=warmup)
    return seconds * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import secorder

    model = make_model("mlp")
    x, y = make_data("mlp")
    params = {k: v.detach() for k, v in model.named_parameters()}

    def model_fn(p: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (inp,))

    def forward_backward() -> Any:
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = torch.nn.functional.cross_entropy(model_fn(p, x), y)
        return torch.autograd.grad(loss, list(p.values()))

    x2 = x.flatten(1).square()
    d2 = torch.randn(x.shape[0], 128).square()
    refs = {
        "plain forward": median_ms(lambda: model_fn(params, x), args.repeats, args.warmup),
        "forward + gradient (autograd)": median_ms(forward_backward, args.repeats, args.warmup),
        "(x^2)^T d^2 at the first layer": median_ms(lambda: x2.T @ d2, args.repeats, args.warmup),
    }

    columns = [(kind, what) for kind in ("empirical", "ggn") for what in ("trace", "diagonal")]
    rows: dict[str, list[str]] = {}
    for kind, what in columns:
        transform = secorder.fisher_trace if what == "trace" else secorder.fisher_diagonal
        fn = transform(model_fn, "cross_entropy", kind=kind)
        total = median_ms(lambda fn=fn: fn(params, x, y), args.repeats, args.warmup)
        assert fn.path_info.path == "fast", fn.path_info
        times: dict[str, list[float]] = {}
        with timed_stages(times):
            for _ in range(args.warmup):
                fn(params, x, y)
            times.clear()
            for _ in range(args.repeats):
                fn(params, x, y)
        stage_ms = {
            stage: sum(times[stage]) / args.repeats * 1e3 if stage in times else 0.0 for stage in STAGES
        }
        rest = total - sum(stage_ms.values())
        for stage, ms in [("whole call", total), *stage_ms.items(), ("rest", rest)]:
            rows.setdefault(stage, []).append(f"{ms:.3f}")
    head = ["stage (ms)", *(f"{'EF' if k == 'empirical' else 'GGN'} {w}" for k, w in columns)]
    print(f"# Exact Fisher on the MLP 784-128-128-10 (N=128): stages of one call ({C.machine()})\n")
    print(C.table([[stage, *vals] for stage, vals in rows.items()], head))
    print("reference (ms, the same batch without secorder):\n")
    print(C.table([[k, f"{v:.3f}"] for k, v in refs.items()], ["computation", "ms"]))


if __name__ == "__main__":
    main()

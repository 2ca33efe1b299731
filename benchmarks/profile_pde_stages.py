"""Where the time of one ``secorder.laplacian`` / ``secorder.biharmonic`` call goes (issue 14):
a stage breakdown of the default path next to the ``static=True`` replay, on the workloads of
``bench_laplacian.py`` (tanh MLP D→256→256→1, N = 64 points, float32).

Each stage is timed by wrapping the function of ``secorder.pde`` that implements it
(``time.perf_counter``; a stage's *own* time: the stages called inside it are subtracted and
counted as themselves), medians over the calls after the warm-up:

* ``checks``: binding the arguments and the input policies (``_bind``), the result's finite
  check (``check_finite_result``);
* ``record``: the recorder around the recorded evaluations (``secorder._engine.tape.record``:
  its dispatch mode, kernel substitutions and bookkeeping; the evaluation inside is counted as
  ``u forward`` or ``eval (recorded)``);
* ``u forward``: the user's function inside the recording (``_bind``'s closure), with the
  recorder's per-op dispatch (compare ``plain u``: the same forward pass without secorder);
* ``eval (recorded)``: the biharmonic's inner collapsed Laplacian, run while its tape is
  recorded (with the recorder's per-op dispatch);
* ``proof``: the points' independence proved on the tape (``_check_independent``; once per
  structure of u's tape, ``secorder.pde._DERIVED``);
* ``derive``: what the default path derives from the structure of u's tape instead of doing it
  again: its fingerprint, and the biharmonic's outer tape filled in from its template
  (``_instantiate``) or made a template after its recording (``_template``);
* ``plan``: ``collapsed.plan`` (liveness, drop schedule, held tangents);
* ``eval``: the collapsed passes (``collapsed.evaluate``);
* ``rest``: the whole call minus the stages above.

The wrappers add a few microseconds per stage; the ``whole call`` column is timed without them.
Prints a table (record it with ``python benchmarks/record.py profile_pde_stages.py``).

Usage::

    PYTHONPATH=. python benchmarks/profile_pde_stages.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_laplacian as B  # noqa: N812 - the same networks and points

import secorder.pde as pde

STAGES = ["checks", "record", "u forward", "eval (recorded)", "proof", "derive", "plan", "eval"]


@contextmanager
def timed_stages(own: dict[str, float]) -> Iterator[None]:
    """Wrap the stage functions of ``secorder.pde``; add each stage's own time to ``own``."""
    stack: list[list[float]] = []  # per active stage: [inner time]

    def wrap(name: str, fn: Callable[..., Any], stage: Callable[..., str]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            label = stage(*args, **kwargs)
            stack.append([0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - t0
                inner = stack.pop()[0]
                own[label] = own.get(label, 0.0) + total - inner
                if stack:
                    stack[-1][0] += total

        return wrapper

    recording = [0]
    real_record, real_eval = pde.record, pde.evaluate

    def record(fn: Any, leaves: Any, inputs: Any = None, **kw: Any) -> Any:
        recording[0] += 1
        try:
            return real_record(wrap_fn(fn), leaves, inputs, **kw)
        finally:
            recording[0] -= 1

    def wrap_fn(fn: Any) -> Any:  # the recorded function: u's closure or the inner Laplacian
        return wrap("u forward", fn, lambda *a, **k: "u forward") if fn.__name__ == "fn" else fn

    patches = {
        "_bind": wrap("checks", pde._bind, lambda *a, **k: "checks"),
        "check_finite_result": wrap("checks", pde.check_finite_result, lambda *a, **k: "checks"),
        "record": wrap("record", record, lambda *a, **k: "record"),
        "_check_independent": wrap("proof", pde._check_independent, lambda *a, **k: "proof"),
        "fingerprint": wrap("derive", pde.fingerprint, lambda *a, **k: "derive"),
        "_instantiate": wrap("derive", pde._instantiate, lambda *a, **k: "derive"),
        "_template": wrap("derive", pde._template, lambda *a, **k: "derive"),
        "plan": wrap("plan", pde.plan, lambda *a, **k: "plan"),
        "evaluate": wrap("eval", real_eval, lambda *a, **k: "eval (recorded)" if recording[0] else "eval"),
    }
    saved = {k: getattr(pde, k) for k in patches}
    for k, v in patches.items():
        setattr(pde, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(pde, k, v)


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    workloads = [("tanh D=16", "exact", 16), ("tanh D=64", "exact", 64), ("tanh D=5", "biharmonic", 5)]
    head = ["workload", "path", "whole call (ms)", "plain u", *STAGES, "rest"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, kind, d in workloads:
        fns = B.contenders(kind, B.net_tanh, d)
        p = B.params(d, False)
        x = torch.randn(B.N_POINTS, d, generator=torch.Generator().manual_seed(1))
        plain = median_ms(lambda: B.net_tanh(p, x).squeeze(-1), args.repeats)  # noqa: B023
        for path in ("secorder", "static"):
            fn = fns[path]
            whole = median_ms(fn, args.repeats)
            runs: list[dict[str, float]] = []
            fn()
            for _ in range(args.repeats):
                own: dict[str, float] = {}
                with timed_stages(own):
                    fn()
                runs.append(own)
            med = {s: statistics.median(r.get(s, 0.0) for r in runs) * 1e3 for s in STAGES}
            rest = whole - sum(med.values())
            cells = [f"{med[s]:.2f}" if med[s] else "—" for s in STAGES]
            name = "default" if path == "secorder" else "static"
            print(
                f"| {label} {kind} | {name} | {whole:.2f} | {plain:.2f} | "
                + " | ".join(cells)
                + f" | {rest:.2f} |"
            )
    print(
        f"\nMedians over {args.repeats} calls after a warm-up, {args.threads} thread(s), float32, "
        f"N = {B.N_POINTS} points; a stage's own time (stages inside it counted as themselves), "
        "each stage's median on its own (the stages' medians need not add up to the call's)."
    )


if __name__ == "__main__":
    main()

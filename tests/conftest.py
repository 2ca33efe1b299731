"""Shared fixtures: dtypes and devices with readable ids, hypothesis profiles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles. Strategies draw every random number through hypothesis (seeds for
# torch.Generator objects, never torch's global generator), so a failure reported with its
# blob (print_blob) or seed replays exactly.
#   default: local runs, 25 fresh random examples per property per run;
#   ci:      CI=true, the same 25 derandomized examples every run (no flaky CI);
#   explore: many fresh examples, for a scheduled job or a local hunt
#            (HYPOTHESIS_PROFILE=explore python -m pytest tests/test_hessian.py
#            tests/test_sweep_properties.py tests/test_taylor_ops.py, or nox -s explore).
_common = {"deadline": None, "print_blob": True, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("default", max_examples=25, **_common)
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("explore", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default"))

# The suite's problems are tiny: one thread avoids thread-pool overhead that dominates
# small ops (and contention when several suites share a machine). Benchmarks set their own.
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def tol(dtype: torch.dtype) -> dict[str, float]:
    """Comparison tolerances for results computed in ``dtype``."""
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}


@pytest.fixture(autouse=True)
def _fresh_plan_cache() -> None:
    """Each test starts with an empty plan cache (secorder._engine.plancache): a test that
    spies on or patches the analysis then sees it run, whatever ran before it (the cache's own
    hits are tested in tests/test_plancache.py), and so with the biharmonic's outer-tape
    templates and proofs (secorder.pde._DERIVED, tested in tests/test_pde.py)."""
    from secorder._engine.sweep import _PLANS
    from secorder.pde import _DERIVED

    _PLANS.clear()
    _DERIVED.clear()

"""The plan cache of the structured sweep (:mod:`secorder._engine.plancache`): a hit gives the
same numbers, bit for bit, as a fresh analysis; a changed structure (shapes, strides, the branch
taken, train vs eval, which constant is the data) misses; the cache stays bounded."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import Tensor, nn

import secorder
from secorder._engine import sweep
from secorder._engine.plancache import PlanCache, fingerprint
from secorder._engine.tape import record

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_cache() -> Any:
    sweep._PLANS.clear()
    yield
    sweep._PLANS.clear()


def _params(gen: torch.Generator) -> dict[str, Tensor]:
    return {
        "w1": torch.randn(5, 4, generator=gen, dtype=F64),
        "b1": torch.randn(5, generator=gen, dtype=F64),
        "w2": torch.randn(3, 5, generator=gen, dtype=F64),
    }


BRANCH = {"relu": False}


def model_fn(p: dict[str, Tensor], x: Tensor) -> Tensor:
    h = F.linear(x, p["w1"], p["b1"])
    h = torch.relu(h) if BRANCH["relu"] else torch.tanh(h)  # Python control flow, recorded as taken
    return F.linear(h, p["w2"])


def _equal(a: Any, b: Any) -> bool:
    """Bit-identical results (a tensor, or a dict of per-parameter diagonals)."""
    if isinstance(a, dict):
        return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def _batch(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 4, generator=gen, dtype=F64), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
@pytest.mark.parametrize("what", ["trace", "diagonal"])
def test_a_hit_gives_the_numbers_of_a_fresh_analysis_bit_for_bit(kind: str, what: str) -> None:
    gen = torch.Generator().manual_seed(0)
    params, (x, y) = _params(gen), _batch(6, gen)
    transform = secorder.fisher_trace if what == "trace" else secorder.fisher_diagonal
    fn = transform(model_fn, "cross_entropy", kind=kind, path="fast")
    miss = fn(params, x, y)
    assert (sweep._PLANS.hits, sweep._PLANS.misses) == (0, 1)
    hit = fn(params, x, y)
    assert sweep._PLANS.hits == 1
    assert _equal(miss, hit)
    # a hit at other parameter values and data of the same structure: the fresh analysis' numbers
    params2, (x2, y2) = _params(gen), _batch(6, gen)
    cached = fn(params2, x2, y2)
    assert sweep._PLANS.hits == 2
    sweep._PLANS.clear()
    assert _equal(cached, fn(params2, x2, y2))
    assert sweep._PLANS.misses == 1
    # and the exact numbers: the generic route (whole-batch vector-Jacobian products, no tape)
    generic = transform(model_fn, "cross_entropy", kind=kind, path="generic")
    torch.testing.assert_close(cached, generic(params2, x2, y2))


def _count_misses(calls: list[Any]) -> list[int]:
    out = []
    for call in calls:
        before = sweep._PLANS.misses
        call()
        out.append(sweep._PLANS.misses - before)
    return out


def test_another_shape_another_branch_or_another_layout_misses() -> None:
    gen = torch.Generator().manual_seed(1)
    params, (x, y) = _params(gen), _batch(6, gen)
    fn = secorder.fisher_diagonal(model_fn, "cross_entropy", path="fast")
    x8, y8 = _batch(8, gen)
    xt = x.T.contiguous().T  # the same entries, column-major: other strides

    def relu() -> Tensor:
        BRANCH["relu"] = True
        try:
            return fn(params, x, y)
        finally:
            BRANCH["relu"] = False

    calls = [lambda: fn(params, x, y), lambda: fn(params, x, y), lambda: fn(params, x8, y8), relu, relu]
    calls += [lambda: fn(params, xt, y), lambda: fn({k: v.float() for k, v in params.items()}, x.float(), y)]
    assert _count_misses(calls) == [1, 0, 1, 1, 0, 1, 1]
    assert len(sweep._PLANS.entries) == 5
    BRANCH["relu"] = True
    try:
        cached = fn(params, x, y)
        sweep._PLANS.clear()
        assert _equal(cached, fn(params, x, y))
    finally:
        BRANCH["relu"] = False


def test_train_mode_misses_the_plan_of_eval_mode() -> None:
    """Eval-mode BatchNorm is per-sample (cached plan); train mode couples the samples: its tape
    differs (the training flag), misses the cache and the proof refuses it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(2)
    x, y = _batch(6, gen)
    fn = secorder.fisher_diagonal(model, "cross_entropy")
    params = {k: v.detach() for k, v in model.named_parameters()}
    model.eval()
    fn(params, x, y)
    assert fn.path_info.path == "fast" and sweep._PLANS.misses == 1
    fn(params, x, y)
    assert sweep._PLANS.hits == 1
    model.train()
    fn(params, x, y)
    assert fn.path_info.path == "generic" and "BatchNorm in training mode" in fn.path_info.reason
    assert sweep._PLANS.misses == 2 and sweep._PLANS.hits == 1


def test_the_fingerprint_names_which_constant_is_the_data() -> None:
    """Equal shapes, but only a data argument is batched: a constant of the same shape that is
    not in ``data`` gets another key (the proof tags the data constants only)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(3, 4, generator=gen, dtype=F64)
    x, c = torch.randn(6, 4, generator=gen, dtype=F64), torch.randn(6, 4, generator=gen, dtype=F64)
    tape = record(lambda ls: F.linear(x + c, ls[0]), [w])
    values = tape.values
    assert values is not None
    keys = [fingerprint(tape, values, data, 6, True) for data in ([x], [c], [x, c], [x])]
    assert keys[0] != keys[1] and keys[0] != keys[2] and keys[1] != keys[2]
    assert keys[0] == keys[3] and hash(keys[0]) == hash(keys[3])
    assert fingerprint(tape, values, [x], 6, True) != fingerprint(tape, values, [x], 6, False)


def test_an_argument_without_a_key_is_not_cached() -> None:
    tape = record(lambda ls: ls[0].sum(), [torch.ones(3)])
    tape.nodes[0].kwargs = {"opaque": object()}
    assert tape.values is not None
    assert fingerprint(tape, tape.values, []) is None
    cache = PlanCache(4)
    cache.put(None, "entry")
    assert cache.get(None) is None and not cache.entries


def test_the_cache_is_bounded_least_recently_used_first_out() -> None:
    cache = PlanCache(3)
    for k in range(3):
        cache.put(k, f"plan {k}")
    assert cache.get(0) == "plan 0"  # 0 is now the most recent
    cache.put(3, "plan 3")
    assert list(cache.entries) == [2, 0, 3]
    assert cache.get(1) is None and (cache.hits, cache.misses) == (1, 1)
    # the total weight (tape nodes + values) is bounded too
    heavy = PlanCache(10, max_weight=100)
    for k, w in enumerate([40, 30, 20, 50]):
        heavy.put(k, f"plan {k}", w)
    assert list(heavy.entries) == [1, 2, 3] and heavy.weight == 100  # 0 evicted: 140 > 100
    heavy.put(2, "plan 2 again", 10)  # replaced: its old weight is given back
    assert list(heavy.entries) == [1, 3, 2] and heavy.weight == 90
    heavy.put(9, "too heavy", 101)
    assert 9 not in heavy.entries and heavy.weight == 90
    gen = torch.Generator().manual_seed(4)
    params = _params(gen)
    fn = secorder.fisher_trace(model_fn, "cross_entropy", path="fast")
    for n in range(2, 2 + sweep._PLANS.size + 5):  # a new batch size each call: a new structure
        fn(params, *_batch(n, gen))
    assert len(sweep._PLANS.entries) == sweep._PLANS.size

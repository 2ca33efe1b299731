"""An adversarial suite: careless and hostile input to every public function (issue 12).

Every case must either raise a secorder error whose words name the problem (the regex), or
(for the well-formed but unusual inputs at the end) return the dense float64 reference.
No case may mutate the model. The table is the product of the entry points and the
bad-input classes that apply to them, plus one-off cases; ``test_suite_size`` keeps it at
100 cases or more.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812  # the conventional alias
from torch import Tensor, nn

import secorder
import secorder.approximations as approx
import secorder.core as core
from secorder.operators import DenseOperator
from secorder.testing import dense_hessian

F64 = torch.float64
GEN = lambda: torch.Generator().manual_seed(0)


class Problem:
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        self.f, self.params = secorder.module_loss(self.model, F.cross_entropy)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(6, 3, dtype=F64, generator=g)
        self.y = torch.randint(0, 3, (6,), generator=g)


# entry points as fn(problem, params, x, y); "module": keyed by the model's names
Entry = Callable[[Problem, Any, Tensor, Tensor], Any]
ENTRIES: dict[str, tuple[Entry, bool]] = {
    "hvp": (lambda P, p, x, y: secorder.hvp(P.f)(p, p, x, y), True),
    "hessian_trace": (lambda P, p, x, y: secorder.hessian_trace(P.f)(p, x, y), True),
    "hessian_trace_hutchinson": (
        lambda P, p, x, y: secorder.hessian_trace(P.f, num_probes=3)(p, x, y, generator=GEN()),
        True,
    ),
    "hessian_trace_xtrace": (
        lambda P, p, x, y: secorder.hessian_trace(P.f, num_probes=6, method="xtrace")(
            p, x, y, generator=GEN()
        ),
        True,
    ),
    "hessian_trace_sweep": (lambda P, p, x, y: secorder.hessian_trace(P.f, exact="sweep")(p, x, y), True),
    "hessian_diagonal": (lambda P, p, x, y: secorder.hessian_diagonal(P.f)(p, x, y), True),
    "hessian_diagonal_probes": (
        lambda P, p, x, y: secorder.hessian_diagonal(P.f, num_probes=3)(p, x, y, generator=GEN()),
        True,
    ),
    "hessian_operator": (
        lambda P, p, x, y: (lambda op: op.matmat(torch.ones(1, op.size, dtype=F64)))(
            secorder.hessian_operator(P.f, p, x, y)[0]
        ),
        True,
    ),
    "hessian_trace_adaptive": (
        lambda P, p, x, y: secorder.hessian_trace_adaptive(P.f)(p, x, y, generator=GEN()),
        True,
    ),
    "hessian_frobenius_norm_sq": (lambda P, p, x, y: secorder.hessian_frobenius_norm_sq(P.f)(p, x, y), True),
    "hessian_eigenvalues": (
        lambda P, p, x, y: secorder.hessian_eigenvalues(P.f)(p, x, y, generator=GEN()),
        True,
    ),
    "hessian_spectral_density": (
        lambda P, p, x, y: secorder.hessian_spectral_density(P.f, num_runs=1, num_steps=4)(
            p, x, y, generator=GEN()
        ),
        True,
    ),
    "fisher_trace": (lambda P, p, x, y: secorder.fisher_trace(P.model, "cross_entropy")(p, x, y), True),
    "fisher_trace_probes": (
        lambda P, p, x, y: secorder.fisher_trace(P.model, "cross_entropy", num_probes=3)(
            p, x, y, generator=GEN()
        ),
        True,
    ),
    "fisher_diagonal_empirical": (
        lambda P, p, x, y: secorder.fisher_diagonal(P.model, "cross_entropy", kind="empirical")(p, x, y),
        True,
    ),
    "fisher_diagonal_mc": (
        lambda P, p, x, y: secorder.fisher_diagonal(P.model, "cross_entropy", kind="mc", num_probes=2)(
            p, x, y, generator=GEN()
        ),
        True,
    ),
    "fisher_operator": (lambda P, p, x, y: secorder.fisher_operator(P.model, "cross_entropy")(p, x, y), True),
    "module_hessian_trace": (
        lambda P, p, x, y: secorder.module_hessian_trace(P.model, "cross_entropy")(p, x, y),
        True,
    ),
    "module_hessian_diagonal_cp": (
        lambda P, p, x, y: secorder.module_hessian_diagonal(
            P.model, "cross_entropy", method="curvature_propagation", num_probes=2
        )(p, x, y, generator=GEN()),
        True,
    ),
    "dataset_hessian_trace": (lambda P, p, x, y: secorder.dataset_hessian_trace(P.f, p, [(x, y)]), True),
    "dataset_hessian_diagonal": (
        lambda P, p, x, y: secorder.dataset_hessian_diagonal(P.f, p, [(x, y)], num_probes=2, generator=GEN()),
        True,
    ),
    "dataset_fisher_trace": (
        lambda P, p, x, y: secorder.dataset_fisher_trace(P.model, "cross_entropy", p, [(x, y)]),
        True,
    ),
    "dataset_fisher_diagonal": (
        lambda P, p, x, y: secorder.dataset_fisher_diagonal(P.model, "cross_entropy", p, [(x, y)]),
        True,
    ),
}

NONFINITE = r"must be finite.*(NaN|infinite).*(set_check_finite|batch)"
CASES: list[Any] = []


def _case(name: str, run: Callable[[Problem], Any], exc: type[BaseException], match: str) -> None:
    CASES.append(pytest.param(run, exc, match, id=name))


def _with_params(entry: Entry, edit: Callable[[Problem], Any]) -> Callable[[Problem], Any]:
    return lambda P: entry(P, edit(P), P.x, P.y)


def _nan(P: Problem) -> dict[str, Tensor]:
    p = {k: v.clone() for k, v in P.params.items()}
    p["0.bias"][2] = float("nan")
    return p


def _inf(P: Problem) -> dict[str, Tensor]:
    p = {k: v.clone() for k, v in P.params.items()}
    p["2.weight"][0, 1] = -float("inf")
    return p


def _typo(P: Problem) -> dict[str, Tensor]:
    return {("2.biass" if k == "2.bias" else k): v for k, v in P.params.items()}


def _missing(P: Problem) -> dict[str, Tensor]:
    return {k: v for k, v in P.params.items() if k != "0.weight"}


def _extra(P: Problem) -> dict[str, Tensor]:
    return {**P.params, "3.weight": torch.zeros(2, dtype=F64)}


def _inference_params(P: Problem) -> dict[str, Tensor]:
    with torch.inference_mode():
        return {k: v.clone() for k, v in P.params.items()}


def _in_inference_mode(entry: Entry) -> Callable[[Problem], Any]:
    def run(P: Problem) -> Any:
        with torch.inference_mode():
            return entry(P, P.params, P.x, P.y)

    return run


def _in_autocast(entry: Entry) -> Callable[[Problem], Any]:
    def run(P: Problem) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return entry(P, P.params, P.x, P.y)

    return run


def _empty_batch(entry: Entry) -> Callable[[Problem], Any]:
    return lambda P: entry(P, P.params, P.x[:0], P.y[:0])


def _nan_inputs(entry: Entry) -> Callable[[Problem], Any]:
    def run(P: Problem) -> Any:
        x = P.x.clone()
        x[3, 1] = float("nan")
        return entry(P, P.params, x, P.y)

    return run


for _name, (_entry, _module) in ENTRIES.items():
    _case(f"{_name}-nan-param", _with_params(_entry, _nan), ValueError, NONFINITE)
    _case(f"{_name}-inf-param", _with_params(_entry, _inf), ValueError, NONFINITE)
    _case(f"{_name}-nan-input", _nan_inputs(_entry), ValueError, r"must be finite.*in samples \[3\]")
    _case(f"{_name}-empty-batch", _empty_batch(_entry), ValueError, r"at least one sample")
    _case(f"{_name}-inference-mode", _in_inference_mode(_entry), RuntimeError, r"torch\.inference_mode")
    _case(
        f"{_name}-inference-params",
        _with_params(_entry, _inference_params),
        RuntimeError,
        r"must not be inference tensors",
    )
    _case(f"{_name}-autocast", _in_autocast(_entry), RuntimeError, r"not under torch\.autocast")
    if _module and _name != "hvp":  # hvp's tangent check comes first: covered below
        _case(f"{_name}-typo-key", _with_params(_entry, _typo), ValueError, r"did you mean '2\.bias'\?")
        _case(
            f"{_name}-missing-key",
            _with_params(_entry, _missing),
            ValueError,
            r"missing keys \['0\.weight'\]",
        )
        _case(f"{_name}-extra-key", _with_params(_entry, _extra), ValueError, r"unknown keys '3\.weight'")


# -- the eager (torch_secorder-shaped) API ----------------------------------------------------
def _closure(P: Problem, params: list[Tensor]) -> Callable[[], Tensor]:
    return lambda: F.cross_entropy(
        torch.func.functional_call(P.model, dict(zip(P.params, params)), (P.x,)), P.y
    )


def _eager_nan(fn: Callable[[Callable[[], Tensor], list[Tensor]], Any]) -> Callable[[Problem], Any]:
    def run(P: Problem) -> Any:
        ps = [v.clone().requires_grad_(True) for v in _nan(P).values()]
        return fn(_closure(P, ps), ps)

    return run


def _eager_ctx(fn: Callable[[Callable[[], Tensor], list[Tensor]], Any], ctx: str) -> Callable[[Problem], Any]:
    def run(P: Problem) -> Any:
        ps = [v.clone().requires_grad_(True) for v in P.params.values()]
        cm = torch.autocast("cpu", dtype=torch.bfloat16) if ctx == "autocast" else torch.inference_mode()
        with cm:
            return fn(_closure(P, ps), ps)

    return run


EAGER = {
    "core.hessian_trace": lambda func, ps: core.hessian_trace(func, ps),
    "core.hessian_diagonal": lambda func, ps: core.hessian_diagonal(func, ps),
    "core.exact_hvp": lambda func, ps: core.exact_hvp(func, ps, [torch.ones_like(p) for p in ps]),
    "core.hvp.hessian_trace": lambda func, ps: __import__("secorder.core.hvp", fromlist=["x"]).hessian_trace(
        func, ps, num_samples=2, generator=GEN()
    ),
}
for _name, _fn in EAGER.items():
    _case(f"{_name}-nan-param", _eager_nan(_fn), ValueError, r"params must be finite.*at params\[1\]")
    _case(f"{_name}-autocast", _eager_ctx(_fn, "autocast"), RuntimeError, r"not under torch\.autocast")
    _case(f"{_name}-inference-mode", _eager_ctx(_fn, "inference"), RuntimeError, r"torch\.inference_mode")


# -- one-off cases -----------------------------------------------------------------------------
def _dropout_problem(P: Problem) -> tuple[Any, Any]:
    m = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), nn.Linear(4, 3)).double()
    return secorder.module_loss(m, F.cross_entropy)


def _dropout_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.3)).double()


RANDOM = r"deterministic function.*global random generator"
ONE_OFF = [
    (
        "hessian_trace-dropout",
        lambda P: secorder.hessian_trace(_dropout_problem(P)[0])(_dropout_problem(P)[1], P.x, P.y),
        ValueError,
        RANDOM,
    ),
    (
        "hessian_diagonal-dropout",
        lambda P: secorder.hessian_diagonal(_dropout_problem(P)[0], num_probes=2)(
            _dropout_problem(P)[1], P.x, P.y, generator=GEN()
        ),
        ValueError,
        RANDOM,
    ),
    (
        "hessian_spectral_density-randn",
        lambda P: secorder.hessian_spectral_density(
            lambda w: (w * torch.randn(3, dtype=F64)).pow(2).sum(), num_runs=1, num_steps=2
        )(torch.ones(3, dtype=F64), generator=GEN()),
        ValueError,
        RANDOM,
    ),
    (
        "fisher_trace-dropout-module",
        lambda P: secorder.fisher_trace(
            nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.3)).double(), "cross_entropy"
        )(dict(nn.Sequential(nn.Linear(3, 3)).double().named_parameters()), P.x, P.y),
        ValueError,
        r"deterministic|Dropout",
    ),
    (
        "module_hessian_trace-dropout",
        lambda P: secorder.module_hessian_trace(_dropout_model(), "cross_entropy")(
            {k: v.detach() for k, v in _dropout_model().named_parameters()}, P.x, P.y
        ),
        ValueError,
        r"module_hessian_diagonal\(model, loss\).*Dropout\(p=0\.3\) in train mode.*model\.eval\(\)",
    ),
    (
        "hvp-nan-tangent",
        lambda P: secorder.hvp(P.f)(_nan(P), P.params, P.x, P.y),
        ValueError,
        r"v must be finite.*at v\['0\.bias'\]",
    ),
    (
        "hvp-tangent-shape",
        lambda P: secorder.hvp(P.f)({k: v[..., :1] for k, v in P.params.items()}, P.params, P.x, P.y),
        ValueError,
        r"v must have the structure and shapes",
    ),
    (
        "hvp-tangent-keys",
        lambda P: secorder.hvp(P.f)({"a": torch.ones(1)}, P.params, P.x, P.y),
        ValueError,
        r"v must have the structure",
    ),
    (
        "hessian_trace-empty-params",
        lambda P: secorder.hessian_trace(lambda w: w.sum())(torch.zeros(0)),
        ValueError,
        r"at least one parameter entry",
    ),
    (
        "hessian_trace-meta",
        lambda P: secorder.hessian_trace(lambda w: (w**2).sum())(torch.ones(2, device="meta")),
        ValueError,
        r"meta device",
    ),
    (
        "hessian_trace-ddp-prefix",
        lambda P: secorder.hessian_trace(P.f)({"module." + k: v for k, v in P.params.items()}, P.x, P.y),
        ValueError,
        r"Strip the wrapper prefix",
    ),
    (
        "hessian_trace-list-params",
        lambda P: secorder.hessian_trace(P.f)(list(P.params.values()), P.x, P.y),
        TypeError,
        r"params must be a dict",
    ),
    (
        "hessian_trace-user-error",
        lambda P: secorder.hessian_trace(lambda w: w.reshape(7).sum())(torch.ones(3)),
        RuntimeError,
        r"shape '\[7\]' is invalid",
    ),
    (
        "hessian_trace-detached",
        lambda P: secorder.hessian_trace(lambda w: (w**2).sum().detach(), num_probes=2)(
            torch.ones(3), generator=GEN()
        ),
        ValueError,
        r"depend on the differentiated argument",
    ),
    (
        "hessian_trace-item",
        lambda P: secorder.hessian_trace(lambda w: torch.tensor((w**2).sum().item()))(torch.ones(3)),
        ValueError,
        r"depend on the differentiated argument",
    ),
    (
        "hessian_trace-vector-output",
        lambda P: secorder.hessian_trace(lambda w: w**2)(torch.ones(3)),
        ValueError,
        r"scalar \(0-dim\)",
    ),
    (
        "hessian_trace-with_stderr-str",
        lambda P: secorder.hessian_trace(P.f, with_stderr="yes"),
        TypeError,
        r"with_stderr must be True or False",
    ),
    (
        "hessian_trace-num_probes-0",
        lambda P: secorder.hessian_trace(P.f, num_probes=0),
        ValueError,
        r"num_probes must be",
    ),
    (
        "hessian_trace-generator-int",
        lambda P: secorder.hessian_trace(P.f, num_probes=2)(P.params, P.x, P.y, generator=3),
        TypeError,
        r"generator",
    ),
    (
        "hessian_eigenvalues-k-too-big",
        lambda P: secorder.hessian_eigenvalues(P.f, k=40)(P.params, P.x, P.y),
        ValueError,
        r"k must not exceed",
    ),
    (
        "module_hessian_diagonal-chunk0",
        lambda P: secorder.module_hessian_diagonal(P.model, "cross_entropy", chunk_size=0),
        ValueError,
        r"chunk_size must be",
    ),
    (
        "module_hessian_diagonal-max_hvp",
        lambda P: secorder.module_hessian_diagonal(P.model, "cross_entropy", max_hvp_params=-1),
        ValueError,
        r"max_hvp_params must be an int >= 0",
    ),
    (
        "module_hessian_trace-bogus",
        lambda P: secorder.module_hessian_trace(P.model, "cross_entropy", bogus=1),
        TypeError,
        r"module_hessian_trace\(model, loss\).*\['bogus'\]",
    ),
    (
        "module_hessian_trace-stderr-str",
        lambda P: secorder.module_hessian_trace(P.model, "cross_entropy", with_stderr="yes"),
        TypeError,
        r"with_stderr must be True or False",
    ),
    (
        "module_hessian_trace-live-params",
        lambda P: secorder.module_hessian_trace(P.model, "cross_entropy")(
            dict(P.model.named_parameters()), P.x, P.y
        ),
        ValueError,
        r"without a gradient.*method='hvp'",
    ),
    (
        "hessian_trace-sweep-live-params",
        lambda P: secorder.hessian_trace(P.f, exact="sweep")(dict(P.model.named_parameters()), P.x, P.y),
        ValueError,
        r"without a gradient.*exact='hvp'",
    ),
    (
        "lanczos_eigenvalues-tensor",
        lambda P: secorder.lanczos_eigenvalues(torch.eye(3), 1),
        TypeError,
        r"op must be a linear operator",
    ),
    (
        "lanczos_eigenvalues-nan-operator",
        lambda P: secorder.lanczos_eigenvalues(
            DenseOperator(torch.full((3, 3), float("nan"))), 1, generator=GEN()
        ),
        ValueError,
        r"must be finite",
    ),
    (
        "spectral_density-tensor",
        lambda P: secorder.spectral_density(torch.eye(3)),
        TypeError,
        r"op must be a linear operator",
    ),
    (
        "plot_spectral_density-mismatch",
        lambda P: secorder.plot_spectral_density(torch.zeros(4), torch.zeros(3), "unused.png"),
        ValueError,
        r"same length",
    ),
    (
        "dataset-mismatched-sizes",
        lambda P: secorder.dataset_hessian_trace(P.f, P.params, [(P.x, P.y[:4])]),
        ValueError,
        r"at batch 0",
    ),
    (
        "dataset-empty-iterable",
        lambda P: secorder.dataset_hessian_trace(P.f, P.params, []),
        ValueError,
        r"at least one batch",
    ),
    (
        "dataset-generator",
        lambda P: secorder.dataset_hessian_trace(P.f, P.params, iter([(P.x, P.y)])),
        TypeError,
        r"re-iterable",
    ),
    (
        "fisher_trace-bad-targets",
        lambda P: secorder.fisher_trace(P.model, "cross_entropy")(P.params, P.x, P.y + 5),
        ValueError,
        r"batch|class|target",
    ),
    (
        "set_memory_budget-negative",
        lambda P: secorder.set_memory_budget(-1),
        ValueError,
        r"memory|budget|bytes",
    ),
    (
        "set_exact_budget-negative",
        lambda P: secorder.set_exact_budget(-1),
        ValueError,
        r"num_products must be a positive int",
    ),
    (
        "set_check_finite-str",
        lambda P: secorder.set_check_finite("off"),
        TypeError,
        r"enabled must be True or False",
    ),
    (
        "hessian_operator-matmat-shape",
        lambda P: secorder.hessian_operator(P.f, P.params, P.x, P.y)[0].matmat(torch.ones(31, dtype=F64)),
        ValueError,
        r"V must be a \(k, P\) tensor",
    ),
    (
        "module_loss-not-module",
        lambda P: secorder.module_loss(lambda x: x, F.mse_loss),
        TypeError,
        r"model must be a torch\.nn\.Module",
    ),
    # the PDE operators: u(params, x) of a batch of points
    (
        "laplacian-nan-point",
        lambda P: secorder.laplacian(_u_points)(P.params, _points(nan=True)),
        ValueError,
        r"must be finite.*NaN.*in samples \[2\]",
    ),
    (
        "laplacian-nan-param",
        lambda P: secorder.laplacian(_u_points)(
            {**P.params, "0.bias": torch.full((4,), float("nan"), dtype=F64)}, _points()
        ),
        ValueError,
        NONFINITE,
    ),
    (
        "laplacian-singular-u",
        lambda P: secorder.laplacian(lambda p, x: torch.log(x.abs()).sum(-1))(
            P.params, torch.zeros(2, 3, dtype=F64)
        ),
        ValueError,
        r"the Laplacian must be finite.*u overflowed or has a singular point",
    ),
    (
        "laplacian-empty-batch",
        lambda P: secorder.laplacian(_u_points)(P.params, _points()[:0]),
        ValueError,
        r"at least one point",
    ),
    (
        "laplacian-inference-mode",
        lambda P: _in_inference(lambda: secorder.laplacian(_u_points)(P.params, _points())),
        RuntimeError,
        r"inference_mode",
    ),
    (
        "laplacian-one-point-vector",
        lambda P: secorder.laplacian(_u_points)(P.params, torch.ones(3, dtype=F64)),
        ValueError,
        r"batch of N points",
    ),
    (
        "laplacian-generator-not-a-generator",
        lambda P: secorder.laplacian(_u_points, num_probes=2)(P.params, _points(), generator=0),
        TypeError,
        r"generator must be a torch\.Generator",
    ),
    (
        "laplacian-bad-num-probes",
        lambda P: secorder.laplacian(_u_points, num_probes=0),
        ValueError,
        r"num_probes",
    ),
    (
        "biharmonic-nan-point",
        lambda P: secorder.biharmonic(_u_points)(P.params, _points(nan=True)),
        ValueError,
        r"must be finite",
    ),
    (
        "biharmonic-singular-u",
        lambda P: secorder.biharmonic(lambda p, x: torch.log(x.abs()).sum(-1))(
            P.params, torch.zeros(2, 3, dtype=F64)
        ),
        ValueError,
        r"the biharmonic must be finite",
    ),
    (
        "biharmonic-empty-batch",
        lambda P: secorder.biharmonic(_u_points)(P.params, _points()[:0]),
        ValueError,
        r"at least one point",
    ),
    (
        "approx.empirical_fisher_trace-nan",
        lambda P: approx.empirical_fisher_trace(_nan_model(P), F.cross_entropy, P.x, P.y),
        ValueError,
        r"finite",
    ),
]


def _points(nan: bool = False) -> Tensor:
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    if nan:
        x[2, 1] = float("nan")
    return x


def _u_points(params: dict[str, Tensor], x: Tensor) -> Tensor:
    h = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
    return (h @ params["2.weight"].T + params["2.bias"]).sum(-1)


def _in_inference(run: Callable[[], Any]) -> Any:
    with torch.inference_mode():
        return run()


def _nan_model(P: Problem) -> nn.Module:
    model = copy.deepcopy(P.model)  # a broken copy: P.model itself must stay untouched
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    return model


for _name, _run, _exc, _match in ONE_OFF:
    _case(_name, _run, _exc, _match)


def _state(model: nn.Module) -> list[Any]:
    return [(k, v.detach().clone()) for k, v in model.state_dict().items()] + [model.training]


@pytest.mark.parametrize(("run", "exc", "match"), CASES)
def test_adversarial_case_raises_a_clear_error(run, exc, match) -> None:
    P = Problem()
    before = _state(P.model)
    with pytest.raises(exc, match=match):
        run(P)
    after = _state(P.model)  # the model is never mutated, not even by a failing call
    for (k, a), (_, b) in zip(before[:-1], after[:-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{k} changed")
    assert before[-1] == after[-1]


# -- unusual but valid input: exact numbers --------------------------------------------------
def test_unusual_valid_inputs_give_dense_references() -> None:
    P = Problem()
    ref = torch.trace(dense_hessian(P.f, P.params, P.x, P.y))
    shuffled = dict(reversed(list(P.params.items())))
    torch.testing.assert_close(secorder.hessian_trace(P.f)(shuffled, P.x, P.y), ref)
    torch.testing.assert_close(secorder.dataset_hessian_trace(P.f, P.params, [(P.x, P.y)]), ref)
    with torch.no_grad():  # secorder enables grad itself
        torch.testing.assert_close(secorder.hessian_trace(P.f)(P.params, P.x, P.y), ref)
    one = secorder.hessian_trace(P.f)(P.params, P.x[:1], P.y[:1])  # a batch of one sample
    torch.testing.assert_close(one, torch.trace(dense_hessian(P.f, P.params, P.x[:1], P.y[:1])))


def test_suite_size() -> None:
    assert len(CASES) >= 100
    ids = [str(c.id) for c in CASES]
    public = {
        n
        for n in secorder.__all__
        if callable(getattr(secorder, n)) and not isinstance(getattr(secorder, n), type)
    }
    getters = {"memory_budget", "exact_budget", "check_finite_enabled"}  # no input to get wrong
    missing = {n for n in public - getters if not any(i.startswith(n) for i in ids)}
    assert not missing, f"public functions without adversarial cases: {sorted(missing)}"

"""The cost model of the exact routes (secorder/_cost.py): the choice of ``auto``, its report,
and the refusal of exact work over the budget before any product, naming routes that work."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import Tensor, nn

import secorder
from secorder import _cost
from secorder._cost import ExactBudgetError

DT = torch.float64
N = 4


@pytest.fixture(autouse=True)
def _restore_budget() -> Iterator[None]:
    before = secorder.exact_budget()
    yield
    secorder.set_exact_budget(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp_problem() -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """A tanh MLP 3-4-3 with mean cross-entropy (P = 28; R from :func:`_sweep_r`)."""
    params = {
        "w1": torch.randn(3, 4, generator=_gen(0), dtype=DT),
        "b1": torch.randn(4, generator=_gen(1), dtype=DT),
        "w2": torch.randn(4, 3, generator=_gen(2), dtype=DT),
    }
    x = torch.randn(N, 3, generator=_gen(3), dtype=DT)
    y = torch.randint(0, 3, (N,), generator=_gen(4))
    return params, x, y


class _Counted:
    """``f`` with a count of its evaluations (each product evaluates it at least once)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        return F.cross_entropy(torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"], y)


def _p(params: dict[str, Tensor]) -> int:
    return sum(v.numel() for v in params.values())


def _sweep_r(params: dict[str, Tensor], x: Tensor, y: Tensor) -> int:
    """R, the sweep's columns per sample for :func:`_mlp_problem` (with no cap)."""
    before = secorder.exact_budget()
    secorder.set_exact_budget(None)
    fn = secorder.hessian_diagonal(_Counted(), exact="sweep")
    fn(params, x, y)
    secorder.set_exact_budget(before)
    return int(fn.method_info.num_columns)


def test_budget_setting_is_validated_and_none_removes_the_cap() -> None:
    assert secorder.exact_budget() == _cost.DEFAULT_BUDGET
    for bad in (0, -3, 1.5, True, "many"):
        with pytest.raises(
            secorder.SecorderError, match=r"set_exact_budget\(num_products\): num_products must"
        ):
            secorder.set_exact_budget(bad)  # type: ignore[arg-type]
    secorder.set_exact_budget(None)
    assert secorder.exact_budget() is None
    params, x, y = _mlp_problem()
    fn = secorder.hessian_trace(_Counted(), exact="hvp")
    fn(params, x, y)
    assert "no cap" in fn.method_info.cost


def test_auto_reports_both_estimates_and_takes_the_cheaper_sweep() -> None:
    params, x, y = _mlp_problem()
    fn = secorder.hessian_diagonal(_Counted())
    fn(params, x, y)
    info = fn.method_info
    assert info.method == "sweep" and 0 < info.num_columns < _p(params)
    assert f"sweep: {info.num_columns:,} products" in info.cost
    assert f"hvp: {_p(params):,} products" in info.cost
    assert f"budget {_cost.DEFAULT_BUDGET:,}" in info.cost


def _few_params() -> tuple[Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]:
    w = torch.tensor([[0.3], [-0.7]], dtype=DT)
    x = torch.randn(N, 10, 2, generator=_gen(5), dtype=DT)

    def f(w: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(x @ w).pow(2).sum()

    return w, x, f


def test_auto_takes_one_hot_hvps_when_they_are_fewer_than_the_sweep_columns() -> None:
    # P = 2 parameters, pointwise ops over 10 entries per sample: R >= 10 sweep columns > P = 2
    w, x, f = _few_params()
    forced = secorder.hessian_diagonal(f, exact="sweep")
    forced(w, x)
    r = forced.method_info.num_columns
    assert r >= 10
    fn = secorder.hessian_diagonal(f)
    diag = fn(w, x)
    info = fn.method_info
    assert info.method == "hvp" and f"R={r}" in info.reason and "P=2" in info.reason, info
    assert f"sweep: {r} products" in info.cost and "hvp: 2 products" in info.cost
    ref = torch.autograd.functional.hessian(lambda v: f(v, x), w).reshape(2, 2).diagonal().reshape(2, 1)
    torch.testing.assert_close(diag, ref)


def test_refusal_comes_before_any_product_and_names_a_route_that_works() -> None:
    params, x, y = _mlp_problem()
    r, p = _sweep_r(params, x, y), _p(params)
    assert 3 < r < p
    secorder.set_exact_budget(3)  # fewer than the sweep's R columns and the P HVPs
    f = _Counted()
    fn = secorder.hessian_diagonal(f, chunk_size=1)
    with pytest.raises(ExactBudgetError) as info:
        fn(params, x, y)
    msg = str(info.value)
    assert f.calls <= 1  # one recording of f for the sweep's plan; no product (chunk_size=1: P calls)
    assert msg.startswith("hessian_diagonal(f)(*args): an exact Hessian diagonal may start at most")
    assert "secorder.exact_budget()=3 products" in msg
    assert f"sweep: {r} products" in msg and f"hvp: {p} products" in msg
    assert "hessian_diagonal(f, num_probes=K)" in msg
    assert "hessian_diagonal(f, num_probes=K, method='curvature_propagation')" in msg
    assert f"secorder.set_exact_budget({r})" in msg
    # the named routes work under the same budget (estimators are not capped), and agree with
    # the exact value within their standard errors
    gen = _gen(7)
    hutch, hutch_err = secorder.hessian_diagonal(f, num_probes=64, with_stderr=True)(
        params, x, y, generator=gen
    )
    cp, cp_err = secorder.hessian_diagonal(
        f, num_probes=64, method="curvature_propagation", with_stderr=True
    )(params, x, y, generator=gen)
    secorder.set_exact_budget(None)
    exact = secorder.hessian_diagonal(f)(params, x, y)
    for est, err in ((hutch, hutch_err), (cp, cp_err)):
        total = sum((est[k] - exact[k]).sum() for k in exact)
        total_err = sum((err[k] ** 2).sum() for k in exact) ** 0.5  # entries' errors, as if independent
        assert abs(float(total)) <= 6 * float(total_err) + 1e-12


def test_the_lifted_budget_in_the_message_runs_the_exact_value() -> None:
    params, x, y = _mlp_problem()
    r = _sweep_r(params, x, y)
    secorder.set_exact_budget(3)
    with pytest.raises(ExactBudgetError, match=rf"secorder.set_exact_budget\({r}\)"):
        secorder.hessian_trace(_Counted())(params, x, y)
    secorder.set_exact_budget(r)
    fn = secorder.hessian_trace(_Counted())
    out = fn(params, x, y)
    assert fn.method_info.method == "sweep" and fn.method_info.num_columns == r
    secorder.set_exact_budget(None)
    torch.testing.assert_close(out, secorder.hessian_trace(_Counted(), exact="hvp")(params, x, y))


def test_auto_takes_hvps_when_only_they_fit_the_budget() -> None:
    w, x, f = _few_params()
    secorder.set_exact_budget(5)  # R >= 10 > 5 >= P = 2
    fn = secorder.hessian_trace(f)
    fn(w, x)
    assert fn.method_info.method == "hvp" and "sweep: " in fn.method_info.cost


@pytest.mark.parametrize("forced", ["hvp", "sweep", "per_sample"])
def test_forced_routes_obey_the_budget(forced: str) -> None:
    params, x, y = _mlp_problem()
    secorder.set_exact_budget(2)
    options = {"per_sample": True} if forced == "per_sample" else {"exact": forced}
    f = _Counted()
    with pytest.raises(ExactBudgetError) as info:
        secorder.hessian_trace(f, **options)(params, x, y)  # type: ignore[arg-type]
    msg = str(info.value)
    assert msg.startswith("hessian_trace(f)(*args): an exact Hessian trace may start at most")
    assert "hessian_trace(f, num_probes=K)" in msg and f.calls <= 1
    if forced == "hvp":
        assert f"hvp: {_p(params)} products" in msg and "sweep" not in msg.split("For an estimate")[0]
    else:
        assert f"sweep: {_sweep_r(params, x, y)} products" in msg
    if forced == "per_sample":
        assert "no randomized route gives per-sample rows" in msg


def test_refusal_inside_vmap_names_hutchinson_only() -> None:
    params, x, y = _mlp_problem()
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    secorder.set_exact_budget(4)
    fn = secorder.hessian_trace(_Counted())
    with pytest.raises(ExactBudgetError) as info:
        torch.func.vmap(fn, in_dims=(0, None, None))(stacked, x, y)
    msg = str(info.value)
    assert f"hvp: {_p(params)} products" in msg and "curvature_propagation" not in msg
    assert "hessian_trace(f, num_probes=K)" in msg
    out = torch.func.vmap(
        secorder.hessian_trace(_Counted(), num_probes=4), in_dims=(0, None, None), randomness="different"
    )(stacked, x, y)
    assert out.shape == (2,)


def test_frobenius_norm_obeys_the_budget() -> None:
    params, x, y = _mlp_problem()
    secorder.set_exact_budget(_p(params) - 1)
    with pytest.raises(ExactBudgetError, match=r"hessian_frobenius_norm_sq\(f, num_probes=K\)"):
        secorder.hessian_frobenius_norm_sq(_Counted())(params, x, y)
    secorder.hessian_frobenius_norm_sq(_Counted(), num_probes=3)(params, x, y, generator=_gen(0))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _module_params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def test_module_hessian_refusal_names_its_own_routes() -> None:
    model = _model()
    params, (x, y) = (
        _module_params(model),
        (torch.randn(N, 3, generator=_gen(3), dtype=DT), torch.arange(N) % 3),
    )
    secorder.set_exact_budget(2)
    with pytest.raises(ExactBudgetError) as info:
        secorder.module_hessian_diagonal(model, "cross_entropy")(params, x, y)
    msg = str(info.value)
    assert msg.startswith("module_hessian_diagonal(model, loss)(params, inputs, targets): an exact Hessian")
    assert "method='curvature_propagation', num_probes=K" in msg
    with pytest.raises(ExactBudgetError, match=f"hvp: {_p(params)} products"):
        secorder.module_hessian_diagonal(model, "cross_entropy", method="hvp")(params, x, y)
    fn = secorder.module_hessian_diagonal(
        model, "cross_entropy", method="curvature_propagation", num_probes=8
    )
    est = fn(params, x, y, generator=_gen(1))
    assert set(est) == set(params) and fn.method_info.method == "curvature_propagation"


def _fisher_data() -> tuple[Tensor, Tensor]:
    return torch.randn(N, 3, generator=_gen(3), dtype=DT), torch.arange(N) % 3


@pytest.mark.parametrize("trace", [True, False], ids=["trace", "diagonal"])
def test_fisher_refusal_names_hutchinson_and_the_mc_fisher(trace: bool) -> None:
    model = _model()
    params, (x, y) = _module_params(model), _fisher_data()
    transform = secorder.fisher_trace if trace else secorder.fisher_diagonal
    name = "fisher_trace" if trace else "fisher_diagonal"
    secorder.set_exact_budget(2)  # R = 3 columns per sample (C = 3), N·R = 12
    with pytest.raises(ExactBudgetError) as info:
        transform(model, "cross_entropy")(params, x, y)
    msg = str(info.value)
    assert msg.startswith(f"{name}(model_fn, loss)(params, inputs, targets): an exact GGN")
    assert "fast: 3 products" in msg and "generic: 12 products" in msg
    assert f"{name}(model_fn, loss, num_probes=K)" in msg
    assert f"{name}(model_fn, loss, kind='mc', num_probes=K)" in msg
    # both named routes run under this budget (the MC Fisher's K = 1 column walk fits)
    hutch = transform(model, "cross_entropy", num_probes=4)
    hutch(params, x, y, generator=_gen(0))
    assert hutch.path_info.path == "hutchinson"
    mc = transform(model, "cross_entropy", kind="mc", num_probes=1)
    mc(params, x, y, generator=_gen(0))
    assert mc.path_info.path == "fast" and "fast: 1 products" in mc.path_info.cost


def test_fisher_forced_generic_obeys_the_budget_and_auto_takes_the_sweep() -> None:
    model = _model()
    params, (x, y) = _module_params(model), _fisher_data()
    secorder.set_exact_budget(5)  # R = 3 fits, N·R = 12 does not
    auto = secorder.fisher_trace(model, "cross_entropy")
    value = auto(params, x, y)
    assert auto.path_info.path == "fast" and "generic: 12 products" in auto.path_info.cost
    with pytest.raises(ExactBudgetError, match=r"generic: 12 products.*path='generic' was requested"):
        secorder.fisher_trace(model, "cross_entropy", path="generic")(params, x, y)
    secorder.set_exact_budget(None)
    torch.testing.assert_close(
        value, secorder.fisher_trace(model, "cross_entropy", path="generic")(params, x, y)
    )


class _Tied(nn.Module):
    """An embedding tied to the output layer: a parameter no interface covers (per-leaf VJPs)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return torch.tanh(self.emb(ids).mean(1)) @ self.emb.weight.T


def test_fisher_auto_takes_per_leaf_vjps_when_the_generic_route_is_over_budget() -> None:
    model = _Tied().to(DT)
    params = _module_params(model)
    x, y = torch.randint(0, 7, (N, 3), generator=_gen(1)), torch.randint(0, 7, (N,), generator=_gen(2))
    auto = secorder.fisher_diagonal(model, "cross_entropy")
    ref = auto(params, x, y)  # default budget: the whole-batch VJPs (measured faster)
    assert auto.path_info.path == "generic" and "per-leaf vector-Jacobian products" in auto.path_info.reason
    secorder.set_exact_budget(10)  # R = 7 fits, N·R = 28 does not
    diag = auto(params, x, y)
    assert auto.path_info.path == "fast", auto.path_info
    for k in params:
        torch.testing.assert_close(diag[k], ref[k])


def test_fisher_auto_takes_per_leaf_vjps_where_their_measured_cost_is_lower() -> None:
    # the sweep with per-leaf VJPs costs about 2.5 whole-batch VJPs per column + 64 (secorder._cost):
    # below the generic route's N·R at N = 64 samples and R = 7 columns, above it at N = 4
    model = _Tied().to(DT)
    params = _module_params(model)
    x, y = torch.randint(0, 7, (64, 3), generator=_gen(1)), torch.randint(0, 7, (64,), generator=_gen(2))
    leafvjp = _cost.leaf_vjp_sweep(7, 64)
    assert leafvjp.products < 64 * 7 and _cost.leaf_vjp_sweep(7, 4).products > 4 * 7
    auto = secorder.fisher_trace(model, "cross_entropy")
    value = auto(params, x, y)
    assert auto.path_info.path == "fast", auto.path_info
    small = secorder.fisher_trace(model, "cross_entropy")
    small(params, x[:4], y[:4])
    assert (
        small.path_info.path == "generic"
        and f"fast with per-leaf VJPs: {_cost.leaf_vjp_sweep(7, 4).products} products" in small.path_info.cost
    )
    generic = secorder.fisher_trace(model, "cross_entropy", path="generic")(params, x, y)
    torch.testing.assert_close(value, generic)


def test_half_precision_one_hot_route_obeys_the_budget() -> None:
    model = _model().to(torch.bfloat16)
    params = _module_params(model)
    x, y = torch.randn(N, 3, generator=_gen(3)).to(torch.bfloat16), torch.arange(N) % 3
    p = _p(params)
    secorder.set_exact_budget(p - 1)
    with pytest.raises(ExactBudgetError, match=f"one_hot: {p} products"):
        secorder.fisher_trace(model, "cross_entropy")(params, x, y)
    secorder.set_exact_budget(p)
    fn = secorder.fisher_trace(model, "cross_entropy")
    fn(params, x, y)
    assert fn.path_info.path == "one_hot" and f"one_hot: {p} products" in fn.path_info.cost


class _AdmittedError(Exception):
    """Raised by the wrapped budget check after it passed: the route was admitted (no work done)."""


def _admitted(monkeypatch: pytest.MonkeyPatch, run: object) -> bool:
    """Whether the budget admits the first exact route ``run()`` checks (stopped right after)."""
    original = _cost.check_budget

    def check_then_stop(*args: object, **kwargs: object) -> None:
        original(*args, **kwargs)  # type: ignore[arg-type]
        raise _AdmittedError

    monkeypatch.setattr(_cost, "check_budget", check_then_stop)
    try:
        run()  # type: ignore[operator]
    except _AdmittedError:
        return True
    except ExactBudgetError:
        return False
    finally:
        monkeypatch.setattr(_cost, "check_budget", original)
    raise AssertionError("no budget check")


@pytest.mark.parametrize("per_walk", [1, 10**9], ids=["heavy_meetings", "free_meetings"])
def test_auto_weights_sweep_columns_by_their_per_leaf_vjp_meetings(
    monkeypatch: pytest.MonkeyPatch, per_walk: int
) -> None:
    # the decomposed RNN meets its weight stacks once per step (per-leaf VJPs in every walk):
    # R = 30 columns against P = 99 HVPs; weighted 1 + m/per_walk, the choice flips
    import _zoo

    case = _zoo.build("rnn", DT, batch=3)
    f, params = secorder.module_loss(case.model, _zoo.loss_of(case))
    params = {k: v.detach() for k, v in params.items()}
    monkeypatch.setattr(_cost, "LEAF_MEETINGS_PER_WALK", per_walk)
    fn = secorder.hessian_diagonal(f)
    diag = fn(params, case.inputs, case.targets)
    info = fn.method_info
    meetings = int(info.cost.split(" per-leaf VJP meetings")[0].rsplit(" ", 1)[1])
    r = 30
    weighted = -(-r * (per_walk + meetings) // per_walk)
    assert meetings >= 1 and f"sweep: {weighted:,} products (R={r}" in info.cost, info
    assert info.method == ("hvp" if weighted > info.num_params else "sweep"), info
    assert info.method == ("hvp" if per_walk == 1 else "sweep")
    names = list(params)
    dense = torch.func.hessian(
        lambda flat: f(dict(zip(names, _unflatten(flat, params))), case.inputs, case.targets)
    )(torch.cat([v.reshape(-1) for v in params.values()]))
    got = torch.cat([diag[k].reshape(-1) for k in names])
    torch.testing.assert_close(got, dense.diagonal(), rtol=1e-9, atol=1e-12)


def _unflatten(flat: Tensor, like: dict[str, Tensor]) -> list[Tensor]:
    out, i = [], 0
    for v in like.values():
        out.append(flat[i : i + v.numel()].reshape(v.shape))
        i += v.numel()
    return out


@pytest.mark.parametrize("name", ["gpt2", "gpt2_eager", "bert", "bert_eager", "rnn", "lstm", "gru", "mha",
                                  "sdpa", "vit", "resnet_eval", "resnet_train"])  # fmt: skip
def test_default_budget_admits_the_benchmark_size_zoo(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import _zoo

    if name.startswith(("gpt2", "bert")) and _zoo.transformers_or_none() is None:
        pytest.skip("transformers is not installed")
    case = _zoo.build(name, torch.float32, batch=4, bench=True)
    f, params = secorder.module_loss(case.model, _zoo.loss_of(case))
    params = {k: v.detach() for k, v in params.items()}
    args = (params, case.inputs, case.targets)
    # one-hot HVPs (GPT-2: P = 34,176) and the generic Fisher route (N·R products) both fit
    assert _admitted(monkeypatch, lambda: secorder.hessian_trace(f, exact="hvp")(*args))
    assert _admitted(
        monkeypatch, lambda: secorder.fisher_trace(case.model, "cross_entropy", path="generic")(*args)
    )


def test_default_budget_refuses_a_50k_vocabulary_gpt2(monkeypatch: pytest.MonkeyPatch) -> None:
    import _zoo

    transformers = _zoo.transformers_or_none()
    if transformers is None:
        pytest.skip("transformers is not installed")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64)  # bench_memory.py
    torch.manual_seed(0)
    model = _zoo.LogitsOnly(transformers.GPT2LMHeadModel(cfg), per_token=True).eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 64), generator=_gen(0))
    f, params = secorder.module_loss(model, F.cross_entropy)
    params = {k: v.detach() for k, v in params.items()}
    with pytest.raises(ExactBudgetError, match=r"hessian_trace\(f, num_probes=K\)"):
        secorder.hessian_trace(f, exact="hvp")(params, ids, ids)
    with pytest.raises(
        ExactBudgetError, match=r"fisher_trace\(model_fn, loss, kind='mc', num_probes=K\)"
    ) as info:
        secorder.fisher_trace(model, "cross_entropy")(params, ids, ids)
    assert f"fast: {cfg.vocab_size * 64:,} products" in str(info.value)


def test_dataset_hessian_obeys_the_budget_per_batch() -> None:
    params, x, y = _mlp_problem()
    data = [(x[:2], y[:2]), (x[2:], y[2:])]
    secorder.set_exact_budget(_p(params) - 1)
    with pytest.raises(ExactBudgetError) as info:
        secorder.dataset_hessian_trace(_Counted(), params, data)
    msg = str(info.value)
    assert msg.startswith("dataset_hessian_trace(f, params, data)") and f"hvp: {_p(params)} products" in msg
    assert "dataset_hessian_trace(f, params, data, num_probes=K)" in msg
    est = secorder.dataset_hessian_trace(_Counted(), params, data, num_probes=4, generator=_gen(0))
    assert est.shape == ()


def test_eager_api_obeys_the_budget_and_its_named_route_runs() -> None:
    from secorder.core import hessian_diagonal as eager_diagonal
    from secorder.core import hessian_trace as eager_trace
    from secorder.core.hvp import hessian_trace as eager_hutchinson

    params, x, y = _mlp_problem()
    plist = [v.clone().requires_grad_(True) for v in params.values()]

    def closure() -> Tensor:
        return _Counted()(dict(zip(params, plist)), x, y)

    secorder.set_exact_budget(_p(params) - 1)
    with pytest.raises(
        ExactBudgetError, match=r"secorder.core.hvp.hessian_trace\(func, params, num_samples=K\)"
    ):
        eager_trace(closure, plist)
    with pytest.raises(
        ExactBudgetError, match=r"^hessian_diagonal\(func, params\): an exact Hessian diagonal"
    ):
        eager_diagonal(closure, plist)
    assert eager_hutchinson(closure, plist, num_samples=4, generator=_gen(0)).shape == ()


def test_default_budget_refuses_full_size_resnet18_one_hot_hvps() -> None:
    import _zoo

    case = _zoo.resnet18_case(batch=1, img=32, classes=1000)
    f, params = secorder.module_loss(case.model, _zoo.loss_of(case))
    params = {k: v.detach() for k, v in params.items()}
    counted = _CountedLoss(f)
    with pytest.raises(ExactBudgetError) as info:
        secorder.hessian_trace(counted, exact="hvp")(params, case.inputs, case.targets)
    assert counted.calls == 0  # refused before any evaluation
    assert f"hvp: {_p(params):,} products" in str(info.value) and _p(params) > 11_000_000


class _CountedLoss:
    def __init__(self, f: Callable[..., Tensor]) -> None:
        self.f, self.calls = f, 0

    def __call__(self, *args: object) -> Tensor:
        self.calls += 1
        return self.f(*args)


def test_dataset_fisher_refusal_names_the_dataset_call_and_its_routes() -> None:
    model = _model()
    params, (x, y) = _module_params(model), _fisher_data()
    data = [(x[:2], y[:2]), (x[2:], y[2:])]
    secorder.set_exact_budget(2)  # R = 3 columns per sample
    with pytest.raises(ExactBudgetError) as info:
        secorder.dataset_fisher_trace(model, "cross_entropy", params, data)
    msg = str(info.value)
    assert msg.startswith("dataset_fisher_trace(model_fn, loss, params, data)") and "fast: 3 products" in msg
    assert "dataset_fisher_trace(model_fn, loss, params, data, num_probes=K)" in msg
    est = secorder.dataset_fisher_trace(model, "cross_entropy", params, data, num_probes=4, generator=_gen(0))
    assert est.shape == ()

"""The Hessian transforms against dense references (float64), on fixed and generated problems."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import secorder
from secorder._pytree import flatten, ravel
from secorder.operators import STRATEGIES
from secorder.testing import dense_hessian
from tests.conftest import tol

CONCRETE = [s for s in STRATEGIES if s != "auto"]


def _mlp(widths: list[int], act: type[nn.Module], dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def _problem(dtype: torch.dtype, act: type[nn.Module] = nn.Tanh, seed: int = 0):
    model = _mlp([4, 6, 5, 3], act, dtype, seed)
    f, params = secorder.module_loss(model, nn.functional.cross_entropy)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (9,), generator=g)
    return f, params, x, y


@pytest.mark.parametrize("strategy", ["auto", *CONCRETE])
def test_exact_trace_and_diagonal_match_dense(dtype: torch.dtype, strategy: str) -> None:
    f, params, x, y = _problem(dtype)
    H = dense_hessian(f, params, x, y)
    trace = secorder.hessian_trace(f, strategy=strategy)(params, x, y)
    diag = secorder.hessian_diagonal(f, strategy=strategy)(params, x, y)
    assert trace.dtype == dtype and trace.shape == ()
    torch.testing.assert_close(trace, H.diagonal().sum(), **tol(dtype))
    assert list(diag) == list(params)  # structure and key order kept
    torch.testing.assert_close(ravel(flatten(diag)[0]), H.diagonal(), **tol(dtype))


@pytest.mark.parametrize("strategy", ["auto", *CONCRETE])
def test_hvp_matches_dense(strategy: str) -> None:
    f, params, x, y = _problem(torch.float64)
    H = dense_hessian(f, params, x, y)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    hv = secorder.hvp(f, strategy=strategy)(v, params, x, y)
    assert list(hv) == list(params)
    torch.testing.assert_close(ravel(flatten(hv)[0]), H @ ravel(flatten(v)[0]))


def test_hvp_under_vmap_over_tangents() -> None:
    f, params, x, y = _problem(torch.float64)
    H = dense_hessian(f, params, x, y)
    V = {k: torch.randn(5, *p.shape, dtype=p.dtype) for k, p in params.items()}
    HV = torch.func.vmap(secorder.hvp(f), in_dims=(0, None, None, None))(V, params, x, y)
    flat_V = ravel(flatten(V)[0], batch_dims=1)
    torch.testing.assert_close(ravel(flatten(HV)[0], batch_dims=1), flat_V @ H)


def test_dict_key_order_is_irrelevant_and_preserved() -> None:
    f, params, x, y = _problem(torch.float64)
    keys = list(params)
    random.Random(3).shuffle(keys)
    shuffled = {k: params[k] for k in keys}
    d1 = secorder.hessian_diagonal(f)(params, x, y)
    d2 = secorder.hessian_diagonal(f)(shuffled, x, y)
    assert list(d2) == keys
    for k in keys:
        torch.testing.assert_close(d1[k], d2[k])
    torch.testing.assert_close(
        secorder.hessian_trace(f)(params, x, y), secorder.hessian_trace(f)(shuffled, x, y)
    )


def test_argnums_selects_inputs_laplacian() -> None:
    """The Laplacian of a function of its inputs: argnums=1 differentiates x, not params."""
    torch.manual_seed(0)
    net = _mlp([3, 8, 1], nn.Tanh, torch.float64)
    fwd, params = secorder.modules.module_forward(net)

    def u(p, x):
        return fwd(p, x.unsqueeze(0)).squeeze()

    x = torch.randn(3, dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda z: u(params, z), x)
    torch.testing.assert_close(secorder.hessian_trace(u, argnums=1)(params, x), H.trace())
    torch.testing.assert_close(secorder.hessian_diagonal(u, argnums=-1)(params, x), H.diagonal())


def test_chunk_size_does_not_change_results() -> None:
    f, params, x, y = _problem(torch.float64)
    exact = [secorder.hessian_trace(f, chunk_size=c)(params, x, y) for c in (1, 7, None)]
    for e in exact[1:]:
        torch.testing.assert_close(e, exact[0])
    est = [
        secorder.hessian_trace(f, num_probes=10, chunk_size=c)(
            params, x, y, generator=torch.Generator().manual_seed(5)
        )
        for c in (1, 3, None)
    ]
    for e in est[1:]:
        torch.testing.assert_close(e, est[0])


def test_same_generator_state_gives_identical_results() -> None:
    f, params, x, y = _problem(torch.float32)
    fn = secorder.hessian_trace(f, num_probes=8, with_stderr=True)
    a = fn(params, x, y, generator=torch.Generator().manual_seed(11))
    b = fn(params, x, y, generator=torch.Generator().manual_seed(11))
    c = fn(params, x, y, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    d = secorder.hessian_diagonal(f, num_probes=4)
    da = d(params, x, y, generator=torch.Generator().manual_seed(1))
    db = d(params, x, y, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_exact_stderr_is_zero_and_estimates_have_stderr() -> None:
    f, params, x, y = _problem(torch.float64)
    est, err = secorder.hessian_trace(f, with_stderr=True)(params, x, y)
    assert err.item() == 0.0
    torch.testing.assert_close(est, secorder.hessian_trace(f)(params, x, y))
    _diag, derr = secorder.hessian_diagonal(f, num_probes=6, with_stderr=True)(
        params, x, y, generator=torch.Generator().manual_seed(0)
    )
    assert list(derr) == list(params) and all((derr[k] >= 0).all() for k in derr)
    _est, err = secorder.hessian_trace(f, num_probes=1, with_stderr=True)(
        params, x, y, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isnan(err)  # undefined from one sample, reported as such


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_rademacher_and_gaussian_exact_on_diagonal_quadratic(distribution: str) -> None:
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    f = lambda x: (w * x**2).sum()
    est = secorder.hessian_trace(f, num_probes=3, distribution=distribution)(
        torch.zeros(3, dtype=torch.float64), generator=torch.Generator().manual_seed(0)
    )
    if distribution == "rademacher":  # v_i^2 = 1: exact on a diagonal Hessian
        torch.testing.assert_close(est, torch.tensor(12.0, dtype=torch.float64))
    else:  # (1/K) Σ_k v_kᵀ H v_k, probe k being the k-th torch.randn draw of the generator
        g = torch.Generator().manual_seed(0)
        V = torch.stack([torch.randn(3, generator=g, dtype=torch.float64) for _ in range(3)])
        torch.testing.assert_close(est, ((V**2) * (2 * w)).sum(1).mean())
        assert abs(float(est) - 12.0) > 1e-3  # Gaussian probes are not exact here


def test_float32_and_float64_keep_dtype(dtype: torch.dtype, device: torch.device) -> None:
    f, params, x, y = _problem(dtype)
    params = {k: v.to(device) for k, v in params.items()}
    x, y = x.to(device), y.to(device)
    gen = torch.Generator(device).manual_seed(0)
    t = secorder.hessian_trace(f, num_probes=3)(params, x, y, generator=gen)
    d = secorder.hessian_diagonal(f)(params, x, y)
    assert t.dtype == dtype and t.device.type == device.type
    assert all(v.dtype == dtype and v.device.type == device.type for v in d.values())


# -- pytrees and generated functions --------------------------------------------------------------

_ACTS = [torch.tanh, torch.sin, torch.sigmoid, lambda z: z**3, nn.functional.softplus]


@st.composite
def pytrees(draw: st.DrawFn):
    """Nested dicts/lists/tuples of small float64 tensors with random keys and ranks."""
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)

    def leaf():
        shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
        return torch.randn(shape, generator=g, dtype=torch.float64)

    def node(depth: int):
        kind = draw(st.sampled_from(["leaf", "dict", "list", "tuple"] if depth < 2 else ["leaf"]))
        if kind == "leaf":
            return leaf()
        n = draw(st.integers(1, 3))
        children = [node(depth + 1) for _ in range(n)]
        if kind == "dict":
            keys = draw(
                st.lists(st.text("abcxyz", min_size=1, max_size=3), min_size=n, max_size=n, unique=True)
            )
            return dict(zip(keys, children))
        return list(children) if kind == "list" else tuple(children)

    return node(0), seed


def _generated_function(seed: int):
    """A smooth nonlinear scalar function of all leaves: mixes them through random weights."""
    rng = random.Random(seed)
    acts = [rng.choice(_ACTS) for _ in range(2)]

    def f(tree):
        leaves = flatten(tree)[0]
        z = torch.cat([leaf.reshape(-1) for leaf in leaves])
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(4, z.numel(), generator=gen, dtype=z.dtype)
        h = acts[0](W @ z)
        return (acts[1](h) ** 2).sum() + (z**2).sum() * (h[0] ** 2)

    return f


@given(pytrees())
def test_property_generated_pytree_functions(tree_and_seed) -> None:
    tree, seed = tree_and_seed
    f = _generated_function(seed)
    H = dense_hessian(f, tree)
    trace = secorder.hessian_trace(f)(tree)
    diag = secorder.hessian_diagonal(f)(tree)
    assert flatten(diag)[1] == flatten(tree)[1]
    flat_diag = ravel(flatten(diag)[0])
    torch.testing.assert_close(flat_diag, H.diagonal())
    torch.testing.assert_close(trace, H.diagonal().sum())
    torch.testing.assert_close(trace, flat_diag.sum())
    v_leaves = [torch.randn_like(leaf) for leaf in flatten(tree)[0]]
    v = secorder._pytree.unflatten(flatten(tree)[1], v_leaves)
    hv = secorder.hvp(f)(v, tree)
    torch.testing.assert_close(ravel(flatten(hv)[0]), H @ ravel(v_leaves))


@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    act=st.sampled_from([nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.SiLU]),
    loss=st.sampled_from(["ce", "mse"]),
    seed=st.integers(0, 1000),
    shuffle=st.booleans(),
)
def test_property_small_models(widths, act, loss, seed, shuffle) -> None:
    out_dim = max(widths[-1], 2) if loss == "ce" else widths[-1]
    model = _mlp([*widths[:-1], out_dim], act, torch.float64, seed)
    loss_fn = nn.functional.cross_entropy if loss == "ce" else nn.functional.mse_loss
    f, params = secorder.module_loss(model, loss_fn)
    if shuffle:
        keys = list(params)
        random.Random(seed).shuffle(keys)
        params = {k: params[k] for k in keys}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, widths[0], generator=g, dtype=torch.float64)
    y = (
        torch.randint(0, out_dim, (5,), generator=g)
        if loss == "ce"
        else torch.randn(5, out_dim, generator=g, dtype=torch.float64)
    )
    H = dense_hessian(f, params, x, y)
    diag = secorder.hessian_diagonal(f)(params, x, y)
    assert list(diag) == list(params)
    torch.testing.assert_close(ravel(flatten(diag)[0]), H.diagonal())
    torch.testing.assert_close(secorder.hessian_trace(f)(params, x, y), H.trace())


def test_relu_network_kinks_are_handled() -> None:
    f, params, x, y = _problem(torch.float64, act=nn.ReLU)
    H = dense_hessian(f, params, x, y)
    torch.testing.assert_close(secorder.hessian_trace(f)(params, x, y), H.trace())


def test_linear_function_has_zero_hessian() -> None:
    for strategy in CONCRETE:
        f = lambda p: (p["a"] * 3).sum()
        p = {"a": torch.ones(3, dtype=torch.float64)}
        assert secorder.hessian_trace(f, strategy=strategy)(p).item() == 0.0
        assert torch.equal(
            secorder.hessian_diagonal(f, strategy=strategy)(p)["a"], torch.zeros(3, dtype=torch.float64)
        )


def test_unused_leaf_gets_zeros() -> None:
    f = lambda p: (p["a"] ** 3).sum()
    p = {"a": torch.ones(2, dtype=torch.float64), "unused": torch.ones(3, dtype=torch.float64)}
    for strategy in CONCRETE:
        d = secorder.hessian_diagonal(f, strategy=strategy)(p)
        torch.testing.assert_close(d["a"], torch.full((2,), 6.0, dtype=torch.float64))
        torch.testing.assert_close(d["unused"], torch.zeros(3, dtype=torch.float64))


def test_auto_strategy_rule_is_inspectable() -> None:
    """Eager "auto": quadratic forms by the Taylor tape; products by a loop on one retained
    graph for convolutions, batched rev-over-rev otherwise."""
    f, params, x, y = _problem(torch.float64)
    op, _ = secorder.hessian_operator(f, params, x, y)
    assert op.strategy == "auto" and op.quadform_strategy is None
    op.quadform(torch.ones(2, op.size, dtype=torch.float64))
    assert op.quadform_strategy == "taylor" and op.strategy == "auto"
    op.matmat(torch.ones(2, op.size, dtype=torch.float64))
    assert op.strategy == "rev_rev"
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).double()
    fc, pc = secorder.module_loss(conv, nn.functional.cross_entropy)
    xc, yc = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 1])
    opc, _ = secorder.hessian_operator(fc, pc, xc, yc)
    diag = secorder.estimators.exact_diagonal(opc)
    assert opc.strategy == "autograd"
    torch.testing.assert_close(diag, dense_hessian(fc, pc, xc, yc).diagonal())
    # Differentiable contexts settle on rev_rev at once.
    with torch.enable_grad():
        op_g, _ = secorder.hessian_operator(f, {k: v.requires_grad_(True) for k, v in params.items()}, x, y)
    assert op_g.strategy == "rev_rev"


def test_auto_strategy_for_one_product_at_a_time() -> None:
    """Lanczos multiplies one vector per call: the eager auto rule takes the retained-graph loop."""
    f, params, x, y = _problem(torch.float64)
    g, leaves = secorder.testing.flat_function(f, (params, x, y))
    op = secorder.operators.HessianOperator(lambda ls: g(ls[0]), [leaves], "auto", one_at_a_time=True)
    hv = op.matmat(torch.eye(op.size, dtype=torch.float64)[:1])
    assert op.strategy == "autograd"
    torch.testing.assert_close(hv[0], dense_hessian(f, params, x, y)[0])

"""The eager, torch_secorder-shaped API (secorder.core, secorder.approximations).

Dense float64 references from torch.autograd.functional.hessian / torch.func; the
issue's examples run verbatim; create_graph, strict, zeros for frozen tensors, no
mutation of a model, and every error message.
"""

from __future__ import annotations

import copy
import functools
import math
import textwrap
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import secorder
import secorder.core._closure as closure_mod
from secorder._errors import SecorderError
from secorder.approximations.fisher_diagonal import empirical_fisher_diagonal, generalized_fisher_diagonal
from secorder.approximations.fisher_trace import empirical_fisher_trace, generalized_fisher_trace
from secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from secorder.core.hessian_trace import hessian_trace, model_hessian_trace
from secorder.core.hvp import exact_hvp, gauss_newton_product, model_hvp
from secorder.core.hvp import hessian_trace as hutchinson_trace
from secorder.testing import dense_hessian
from tests.conftest import tol

F64 = torch.float64


# -- references ------------------------------------------------------------------
def dense_hessian_of(g: Callable[..., Tensor], params: Sequence[Tensor]) -> Tensor:
    """The P×P Hessian of ``g(*params)`` over the concatenated flattened tensors."""
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def flat_g(x: Tensor) -> Tensor:
        return g(*[c.reshape(s) for c, s in zip(torch.split(x, sizes), shapes)])

    return torch.autograd.functional.hessian(flat_g, flat)


def split_like(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    sizes = [p.numel() for p in params]
    return [c.reshape(p.shape) for c, p in zip(torch.split(flat, sizes), params)]


def model_function(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> Callable[..., Tensor]:
    """``g(*params) = loss_fn(model(x; params), y)`` with cloned buffers (the reference)."""
    names = [k for k, _ in model.named_parameters()]
    buffers = {k: b.clone() for k, b in model.named_buffers()}

    def g(*ps: Tensor) -> Tensor:
        state = {**{k: b.clone() for k, b in buffers.items()}, **dict(zip(names, ps))}
        return loss_fn(functional_call(model, state, (x,)), y)

    return g


def small_mlp(dtype: torch.dtype = F64, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2)).to(dtype)


def closure_problem(dtype: torch.dtype = F64) -> tuple[Callable[..., Tensor], list[Tensor]]:
    """A non-separable function of two tensors (cross terms between them)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=dtype).requires_grad_()

    def g(a: Tensor, b: Tensor) -> Tensor:
        return torch.tanh(a @ b).pow(2).sum() + (a.sin() * b).sum() * b.prod() + (b**4).sum()

    return g, [a, b]


# -- the examples, verbatim --------------------------------------------------
EXAMPLE_QUADRATIC = """
import torch
from secorder.core.hessian_trace import hessian_trace
x = torch.tensor([1.0, 2.0], requires_grad=True)
def quadratic():
    return x.pow(2).sum()
trace = hessian_trace(quadratic, [x], num_samples=1000)   # 4.0
"""

EXAMPLE_MODEL = """
import torch, torch.nn as nn
from secorder.core.hessian_trace import model_hessian_trace
model = nn.Linear(10, 1); x = torch.randn(5, 10); y = torch.randn(5, 1)
trace = model_hessian_trace(model, nn.functional.mse_loss, x, y)
"""


def test_verbatim_quadratic_example() -> None:
    scope: dict = {}
    exec(textwrap.dedent(EXAMPLE_QUADRATIC), scope)
    assert isinstance(scope["trace"], Tensor) and scope["trace"].dim() == 0
    assert scope["trace"].item() == 4.0


def test_verbatim_model_example() -> None:
    scope: dict = {}
    exec(textwrap.dedent(EXAMPLE_MODEL), scope)
    x = scope["x"]
    # L = mean((Wx + b - y)²): H = (2/N) Σ_n [x_n; 1][x_n; 1]ᵀ, so tr H = (2/N) Σ_n (‖x_n‖² + 1).
    expected = 2 * (x.pow(2).sum() + x.shape[0]) / x.shape[0]
    torch.testing.assert_close(scope["trace"], expected)


# -- exact values against dense references ---------------------------------------------
def test_closure_trace_diagonal_hvp_match_dense(dtype: torch.dtype) -> None:
    g, params = closure_problem(dtype)
    H = dense_hessian_of(g, [p.double() for p in params])
    func = lambda: g(*params)
    t = tol(dtype)
    trace = hessian_trace(func, params)
    assert trace.dim() == 0 and trace.dtype == dtype
    torch.testing.assert_close(trace.double(), H.trace(), **t)
    diag = hessian_diagonal(func, params)
    for d, ref, p in zip(diag, split_like(H.diagonal(), params), params):
        assert d.shape == p.shape and d.dtype == dtype
        torch.testing.assert_close(d.double(), ref, **t)
    v = [torch.randn_like(p) for p in params]
    hv = exact_hvp(func, params, v)
    ref = H @ torch.cat([a.double().reshape(-1) for a in v])
    for h, r in zip(hv, split_like(ref, params)):
        torch.testing.assert_close(h.double(), r, **t)
    weighted = hessian_diagonal(func, params, v=v)
    for w, d, a in zip(weighted, diag, v):
        torch.testing.assert_close(w, d * a)


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus], ids=["tanh", "softplus"])
def test_model_functions_match_dense(act: type[nn.Module]) -> None:
    model = small_mlp(act=act)
    x = torch.randn(6, 3, dtype=F64)
    y = torch.randint(0, 2, (6,))
    loss = nn.CrossEntropyLoss()
    params = list(model.parameters())
    H = dense_hessian_of(model_function(model, loss, x, y), params)
    torch.testing.assert_close(model_hessian_trace(model, loss, x, y), H.trace())
    for d, ref in zip(model_hessian_diagonal(model, loss, x, y), split_like(H.diagonal(), params)):
        torch.testing.assert_close(d, ref)
    v = [torch.randn_like(p) for p in params]
    ref = H @ torch.cat([a.reshape(-1) for a in v])
    for h, r in zip(model_hvp(model, loss, x, y, v), split_like(ref, params)):
        torch.testing.assert_close(h, r)


def test_laplacian_matches_torch_func_hessian() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.randn(8, dtype=F64, requires_grad=True)
    ref = torch.func.hessian(lambda z: net(z).squeeze())(x.detach())
    torch.testing.assert_close(hessian_trace(lambda: net(x).squeeze(), [x]), ref.trace())
    torch.testing.assert_close(hessian_diagonal(lambda: net(x).squeeze(), [x])[0], ref.diagonal())


def test_single_tensor_returns_tensor_and_many_return_list() -> None:
    g, params = closure_problem()
    hv = exact_hvp(lambda: g(*params), params[:1], torch.ones_like(params[0]))
    assert isinstance(hv, Tensor) and hv.shape == params[0].shape
    hv2 = exact_hvp(lambda: g(*params), params, [torch.ones_like(p) for p in params])
    assert isinstance(hv2, list) and len(hv2) == 2


def test_params_from_generator_and_tuple() -> None:
    model = small_mlp()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    func = lambda: nn.functional.mse_loss(model(x), y)
    a = hessian_trace(func, model.parameters())
    b = hessian_trace(func, tuple(model.parameters()))
    torch.testing.assert_close(a, b)


def test_works_under_no_grad() -> None:
    g, params = closure_problem()
    expected = hessian_trace(lambda: g(*params), params)
    with torch.no_grad():
        torch.testing.assert_close(hessian_trace(lambda: g(*params), params), expected)


def test_loop_fallback_gives_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    g, params = closure_problem()
    expected = hessian_diagonal(lambda: g(*params), params)

    def failing_vmap(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no batching rule (simulated)")

    monkeypatch.setattr(closure_mod, "vmap", failing_vmap)
    for d, e in zip(hessian_diagonal(lambda: g(*params), params), expected):
        torch.testing.assert_close(d, e)


def test_blocks_respect_chunking() -> None:
    # More one-hot rows than MAX_CHUNK_ROWS in one tensor: several chunks per block.
    n = closure_mod.MAX_CHUNK_ROWS + 7
    x = torch.linspace(-1, 1, n, dtype=F64).requires_grad_()
    d = hessian_diagonal(lambda: x.pow(4).sum() + x.sum() ** 2, [x])[0]
    torch.testing.assert_close(d, 12 * x.detach() ** 2 + 2)


# -- gauss_newton_product ------------------------------------------------------------
@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_gauss_newton_product_matches_dense(loss_name: str) -> None:
    model = small_mlp()
    x = torch.randn(5, 3, dtype=F64)
    if loss_name == "mse":
        loss, y = nn.MSELoss(), torch.randn(5, 2, dtype=F64)
    else:
        loss, y = nn.functional.cross_entropy, torch.randint(0, 2, (5,))
    params = list(model.parameters())
    names = [k for k, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def outputs(theta: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, split_like(theta, params))), (x,))

    z = outputs(flat)
    J = torch.autograd.functional.jacobian(outputs, flat).reshape(z.numel(), -1)
    Hz = torch.autograd.functional.hessian(lambda o: loss(o.reshape(z.shape), y), z.reshape(-1).detach())
    G = J.T @ Hz @ J
    v = [torch.randn_like(p) for p in params]
    ref = G @ torch.cat([a.reshape(-1) for a in v])
    for gv, r in zip(gauss_newton_product(model, loss, x, y, v), split_like(ref, params)):
        torch.testing.assert_close(gv, r)


# -- Hutchinson (secorder.core.hvp.hessian_trace) -------------------------------------------
def test_hutchinson_exact_on_diagonal_hessian_and_reproducible() -> None:
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    func = lambda: (w * x**2).sum() + x.sum()
    est = hutchinson_trace(func, [x], num_samples=3, generator=torch.Generator().manual_seed(0))
    assert isinstance(est, Tensor) and est.dim() == 0
    torch.testing.assert_close(est, torch.tensor(12.0, dtype=F64))
    g, params = closure_problem()
    a = hutchinson_trace(lambda: g(*params), params, 7, generator=torch.Generator().manual_seed(3))
    b = hutchinson_trace(lambda: g(*params), params, 7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("sparse", [False, True], ids=["rademacher", "sparse"])
def test_hutchinson_unbiased(sparse: bool) -> None:
    g, params = closure_problem()
    exact = dense_hessian_of(g, params).trace()
    gen = torch.Generator().manual_seed(0)
    seeds = 200
    values = torch.stack(
        [hutchinson_trace(lambda: g(*params), params, 4, sparse=sparse, generator=gen) for _ in range(seeds)]
    )
    stderr = values.std() / math.sqrt(seeds)
    assert abs(values.mean() - exact) < 4 * stderr, (values.mean(), exact, stderr)


# -- create_graph --------------------------------------------------------------------
def _trace_grad_reference(g: Callable[..., Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    leaves = [p.detach().clone().requires_grad_() for p in params]
    H = torch.autograd.functional.hessian(lambda *ps: g(*ps), tuple(leaves), create_graph=True)
    trace = sum(H[i][i].reshape(p.numel(), p.numel()).trace() for i, p in enumerate(leaves))
    return list(torch.autograd.grad(trace, leaves))


def test_create_graph_trace_is_differentiable() -> None:
    g, params = closure_problem()
    ref = _trace_grad_reference(g, params)
    trace = hessian_trace(lambda: g(*params), params, create_graph=True)
    for got, r in zip(torch.autograd.grad(trace, params), ref):
        torch.testing.assert_close(got, r)
    diag = hessian_diagonal(lambda: g(*params), params, create_graph=True)
    total = sum(d.sum() for d in diag)
    for got, r in zip(torch.autograd.grad(total, params), ref):
        torch.testing.assert_close(got, r)
    # Hutchinson with Rademacher probes is exact on a separable function: same derivative.
    x = torch.tensor([0.3, -0.7], dtype=F64, requires_grad=True)
    est = hutchinson_trace(lambda: x.sin().sum(), [x], 2, create_graph=True, generator=torch.Generator())
    torch.testing.assert_close(torch.autograd.grad(est, x)[0], -x.detach().cos())


def test_create_graph_false_gives_plain_tensors() -> None:
    g, params = closure_problem()
    assert not hessian_trace(lambda: g(*params), params).requires_grad
    assert not any(d.requires_grad for d in hessian_diagonal(lambda: g(*params), params))


def test_create_graph_model_hvp_and_gauss_newton() -> None:
    model = small_mlp()
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    params = list(model.parameters())
    u = [torch.randn_like(p) for p in params]
    v = [torch.randn_like(p) for p in params]
    g = model_function(model, nn.functional.mse_loss, x, y)
    flat_u = torch.cat([a.reshape(-1) for a in u])
    flat_v = torch.cat([a.reshape(-1) for a in v])

    # Reference: d/dθ uᵀ H(θ) v through a differentiable dense Hessian.
    leaves = [p.detach().clone().requires_grad_() for p in params]
    H = torch.autograd.functional.hessian(lambda *ps: g(*ps), tuple(leaves), create_graph=True)
    n = len(leaves)
    blocks = [
        torch.cat([H[i][j].reshape(leaves[i].numel(), leaves[j].numel()) for j in range(n)], 1)
        for i in range(n)
    ]
    ref = grads_or_zeros(flat_u @ torch.cat(blocks, 0) @ flat_v, leaves)
    hv = model_hvp(model, nn.functional.mse_loss, x, y, v, create_graph=True)
    got = grads_or_zeros(sum((a * h).sum() for a, h in zip(u, hv)), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    # d/dθ uᵀ G(θ) v with G = Jᵀ ∇²_z L J built densely by torch.func (reverse over reverse).
    names = [k for k, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def outputs(theta: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, split_like(theta, params))), (x,))

    def u_g_v(theta: Tensor) -> Tensor:
        z = outputs(theta)
        J = torch.func.jacrev(outputs)(theta).reshape(z.numel(), -1)
        Hz = torch.func.jacrev(torch.func.jacrev(lambda o: nn.functional.mse_loss(o.reshape(z.shape), y)))(
            z.reshape(-1)
        )
        return flat_u @ J.T @ Hz @ J @ flat_v

    ref_g = split_like(torch.func.grad(u_g_v)(flat), params)
    gv = gauss_newton_product(model, nn.functional.mse_loss, x, y, v, create_graph=True)
    got = grads_or_zeros(sum((a * h).sum() for a, h in zip(u, gv)), params)
    for a, b in zip(got, ref_g):
        torch.testing.assert_close(a, b)
    plain = gauss_newton_product(model, nn.functional.mse_loss, x, y, v)
    assert not any(t.requires_grad for t in plain)


# -- strict, frozen and unused tensors ---------------------------------------------------
def test_unused_tensor_zeros_or_strict_error() -> None:
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    unused = torch.ones(3, dtype=F64, requires_grad=True)
    func = lambda: x.pow(3).sum()
    diag = hessian_diagonal(func, [x, unused])
    torch.testing.assert_close(diag[1], torch.zeros(3, dtype=F64))
    torch.testing.assert_close(hessian_trace(func, [x, unused]), torch.tensor(18.0, dtype=F64))
    match = (
        r"hessian_trace\(func, params\): with strict=True .* params\[1\] \(shape \(3,\)\) with no gradient"
    )
    with pytest.raises(SecorderError, match=match):
        hessian_trace(func, [x, unused], strict=True)
    with pytest.raises(SecorderError, match=r"strict=False"):
        hessian_diagonal(func, [x, unused], strict=True)


def test_frozen_tensors_get_zeros_in_both_modes() -> None:
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    frozen = torch.tensor([3.0], dtype=F64)
    func = lambda: (x.pow(3).sum() * frozen**2).sum()
    for strict in (False, True):
        diag = hessian_diagonal(func, [x, frozen], strict=strict)
        torch.testing.assert_close(diag[0], 6 * 9 * x.detach())
        torch.testing.assert_close(diag[1], torch.zeros(1, dtype=F64))
    hv = exact_hvp(func, [x, frozen], [torch.ones(2, dtype=F64), torch.ones(1, dtype=F64)])
    torch.testing.assert_close(hv[1], torch.zeros(1, dtype=F64))
    assert hutchinson_trace(func, [frozen], 3).item() == 0.0


def test_linear_function_has_zero_hessian() -> None:
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    assert hessian_trace(lambda: (3 * x).sum(), [x]).item() == 0.0
    torch.testing.assert_close(
        exact_hvp(lambda: (3 * x).sum(), [x], torch.ones(2)), torch.zeros(2, dtype=F64)
    )


def test_frozen_model_parameters() -> None:
    model = small_mlp()
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    params = list(model.parameters())
    diag = model_hessian_diagonal(model, nn.functional.mse_loss, x, y, strict=True)
    assert torch.count_nonzero(diag[0]) == 0
    g = model_function(model, nn.functional.mse_loss, x, y)
    H = dense_hessian_of(g, params)
    for d, ref in zip(diag[1:], split_like(H.diagonal(), params)[1:]):
        torch.testing.assert_close(d, ref)
    gv = gauss_newton_product(model, nn.functional.mse_loss, x, y, [torch.ones_like(p) for p in params])
    assert torch.count_nonzero(gv[0]) == 0


# -- the model is never mutated ---------------------------------------------------------------
def grads_or_zeros(out: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """d out / d inputs, zeros where out does not depend on an input."""
    gs = torch.autograd.grad(out, list(inputs), allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, inputs)]


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_mutation_with_batchnorm(train: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    model.train(train)
    before = _state(model)
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    v = [torch.randn_like(p) for p in model.parameters()]
    loss = nn.MSELoss()
    trace = model_hessian_trace(model, loss, x, y)
    diag = model_hessian_diagonal(model, loss, x, y)
    hv = model_hvp(model, loss, x, y, v)
    gv = gauss_newton_product(model, loss, x, y, v)
    after = _state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert model.training is train and all(m.training is train for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    # ... and the numbers are those of the model as it was (dense float64 references)
    names = [k for k, _ in model.named_parameters()]
    base = {k: t.detach() for k, t in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def out(q: dict[str, Tensor]) -> Tensor:
        return functional_call(model, ({**q}, {k: b.clone() for k, b in buffers.items()}), (x,))

    H = dense_hessian(lambda q: loss(out(q), y), base)  # flat order: sorted names
    order = sorted(range(len(names)), key=lambda i: names[i])
    flat = lambda ts: torch.cat([ts[i].reshape(-1) for i in order])
    torch.testing.assert_close(trace, H.diagonal().sum())
    torch.testing.assert_close(flat(diag), H.diagonal())
    torch.testing.assert_close(flat(hv), H @ flat(v))
    # G v = Jᵀ (∇²_z L) J v with ∇²_z L = 2/(N·D) I for the mean squared error
    tangent = dict(zip(names, v))
    z, jv = torch.func.jvp(out, (base,), (tangent,))
    (gv_ref,) = torch.func.vjp(out, base)[1](2 * jv / z.numel())
    torch.testing.assert_close(flat(gv), flat([gv_ref[k] for k in names]))


def test_batchnorm_train_matches_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    H = dense_hessian_of(model_function(model, nn.functional.mse_loss, x, y), list(model.parameters()))
    torch.testing.assert_close(model_hessian_trace(model, nn.functional.mse_loss, x, y), H.trace())


# -- errors ------------------------------------------------------------------------------
def test_error_params_not_a_list() -> None:
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(
        TypeError, match=r"hessian_trace\(func, params\): params must be a list of tensors.*\[x\]"
    ):
        hessian_trace(lambda: x.sum(), x)  # type: ignore[arg-type]
    with pytest.raises(SecorderError, match=r"at least one tensor, but received an empty list"):
        hessian_diagonal(lambda: x.sum(), [])
    with pytest.raises(
        TypeError, match=r"every entry of params must be a torch.Tensor.*float at params\[1\]"
    ):
        hessian_trace(lambda: x.sum(), [x, 1.0])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"real floating-point tensor, but received dtype torch.int64"):
        exact_hvp(lambda: x.sum(), [torch.ones(2, dtype=torch.long)], torch.ones(2))


def test_error_func_output() -> None:
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(SecorderError, match=r"func\(\) must return a scalar .* shape \(2,\).*\.sum\(\)"):
        hessian_trace(lambda: x * 2, [x])
    with pytest.raises(
        TypeError, match=r"func\(\) must return a scalar \(0-dim\) tensor, but received a float"
    ):
        hessian_diagonal(lambda: 1.0, [x])  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match=r"func must be callable"):
        hessian_trace(x, [x])  # type: ignore[arg-type]
    model = nn.Linear(2, 1)
    with pytest.raises(
        SecorderError, match=r"model_hessian_trace.*loss_fn\(model\(inputs\), targets\) must return a scalar"
    ):
        model_hessian_trace(model, lambda o, t: o - t, torch.ones(3, 2), torch.ones(3, 1))


def test_error_vectors() -> None:
    x = torch.ones(2, requires_grad=True)
    y = torch.ones(3, requires_grad=True)
    func = lambda: (x.sum() * y.sum()) ** 2
    with pytest.raises(
        SecorderError,
        match=r"exact_hvp\(func, params, v\): v must have one tensor per entry.*shapes \[\(2,\)\]",
    ):
        exact_hvp(func, [x, y], [torch.ones(2)])
    with pytest.raises(SecorderError, match=r"v must have one tensor per entry.*\[\(2,\), \(4,\)\]"):
        hessian_diagonal(func, [x, y], v=[torch.ones(2), torch.ones(4)])
    with pytest.raises(TypeError, match=r"v must be a tensor or a list of tensors"):
        exact_hvp(func, [x, y], 3.0)  # type: ignore[arg-type]


def test_error_options() -> None:
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(SecorderError, match=r"num_samples must be an int >= 1, but received 0"):
        hutchinson_trace(lambda: x.pow(2).sum(), [x], num_samples=0)
    with pytest.raises(TypeError, match=r"create_graph must be True or False, but received 'yes'"):
        hessian_trace(lambda: x.pow(2).sum(), [x], create_graph="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"strict must be True or False"):
        hessian_diagonal(lambda: x.pow(2).sum(), [x], strict=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None"):
        hutchinson_trace(lambda: x.pow(2).sum(), [x], generator=0)  # type: ignore[arg-type]


def test_error_model_arguments() -> None:
    with pytest.raises(
        TypeError, match=r"model_hvp.*model must be a torch.nn.Module, but received a function"
    ):
        model_hvp(lambda z: z, nn.functional.mse_loss, torch.ones(1), torch.ones(1), torch.ones(1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"gauss_newton_product.*loss_fn must be callable"):
        gauss_newton_product(
            nn.Linear(1, 1), "mse", torch.ones(1, 1), torch.ones(1, 1), [torch.ones(1, 1), torch.ones(1)]
        )  # type: ignore[arg-type]
    with pytest.raises(
        SecorderError, match=r"gauss_newton_product.*loss_fn\(model\(x\), y\) must return a scalar"
    ):
        gauss_newton_product(
            nn.Linear(1, 1),
            lambda o, t: o - t,
            torch.ones(2, 1),
            torch.ones(2, 1),
            [torch.ones(1, 1), torch.ones(1)],
        )


def test_mixed_dtypes_error_names_the_fix() -> None:
    x = torch.ones(2, dtype=torch.float32, requires_grad=True)
    y = torch.ones(2, dtype=F64, requires_grad=True)
    func = lambda: (x.double() * y).pow(2).sum()
    # The diagonal works block by block; a product over both tensors needs one dtype.
    assert [d.dtype for d in hessian_diagonal(func, [x, y])] == [torch.float32, F64]
    with pytest.raises(
        SecorderError, match=r"exact_hvp\(func, params, v\): all leaves of params must share one dtype"
    ):
        exact_hvp(func, [x, y], [torch.ones(2), torch.ones(2)])


def test_does_not_copy_model() -> None:
    # model_* functions differentiate the user's own parameters (create_graph reaches them).
    model = small_mlp()
    clone = copy.deepcopy(model)
    x, y = torch.randn(3, 3, dtype=F64), torch.randn(3, 2, dtype=F64)
    t = model_hessian_trace(model, nn.functional.mse_loss, x, y, create_graph=True)
    grads = torch.autograd.grad(t, list(model.parameters()))
    ref = _trace_grad_reference(model_function(clone, nn.functional.mse_loss, x, y), list(clone.parameters()))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


# -- secorder.approximations ----------------------------------------------------------------
EXAMPLE_FISHER = """
from secorder.approximations.fisher_trace import empirical_fisher_trace, generalized_fisher_trace
efim_trace = empirical_fisher_trace(model, nn.MSELoss(), inputs, targets)
gfim_trace = generalized_fisher_trace(model, model(inputs), class_labels, loss_type="nll")
"""


def per_sample_grads(model: nn.Module, loss_of_sample: Callable[[int], Tensor], n: int) -> list[list[Tensor]]:
    """∇_θ l_n for each sample, by independent autograd calls (the reference)."""
    return [list(torch.autograd.grad(loss_of_sample(i), list(model.parameters()))) for i in range(n)]


def categorical_fisher_reference(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Σ_n Σ_c p_nc ∇log p_c(x_n)², enumerating the classes (the definition), per sample alone."""
    params = list(model.parameters())
    diag = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        logp = torch.log_softmax(model(x[i : i + 1])[0], dim=0)
        for c in range(logp.shape[0]):
            g = torch.autograd.grad(logp[c], params, retain_graph=True)
            for d, a in zip(diag, g):
                d += logp[c].exp().detach() * a**2
    return sum(d.sum() for d in diag), diag


def test_verbatim_fisher_example() -> None:
    torch.manual_seed(0)
    model = nn.Linear(10, 2).double()
    inputs = torch.randn(5, 10, dtype=F64)
    targets = torch.randn(5, 2, dtype=F64)
    class_labels = torch.randint(0, 2, (5,))
    scope: dict = {
        "model": model,
        "inputs": inputs,
        "targets": targets,
        "class_labels": class_labels,
        "nn": nn,
    }
    exec(textwrap.dedent(EXAMPLE_FISHER), scope)
    grads = per_sample_grads(
        model, lambda i: nn.functional.mse_loss(model(inputs[i : i + 1]), targets[i : i + 1]), 5
    )
    expected = sum(sum((a**2).sum() for a in g) for g in grads) / 5
    torch.testing.assert_close(scope["efim_trace"], expected)
    torch.testing.assert_close(scope["gfim_trace"], categorical_fisher_reference(model, inputs)[0])


def _mse_sum(o: Tensor, t: Tensor) -> Tensor:
    return ((o - t) ** 2).sum()


@pytest.mark.parametrize(
    ("loss_fn", "reduction", "classes"),
    [
        (nn.MSELoss(), "mean", False),
        (nn.MSELoss(reduction="sum"), "sum", False),
        (nn.functional.mse_loss, "mean", False),
        (functools.partial(nn.functional.mse_loss, reduction="sum"), "sum", False),
        (_mse_sum, "sum", False),
        (lambda o, t: ((o - t) ** 2).mean(), "mean", False),
        (nn.CrossEntropyLoss(), "mean", True),
        (nn.functional.cross_entropy, "mean", True),
        (nn.NLLLoss(), "mean", True),
    ],
    ids=[
        "MSELoss",
        "MSELoss-sum",
        "F.mse_loss",
        "partial-sum",
        "callable-sum",
        "callable-mean",
        "CELoss",
        "F.ce",
        "NLLLoss",
    ],
)
def test_empirical_fisher_matches_definition(loss_fn: Callable, reduction: str, classes: bool) -> None:
    model = small_mlp()
    n = 6
    x = torch.randn(n, 3, dtype=F64)
    y = torch.randint(0, 2, (n,)) if classes else torch.randn(n, 2, dtype=F64)
    net = nn.Sequential(model, nn.LogSoftmax(dim=1)) if isinstance(loss_fn, nn.NLLLoss) else model
    grads = per_sample_grads(net, lambda i: loss_fn(net(x[i : i + 1]), y[i : i + 1]), n)
    scale = 1.0 / n if reduction == "mean" else 1.0
    diag_ref = [scale * sum(g[j] ** 2 for g in grads) for j in range(len(grads[0]))]
    trace = empirical_fisher_trace(net, loss_fn, x, y)
    torch.testing.assert_close(trace, sum(d.sum() for d in diag_ref))
    for d, r in zip(empirical_fisher_diagonal(net, loss_fn, x, y), diag_ref):
        torch.testing.assert_close(d, r)


def test_empirical_fisher_frozen_and_no_mutation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    model[0].bias.requires_grad_(False)
    before = _state(model)
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    diag = empirical_fisher_diagonal(model, nn.MSELoss(), x, y)
    assert [d.shape for d in diag] == [p.shape for p in model.parameters()]
    assert torch.count_nonzero(diag[1]) == 0
    torch.testing.assert_close(empirical_fisher_trace(model, nn.MSELoss(), x, y), sum(d.sum() for d in diag))
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items()) and not model.training


def test_empirical_fisher_of_coupled_samples_is_the_batch_evaluation() -> None:
    """Train-mode BatchNorm couples the samples: the empirical Fisher is that of the batch
    evaluation, (1/N) Σ_n ‖∇_θ l_n‖² with l_n sample n's term of the batch loss (the module's
    running statistics are left as they were)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()  # train mode
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    before = copy.deepcopy(model.state_dict())
    got = empirical_fisher_trace(model, nn.MSELoss(), x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ref_model = copy.deepcopy(model)
    per_sample = ((ref_model(x) - y) ** 2).mean(1)  # l_n: sample n's mean over its D outputs
    want = 0.0
    for n in range(x.shape[0]):
        grads = torch.autograd.grad(per_sample[n], list(ref_model.parameters()), retain_graph=True)
        want += sum(float((g**2).sum()) for g in grads)
    torch.testing.assert_close(got, torch.tensor(want / x.shape[0], dtype=F64))


def test_generalized_fisher_matches_definition_and_fisher_transform() -> None:
    model = small_mlp()
    x = torch.randn(6, 3, dtype=F64)
    labels = torch.randint(0, 2, (6,))
    trace_ref, diag_ref = categorical_fisher_reference(model, x)
    torch.testing.assert_close(generalized_fisher_trace(model, model(x), labels), trace_ref)
    for d, r in zip(generalized_fisher_diagonal(model, model(x), labels), diag_ref):
        torch.testing.assert_close(d, r)
    params = {k: p.detach() for k, p in model.named_parameters()}
    ggn_sum = secorder.fisher_trace(model, "cross_entropy", reduction="sum")(params, x, labels)
    torch.testing.assert_close(ggn_sum, trace_ref)
    # The labels do not enter the Fisher (an expectation over the model's predictions).
    torch.testing.assert_close(generalized_fisher_trace(model, model(x), 1 - labels), trace_ref)


def test_generalized_fisher_keeps_graph_and_differentiates() -> None:
    model = small_mlp()
    x, labels = torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,))
    out = model(x)
    generalized_fisher_trace(model, out, labels)
    nn.functional.cross_entropy(out, labels).backward()  # the graph is still there
    assert all(p.grad is not None for p in model.parameters())
    names = [k for k, _ in model.named_parameters()]
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def fisher_trace_of(theta: Tensor) -> Tensor:
        f = lambda t: functional_call(model, dict(zip(names, split_like(t, params))), (x,))
        z = f(theta)
        J = torch.func.jacrev(f)(theta)  # (N, C, P)
        p = torch.softmax(z, 1)
        E = torch.eye(z.shape[1], dtype=F64)
        g = torch.einsum("ncp,nkc->nkp", J, E.unsqueeze(0) - p.unsqueeze(1))  # J_nᵀ(e_k − p_n)
        return (p * (g**2).sum(-1)).sum()

    ref = split_like(torch.func.grad(fisher_trace_of)(flat), params)
    t = generalized_fisher_trace(model, model(x), labels, create_graph=True)
    for a, b in zip(torch.autograd.grad(t, params), ref):
        torch.testing.assert_close(a, b)


def test_generalized_fisher_chunks_over_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_mlp()
    x, labels = torch.randn(7, 3, dtype=F64), torch.randint(0, 2, (7,))
    expected = generalized_fisher_diagonal(model, model(x), labels)
    monkeypatch.setattr(closure_mod, "MAX_CHUNK_ROWS", 3)  # 1 class x 3 samples per batched call
    for d, e in zip(generalized_fisher_diagonal(model, model(x), labels), expected):
        torch.testing.assert_close(d, e)


def test_approximation_errors() -> None:
    model = nn.Linear(3, 2)
    x, labels = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(NotImplementedError, match=r"loss_type must be 'nll'.*'mse'.*kind='ggn'"):
        generalized_fisher_trace(model, model(x), labels, loss_type="mse")
    with pytest.raises(SecorderError, match=r"outputs must carry the autograd graph.*torch.no_grad"):
        with torch.no_grad():
            out = model(x)
        generalized_fisher_trace(model, out, labels)
    with pytest.raises(SecorderError, match=r"targets must be integer class labels of shape \(N,\) = \(4,\)"):
        generalized_fisher_diagonal(model, model(x), labels[:3])
    with pytest.raises(SecorderError, match=r"outputs must be floating-point logits of shape \(N, C\)"):
        generalized_fisher_trace(model, model(x)[:, 0], labels)
    with pytest.raises(SecorderError, match=r"num_samples must be an int >= 1"):
        empirical_fisher_trace(model, nn.MSELoss(), x, torch.randn(4, 2), num_samples=0)
    with pytest.raises(SecorderError, match=r"reduction 'mean' or 'sum', but received reduction='none'"):
        empirical_fisher_trace(model, nn.MSELoss(reduction="none"), x, torch.randn(4, 2))
    with pytest.raises(SecorderError, match=r"must be the mean or the sum of its per-sample values"):
        empirical_fisher_trace(model, lambda o, t: ((o - t) ** 2).sum() ** 0.5, x, torch.randn(4, 2))
    with pytest.raises(TypeError, match=r"loss_fn must be callable"):
        empirical_fisher_diagonal(model, "mse", x, torch.randn(4, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        generalized_fisher_trace(lambda z: z, model(x), labels)  # type: ignore[arg-type]


# -- where torch_secorder 0.0.1 differs (the "migrating" page; run where it is installed) --------------
def _torch_secorder(module: str) -> object:
    pytest.importorskip("torch_secorder")
    import importlib

    return importlib.import_module(f"torch_secorder.{module}")


def _classifier() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, torch.randn(16, 4, dtype=F64), torch.randint(0, 3, (16,))


def test_migrating_exact_hessian_functions_agree() -> None:
    ts_trace, ts_diag = _torch_secorder("core.hessian_trace"), _torch_secorder("core.hessian_diagonal")
    model, x, y = _classifier()
    params = list(model.parameters())
    func = lambda: nn.functional.cross_entropy(model(x), y)
    torch.testing.assert_close(ts_trace.hessian_trace(func, params), hessian_trace(func, params))  # type: ignore[attr-defined]
    for a, b in zip(ts_diag.hessian_diagonal(func, params), hessian_diagonal(func, params)):  # type: ignore[attr-defined]
        torch.testing.assert_close(a, b)


def test_migrating_fisher_numbers_differ() -> None:
    ts_fisher = _torch_secorder("approximations.fisher_trace")
    model, x, y = _classifier()
    params = list(model.parameters())
    ce = nn.functional.cross_entropy
    batch_grad = torch.autograd.grad(ce(model(x), y), params)
    # torch_secorder: the squared norm of the batch gradient ...
    ts_ef = ts_fisher.empirical_fisher_trace(model, ce, x, y)  # type: ignore[attr-defined]
    assert ts_ef.dtype == torch.float32  # accumulated in float32 whatever the model's dtype
    torch.testing.assert_close(ts_ef.double(), sum((g**2).sum() for g in batch_grad), rtol=1e-6, atol=0)
    # ... ours: the mean of the per-sample squared gradient norms, larger by the missing cross terms.
    ours = empirical_fisher_trace(model, ce, x, y)
    per = per_sample_grads(model, lambda i: ce(model(x[i : i + 1]), y[i : i + 1]), 16)
    torch.testing.assert_close(ours, sum(sum((a**2).sum() for a in g) for g in per) / 16)
    assert ours > 5 * ts_ef
    # Generalized: torch_secorder squares the gradient of Σ_n log p(y_n|x_n) for the given labels.
    logp = torch.log_softmax(model(x), 1)[torch.arange(16), y].sum()
    ts_gf = ts_fisher.generalized_fisher_trace(model, model(x), y)  # type: ignore[attr-defined]
    expected = sum((g**2).sum() for g in torch.autograd.grad(logp, params))
    torch.testing.assert_close(ts_gf.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        generalized_fisher_trace(model, model(x), y), categorical_fisher_reference(model, x)[0]
    )


def test_migrating_behaviour_differences() -> None:
    ts_hvp, ts_trace = _torch_secorder("core.hvp"), _torch_secorder("core.hessian_trace")
    ts_diag = _torch_secorder("core.hessian_diagonal")
    model, x, y = _classifier()
    params = list(model.parameters())
    func = lambda: nn.functional.cross_entropy(model(x), y)
    v = [torch.randn_like(p) for p in params]
    # gauss_newton_product: torch_secorder 0.0.1 returns zeros (it backpropagates through a detached copy).
    assert all(
        torch.count_nonzero(g) == 0
        for g in ts_hvp.gauss_newton_product(model, nn.functional.cross_entropy, x, y, v)
    )  # type: ignore[attr-defined]
    assert all(
        torch.count_nonzero(g) > 0 for g in gauss_newton_product(model, nn.functional.cross_entropy, x, y, v)
    )
    # Hutchinson returns a Python float there, a 0-dim tensor here.
    assert isinstance(ts_hvp.hessian_trace(func, params, num_samples=2), float)  # type: ignore[attr-defined]
    # model_* functions update BatchNorm running statistics there, not here.
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    before = bn[1].running_mean.clone()
    model_hessian_trace(bn, nn.functional.cross_entropy, x, y)
    assert torch.equal(before, bn[1].running_mean)
    ts_trace.model_hessian_trace(bn, nn.functional.cross_entropy, x, y)  # type: ignore[attr-defined]
    assert not torch.equal(before, bn[1].running_mean)
    # strict=True: torch_secorder raises for a frozen tensor and returns zeros for an unused one.
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    cube = lambda: (w**3).sum()
    unused = torch.ones(2, requires_grad=True)
    assert ts_diag.hessian_diagonal(cube, [w, unused], strict=True)[1].abs().sum() == 0  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="does not require grad"):
        ts_diag.hessian_diagonal(cube, [w, torch.ones(2)], strict=True)  # type: ignore[attr-defined]


def test_migrating_sparse_probes_biased_there() -> None:
    ts_hvp = _torch_secorder("core.hvp")
    x = torch.linspace(0.5, 2.0, 20, dtype=F64).requires_grad_()
    func = lambda: (x**3).sum()
    exact = 6 * x.detach().sum()
    torch.manual_seed(0)
    theirs = torch.tensor([ts_hvp.hessian_trace(func, [x], 10, sparse=True) for _ in range(200)])  # type: ignore[attr-defined]
    ours = torch.stack([hutchinson_trace(func, [x], 10, sparse=True) for _ in range(200)])
    # E[v vᵀ] = 0.1 I for their sparse probes: the mean is a tenth of the trace.
    assert abs(theirs.mean() - 0.1 * exact) < 4 * theirs.std() / math.sqrt(200)
    assert abs(ours.mean() - exact) < 4 * ours.std() / math.sqrt(200)

"""Composition with torch.func: ensembles under vmap, curvature regularizers under grad."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import secorder
from secorder.testing import dense_hessian, flat_function


def _ensemble(n: int = 3, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype) for _ in range(n)]
    params, _ = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")

    def f(p, x, y):
        return nn.functional.cross_entropy(functional_call(base, p, (x,)), y)

    x = torch.randn(7, 4, dtype=dtype)
    y = torch.randint(0, 3, (7,))
    return f, params, x, y


def test_vmap_exact_equals_loop_over_members() -> None:
    f, params, x, y = _ensemble()
    vm = vmap(secorder.hessian_trace(f), in_dims=(0, None, None))(params, x, y)
    loop = torch.stack(
        [secorder.hessian_trace(f)({k: v[i] for k, v in params.items()}, x, y) for i in range(3)]
    )
    torch.testing.assert_close(vm, loop)
    vd = vmap(secorder.hessian_diagonal(f), in_dims=(0, None, None))(params, x, y)
    for i in range(3):
        ld = secorder.hessian_diagonal(f)({k: v[i] for k, v in params.items()}, x, y)
        for k in ld:
            torch.testing.assert_close(vd[k][i], ld[k])


def test_vmap_hutchinson_randomness_same_equals_loop_with_same_seed() -> None:
    f, params, x, y = _ensemble()
    fn = secorder.hessian_trace(f, num_probes=6)
    torch.manual_seed(123)
    vm = vmap(fn, in_dims=(0, None, None), randomness="same")(params, x, y)
    loop = []
    for i in range(3):
        torch.manual_seed(123)
        loop.append(fn({k: v[i] for k, v in params.items()}, x, y))
    torch.testing.assert_close(vm, torch.stack(loop))


def test_vmap_hutchinson_randomness_different_gives_each_member_an_estimate() -> None:
    """Each member's estimate lies within 5 of its own standard errors of its exact trace,
    the members are far apart at that precision (a mix-up fails), and the probes differ per
    member (the standardized errors are distinct)."""
    f, params, x, y = _ensemble(n=4)
    fn = secorder.hessian_trace(f, num_probes=4000, with_stderr=True)
    torch.manual_seed(0)  # under vmap the probes come from the global generator
    vm, err = vmap(fn, in_dims=(0, None, None), randomness="different")(params, x, y)
    exact = vmap(secorder.hessian_trace(f), in_dims=(0, None, None))(params, x, y)
    z = (vm - exact) / err
    assert (z.abs() < 5).all(), z
    # no estimate is consistent with another member's trace: a mix-up of members would fail
    cross = (vm[:, None] - exact[None, :]).abs() / err[:, None]
    assert (cross[~torch.eye(4, dtype=torch.bool)] > 5).all(), cross
    assert len(set(z.tolist())) == 4


def test_grad_of_exact_trace_matches_dense_reference() -> None:
    f, params, x, y = _ensemble(n=1)
    p0 = {k: v[0] for k, v in params.items()}
    g = grad(secorder.hessian_trace(f))(p0, x, y)
    flat_f, theta = flat_function(f, (p0, x, y))
    theta = theta.clone().requires_grad_(True)
    H = torch.autograd.functional.hessian(flat_f, theta, create_graph=True)
    (ref,) = torch.autograd.grad(H.diagonal().sum(), theta)
    got = torch.cat([g[k].reshape(-1) for k in sorted(g)])  # secorder's flat order: sorted keys
    torch.testing.assert_close(got, ref)


def test_grad_of_hutchinson_trace_is_grad_of_the_estimate() -> None:
    """d/dθ of the estimate with fixed probes equals d/dθ of (1/K) Σ vᵀ H(θ) v."""
    f, params, x, y = _ensemble(n=1)
    p0 = {k: v[0] for k, v in params.items()}
    fn = secorder.hessian_trace(f, num_probes=3)
    g = grad(fn)(p0, x, y, generator=torch.Generator().manual_seed(4))
    V = secorder.probes.draw(
        3, 43, "rademacher", torch.Generator().manual_seed(4), torch.float64, torch.device("cpu")
    )
    flat_f, theta = flat_function(f, (p0, x, y))
    theta = theta.clone().requires_grad_(True)
    H = torch.autograd.functional.hessian(flat_f, theta, create_graph=True)
    (ref,) = torch.autograd.grad(((V @ H) * V).sum() / 3, theta)
    got = torch.cat([g[k].reshape(-1) for k in sorted(g)])
    torch.testing.assert_close(got, ref)


def test_differentiable_under_ordinary_autograd() -> None:
    """With params requiring grad, the exact trace carries an autograd graph (regularizers)."""
    f, params, x, y = _ensemble(n=1)
    p0 = {k: v[0].clone().requires_grad_(True) for k, v in params.items()}
    t = secorder.hessian_trace(f)(p0, x, y)
    t.backward()
    ref = grad(secorder.hessian_trace(f))({k: v.detach() for k, v in p0.items()}, x, y)
    for k in p0:
        torch.testing.assert_close(p0[k].grad, ref[k])


def test_dense_reference_sanity() -> None:
    H = dense_hessian(lambda p: (p["b"] ** 2).sum() * p["a"].sum(), {"b": torch.ones(2), "a": torch.ones(1)})
    # flat order: a (1), b (2); H = [[0, 2b^T], [2b, 2a I]]
    torch.testing.assert_close(H, torch.tensor([[0.0, 2, 2], [2, 2, 0], [2, 0, 2]]))


@pytest.mark.parametrize("strategy", ["rev_rev", "fwd_rev"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_vmap_over_points_through_layer_norm(strategy: str, affine: bool) -> None:
    """Regression: vmap(hessian_trace(u, argnums=1)) over points of a LayerNorm network failed with
    rev_rev (PyTorch's layer-norm double backward accumulates in place into an unbatched tensor);
    a vmap-batched F.layer_norm now runs in its math form under secorder's decomposed kernels."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 6), nn.LayerNorm(6, elementwise_affine=affine), nn.Tanh(), nn.Linear(6, 1)
    )
    net = net.double()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def u(p, xn):
        return functional_call(net, p, (xn,))[0]

    x = torch.randn(5, 3, dtype=torch.float64)
    got = vmap(secorder.hessian_trace(u, argnums=1, strategy=strategy), in_dims=(None, 0))(params, x)
    want = torch.stack([torch.autograd.functional.hessian(lambda xn: u(params, xn), xn).trace() for xn in x])
    torch.testing.assert_close(got, want)
    # the unbatched call is unchanged (the fused kernel)
    torch.testing.assert_close(secorder.hessian_trace(u, argnums=1, strategy=strategy)(params, x[0]), want[0])

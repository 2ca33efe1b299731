"""secorder.laplacian / secorder.biharmonic against dense float64 references (torch.func.hessian)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch's conventional alias)
from torch.func import grad, hessian, vmap

import secorder
from secorder import biharmonic, laplacian


def _per_point_hessian(u, params, x):
    """(N, *O, D, D): the Hessian in x of each point's output, by torch.func.hessian per point."""
    return vmap(hessian(lambda xn: u(params, xn[None])[0]))(x)


def _ref_laplacian(u, params, x):
    h = _per_point_hessian(u, params, x.reshape(x.shape[0], -1))
    return h.diagonal(dim1=-2, dim2=-1).sum(-1)


def _mlp_params(d, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(h, d, generator=g, dtype=dtype) / math.sqrt(d),
        "b1": torch.randn(h, generator=g, dtype=dtype),
        "w2": torch.randn(h, h, generator=g, dtype=dtype) / math.sqrt(h),
        "w3": torch.randn(1, h, generator=g, dtype=dtype) / math.sqrt(h),
    }


def _mlp(act):
    def u(p, x):
        z = act(F.linear(x, p["w1"], p["b1"]))
        z = act(z @ p["w2"].T)
        return F.linear(z, p["w3"]).squeeze(-1)

    return u


def _attention(p, x):
    # tokens: split the D coordinates of a point into 2 tokens of D/2 features
    n = x.shape[0]
    t = x.reshape(n, 2, -1) @ p["a"]  # (n, 2, h)
    scores = torch.bmm(t, t.transpose(1, 2)) / math.sqrt(t.shape[-1])
    return torch.bmm(torch.softmax(scores, -1), t).sum((1, 2))


ACTIVATIONS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "sin": torch.sin,
    "cos": torch.cos,
    "exp": lambda z: torch.exp(0.3 * z),
    "log": lambda z: torch.log(z * z + 1),
    "pow": lambda z: (z * z + 1) ** 1.5,
    "sqrt_rsqrt_recip": lambda z: (
        torch.sqrt(z * z + 1) + torch.rsqrt(z * z + 2) + torch.reciprocal(z * z + 3)
    ),
    "relu": torch.relu,
    "silu": F.silu,
    "softplus": F.softplus,
    "softplus_beta": lambda z: F.softplus(z, beta=2.0, threshold=1.0),
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "layer_norm": lambda z: torch.tanh(
        F.layer_norm(
            z,
            z.shape[-1:],
            torch.linspace(0.5, 1.5, z.shape[-1], dtype=z.dtype),
            torch.linspace(-1, 1, z.shape[-1], dtype=z.dtype),
        )
    ),
    "softmax": lambda z: torch.softmax(z, -1) * z.shape[-1],
    "log_softmax": lambda z: torch.log_softmax(z, -1),
    "product": lambda z: torch.sin(z) * torch.tanh(z),
    "quotient": lambda z: torch.sin(z) / (torch.cos(z) + 2),
    "squeeze_unsqueeze": lambda z: torch.tanh(z.unsqueeze(1)).squeeze(1) * z.unsqueeze(0).squeeze(),
    "erf_generic": torch.erf,
    "cumsum_fallback": lambda z: torch.tanh(torch.cumsum(z, -1)),
    "rsub_scalar": lambda z: torch.tanh(1.0 - z) * (2.0 - torch.sin(z)),
    "sum_mean": lambda z: (
        torch.tanh(z) * torch.sin(z).sum(-1, keepdim=True)
        + torch.cos(z).mean(-1, keepdim=True)
        + torch.exp(0.2 * z).mean([-1]).unsqueeze(-1)
    ),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_exact_matches_dense_hessian_trace(name):
    d, n = 4, 5
    params = _mlp_params(d, 6, torch.float64)
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = _mlp(ACTIVATIONS[name])
    fn = laplacian(u)
    got = fn(params, x)
    torch.testing.assert_close(got, _ref_laplacian(u, params, x), rtol=1e-9, atol=1e-9)
    assert fn.method_info.route == "collapsed"
    if name == "cumsum_fallback":
        assert any("cumsum" in k for k in fn.method_info.fallbacks)
    elif name in ("gelu_tanh", "erf_generic"):
        assert fn.method_info.fallbacks  # elementwise partials by nested forward products
    else:
        assert fn.method_info.fallbacks == {}


def _conv_net(p, x):
    img = x.reshape(x.shape[0], 1, 4, 4)
    z = torch.tanh(F.conv2d(img, p["k"], p["c"], padding=1))
    z = F.max_pool2d(z, 2) + F.avg_pool2d(z, 2)
    z = F.gelu(torch.cat([z.flatten(1), z.mean((2, 3))], 1))
    return (z**2).sum(-1)


def _conv1d_net(p, x):
    z = F.silu(F.conv1d(x.unsqueeze(1), p["k1"]))
    return z.sum((1, 2))


@pytest.mark.parametrize("net", ["conv2d_pool", "conv1d", "attention"])
def test_exact_structured_ops(net):
    g = torch.Generator().manual_seed(3)
    dt = torch.float64
    if net == "conv2d_pool":
        params = {
            "k": torch.randn(3, 1, 3, 3, generator=g, dtype=dt),
            "c": torch.randn(3, generator=g, dtype=dt),
        }
        u, d = _conv_net, 16
    elif net == "conv1d":
        params = {"k1": torch.randn(2, 1, 3, generator=g, dtype=dt)}
        u, d = _conv1d_net, 6
    else:
        params = {"a": torch.randn(3, 4, generator=g, dtype=dt) / 2}
        u, d = _attention, 6
    x = torch.randn(4, d, generator=g, dtype=dt)
    fn = laplacian(u)
    torch.testing.assert_close(fn(params, x), _ref_laplacian(u, params, x), rtol=1e-9, atol=1e-9)
    assert fn.method_info.route == "collapsed"
    assert fn.method_info.fallbacks == {}


def test_vector_output_and_event_shape():
    """Outputs (N, O) give one Laplacian per component; points (N, 2, 3) are flattened to D = 6."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64)

    def u(w, x):
        return torch.tanh(x.reshape(x.shape[0], -1) @ w) ** 2

    x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    got = laplacian(u)(w, x)
    ref = vmap(hessian(lambda xn: u(w, xn[None])[0]))(x.reshape(5, 6)).diagonal(dim1=-2, dim2=-1).sum(-1)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_return_derivatives_and_chunks(dtype):
    params = _mlp_params(3, 8, dtype)
    x = torch.randn(7, 3, dtype=dtype, generator=torch.Generator().manual_seed(2))
    u = _mlp(torch.tanh)
    val, grd, lap = laplacian(u, return_derivatives=True, chunk_size=3)(params, x)
    assert lap.dtype == dtype
    torch.testing.assert_close(val, u(params, x))
    ref_grad = vmap(torch.func.grad(lambda xn: u(params, xn[None])[0]))(x)
    torch.testing.assert_close(grd, ref_grad)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(lap, _ref_laplacian(u, params, x), **tol)


def _spd(d, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return s, s @ s.T


def test_weighted_matches_dense():
    d, n = 4, 5
    params = _mlp_params(d, 6, torch.float64)
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = _mlp(torch.sin)
    h = _per_point_hessian(u, params, x)
    s, c = _spd(d, 0, rank=2)
    ref = torch.einsum("ij,nji->n", c, h)
    torch.testing.assert_close(laplacian(u, weighting=c)(params, x), ref)
    torch.testing.assert_close(laplacian(u, weighting_factor=s)(params, x), ref)
    # per point: C_n
    cs = torch.stack([_spd(d, 10 + i)[1] for i in range(n)])
    ref_n = torch.einsum("nij,nji->n", cs, h)
    torch.testing.assert_close(laplacian(u, weighting=cs)(params, x), ref_n)


def test_biharmonic_matches_nested_hessians():
    d = 3
    params = _mlp_params(d, 5, torch.float64)
    x = torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u = _mlp(torch.tanh)

    def lap_one(xn):
        return hessian(lambda z: u(params, z[None])[0])(xn).trace()

    ref = vmap(lambda xn: hessian(lap_one)(xn).trace())(x)
    fn = biharmonic(u)
    torch.testing.assert_close(fn(params, x), ref)
    assert fn.method_info.route == "collapsed"


def test_biharmonic_polynomial_closed_form():
    # Δ² |x|⁴ = 8 D (D + 2)
    x = torch.randn(3, 5, dtype=torch.float64)
    got = biharmonic(lambda c, z: c * (z**2).sum(-1) ** 2)(torch.tensor(1.0, dtype=torch.float64), x)
    torch.testing.assert_close(got, torch.full((3,), 8.0 * 5 * 7, dtype=torch.float64))


def _coverage(est, err, truth, k):
    """Share of estimates within k stderr of the truth (k: the 97.5% quantile of Student's t
    with K - 1 degrees of freedom, as the stderr comes from K probes)."""
    return ((est - truth).abs() <= k * err).double().mean().item()


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_stochastic_unbiased_and_calibrated(distribution):
    d, n, seeds, probes = 6, 4, 300, 8
    params = _mlp_params(d, 8, torch.float64)
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = _mlp(torch.tanh)
    truth = _ref_laplacian(u, params, x)
    fn = laplacian(u, num_probes=probes, distribution=distribution, with_stderr=True)
    ests, errs = zip(*(fn(params, x, generator=torch.Generator().manual_seed(s)) for s in range(seeds)))
    est, err = torch.stack(ests), torch.stack(errs)
    mean = est.mean(0)
    se_of_mean = est.std(0) / seeds**0.5
    assert bool(((mean - truth).abs() <= 4 * se_of_mean).all())
    # per-point stderr calibrated: mean reported stderr ≈ empirical spread, and 95% coverage
    ratio = err.mean(0) / est.std(0)
    assert bool(((ratio > 0.8) & (ratio < 1.15)).all()), ratio
    assert 0.9 <= _coverage(est, err, truth, k=2.365) <= 0.99  # t quantile, 7 dof


def test_stochastic_weighted_unbiased():
    d, n, seeds = 4, 3, 300
    params = _mlp_params(d, 6, torch.float64)
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = _mlp(torch.tanh)
    s, c = _spd(d, 3, rank=3)
    truth = torch.einsum("ij,nji->n", c, _per_point_hessian(u, params, x))
    fn = laplacian(u, num_probes=16, weighting_factor=s, with_stderr=True)
    ests, errs = zip(*(fn(params, x, generator=torch.Generator().manual_seed(s)) for s in range(seeds)))
    est = torch.stack(ests)
    assert bool(((est.mean(0) - truth).abs() <= 4 * est.std(0) / seeds**0.5).all())
    assert 0.9 <= _coverage(est, torch.stack(errs), truth, k=2.131) <= 0.99  # t quantile, 15 dof


def test_stochastic_biharmonic_unbiased_and_calibrated():
    d, n, seeds = 3, 3, 200
    params = _mlp_params(d, 5, torch.float64)
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u = _mlp(torch.tanh)
    truth = biharmonic(u)(params, x)
    fn = biharmonic(u, num_probes=6, with_stderr=True)
    ests, errs = zip(*(fn(params, x, generator=torch.Generator().manual_seed(s)) for s in range(seeds)))
    est, err = torch.stack(ests), torch.stack(errs)
    assert bool(((est.mean(0) - truth).abs() <= 4 * est.std(0) / seeds**0.5).all())
    ratio = err.mean(0) / est.std(0)
    assert bool(((ratio > 0.7) & (ratio < 1.4)).all()), ratio
    plain = biharmonic(u, num_probes=6)(params, x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, ests[0])


def test_pinn_loss_gradient_matches_nested_ad():
    d, n = 3, 6
    params = _mlp_params(d, 8, torch.float64)
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    f = torch.sin(x).sum(-1)
    u = _mlp(torch.tanh)
    lap = laplacian(u)

    def loss(p):
        return ((lap(p, x) - f) ** 2).mean()

    def ref_loss(p):
        return ((_ref_laplacian(u, p, x) - f) ** 2).mean()

    g_ref = grad(ref_loss)(params)
    g_fn = grad(loss)(params)
    assert lap.method_info.route == "collapsed"
    torch.testing.assert_close(g_fn, g_ref)
    # and through loss.backward()
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss(leaves).backward()
    for k in params:
        torch.testing.assert_close(leaves[k].grad, g_ref[k])


def test_biharmonic_gradient_matches_nested_ad():
    d = 2
    params = _mlp_params(d, 4, torch.float64)
    x = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    u = _mlp(torch.tanh)

    def ref(p):
        def lap_one(xn):
            return hessian(lambda z: u(p, z[None])[0])(xn).trace()

        return vmap(lambda xn: hessian(lap_one)(xn).trace())(x).sum()

    torch.testing.assert_close(grad(lambda p: biharmonic(u)(p, x).sum())(params), grad(ref)(params))
    # again, at other parameters: the outer tape is now filled in from its template, and the
    # gradient still flows through this call's parameters
    import secorder.pde as pde

    hits = pde._DERIVED.hits
    other = _mlp_params(d, 4, torch.float64, seed=7)
    torch.testing.assert_close(grad(lambda p: biharmonic(u)(p, x).sum())(other), grad(ref)(other))
    assert pde._DERIVED.hits == hits + 1


def test_vmap_over_parameter_ensembles_takes_nested_route():
    d = 3
    ens = [_mlp_params(d, 5, torch.float64, seed=s) for s in range(3)]
    stacked = {k: torch.stack([p[k] for p in ens]) for k in ens[0]}
    x = torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    u = _mlp(torch.tanh)
    fn = laplacian(u)
    got = vmap(fn, in_dims=(0, None))(stacked, x)
    assert fn.method_info.route == "nested"
    assert "vmap" in fn.method_info.reason
    ref = torch.stack([_ref_laplacian(u, p, x) for p in ens])
    torch.testing.assert_close(got, ref)


def test_untraceable_function_takes_nested_route():
    u = _mlp(torch.tanh)
    params = _mlp_params(2, 4, torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64)

    def branchy(p, z):
        return u(p, z) * (2.0 if bool(z.sum() > 1e9) else 1.0)

    fn = laplacian(branchy)
    torch.testing.assert_close(fn(params, x), _ref_laplacian(u, params, x))
    assert fn.method_info.route == "nested"
    assert "tape" in fn.method_info.reason


def test_output_independent_of_points_is_zero():
    x = torch.randn(3, 2)
    got = laplacian(lambda c, z: c * torch.ones(z.shape[0]))(torch.tensor(2.0), x)
    torch.testing.assert_close(got, torch.zeros(3))


def test_generator_reproducible():
    u = _mlp(torch.tanh)
    params = _mlp_params(3, 4, torch.float64)
    x = torch.randn(3, 3, dtype=torch.float64)
    fn = laplacian(u, num_probes=5)
    a = fn(params, x, generator=torch.Generator().manual_seed(7))
    b = fn(params, x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)


# -- errors ---------------------------------------------------------------------------------------
def test_error_points_not_a_batch():
    with pytest.raises(
        ValueError, match=r"laplacian\(u\)\(\*args\): args\[1\] must be a real floating tensor of points"
    ):
        laplacian(lambda p, x: x)(torch.ones(1), torch.ones(3))


def test_error_output_not_per_point():
    with pytest.raises(
        ValueError, match=r"u must return a tensor of shape \(N, \*O\) for N = 3 points.*mean"
    ):
        laplacian(lambda p, x: (p * x).sum())(torch.ones(2), torch.ones(3, 2))


def test_error_weighting_shape_and_type():
    u = lambda p, x: (p * x).sum(-1)
    with pytest.raises(TypeError, match=r"weighting must be a tensor of shape \(D, D\)"):
        laplacian(u, weighting=[[1.0]])
    with pytest.raises(ValueError, match=r"not both"):
        laplacian(u, weighting=torch.eye(2), weighting_factor=torch.eye(2))
    with pytest.raises(ValueError, match=r"act on the D = 2 coordinates"):
        laplacian(u, weighting=torch.eye(3))(torch.ones(2), torch.ones(3, 2))


def test_error_weighting_not_symmetric_or_not_psd():
    u = lambda p, x: (p * x).sum(-1)
    with pytest.raises(ValueError, match=r"must be symmetric"):
        laplacian(u, weighting=torch.tensor([[1.0, 1.0], [0.0, 1.0]]))(torch.ones(2), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"positive semi-definite.*C₊ − C₋"):
        laplacian(u, weighting=torch.tensor([[1.0, 0.0], [0.0, -1.0]]))(torch.ones(2), torch.ones(3, 2))


def test_error_stderr_needs_two_probes():
    with pytest.raises(ValueError, match=r"at least 2 probes"):
        laplacian(lambda p, x: x.sum(-1), num_probes=1, with_stderr=True)
    with pytest.raises(ValueError, match=r"biharmonic\(u\)\(\*args\): a standard error needs at least 2"):
        biharmonic(lambda p, x: x.sum(-1), num_probes=1, with_stderr=True)


def test_error_bad_options():
    with pytest.raises(ValueError, match=r"distribution must be one of"):
        laplacian(lambda p, x: x.sum(-1), distribution="uniform")
    with pytest.raises(TypeError, match=r"return_derivatives"):
        laplacian(lambda p, x: x.sum(-1), return_derivatives="yes")
    with pytest.raises(TypeError, match=r"static must be True or False"):
        biharmonic(lambda p, x: x.sum(-1), static=1)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator"):
        laplacian(lambda p, x: x.sum(-1), num_probes=2)(torch.ones(1), torch.ones(2, 2), generator=3)


def test_user_exception_passes_through():
    class BoomError(Exception):
        pass

    def u(p, x):
        raise BoomError("mine")

    with pytest.raises(BoomError, match="mine"):
        laplacian(u)(torch.ones(1), torch.ones(2, 2))


def test_public_api():
    assert secorder.laplacian is laplacian and secorder.biharmonic is biharmonic
    assert "laplacian" in secorder.__all__ and "biharmonic" in secorder.__all__


def test_error_points_not_independent():
    bn = torch.nn.BatchNorm1d(3)  # training mode: batch statistics mix the points

    def u(w, x):
        return torch.tanh(bn(x) @ w)

    with pytest.raises(ValueError, match=r"u must treat the points independently.*eval mode"):
        laplacian(u)(torch.ones(3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"biharmonic\(u\)\(\*args\): u must treat the points independently"):
        biharmonic(u)(torch.ones(3), torch.randn(5, 3))
    bn.eval()
    torch.testing.assert_close(
        laplacian(u)(torch.ones(3), torch.zeros(2, 3)),
        _ref_laplacian(lambda w, x: u(w, x), torch.ones(3), torch.zeros(2, 3)),
    )


@pytest.mark.parametrize("seed", range(6))
def test_generated_networks(seed):
    """Random compositions of the supported ops: residual sums, products of two branches,
    scalar affine maps, constant quotients, a second matmul of two point-dependent values."""
    g = torch.Generator().manual_seed(seed)
    names = sorted(ACTIVATIONS)
    picks = [names[int(i)] for i in torch.randint(0, len(names), (3,), generator=g)]
    d, h = 3, 5
    p = {
        "a": torch.randn(d, h, generator=g, dtype=torch.float64) / 2,
        "b": torch.randn(h, h, generator=g, dtype=torch.float64) / 2,
        "c": torch.rand(h, generator=g, dtype=torch.float64) + 0.5,
    }

    def u(p, x):
        z = x @ p["a"]
        y1 = ACTIVATIONS[picks[0]](z)
        y2 = ACTIVATIONS[picks[1]](z @ p["b"] - 0.3) * 0.5 + 1.0
        z = y1 * y2 + z / p["c"] - 2.0 * y1
        gram = torch.bmm(z.unsqueeze(2), z.unsqueeze(1))  # (N, h, h): products of two jets
        z = ACTIVATIONS[picks[2]](gram.sum(1) / h) + (-z)
        return z.sum(-1)

    x = torch.randn(4, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(laplacian(u)(p, x), _ref_laplacian(u, p, x), rtol=1e-8, atol=1e-8)


def test_biharmonic_under_vmap_takes_nested_route():
    d = 2
    ens = [_mlp_params(d, 3, torch.float64, seed=s) for s in range(2)]
    stacked = {k: torch.stack([p[k] for p in ens]) for k in ens[0]}
    x = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    u = _mlp(torch.tanh)
    fn = biharmonic(u)
    got = vmap(fn, in_dims=(0, None))(stacked, x)
    assert fn.method_info.route == "nested"
    torch.testing.assert_close(got, torch.stack([biharmonic(u)(p, x) for p in ens]))


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_device_and_dtype_kept(device, dtype):
    params = {k: v.to(device=device, dtype=dtype) for k, v in _mlp_params(3, 4, torch.float64).items()}
    x = torch.randn(5, 3, dtype=dtype, device=device)
    u = _mlp(torch.sin)
    gen = torch.Generator(device).manual_seed(0)
    est, err = laplacian(u, num_probes=4, with_stderr=True)(params, x, generator=gen)
    exact = laplacian(u, weighting=torch.eye(3))(params, x)
    assert est.device.type == exact.device.type == err.device.type == torch.device(device).type
    assert est.dtype == exact.dtype == dtype
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    ref = _ref_laplacian(u, {k: v.double() for k, v in params.items()}, x.double()).to(dtype)
    torch.testing.assert_close(exact, ref, **tol)


def test_dead_first_order_channel_is_skipped_and_results_unchanged():
    """The last hidden layer's K directional derivatives feed nothing when only Δu is wanted."""
    from secorder._engine.collapsed import plan
    from secorder._engine.tape import record

    params = _mlp_params(3, 6, torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = _mlp(torch.tanh)
    tape = record(
        lambda ls, ins: u(dict(zip(sorted(params), ls)), ins[0]), [params[k] for k in sorted(params)], [x]
    )
    skipped = {str(tape.nodes[i].func) for i in plan(tape, [0], first_order=False).skip}
    assert "aten.tanh.default" in skipped  # the second tanh
    assert sum(str(n.func) == "aten.tanh.default" for n in tape.nodes) == 2
    _, _, lap = laplacian(u, return_derivatives=True)(params, x)
    torch.testing.assert_close(lap, laplacian(u)(params, x))
    torch.testing.assert_close(lap, _ref_laplacian(u, params, x))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, None], ids=lambda c: f"chunk{c}")
def test_direction_chunks_give_the_same_results(chunk_size):
    """chunk_size = directions per collapsed pass: second-order sums added across passes (or
    concatenated per probe for the stderr), gradients concatenated; nothing else changes."""
    d = 5
    params = _mlp_params(d, 7, torch.float64)
    x = torch.randn(6, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u = _mlp(torch.tanh)
    val, grd, lap = laplacian(u, return_derivatives=True, chunk_size=chunk_size)(params, x)
    torch.testing.assert_close(lap, _ref_laplacian(u, params, x))
    torch.testing.assert_close(grd, vmap(grad(lambda xn: u(params, xn[None])[0]))(x))
    torch.testing.assert_close(val, u(params, x))
    one = laplacian(u, num_probes=4, with_stderr=True, chunk_size=4)
    many = laplacian(u, num_probes=4, with_stderr=True, chunk_size=chunk_size)
    gen = lambda: torch.Generator().manual_seed(7)
    for a, b in zip(one(params, x, generator=gen()), many(params, x, generator=gen())):
        torch.testing.assert_close(a, b)
    bih = biharmonic(u, chunk_size=chunk_size)(params, x)
    torch.testing.assert_close(bih, biharmonic(u, chunk_size=d)(params, x))
    # values kept across passes (Ctx.memo) carry the parameters' gradients
    loss = lambda c: lambda p: (laplacian(u, chunk_size=c)(p, x) ** 2).mean()
    ref = grad(lambda p: (_ref_laplacian(u, p, x) ** 2).mean())(params)
    torch.testing.assert_close(grad(loss(chunk_size))(params), ref)


def test_default_direction_chunks_bound_the_tangents(monkeypatch):
    """By default K / PASSES directions per pass once the K tangents are not small, and never
    more than the memory budget allows; the results do not change."""
    import secorder.pde as pde

    passes = []
    real = pde.evaluate

    def counting(tape, leaves, inputs, ctx, **kw):
        passes.append(ctx.K)
        return real(tape, leaves, inputs, ctx, **kw)

    monkeypatch.setattr(pde, "evaluate", counting)
    d, h = 8, 16
    params = _mlp_params(d, h, torch.float64)
    x = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    u = _mlp(torch.tanh)
    ref = laplacian(u, chunk_size=d)(params, x)
    passes.clear()
    laplacian(u)(params, x)
    assert passes == [d]  # 8 directions × 3 points × 16 features × 8 bytes: small, one pass
    monkeypatch.setattr(pde, "SMALL_TANGENTS", 0)
    passes.clear()
    torch.testing.assert_close(laplacian(u)(params, x), ref)
    assert passes == [d // pde.PASSES] * pde.PASSES
    budget = secorder.memory_budget()
    try:
        secorder.set_memory_budget(3 * h * 8 * secorder._chunking.ROW_OVERHEAD)  # one direction
        passes.clear()
        torch.testing.assert_close(laplacian(u)(params, x), ref)
        assert passes == [1] * d
    finally:
        secorder.set_memory_budget(budget)


@pytest.mark.parametrize(
    "mix, op",
    [
        (lambda x: torch.cumsum(x, 0), "cumsum"),  # point 0 is unaffected: a value check on it passes
        (lambda x: x - x.mean(0), "sub"),  # the mean over points meets a point
        (lambda x: torch.softmax(x @ x.T, -1) @ x, "mm"),  # attention across the points
    ],
    ids=["cumsum_over_points", "centering", "attention_across_points"],
)
def test_error_mixing_proved_on_the_tape_names_the_op(mix, op):
    """The points' independence is proved on the tape (the per-sample analysis of
    secorder._engine.batch), not checked on values: a mixing that leaves the first point's
    value unchanged (a running sum over the points) is refused too, naming the op."""

    def u(w, x):
        return torch.tanh(mix(x) @ w)

    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64)
    for fn in (laplacian(u), biharmonic(u)):
        for _ in range(2):  # a refused structure is proved (and refused) again at every call
            with pytest.raises(ValueError, match=rf"u must treat the points independently.*aten\.{op}"):
                fn(w, x)


def test_proof_and_plans_derived_once_per_structure(monkeypatch):
    """u's tape is recorded at every call; the independence proof and the collapsed plans, which
    read its structure only, run once per structure (secorder.pde._DERIVED): again for another
    number of points or another chunk_size, not for other values. The results match the dense
    reference at every call."""
    import secorder.pde as pde

    proofs, plans, records = [], [], []
    real_proof, real_plan, real_record = pde._check_independent, pde.plan, pde.record
    monkeypatch.setattr(pde, "_check_independent", lambda *a: proofs.append(1) or real_proof(*a))
    monkeypatch.setattr(pde, "plan", lambda *a, **k: plans.append(1) or real_plan(*a, **k))
    monkeypatch.setattr(pde, "record", lambda *a, **k: records.append(1) or real_record(*a, **k))
    u = _mlp(torch.tanh)
    lap, lap_chunked = laplacian(u), laplacian(u, chunk_size=2)
    calls = [(lap, 4, 0, 1), (lap, 4, 1, 0), (lap, 5, 2, 1), (lap_chunked, 4, 3, 1), (lap, 4, 4, 0)]
    for fn, n, seed, fresh in calls:
        params = _mlp_params(3, 5, torch.float64, seed=seed)
        x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        proofs.clear(), plans.clear(), records.clear()
        got = fn(params, x)
        assert (len(records), len(proofs), len(plans)) == (1, fresh, fresh)
        torch.testing.assert_close(got, _ref_laplacian(u, params, x))


def test_independence_proof_accepts_per_point_scans_and_products():
    """Ops along a per-point axis (cumsum over coordinates, a matrix-vector product with the
    points as rows) pass the proof, and the values match the dense reference."""
    a = torch.randn(3, 3, dtype=torch.float64)

    def u(w, x):
        return (
            torch.tanh(torch.cumsum(x, -1)).pow(2).sum(-1) + torch.sin(torch.mv(x, w)) + (x @ a * x).sum(-1)
        )

    w = torch.randn(3, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    fn = laplacian(u)
    torch.testing.assert_close(fn(w, x), _ref_laplacian(u, w, x))
    assert fn.method_info.route == "collapsed"


def _stream_mlp(d: int, h: int, dtype: torch.dtype, act=torch.tanh):
    g = torch.Generator().manual_seed(5)
    params = {
        "w1": torch.randn(h, d, generator=g, dtype=dtype) / math.sqrt(d),
        "b1": torch.randn(h, generator=g, dtype=dtype) * 0.1,
        "w2": torch.randn(h, h, generator=g, dtype=dtype) / math.sqrt(h),
        "w3": torch.randn(1, h, generator=g, dtype=dtype) / math.sqrt(h),
    }

    def u(p, x):
        z = torch.nn.functional.linear(x, p["w1"], p["b1"])
        return torch.nn.functional.linear(act(act(z) @ p["w2"].T), p["w3"]).squeeze(-1)

    return u, params


@pytest.mark.parametrize("num_probes", [None, 12], ids=["exact", "probes"])
@pytest.mark.parametrize("with_stderr", [False, True], ids=["summed", "per_probe"])
def test_streamed_tangents_match_whole_tangents(monkeypatch, num_probes, with_stderr):
    """With more directions than a block, the hidden layers' tangents are streamed (jet.Lazy,
    computed a block of directions at a time by their one consumer) instead of held whole: the
    estimates are those of the evaluation without streaming (blocks as large as K), exactly, for
    one summed channel and for per-probe channels, and match the dense Laplacian when exact."""
    import secorder._engine.jet as jet
    import secorder.pde as pde

    d, h = 12, 40
    u, params = _stream_mlp(d, h, torch.float64)
    x = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    fn = laplacian(u, num_probes=num_probes, with_stderr=with_stderr, chunk_size=d)
    streamed = []
    real = jet.pair_lazy

    def counting(ctx, a, nd):
        streamed.append(ctx.block)
        return real(ctx, a, nd)

    monkeypatch.setattr(jet, "pair_lazy", counting)
    monkeypatch.setattr(pde, "STREAM_BLOCK", 3)
    got = fn(params, x, generator=torch.Generator().manual_seed(0))
    assert streamed and set(streamed) == {3}  # streamed in blocks of 3 < K = 12
    streamed.clear()
    monkeypatch.setattr(pde, "STREAM_BLOCK", d)  # one block: nothing streamed
    want = fn(params, x, generator=torch.Generator().manual_seed(0))
    assert not streamed
    for a, b in zip(got if with_stderr else (got,), want if with_stderr else (want,)):
        torch.testing.assert_close(a, b)
    if num_probes is None:
        torch.testing.assert_close(got[0] if with_stderr else got, _ref_laplacian(u, params, x))


def test_plan_counts_only_tangents_held_whole():
    """Plan.held: with unit directions (broadcast along the points) every hidden tangent of the
    tanh MLP is broadcast, streamed or skipped; with probes the first layer is streamed twice
    (a cheap D-wide product) while D is at most a quarter of the width, and held whole beyond."""
    from secorder._engine.collapsed import plan
    from secorder._engine.tape import record

    for d, h, bc, held_whole in [(8, 40, True, False), (8, 40, False, False), (20, 40, False, True)]:
        u, params = _stream_mlp(d, h, torch.float32)
        x = torch.randn(5, d)
        tape = record(
            lambda ls, ins, u=u, params=params: u(dict(zip(sorted(params), ls)), ins[0]),
            [params[k] for k in sorted(params)],
            [x],
        )
        p = plan(tape, [0], first_order=False, numels=tape.numels, broadcast=bc)
        assert p.held == (5 * h if held_whole else (0 if bc else 5 * d)), (d, bc, p.held)


def test_lazy_tangent_forwarded_to_two_consumers_is_materialized_and_right():
    """A pass-through op (add.Scalar) forwards a streamed tangent to a value with two consumers:
    the evaluator materializes it there, and the Laplacian is right."""
    g = torch.Generator().manual_seed(2)
    w1 = torch.randn(16, 12, generator=g, dtype=torch.float64) / 4
    w2 = torch.randn(16, 16, generator=g, dtype=torch.float64) / 4

    def u(w, x):
        h = torch.tanh(x @ w1.T) @ w2.T + 1.0  # the matmul's Lazy forwarded by add.Scalar
        return (torch.sin(h) * torch.tanh(h)).sum(-1) * w

    x = torch.randn(3, 12, dtype=torch.float64, generator=g)
    w = torch.tensor(1.5, dtype=torch.float64)
    torch.testing.assert_close(laplacian(u)(w, x), _ref_laplacian(u, w, x))


@pytest.mark.parametrize("num_probes", [None, 12], ids=["exact", "probes"])
def test_pinn_loss_gradient_through_streamed_tangents(monkeypatch, num_probes):
    """With K > the stream block the hidden tangents are streamed (jet.Lazy); the gradient of a
    PINN loss in the parameters (torch.func.grad and backward) is that of the same estimate
    without streaming, and, exact, that of the dense reference."""
    import secorder.pde as pde

    d = 12
    u, params = _stream_mlp(d, 20, torch.float64)
    x = torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    f = torch.sin(x).sum(-1)
    lap = laplacian(u, num_probes=num_probes)

    def loss(p):
        return ((lap(p, x, generator=torch.Generator().manual_seed(3)) - f) ** 2).mean()

    import secorder._engine.jet as jet

    streamed = []
    real = jet.pair_lazy

    def counting(ctx, a, nd):
        streamed.append(ctx.block)
        return real(ctx, a, nd)

    monkeypatch.setattr(jet, "pair_lazy", counting)
    monkeypatch.setattr(pde, "STREAM_BLOCK", d)
    g_whole = grad(loss)(params)
    assert not streamed
    monkeypatch.setattr(pde, "STREAM_BLOCK", 3)
    g_streamed = grad(loss)(params)
    assert streamed and set(streamed) == {3}
    torch.testing.assert_close(g_streamed, g_whole)
    if num_probes is None:
        g_ref = grad(lambda p: ((_ref_laplacian(u, p, x) - f) ** 2).mean())(params)
        torch.testing.assert_close(g_streamed, g_ref)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss(leaves).backward()
    for k in params:
        torch.testing.assert_close(leaves[k].grad, g_whole[k])


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["one_pass", "chunks"])
@pytest.mark.parametrize(
    "first",
    ["linear", "mm", "addmm_alpha", "shifted", "linear_then_bias"],
)
def test_unit_seed_first_linear_takes_weight_rows(monkeypatch, first, chunk_size):
    """Exact directions are the identity's rows: a first linear layer (x @ W, F.linear, addmm
    with alpha, after a shift x + c that passes the tangent through) takes its tangent from W's
    rows without a product (jet.Ctx.unit). The Laplacian, the gradient ∇ₓu, the biharmonic and
    the parameter gradient of a PINN loss match the dense references, in passes of chunks too."""
    import secorder._engine.jet as jet

    d = h = 5  # a second layer of the points' width: only the seed's identity marks the first
    g = torch.Generator().manual_seed(11)
    params = {
        "w1": torch.randn(h, d, generator=g, dtype=torch.float64) / 2,
        "b1": torch.randn(h, generator=g, dtype=torch.float64),
        "w2": torch.randn(1, h, generator=g, dtype=torch.float64),
    }

    def u(p, x):
        if first == "linear":
            z = F.linear(x, p["w1"], p["b1"])
        elif first == "mm":
            z = x @ p["w1"].T
        elif first == "addmm_alpha":
            z = torch.addmm(p["b1"], x, p["w1"].T, beta=0.5, alpha=1.5)
        elif first == "shifted":
            z = (x + 1.0 - p["b1"][:d]) @ p["w1"].T
        else:  # F.linear without bias (mm), then the bias
            z = F.linear(x, p["w1"]) + p["b1"]
        return F.linear(torch.tanh(z) * torch.sin(z), p["w2"]).squeeze(-1)

    x = torch.randn(4, d, dtype=torch.float64, generator=g)
    hits = []
    real = jet._unit_rows

    def counting(*a):
        hit = real(*a)
        hits.append(hit)
        return hit

    monkeypatch.setattr(jet, "_unit_rows", counting)
    val, grd, lap = laplacian(u, return_derivatives=True, chunk_size=chunk_size)(params, x)
    assert any(hits)
    torch.testing.assert_close(lap, _ref_laplacian(u, params, x))
    torch.testing.assert_close(grd, vmap(grad(lambda xn: u(params, xn[None])[0]))(x))
    torch.testing.assert_close(val, u(params, x))
    ref_bih = vmap(
        lambda xn: hessian(lambda z: hessian(lambda y: u(params, y[None])[0])(z).trace())(xn).trace()
    )(x)
    torch.testing.assert_close(biharmonic(u, chunk_size=chunk_size)(params, x), ref_bih)
    f = torch.cos(x).sum(-1)
    loss = lambda p: ((laplacian(u, chunk_size=chunk_size)(p, x) - f) ** 2).mean()
    ref = grad(lambda p: ((_ref_laplacian(u, p, x) - f) ** 2).mean())(params)
    torch.testing.assert_close(grad(loss)(params), ref)


def test_static_replays_the_tape_with_current_values():
    """static=True: later calls with the same signature replay the first call's tape; the
    parameters' and points' current values flow through it (Laplacian, derivatives, PINN loss
    gradients match the dense references); a new shape or a new non-tensor argument records
    again."""
    u = _mlp(torch.tanh)
    mk = lambda seed, n=4: (
        _mlp_params(3, 6, torch.float64, seed=seed),
        torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)),
    )
    import secorder.pde as pde

    planned = []
    real = pde.plan

    def counting(*a, **k):
        planned.append(1)
        return real(*a, **k)

    lap = laplacian(u, static=True, return_derivatives=True)
    for seed, replayed in [(0, False), (1, True), (2, True)]:
        params, x = mk(seed)
        planned.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pde, "plan", counting)
            val, grd, got = lap(params, x)
        assert lap.method_info.replayed is replayed
        assert len(planned) == (0 if replayed else 1)  # the plan is kept with the tape
        torch.testing.assert_close(got, _ref_laplacian(u, params, x))
        torch.testing.assert_close(grd, vmap(grad(lambda xn, p=params: u(p, xn[None])[0]))(x))
        torch.testing.assert_close(val, u(params, x))
    params, x = mk(3, n=5)  # another number of points: recorded again, then replayed
    lap(params, x)
    assert not lap.method_info.replayed
    lap(params, x)
    assert lap.method_info.replayed
    x_t = x.T.contiguous().T  # the same shape, other strides: recorded again
    torch.testing.assert_close(lap(params, x_t)[2], _ref_laplacian(u, params, x))
    assert not lap.method_info.replayed
    f = torch.sin(x).sum(-1)
    plain = laplacian(u, static=True)
    loss = lambda p: ((plain(p, x) - f) ** 2).mean()
    ref = grad(lambda p: ((_ref_laplacian(u, p, x) - f) ** 2).mean())(params)
    torch.testing.assert_close(grad(loss)(params), ref)
    torch.testing.assert_close(grad(loss)(params), ref)  # replayed under torch.func.grad
    assert plain.method_info.replayed
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss(leaves).backward()
    for k in params:
        torch.testing.assert_close(leaves[k].grad, ref[k])

    def branchy(p, x, mode):
        z = torch.tanh(x @ p["w1"].T)
        return (torch.sin(z) if mode == "sin" else z * z) @ p["w3"][0]

    lap_b = laplacian(branchy, static=True)
    for mode, replayed in [("sin", False), ("square", False), ("sin", True), ("square", True)]:
        got = lap_b(params, x, mode)
        assert lap_b.method_info.replayed is replayed
        torch.testing.assert_close(got, _ref_laplacian(lambda p, z, m=mode: branchy(p, z, m), params, x))


def test_static_records_again_when_the_tape_reads_values():
    """A branch on a value (.item()) is baked into the tape: such a tape is never replayed, so
    flipping the branch between calls still gives the right Laplacian."""

    def u(s, x):
        z = x.sum(-1)
        return torch.sin(z) if s.item() > 0 else z**3

    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lap = laplacian(u, static=True)
    for s in (1.0, -1.0, 1.0):
        st = torch.tensor(s, dtype=torch.float64)
        got = lap(st, x)
        assert not lap.method_info.replayed
        torch.testing.assert_close(got, _ref_laplacian(u, st, x))


@pytest.mark.parametrize("num_probes", [None, 3], ids=["exact", "probes"])
def test_static_biharmonic(monkeypatch, num_probes):
    """static=True for the biharmonic: exact, both levels' tapes (and their plans) replayed; with
    probes, u's tape replayed and the Laplacian's recorded (and planned) again (the probes are
    its constants). The results equal those of the transform without static, and the dense
    reference when exact."""
    import secorder.pde as pde

    planned = []
    real = pde.plan
    monkeypatch.setattr(pde, "plan", lambda *a, **k: planned.append(1) or real(*a, **k))
    u = _mlp(torch.tanh)
    bih = biharmonic(u, static=True, num_probes=num_probes)
    ref_fn = biharmonic(u, num_probes=num_probes)
    for seed, replayed in [(0, False), (1, True)]:
        params = _mlp_params(3, 5, torch.float64, seed=seed)
        x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        planned.clear()
        got = bih(params, x, generator=torch.Generator().manual_seed(5))
        assert bih.method_info.replayed is replayed
        assert len(planned) == (2 if not replayed else 0 if num_probes is None else 1)
        torch.testing.assert_close(got, ref_fn(params, x, generator=torch.Generator().manual_seed(5)))
        if num_probes is None:
            want = vmap(
                lambda xn, p=params: hessian(lambda z: hessian(lambda y: u(p, y[None])[0])(z).trace())(
                    xn
                ).trace()
            )(x)
            torch.testing.assert_close(got, want)


def test_streamed_blocks_squared_in_place_only_when_nothing_records_them(monkeypatch):
    """pair_lazy squares a fresh streamed block in place when nothing records it; under the tape
    recorder (the biharmonic records the collapsed Laplacian with streamed blocks when
    chunk_size is given) it does not, so the biharmonic stays on the collapsed route; the
    results match the dense references either way."""
    import secorder._engine.jet as jet
    import secorder.pde as pde

    d = 6
    u, params = _stream_mlp(d, 10, torch.float64)
    x = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(pde, "STREAM_BLOCK", 2)
    seen = []
    real = jet._overwritable

    def counting(t):
        seen.append(real(t))
        return seen[-1]

    monkeypatch.setattr(jet, "_overwritable", counting)
    torch.testing.assert_close(laplacian(u, chunk_size=d)(params, x), _ref_laplacian(u, params, x))
    assert seen and all(seen)  # streamed, nothing records: in place
    seen.clear()
    bih = biharmonic(u, chunk_size=d)
    got = bih(params, x)
    assert bih.method_info.route == "collapsed"
    assert False in seen  # streamed while the Laplacian's tape was recorded: not in place
    want = vmap(
        lambda xn: hessian(lambda z: hessian(lambda y: u(params, y[None])[0])(z).trace())(xn).trace()
    )(x)
    torch.testing.assert_close(got, want)


def _spy_reuse(monkeypatch):
    """Record what pde._reusable_values returned at every call (None: values recomputed)."""
    import secorder.pde as pde

    seen = []
    real = pde._reusable_values

    def spy(tape, args):
        out = real(tape, args)
        seen.append(out)
        return out

    monkeypatch.setattr(pde, "_reusable_values", spy)
    return seen


def test_recorded_values_reused_only_when_no_derivative_can_be_asked(monkeypatch):
    """Without anything to differentiate, the collapsed pass takes the matrix products' values
    from the recording (the same numbers); with a parameter that requires grad, a tensor read
    from outside the arguments that requires grad, torch.func.grad or forward-mode AD, it
    computes its own (differentiable) values, and the gradients match nested AD."""
    from torch.autograd import forward_ad

    d = 3
    params = _mlp_params(d, 6, torch.float64)
    x = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    u = _mlp(torch.tanh)
    ref = _ref_laplacian(u, params, x)
    seen = _spy_reuse(monkeypatch)
    torch.testing.assert_close(laplacian(u)(params, x), ref)
    assert seen[-1] is not None and all(key[1] == "value" for key in seen[-1])
    # a parameter that requires grad
    leaves = {k: v.clone().requires_grad_(k == "w2") for k, v in params.items()}
    (laplacian(u)(leaves, x) ** 2).sum().backward()
    assert seen[-1] is None
    g_ref = grad(lambda w: (_ref_laplacian(u, {**params, "w2": w}, x) ** 2).sum())(params["w2"])
    torch.testing.assert_close(leaves["w2"].grad, g_ref)
    # a tensor u reads from outside its arguments (captured as a tape constant)
    w2 = params["w2"].clone().requires_grad_(True)
    inner = lambda p, z: _mlp(torch.tanh)({**p, "w2": w2}, z)
    (laplacian(inner)(params, x) ** 2).sum().backward()
    assert seen[-1] is None
    torch.testing.assert_close(w2.grad, g_ref)
    # torch.func.grad in the points' coordinates of the Laplacian's sum
    gx = grad(lambda z: laplacian(u)(params, z).sum())(x)
    assert seen[-1] is None
    torch.testing.assert_close(gx, grad(lambda z: _ref_laplacian(u, params, z).sum())(x))
    # forward-mode AD in a parameter
    t = torch.randn_like(params["w2"])
    with forward_ad.dual_level():
        lap = laplacian(u)({**params, "w2": forward_ad.make_dual(params["w2"], t)}, x)
        tangent = forward_ad.unpack_dual(lap).tangent
    assert seen[-1] is None
    _, ref_t = torch.func.jvp(lambda w: _ref_laplacian(u, {**params, "w2": w}, x), (params["w2"],), (t,))
    torch.testing.assert_close(tangent, ref_t)


def test_biharmonic_reuses_the_laplacians_recorded_values(monkeypatch):
    d = 3
    params = _mlp_params(d, 5, torch.float64)
    x = torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u = _mlp(torch.tanh)

    def lap_one(p, xn):
        return hessian(lambda z: u(p, z[None])[0])(xn).trace()

    ref = lambda p: vmap(lambda xn: hessian(lambda z: lap_one(p, z))(xn).trace())(x)
    seen = _spy_reuse(monkeypatch)
    torch.testing.assert_close(biharmonic(u)(params, x), ref(params))
    assert seen[-1] is not None  # the Laplacian's tape: the outer pass takes its values
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    biharmonic(u)(leaves, x).sum().backward()
    assert seen[-1] is None
    g_ref = grad(lambda p: ref(p).sum())(params)
    for k in params:
        torch.testing.assert_close(leaves[k].grad, g_ref[k])


# -- the biharmonic's outer tape, derived from u's tape (secorder.pde._DERIVED) -------------------
def _dense_biharmonic(u, params, x):
    return vmap(
        lambda xn: hessian(lambda z: hessian(lambda y: u(params, y[None])[0])(z).trace())(xn).trace()
    )(x)


def _canonical(tape, known):
    """A tape's nodes with constants as ("known", id) for the tensors in ``known`` (objects the
    test holds across calls) and by value otherwise (e.g. this call's directions)."""
    ids = {id(t) for t in known}

    def key(obj):
        if isinstance(obj, torch.Tensor):
            if id(obj) in ids:
                return ("known", id(obj))
            return ("value", tuple(obj.shape), obj.dtype, obj.tolist())
        if isinstance(obj, (list, tuple)):
            return (type(obj), tuple(key(o) for o in obj))
        if isinstance(obj, dict):
            return (dict, tuple((k, key(v)) for k, v in obj.items()))
        return obj

    return [(n.func, tuple(n.outputs), n.multi, key((n.args, n.kwargs))) for n in tape.nodes], (
        tape.num_leaves, tape.num_inputs, tape.num_values, tape.output, tape.widest, tape.numels, tape.depends,
    )  # fmt: skip


_SCALE = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)  # a tensor u captures


def _gelu_ln(p, x):
    z = F.layer_norm(F.linear(x, p["w1"], p["b1"]), (p["w1"].shape[0],))
    return F.linear(F.gelu(z) @ p["w2"].T, p["w3"]).squeeze(-1)


def _gelu_ln_composed(p, x):
    """``_gelu_ln`` with the layer norm composed of mean, var and sqrt (the same function)."""
    z = F.linear(x, p["w1"], p["b1"])
    z = (z - z.mean(-1, keepdim=True)) / (z.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    return F.linear(F.gelu(z) @ p["w2"].T, p["w3"]).squeeze(-1)


def _captured(p, x):
    return (torch.tanh(F.linear(x * _SCALE, p["w1"], p["b1"])) @ p["w3"].T).squeeze(-1) * torch.tensor(2.0)


@pytest.mark.parametrize(
    ("u", "opts"),
    [
        (_mlp(torch.tanh), {}),
        (_gelu_ln, {}),
        (_captured, {}),
        (_mlp(torch.sin), {"chunk_size": 2}),
        (_mlp(torch.tanh), {"num_probes": 2, "with_stderr": True}),
    ],
    ids=["tanh", "gelu-layernorm", "captured-constants", "chunked", "probes"],
)
def test_biharmonic_outer_tape_derived_equals_recorded(monkeypatch, u, opts):
    """The outer tape taken from the template of an earlier call with u's structure is, op for
    op, the tape a recording of the inner collapsed Laplacian gives at this call (the same ops,
    arguments, value graph, constants: u's captured tensors the same objects, the directions
    equal), and both give the same biharmonic (the dense nested Hessians' when exact)."""
    import secorder.pde as pde

    derived, recorded = [], []
    real_inst, real_record = pde._instantiate, pde._record
    monkeypatch.setattr(pde, "_instantiate", lambda *a: derived.append(real_inst(*a)) or derived[-1])

    def spy_record(fn, *a, **k):
        out = real_record(fn, *a, **k)
        if fn.__name__ == "lap":
            recorded.append(out[0])
        return out

    monkeypatch.setattr(pde, "_record", spy_record)
    bih = biharmonic(u, **opts)
    bih(_mlp_params(3, 6, torch.float64, seed=0), torch.randn(4, 3, dtype=torch.float64))
    assert len(recorded) == 1 and not derived  # the first call records the outer tape
    params = _mlp_params(3, 6, torch.float64, seed=1)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x[:4]  # same shapes, other values
    got = bih(params, x, generator=torch.Generator().manual_seed(3))
    assert len(derived) == 1 and derived[0] is not None and len(recorded) == 1
    assert bih.method_info.route == "collapsed"
    pde._DERIVED.clear()
    want = bih(params, x, generator=torch.Generator().manual_seed(3))
    assert len(recorded) == 2 and len(derived) == 1
    known = [*params.values(), x, _SCALE]
    assert _canonical(derived[0], known) == _canonical(recorded[1], known)
    torch.testing.assert_close(got, want)
    if "num_probes" not in opts:  # native_layer_norm: the composed reference (see below)
        ref = _gelu_ln_composed if u is _gelu_ln else u
        torch.testing.assert_close(got, _dense_biharmonic(ref, params, x))


def test_biharmonic_through_layer_norm_matches_the_composed_layer_norm():
    """torch.func's nested Hessians of ``native_layer_norm`` disagree at fourth order with
    themselves (hessian-of-hessian and jacfwd⁴ give different numbers, torch 2.13), while those
    of the same function composed from mean, var and sqrt agree with each other: the collapsed
    biharmonic through native_layer_norm equals the composed function's (both references)."""
    params = _mlp_params(3, 6, torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = biharmonic(_gelu_ln)(params, x)
    torch.testing.assert_close(got, _dense_biharmonic(_gelu_ln_composed, params, x))
    jacfwd4 = vmap(
        lambda xn: torch.func.jacfwd(
            torch.func.jacfwd(
                lambda z: torch.func.jacfwd(
                    torch.func.jacfwd(lambda y: _gelu_ln_composed(params, y[None])[0])
                )(z).trace()
            )
        )(xn).trace()
    )(x)
    torch.testing.assert_close(got, jacfwd4)


def test_biharmonic_outer_tape_takes_this_calls_constants():
    """A tensor u captures, rebound between calls of the same structure: the derived outer tape
    reads the new one. A tensor held at two places of u's tape at the first call and two
    different ones at the next: the template does not apply, the outer tape is recorded again.
    Every result equals the dense nested Hessians'."""
    import secorder.pde as pde

    held = {"a": torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)}
    held["b"] = held["a"]

    def u(p, x):
        return (torch.tanh(F.linear(x * held["a"], p["w1"], p["b1"])) @ p["w3"].T).squeeze(-1) + (
            x * held["b"]
        ).pow(4).sum(-1)

    bih = biharmonic(u)
    params = _mlp_params(3, 5, torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for step, (a, b) in enumerate([(1, 1), (2, 2), (1, 3)]):
        held["a"] = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64) * a
        held["b"] = held["a"] if a == b else held["a"] * b
        hits = pde._DERIVED.hits
        got = bih(params, x)
        assert pde._DERIVED.hits == hits + (step > 0)  # the structure is the same every time
        torch.testing.assert_close(got, _dense_biharmonic(u, params, x))


def test_outer_tape_template_only_from_known_constants():
    """A template is made only of a tape whose constants are u's tape's constants or the
    directions (anything else, e.g. a tensor made outside both, would be baked in): otherwise
    ``_template`` gives None and the outer tape is recorded at every call."""
    import secorder.pde as pde
    from secorder._engine.tape import record

    c, other = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    dirs = torch.eye(2).reshape(2, 1, 2)
    x = torch.randn(3, 2)
    tape = record(lambda ls, ins: (ins[0] * c).sum(-1), [], [x])
    cases = [
        (lambda ls, ins: (ins[0] * c).sum(-1), True),  # u's captured constant
        (lambda ls, ins: (ins[0] * dirs[1:]).sum(-1), True),  # the directions, sliced as the evaluator does
        (lambda ls, ins: (ins[0] * other).sum(-1), False),
    ]
    for fn, known in cases:
        tape2 = record(fn, [], [x])
        level = pde._template(tape2, tape, dirs, {})
        assert (level is not None) is known
        if level is not None:
            filled = pde._instantiate(level, tape, dirs)
            assert [n.func for n in filled.nodes] == [n.func for n in tape2.nodes]
            torch.testing.assert_close(filled.replay([], [x])[-1], tape2.replay([], [x])[-1])

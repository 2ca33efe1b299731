"""Half precision (float16, bfloat16): accepted, float32 accumulation, refusals that name a route.

The policy under test (``secorder._pytree.accumulation_dtype`` / ``accumulating``): the user's
function and every product formed from it run in the parameters' dtype; probes, reductions,
estimator statistics, Lanczos and accumulated diagonals run in float32, and results come back
in float32.

Tolerances are derived, not tuned. With unit roundoff u = eps/2 of the format, K successive
roundings (a length-n dot product counts n, an elementwise op 1) perturb a value by at most
γ_K = K·u / (1 − K·u) relative to the same computation on absolute values (Higham, *Accuracy
and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 and §3.5). ``chain`` below counts K
for the test model: the longest chain of roundings of the forward pass, taken three times (the
backward pass and the second-order pass retrace it). The references are float64 on the very same
(half-rounded, then exactly upcast) parameters and data, so the comparison sees only the
rounding of the half-precision computation. Results accumulated in float32 add at most
γ_P(float32) relative for a sum of P terms.

These worst-case bounds are loose (the observed errors are about 100 times smaller; for a
bfloat16 trace the bound is of the order of the trace itself): they catch gross errors and
wrong dtypes. The sharp checks are the ones with exact products (the quadratic below), where
float32 accumulation is exact and any half-precision rounding of a sum would fail them, and
the consistency of the trace with the diagonal's float32 sum.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional

import secorder
from secorder import core
from secorder.testing import dense_hessian

HALF = [torch.bfloat16, torch.float16]
D, H, C, N = 4, 5, 3, 6  # inputs, hidden units, classes, samples: small, so γ_K stays informative


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gamma(dtype: torch.dtype, k: int) -> float:
    """Higham's γ_k = k·u / (1 − k·u) for the unit roundoff u of ``dtype``."""
    u = torch.finfo(dtype).eps / 2
    assert k * u < 1, "the bound needs k·u < 1"
    return k * u / (1 - k * u)


def chain() -> int:
    """K for the MLP below: linear (D + 1 with the bias), tanh (1), linear (H + 1), log-softmax
    (C + 2: exp, the sum over C, log, subtraction), the mean over N (N + 1); three passes."""
    return 3 * ((D + 1) + 1 + (H + 1) + (C + 2) + (N + 1))


def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return functional.cross_entropy(torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"], y)


def problem(dtype: torch.dtype) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    g = gen(0)
    p = {
        "w1": torch.randn(H, D, generator=g) / D**0.5,
        "b1": torch.randn(H, generator=g) * 0.1,
        "w2": torch.randn(C, H, generator=g) / H**0.5,
        "b2": torch.randn(C, generator=g) * 0.1,
    }
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return {k: v.to(dtype) for k, v in p.items()}, x.to(dtype), y


def upcast(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.double() for k, v in tree.items()}


def flat(tree: dict[str, Tensor]) -> Tensor:
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def reference(dtype: torch.dtype) -> tuple[Tensor, float]:
    """The float64 Hessian at the half-rounded point and γ_K · max|H_ij|, the entry scale."""
    p, x, y = problem(dtype)
    Hd = dense_hessian(loss, upcast(p), x.double(), y)
    return Hd, gamma(dtype, chain()) * float(Hd.abs().max())


# -- accepted, and the dtype of results ------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_leaves_are_accepted_and_results_are_float32(dtype: torch.dtype) -> None:
    p, x, y = problem(dtype)
    v = {k: torch.ones_like(t) for k, t in p.items()}
    outs = {
        "hvp": secorder.hvp(loss)(v, p, x, y),
        "trace": secorder.hessian_trace(loss)(p, x, y),
        "diagonal": secorder.hessian_diagonal(loss)(p, x, y),
        "hutchinson": secorder.hessian_trace(loss, num_probes=4)(p, x, y, generator=gen(1)),
        "xtrace": secorder.hessian_trace(loss, num_probes=6, method="xtrace")(p, x, y, generator=gen(1)),
        "eigenvalues": secorder.hessian_eigenvalues(loss, k=2)(p, x, y, generator=gen(1)),
    }
    for name, out in outs.items():
        for t in out.values() if isinstance(out, dict) else [out]:
            assert t.dtype == torch.float32, name
            assert bool(torch.isfinite(t).all()), name
    assert {k: t.shape for k, t in outs["diagonal"].items()} == {k: t.shape for k, t in p.items()}


def test_eight_bit_floats_are_refused() -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8 dtypes")
    x = torch.ones(3).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"float64, float32, float16 or bfloat16.*float8_e4m3fn at args\[0\]"):
        secorder.hessian_trace(lambda w: (w.float() ** 2).sum())(x)


# -- float32 accumulation: exact products, so the sums alone are seen -----------------------------


def quadratic(dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """f(x) = ½ Σ a_i x_i² with P = 2^14 − 1 entries a_i = 1 + (i mod 128)/128, exact in both formats.

    H = diag(a), and every product H v with v_i ∈ {−1, 0, 1} is exact in the format (½·a_i·v_i
    needs at most 8 significant bits), so the only rounding is secorder's summation. Every
    partial sum is a multiple of 1/128 below 2^15 (22 significant bits): exact in float32 in any
    order, so a float32 accumulation gives Σa exactly (a mean over probes adds one division, one
    rounding). Σa = 24510.0078125 is not representable in either half format: a result
    accumulated or returned in it is off by more than that (checked below, so the test can fail).
    """
    P = (1 << 14) - 1
    a = 1 + (torch.arange(P) % 128) / 128
    x = torch.randn(P, generator=gen(2)).to(dtype)
    return a.to(dtype), x, float(a.double().sum())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("strategy", ["rev_rev", "fwd_rev", "autograd", "autograd_batched", "taylor"])
def test_hutchinson_accumulates_in_float32(dtype: torch.dtype, strategy: str) -> None:
    a, x, exact = quadratic(dtype)
    tol = gamma(torch.float32, 1) * exact  # the division of the mean over probes
    assert abs(float(torch.tensor(exact).to(dtype)) - exact) > tol  # a half-rounded total fails
    f = lambda z: 0.5 * (a * z * z).sum()
    est = secorder.hessian_trace(f, num_probes=3, strategy=strategy)(x, generator=gen(3))
    assert est.dtype == torch.float32
    assert abs(float(est) - exact) <= tol  # Rademacher probes: vᵀ diag(a) v = Σa, no variance


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_exact_trace_and_diagonal_accumulate_in_float32(dtype: torch.dtype) -> None:
    a, x, exact = quadratic(dtype)
    f = lambda z: 0.5 * (a * z * z).sum()
    fn = secorder.hessian_trace(f)
    tr = fn(x)
    assert float(tr) == exact  # exact one-hot products, an exact float32 sum
    assert "torch." + str(dtype).split(".")[1] in fn.method_info.reason  # why no sweep
    diag = secorder.hessian_diagonal(f, chunk_size=4096)(x)
    assert diag.dtype == torch.float32
    torch.testing.assert_close(diag, a.float(), rtol=0, atol=0)  # one-hot products are exact here


# -- against float64 references ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_exact_hessian_quantities_match_float64(dtype: torch.dtype) -> None:
    Hd, tol = reference(dtype)
    p, x, y = problem(dtype)
    P = Hd.shape[0]
    diag = flat(secorder.hessian_diagonal(loss)(p, x, y)).double()
    assert float((diag - Hd.diagonal()).abs().max()) <= tol
    trace = float(secorder.hessian_trace(loss)(p, x, y))
    assert abs(trace - float(Hd.trace())) <= P * tol * (1 + gamma(torch.float32, P))
    # the same one-hot products: the trace is the diagonal's sum up to float32 summation alone
    assert abs(trace - float(diag.sum())) <= gamma(torch.float32, P) * float(diag.abs().sum())
    v = {k: torch.randn(t.shape, generator=gen(4)).to(dtype) for k, t in p.items()}
    hv = flat(secorder.hvp(loss)(v, p, x, y)).double()
    ref = Hd @ flat(upcast(v))
    assert float((hv - ref).abs().max()) <= tol * float(flat(upcast(v)).abs().sum())


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_eager_api_matches_float64(dtype: torch.dtype) -> None:
    Hd, tol = reference(dtype)
    p, x, y = problem(dtype)
    params = [p[k].clone().requires_grad_(True) for k in sorted(p)]
    closure = lambda: loss(dict(zip(sorted(p), params)), x, y)
    tr = core.hessian_trace(closure, params)
    assert tr.dtype == torch.float32
    assert abs(float(tr) - float(Hd.trace())) <= Hd.shape[0] * tol * (1 + gamma(torch.float32, Hd.shape[0]))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_hutchinson_is_unbiased_for_the_half_precision_hessian(dtype: torch.dtype) -> None:
    """Mean of many seeds within 4 standard errors (plus the rounding bound) of the exact trace."""
    Hd, tol = reference(dtype)
    p, x, y = problem(dtype)
    fn = secorder.hessian_trace(loss, num_probes=20, with_stderr=True)
    runs = [fn(p, x, y, generator=gen(10 + s)) for s in range(20)]
    est = torch.stack([e for e, _ in runs])
    mean, stderr = float(est.mean()), float(est.std() / len(runs) ** 0.5)
    assert all(e.dtype == torch.float32 for e, _ in runs)
    assert abs(mean - float(Hd.trace())) <= 4 * stderr + Hd.shape[0] * tol


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_eigenvalues_match_float64(dtype: torch.dtype) -> None:
    """Weyl: |λ_i(Ĥ) − λ_i(H)| ≤ ‖Ĥ − H‖_2 ≤ P·max|entry error|, plus Lanczos' own residual
    tolerance eps(format)·|θ|max (the default for products formed in a half format)."""
    Hd, tol = reference(dtype)
    p, x, y = problem(dtype)
    lam = secorder.hessian_eigenvalues(loss, k=2)(p, x, y, generator=gen(5))
    ref = torch.linalg.eigvalsh(Hd).flip(0)[:2]
    bound = Hd.shape[0] * tol + torch.finfo(dtype).eps * float(ref.abs().max())
    assert float((lam.double() - ref).abs().max()) <= bound


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_exact_fisher_matches_float64(dtype: torch.dtype, kind: str) -> None:
    """The exact GGN / empirical Fisher of half parameters: one-hot operator products (path
    ``"one_hot"``) against the float64 column routes at the same point."""
    p, x, y = problem(dtype)
    model = lambda q, z: torch.tanh(z @ q["w1"].T + q["b1"]) @ q["w2"].T + q["b2"]
    fn = secorder.fisher_diagonal(model, "cross_entropy", kind=kind)
    got = fn(p, x, y)
    assert fn.path_info.path == "one_hot"
    ref = flat(secorder.fisher_diagonal(model, "cross_entropy", kind=kind)(upcast(p), x.double(), y))
    assert all(t.dtype == torch.float32 for t in got.values())
    assert float((flat(got).double() - ref).abs().max()) <= gamma(dtype, chain()) * float(ref.abs().max())
    tr = secorder.fisher_trace(model, "cross_entropy", kind=kind)(p, x, y)
    P = ref.numel()
    assert abs(float(tr) - float(ref.sum())) <= P * gamma(dtype, chain()) * float(ref.abs().max())


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fisher_hutchinson_and_mc_run_in_float32(dtype: torch.dtype) -> None:
    p, x, y = problem(dtype)
    model = lambda q, z: torch.tanh(z @ q["w1"].T + q["b1"]) @ q["w2"].T + q["b2"]
    est = secorder.fisher_trace(model, "cross_entropy", num_probes=8)(p, x, y, generator=gen(6))
    mc = secorder.fisher_diagonal(model, "cross_entropy", kind="mc", num_probes=2)(p, x, y, generator=gen(6))
    assert est.dtype == torch.float32 and bool(torch.isfinite(est))
    assert all(t.dtype == torch.float32 and bool((t >= 0).all()) for t in mc.values())


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_module_hessian_diagonal_takes_one_hot_products(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).to(dtype)
    p = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(N, D, generator=gen(7)).to(dtype), torch.randint(0, C, (N,), generator=gen(7))
    fn = secorder.module_hessian_diagonal(model, "cross_entropy")
    got = fn(p, x, y)
    assert fn.method_info.method == "hvp" and str(dtype) in fn.method_info.reason
    ref64 = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).double()
    ref64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref = secorder.module_hessian_diagonal(ref64, "cross_entropy")(upcast(p), x.double(), y)
    scale = max(float(t.abs().max()) for t in ref.values())
    for k in ref:
        assert got[k].dtype == torch.float32
        assert float((got[k].double() - ref[k]).abs().max()) <= gamma(dtype, chain()) * scale


# -- refusals name a route that honours the precision ----------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_structured_routes_refuse_naming_a_route(dtype: torch.dtype) -> None:
    p, x, y = problem(dtype)
    with pytest.raises(ValueError, match=rf"exact='sweep'.*{dtype}.*exact='hvp'"):
        secorder.hessian_diagonal(loss, exact="sweep")(p, x, y)
    with pytest.raises(ValueError, match=rf"per_sample=True.*{dtype}.*float32"):
        secorder.hessian_diagonal(loss, per_sample=True)(p, x, y)
    model = lambda q, z: torch.tanh(z @ q["w1"].T + q["b1"]) @ q["w2"].T + q["b2"]
    with pytest.raises(ValueError, match=rf"per_sample=True.*{dtype}.*float32"):
        secorder.fisher_diagonal(model, "cross_entropy", per_sample=True)(p, x, y)
    with pytest.raises(ValueError, match=rf"with_stderr=True of the MC Fisher.*{dtype}.*Drop with_stderr"):
        secorder.fisher_trace(model, "cross_entropy", kind="mc", num_probes=2, with_stderr=True)(
            p, x, y, generator=gen(0)
        )
    with pytest.raises(ValueError, match=rf"strategy='finite_difference' needs float32.*{dtype}.*'rev_rev'"):
        secorder.hessian_trace(loss, num_probes=2, strategy="finite_difference")(p, x, y, generator=gen(0))
    net = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).to(dtype)
    params = {k: v.detach() for k, v in net.named_parameters()}
    with pytest.raises(ValueError, match=rf"method='sweep'.*{dtype}.*method='hvp'"):
        secorder.module_hessian_diagonal(net, "cross_entropy", method="sweep")(params, x, y)


def test_float16_overflow_is_named() -> None:
    """float16's largest finite value is 65504: f = c·Σz⁴ at z = 1 with c = 10⁴ has a finite loss
    (10⁴) and gradient (4·10⁴) but second derivatives 12·10⁴, an Inf in float16: reported, naming
    the format's range, never returned."""
    big = torch.finfo(torch.float16).max
    f = lambda z: 1e4 * (z**4).sum()
    z = torch.ones(4, dtype=torch.float16)
    with pytest.raises(
        ValueError, match=rf"non-finite second-order.*float16, whose largest finite value is {big:.0f}"
    ):
        secorder.hessian_trace(f)(z)
    with pytest.raises(ValueError, match=rf"float16, whose largest finite value is {big:.0f}"):
        secorder.hessian_trace(f, num_probes=2)(z, generator=gen(0))
    # parameters that overflowed before the call: named as such
    with pytest.raises(ValueError, match=rf"1 infinite entries.*float16 holds at most {big:.0f}"):
        secorder.hessian_trace(f)(torch.tensor([1.0, 7e4, 0.0, 1.0]).half())
    # finite float16 entries whose sum would overflow float16 are accepted (H = 2I: finite)
    assert torch.isfinite(secorder.hessian_trace(lambda w: (w * w).sum())(torch.full((4,), 6e4).half()))
    # bfloat16 has float32's range: finite, 4 · 12·10⁴ within a few roundings
    tr = float(secorder.hessian_trace(f)(z.bfloat16()))
    assert abs(tr - 4.8e5) <= gamma(torch.bfloat16, 4) * 4.8e5


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_laplace_backends_match_float64(dtype: torch.dtype) -> None:
    pytest.importorskip("laplace", reason="laplace-torch is an optional extra (secorder[laplace])")
    from secorder.laplace import SecorderEF, SecorderGGN, SecorderHessian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).to(dtype)
    ref64 = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).double()
    ref64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x, y = torch.randn(N, D, generator=gen(8)).to(dtype), torch.randint(0, C, (N,), generator=gen(8))
    for backend, kw in [(SecorderGGN, {}), (SecorderEF, {}), (SecorderHessian, {"negative": "keep"})]:
        for method in ("diag", "full"):
            _, got = getattr(backend(model, "classification", **kw), method)(x, y)
            _, ref = getattr(backend(ref64, "classification", **kw), method)(x.double(), y)
            assert got.dtype == torch.float32, (backend, method)
            bound = gamma(dtype, chain()) * float(ref.abs().max())
            assert float((got.double() - ref).abs().max()) <= bound, (backend, method)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_dataset_quantities_match_float64(dtype: torch.dtype) -> None:
    """secorder.data: the batch operators accumulate in float32 and so does the sum over batches
    (the DatasetOperator's dtype is float32, its compute dtype the parameters')."""
    from secorder import data

    p, x, y = problem(dtype)
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, N, 2)]
    ref_batches = [(a.double(), b) for a, b in batches]
    model = lambda q, z: torch.tanh(z @ q["w1"].T + q["b1"]) @ q["w2"].T + q["b2"]
    cases = [
        (
            data.dataset_hessian_diagonal(loss, p, batches),
            data.dataset_hessian_diagonal(loss, upcast(p), ref_batches),
        ),
        (
            data.dataset_hessian_trace(loss, p, batches),
            data.dataset_hessian_trace(loss, upcast(p), ref_batches),
        ),
        (
            data.dataset_fisher_diagonal(model, "cross_entropy", p, batches),
            data.dataset_fisher_diagonal(model, "cross_entropy", upcast(p), ref_batches),
        ),
    ]
    for got, ref in cases:
        g, r = (flat(got), flat(ref)) if isinstance(got, dict) else (got, ref)
        assert g.dtype == torch.float32
        scale = float(r.abs().max()) * (1 if isinstance(got, dict) else flat(p).numel())
        assert float((g.double() - r).abs().max()) <= gamma(dtype, chain()) * scale


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_eager_fisher_approximations_match_float64(dtype: torch.dtype) -> None:
    """torch_secorder's eager Fisher API: the measured reduction of a callable loss tolerates the
    format's rounding (the batch loss, each per-sample loss and their mean round once: 3u < 2·eps),
    and the categorical Fisher squares its columns and sums them in float32."""
    from secorder import approximations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).to(dtype)
    ref64 = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).double()
    ref64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x, y = torch.randn(N, D, generator=gen(9)).to(dtype), torch.randint(0, C, (N,), generator=gen(9))
    ce = lambda z, t: functional.cross_entropy(z, t)  # a callable: the reduction is measured
    pairs = [
        (
            approximations.empirical_fisher_diagonal(model, ce, x, y),
            approximations.empirical_fisher_diagonal(ref64, ce, x.double(), y),
        ),
        (
            approximations.generalized_fisher_diagonal(model, model(x), y),
            approximations.generalized_fisher_diagonal(ref64, ref64(x.double()), y),
        ),
    ]
    for got, ref in pairs:
        g, r = torch.cat([t.flatten() for t in got]), torch.cat([t.flatten() for t in ref])
        assert g.dtype == torch.float32
        assert float((g.double() - r).abs().max()) <= gamma(dtype, chain()) * float(r.abs().max())
    tr = approximations.empirical_fisher_trace(model, ce, x, y)
    ref_tr = approximations.empirical_fisher_trace(ref64, ce, x.double(), y)
    P = sum(p.numel() for p in model.parameters())
    ef_scale = max(float(t.abs().max()) for t in pairs[0][1])  # the largest entry of diag(E)
    assert tr.dtype == torch.float32
    assert abs(float(tr) - float(ref_tr)) <= P * gamma(dtype, chain()) * ef_scale


class _Cube(torch.autograd.Function):
    """x³ with a backward that autograd cannot differentiate again."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_strategy_failure_does_not_offer_half_precision_finite_differences(dtype: torch.dtype) -> None:
    f = lambda z: _Cube.apply(z).sum()
    z = torch.linspace(0.5, 2.0, 5).to(dtype)
    with pytest.raises(RuntimeError, match=r"finite_difference\" needs only first derivatives \(in float32"):
        secorder.hessian_trace(f, strategy="autograd")(z)
    with pytest.raises(RuntimeError, match=r"finite_difference\" needs only first derivatives\.$"):
        secorder.hessian_trace(f, strategy="autograd")(z.float())

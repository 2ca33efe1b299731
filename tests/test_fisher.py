"""fisher_trace / fisher_diagonal against dense float64 references; statistics; composability; errors.

The reference builds J = ∂z/∂θ and ∇²_z L densely (torch.autograd.functional) and the
per-sample gradients ∇l_n from the loss of each sample run alone, with torch.nn.functional
losses, so every convention (mean vs sum, MSE over N×D elements, cross-entropy positions)
is checked against its definition in secorder.fisher.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import Tensor, nn

import secorder
from secorder import fisher_diagonal, fisher_operator, fisher_trace
from secorder._pytree import flatten, ravel
from secorder.estimators import exact_diagonal
from secorder.testing import flat_function
from tests.conftest import tol

# --------------------------------------------------------------------------- problems


def _mlp_params(sizes: list[int], dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = torch.randn(a, b, generator=g, dtype=dtype) / math.sqrt(a)
        params[f"b{i}"] = torch.randn(b, generator=g, dtype=dtype) * 0.1
    return params


def _mlp(p: dict[str, Tensor], x: Tensor) -> Tensor:
    h = torch.tanh(x @ p["w0"] + p["b0"])
    return h @ p["w1"] + p["b1"]


def _seq_model(p: dict[str, Tensor], x: Tensor) -> Tensor:
    # x: (N, T, d) -> logits (N, C, T): classes in dim 1 as F.cross_entropy expects
    return _mlp(p, x).transpose(1, 2)


def _nonconvex(z: Tensor, y: Tensor) -> Tensor:
    return (torch.sin(z) * y).mean()


def _ce_sum(z: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z, y, reduction="sum")


class Problem:
    def __init__(
        self,
        name: str,
        model_fn: Callable[[Any, Tensor], Tensor],
        params: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        loss: Any,
        ref: Callable[[Tensor, Tensor, str], Tensor],
    ) -> None:
        self.name, self.model_fn, self.params, self.x, self.y, self.loss, self.ref = (
            name,
            model_fn,
            params,
            x,
            y,
            loss,
            ref,
        )


def make_problem(name: str, dtype: torch.dtype = torch.float64, n: int = 5) -> Problem:
    g = torch.Generator().manual_seed(1)
    if name == "ce":
        p = _mlp_params([3, 4, 3], dtype)
        x = torch.randn(n, 3, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (n,), generator=g)
        return Problem(
            name, _mlp, p, x, y, "cross_entropy", lambda z, t, r: F.cross_entropy(z, t, reduction=r)
        )
    if name == "ce_seq":
        p = _mlp_params([2, 3, 3], dtype)
        x = torch.randn(n, 4, 2, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (n, 4), generator=g)
        return Problem(
            name, _seq_model, p, x, y, "cross_entropy", lambda z, t, r: F.cross_entropy(z, t, reduction=r)
        )
    if name == "mse":
        p = _mlp_params([3, 4, 6], dtype)
        x = torch.randn(n, 3, generator=g, dtype=dtype)
        y = torch.randn(n, 2, 3, generator=g, dtype=dtype)
        return Problem(
            name,
            lambda q, xx: _mlp(q, xx).reshape(-1, 2, 3),
            p,
            x,
            y,
            "mse",
            lambda z, t, r: F.mse_loss(z, t, reduction=r),
        )
    if name == "bce":
        p = _mlp_params([3, 4, 3], dtype)
        x = torch.randn(n, 3, generator=g, dtype=dtype)
        y = torch.rand(n, 3, generator=g, dtype=dtype)
        return Problem(
            name,
            _mlp,
            p,
            x,
            y,
            "bce_with_logits",
            lambda z, t, r: F.binary_cross_entropy_with_logits(z, t, reduction=r),
        )
    if name == "callable_ce":
        prob = make_problem("ce", dtype, n)
        prob.name, prob.loss = name, None  # filled per reduction in _loss_for
        return prob
    if name == "callable_nonconvex":
        p = _mlp_params([3, 4, 3], dtype)
        x = torch.randn(n, 3, generator=g, dtype=dtype)
        y = torch.randn(n, 3, generator=g, dtype=dtype)
        return Problem(
            name,
            _mlp,
            p,
            x,
            y,
            None,
            lambda z, t, r: (torch.sin(z) * t).mean() if r == "mean" else (torch.sin(z) * t).sum(),
        )
    raise ValueError(name)


def _loss_for(prob: Problem, reduction: str) -> Any:
    if prob.name == "callable_ce":
        return (lambda z, y: F.cross_entropy(z, y)) if reduction == "mean" else _ce_sum
    if prob.name == "callable_nonconvex":
        return _nonconvex if reduction == "mean" else (lambda z, y: (torch.sin(z) * y).sum())
    return prob.loss


def dense_reference(prob: Problem, reduction: str) -> dict[str, Tensor]:
    """G = Jᵀ ∇²_z L J and E = c Σ ∇l_n ∇l_nᵀ (P×P, secorder's flat order), densely."""
    z_of, theta = flat_function(lambda p: prob.model_fn(p, prob.x), (prob.params,))
    z = z_of(theta)
    jac = torch.autograd.functional.jacobian(z_of, theta).reshape(z.numel(), -1)
    hz = torch.autograd.functional.hessian(
        lambda zf: prob.ref(zf.reshape(z.shape), prob.y, reduction), z.reshape(-1)
    )
    n = z.shape[0]
    grads = []
    for i in range(n):
        f_i, _ = flat_function(
            lambda p, i=i: prob.ref(prob.model_fn(p, prob.x[i : i + 1]), prob.y[i : i + 1], reduction),
            (prob.params,),
        )
        grads.append(torch.autograd.functional.jacobian(f_i, theta))
    per = torch.stack(grads)
    c = 1.0 / n if reduction == "mean" else 1.0
    # the definitions' scaling: L = c Σ_n l_n
    total = prob.ref(z, prob.y, reduction)
    per_losses = torch.stack([prob.ref(z[i : i + 1], prob.y[i : i + 1], reduction) for i in range(n)])
    assert torch.allclose(total, c * per_losses.sum())
    return {"ggn": jac.T @ hz @ jac, "empirical": c * per.T @ per}


def _flat(tree: Any) -> Tensor:
    return ravel(flatten(tree)[0])


PROBLEMS = ["ce", "ce_seq", "mse", "bce", "callable_ce", "callable_nonconvex"]


# --------------------------------------------------------------------------- exact values


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
@pytest.mark.parametrize("name", PROBLEMS)
def test_exact_matches_dense_reference(name: str, kind: str, reduction: str) -> None:
    prob = make_problem(name)
    loss = _loss_for(prob, reduction)
    ref = dense_reference(prob, reduction)[kind]
    trace = fisher_trace(prob.model_fn, loss, kind=kind, reduction=reduction)(prob.params, prob.x, prob.y)
    diag = fisher_diagonal(prob.model_fn, loss, kind=kind, reduction=reduction)(prob.params, prob.x, prob.y)
    assert list(diag) == list(prob.params)
    torch.testing.assert_close(trace, ref.trace(), **tol(torch.float64))
    torch.testing.assert_close(_flat(diag), ref.diagonal(), **tol(torch.float64))
    torch.testing.assert_close(_flat(diag).sum(), trace, **tol(torch.float64))


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        *[(n, k) for n in ("ce", "mse") for k in ("ggn", "empirical", "mc")],
        ("callable_nonconvex", "ggn"),
        ("callable_nonconvex", "empirical"),
        ("callable_ce", "ggn"),
    ],
)
def test_operator_products_match_dense(name: str, kind: str) -> None:
    prob = make_problem(name)
    op, _ = fisher_operator(prob.model_fn, _loss_for(prob, "mean"), kind=kind, num_samples=3)(
        prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(0)
    )
    if kind == "mc":
        # one draw is a fixed random matrix: symmetric, PSD, of rank <= N·S (outer products of
        # sampled per-sample gradients), quadforms consistent with products; over many draws
        # its mean is the GGN (every entry within 6 standard errors of the dense reference)
        eye = torch.eye(op.size, dtype=op.dtype)
        dense = op.matmat(eye)
        torch.testing.assert_close(dense, dense.T, **tol(torch.float64))
        torch.testing.assert_close(op.quadform(eye), dense.diagonal(), **tol(torch.float64))
        eig = torch.linalg.eigvalsh(dense)
        assert eig.min() > -1e-10 * eig.max()
        assert int((eig > 1e-10 * eig.max()).sum()) <= prob.x.shape[0] * 3
        mc_op = fisher_operator(prob.model_fn, _loss_for(prob, "mean"), kind="mc", num_samples=3)
        draws = torch.stack(
            [
                mc_op(prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(s))[0].matmat(eye)
                for s in range(300)
            ]
        )
        ggn = dense_reference(prob, "mean")["ggn"]
        se = draws.std(0) / math.sqrt(draws.shape[0])
        z = (draws.mean(0) - ggn).abs() / (se + 1e-12 * ggn.abs().max())
        assert float(z.max()) < 6, float(z.max())
        return
    ref = dense_reference(prob, "mean")[kind]
    v = torch.randn(4, op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(op.matmat(v), v @ ref, **tol(torch.float64))
    torch.testing.assert_close(op.quadform(v), ((v @ ref) * v).sum(1), **tol(torch.float64))
    torch.testing.assert_close(exact_diagonal(op, chunk_size=3), ref.diagonal(), **tol(torch.float64))


@pytest.mark.parametrize(
    ("name", "reduction"),
    [
        ("ce", "mean"),
        ("ce", "sum"),
        ("ce_seq", "mean"),
        ("ce_seq", "sum"),
        ("mse", "mean"),
        ("mse", "sum"),
        ("bce", "mean"),
    ],
)
def test_closed_forms_match_autodiff(name: str, reduction: str) -> None:
    from secorder._losses import LossSpec, resolve_loss

    prob = make_problem(name)
    loss = resolve_loss("", prob.loss, reduction, "ggn")
    z = prob.model_fn(prob.params, prob.x)
    torch.testing.assert_close(loss.per_sample_grads(z, prob.y), LossSpec.per_sample_grads(loss, z, prob.y))
    hz = torch.autograd.functional.hessian(lambda zf: loss.total(zf.reshape(z.shape), prob.y), z.reshape(-1))
    u = torch.randn(3, *z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(0))
    uf = u.reshape(3, -1)
    torch.testing.assert_close(loss.hessian_quadform(z, prob.y, u), ((uf @ hz) * uf).sum(1))
    torch.testing.assert_close(loss.hessian_matvec(z, prob.y, u).reshape(3, -1), uf @ hz)
    # the factor reproduces c·blockdiag(∇²l_n) = ∇²_z L
    factor = loss.factor(z, prob.y)
    cols = factor.columns(0, factor.num_columns).reshape(factor.num_columns, z.shape[0], -1)
    w = factor.weights(0, factor.num_columns)
    w = torch.ones(cols.shape[:2], dtype=z.dtype) if w is None else w
    blocks = torch.einsum("rn,rna,rnb->nab", w, cols, cols) * loss.scale(z)
    torch.testing.assert_close(torch.block_diag(*blocks), hz)


def test_cross_entropy_positions_are_averaged_within_the_sample() -> None:
    # The documented convention: with extra dims, l_n is the mean of its positions' losses, so the
    # empirical Fisher differs from treating positions as samples (which would be N·T items).
    prob = make_problem("ce_seq")
    e = fisher_trace(prob.model_fn, "cross_entropy", kind="empirical")(prob.params, prob.x, prob.y)
    flat = prob.x.reshape(-1, 1, 2)
    per_position = fisher_trace(lambda p, x: _mlp(p, x).transpose(1, 2), "cross_entropy", kind="empirical")(
        prob.params, flat, prob.y.reshape(-1, 1)
    )
    ref = dense_reference(prob, "mean")["empirical"].trace()
    torch.testing.assert_close(e, ref)
    assert not torch.isclose(e, per_position)
    # ... while the GGN is the same either way (it is linear in the per-position Hessians).
    g = fisher_trace(prob.model_fn, "cross_entropy")(prob.params, prob.x, prob.y)
    g_pos = fisher_trace(lambda p, x: _mlp(p, x).transpose(1, 2), "cross_entropy")(
        prob.params, flat, prob.y.reshape(-1, 1)
    )
    torch.testing.assert_close(g, g_pos)


def test_mse_mean_is_over_all_elements() -> None:
    prob = make_problem("mse")
    mean = fisher_trace(prob.model_fn, "mse")(prob.params, prob.x, prob.y)
    total = fisher_trace(prob.model_fn, "mse", reduction="sum")(prob.params, prob.x, prob.y)
    torch.testing.assert_close(total, mean * prob.y.numel())  # L_sum = N·D·L_mean
    e_mean = fisher_trace(prob.model_fn, "mse", kind="empirical")(prob.params, prob.x, prob.y)
    e_sum = fisher_trace(prob.model_fn, "mse", kind="empirical", reduction="sum")(prob.params, prob.x, prob.y)
    n, d = prob.y.shape[0], prob.y[0].numel()
    torch.testing.assert_close(e_sum, e_mean * n * d**2)  # l_n^sum = D l_n^mean, c = 1 vs 1/N


def test_empirical_trace_is_mean_squared_per_sample_gradient_norm() -> None:
    # tr(E) = (1/N) Σ ‖∇l_n‖², not ‖(1/N) Σ ∇l_n‖² (the squared batch gradient).
    prob = make_problem("ce")
    e = fisher_trace(prob.model_fn, "cross_entropy", kind="empirical")(prob.params, prob.x, prob.y)
    norms = []
    for i in range(prob.x.shape[0]):
        f = lambda p, i=i: F.cross_entropy(_mlp(p, prob.x[i : i + 1]), prob.y[i : i + 1])
        g = torch.func.grad(f)(prob.params)
        norms.append(sum((v**2).sum() for v in g.values()))
    torch.testing.assert_close(e, torch.stack(norms).mean())
    batch = torch.func.grad(lambda p: F.cross_entropy(_mlp(p, prob.x), prob.y))(prob.params)
    assert e > 1.5 * sum((v**2).sum() for v in batch.values())


# --------------------------------------------------------------------------- statistics


def _zscore(samples: Tensor, target: Tensor) -> Tensor:
    return (samples.mean(0) - target).abs() / (samples.std(0) / math.sqrt(samples.shape[0]))


@pytest.mark.parametrize(
    ("name", "reduction"),
    [("ce", "mean"), ("ce_seq", "mean"), ("mse", "mean"), ("bce", "mean"), ("ce_seq", "sum")],
)
def test_mc_fisher_is_unbiased_for_the_ggn(name: str, reduction: str) -> None:
    prob = make_problem(name)
    exact = fisher_diagonal(prob.model_fn, prob.loss, reduction=reduction)(prob.params, prob.x, prob.y)
    fn = fisher_diagonal(prob.model_fn, prob.loss, kind="mc", num_probes=2, reduction=reduction)
    draws = torch.stack(
        [
            _flat(fn(prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(s)))
            for s in range(200)
        ]
    )
    target = _flat(exact)
    assert _zscore(draws.sum(1, keepdim=True), target.sum()).item() < 4
    assert _zscore(draws, target).max().item() < 4.5  # every entry (≈30 of them)


def test_mc_stderr_is_calibrated() -> None:
    prob = make_problem("ce")
    exact = fisher_trace(prob.model_fn, "cross_entropy")(prob.params, prob.x, prob.y)
    fn = fisher_trace(prob.model_fn, "cross_entropy", kind="mc", num_probes=30, with_stderr=True)
    hits = 0
    for s in range(200):
        est, err = fn(prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(s))
        hits += int((est - exact).abs() <= 1.96 * err)
    assert 0.88 <= hits / 200 <= 0.99


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_hutchinson_is_unbiased_and_calibrated(kind: str) -> None:
    prob = make_problem("ce")
    exact = fisher_trace(prob.model_fn, "cross_entropy", kind=kind)(prob.params, prob.x, prob.y)
    fn = fisher_trace(prob.model_fn, "cross_entropy", kind=kind, num_probes=20, with_stderr=True)
    ests, hits = [], 0
    for s in range(200):
        est, err = fn(prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(s))
        ests.append(est)
        hits += int((est - exact).abs() <= 1.96 * err)
    assert _zscore(torch.stack(ests).unsqueeze(1), exact).item() < 4
    assert 0.88 <= hits / 200 <= 0.99


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_hutchinson_diagonal_is_unbiased(kind: str) -> None:
    prob = make_problem("bce")
    exact = _flat(fisher_diagonal(prob.model_fn, prob.loss, kind=kind)(prob.params, prob.x, prob.y))
    fn = fisher_diagonal(prob.model_fn, prob.loss, kind=kind, num_probes=5)
    draws = torch.stack(
        [
            _flat(fn(prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(s)))
            for s in range(200)
        ]
    )
    assert _zscore(draws, exact).max().item() < 4.5


def test_hutchinson_with_callable_indefinite_loss_is_unbiased() -> None:
    prob = make_problem("callable_nonconvex")
    exact = fisher_trace(prob.model_fn, _nonconvex)(prob.params, prob.x, prob.y)
    fn = fisher_trace(prob.model_fn, _nonconvex, num_probes=4)
    draws = torch.stack(
        [fn(prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(s)) for s in range(200)]
    )
    assert _zscore(draws.unsqueeze(1), exact).item() < 4


def test_mc_single_draw_has_nan_stderr() -> None:
    prob = make_problem("ce")
    est, err = fisher_trace(prob.model_fn, "cross_entropy", kind="mc", num_probes=1, with_stderr=True)(
        prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isnan(err)
    # the single draw is still an unbiased estimate of tr(G): its mean over seeds matches
    one = fisher_trace(prob.model_fn, "cross_entropy", kind="mc", num_probes=1)
    draws = torch.stack(
        [one(prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(s)) for s in range(300)]
    )
    assert draws[0] == est
    exact = fisher_trace(prob.model_fn, "cross_entropy")(prob.params, prob.x, prob.y)
    assert _zscore(draws.unsqueeze(1), exact).item() < 5
    d, e = fisher_diagonal(prob.model_fn, "cross_entropy", kind="mc", num_probes=1, with_stderr=True)(
        prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(0)
    )
    assert all(torch.isnan(v).all() for v in e.values())
    torch.testing.assert_close(_flat(d).sum(), est)


def test_fisher_operator_for_a_module() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    prob = make_problem("ce")
    params = {k: v.detach() for k, v in model.named_parameters()}
    op, _ = fisher_operator(model, "cross_entropy")(params, prob.x, prob.y)
    want = fisher_diagonal(model, "cross_entropy", path="generic")(params, prob.x, prob.y)
    torch.testing.assert_close(exact_diagonal(op), _flat(want), **tol(torch.float64))


def test_hutchinson_exact_for_orthogonal_jacobian() -> None:
    # z = X w with X = I and MSE(sum): G = 2 I, so Rademacher probes give the trace exactly.
    fn = fisher_trace(lambda w, x: x @ w, "mse", reduction="sum", num_probes=3, with_stderr=True)
    est, err = fn(
        torch.zeros(4, 1), torch.eye(4), torch.zeros(4, 1), generator=torch.Generator().manual_seed(0)
    )
    assert est.item() == 8.0 and err.item() == 0.0


def test_hutchinson_uses_estimator_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from secorder import estimators

    seen = {}

    def fake(op: Any, num_probes: int, **kw: Any) -> tuple[Tensor, Tensor]:
        seen["op"] = type(op).__name__
        return estimators.hutchinson_trace(op, num_probes, **kw)

    monkeypatch.setitem(estimators.TRACE_ESTIMATORS, "fake", fake)
    prob = make_problem("ce")
    fisher_trace(prob.model_fn, "cross_entropy", num_probes=2, method="fake")(prob.params, prob.x, prob.y)
    assert seen["op"] == "GGNOperator"
    fisher_trace(prob.model_fn, "cross_entropy", kind="empirical", num_probes=2, method="fake")(
        prob.params, prob.x, prob.y
    )
    assert seen["op"] == "EmpiricalFisherOperator"


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", ["ggn", "empirical", "mc"])
def test_trace_is_sum_of_diagonal_and_generator_reproducible(kind: str) -> None:
    prob = make_problem("ce_seq")
    probes = 3 if kind == "mc" else None
    t = fisher_trace(prob.model_fn, "cross_entropy", kind=kind, num_probes=probes)
    d = fisher_diagonal(prob.model_fn, "cross_entropy", kind=kind, num_probes=probes)
    gen = lambda: torch.Generator().manual_seed(5)
    torch.testing.assert_close(
        _flat(d(prob.params, prob.x, prob.y, generator=gen())).sum(),
        t(prob.params, prob.x, prob.y, generator=gen()),
    )
    assert torch.equal(
        t(prob.params, prob.x, prob.y, generator=gen()), t(prob.params, prob.x, prob.y, generator=gen())
    )


@pytest.mark.parametrize("kind", ["ggn", "empirical", "mc"])
def test_chunk_size_does_not_change_results(kind: str) -> None:
    prob = make_problem("ce")
    gen = lambda: torch.Generator().manual_seed(3)
    probes = 4 if kind == "mc" else None
    a = fisher_diagonal(prob.model_fn, "cross_entropy", kind=kind, num_probes=probes, chunk_size=1)
    b = fisher_diagonal(prob.model_fn, "cross_entropy", kind=kind, num_probes=probes)
    torch.testing.assert_close(
        _flat(a(prob.params, prob.x, prob.y, generator=gen())),
        _flat(b(prob.params, prob.x, prob.y, generator=gen())),
    )
    h1 = fisher_trace(prob.model_fn, "cross_entropy", num_probes=7, chunk_size=2)
    h2 = fisher_trace(prob.model_fn, "cross_entropy", num_probes=7)
    torch.testing.assert_close(
        h1(prob.params, prob.x, prob.y, generator=gen()), h2(prob.params, prob.x, prob.y, generator=gen())
    )


def test_dict_key_order_is_preserved_and_irrelevant() -> None:
    prob = make_problem("ce")
    shuffled = {k: prob.params[k] for k in ["w1", "b0", "b1", "w0"]}
    fn = fisher_diagonal(prob.model_fn, "cross_entropy")
    a, b = fn(prob.params, prob.x, prob.y), fn(shuffled, prob.x, prob.y)
    assert list(b) == list(shuffled)
    for k in prob.params:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_float32_agrees_with_float64(kind: str, dtype: torch.dtype) -> None:
    prob64, prob = make_problem("ce", torch.float64), make_problem("ce", dtype)
    fn = fisher_diagonal(prob.model_fn, "cross_entropy", kind=kind)
    got = fn(prob.params, prob.x, prob.y)
    assert all(v.dtype == dtype for v in got.values())
    want = fn(prob64.params, prob64.x, prob64.y)
    for k in want:
        torch.testing.assert_close(got[k], want[k].to(dtype), **tol(dtype))


def test_device_is_kept(device: torch.device) -> None:
    prob = make_problem("ce")
    params = {k: v.to(device) for k, v in prob.params.items()}
    out = fisher_diagonal(prob.model_fn, "cross_entropy", kind="mc", num_probes=2)(
        params, prob.x.to(device), prob.y.to(device), generator=torch.Generator(device).manual_seed(0)
    )
    assert all(v.device.type == device.type for v in out.values())


@pytest.mark.parametrize("loss", ["cross_entropy", "callable"])
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_vmap_over_ensemble_equals_loop(kind: str, loss: Any) -> None:
    loss = (lambda z, t: F.cross_entropy(z, t)) if loss == "callable" else loss
    prob = make_problem("ce")
    members = [_mlp_params([3, 4, 3], torch.float64, seed=s) for s in range(3)]
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    x, y = prob.x, prob.y
    for fn in (fisher_trace(_mlp, loss, kind=kind), fisher_diagonal(_mlp, loss, kind=kind)):
        loop = [fn(m, x, y) for m in members]
        batched = torch.func.vmap(fn, in_dims=(0, None, None))(stacked, x, y)  # last: path_info below
        if isinstance(batched, dict):
            for k in batched:
                torch.testing.assert_close(batched[k], torch.stack([lp[k] for lp in loop]))
        else:
            torch.testing.assert_close(batched, torch.stack(loop))
    assert fn.path_info.path == "generic"  # under vmap the structured sweep does not run


@pytest.mark.parametrize("kind", ["ggn", "empirical", "mc"])
def test_vmap_over_ensemble_randomized(kind: str) -> None:
    """Each member's estimate is unbiased for its own trace: |est − exact| < 5 stderr, per member.

    The members' exact traces lie many standard errors apart, so an estimate computed for
    the wrong member (or one shared by all) fails; E[mc] = E[Hutchinson GGN] = G, and the
    empirical Fisher is checked against its own exact trace.
    """
    members = [_mlp_params([3, 4, 3], torch.float64, seed=s) for s in range(3)]
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    prob = make_problem("ce")
    fn = fisher_trace(_mlp, "cross_entropy", kind=kind, num_probes=400, with_stderr=True)
    torch.manual_seed(0)  # under vmap the probes come from the global generator
    out, err = torch.func.vmap(fn, in_dims=(0, None, None), randomness="different")(stacked, prob.x, prob.y)
    exact_kind = "empirical" if kind == "empirical" else "ggn"
    exact = torch.stack(
        [fisher_trace(_mlp, "cross_entropy", kind=exact_kind)(m, prob.x, prob.y) for m in members]
    )
    assert out.shape == err.shape == (3,) and (err > 0).all()
    assert ((out - exact).abs() < 5 * err).all(), (out - exact) / err
    # no estimate is consistent with another member's trace: a mix-up of members would fail
    cross = (out[:, None] - exact[None, :]).abs() / err[:, None]
    assert (cross[~torch.eye(3, dtype=torch.bool)] > 5).all(), cross


def test_grad_of_exact_trace_matches_dense() -> None:
    prob = make_problem("ce")
    for kind in ("ggn", "empirical"):
        fn = fisher_trace(prob.model_fn, "cross_entropy", kind=kind)
        g = torch.func.grad(lambda p, fn=fn: fn(p, prob.x, prob.y))(prob.params)

        def dense_trace(theta: Tensor, kind: str = kind) -> Tensor:
            from secorder._pytree import unflatten, unravel

            leaves, spec = flatten(prob.params)
            p = unflatten(spec, unravel(theta, [leaf.shape for leaf in leaves]))
            sub = Problem("ce", prob.model_fn, p, prob.x, prob.y, prob.loss, prob.ref)
            return _dense_trace_differentiable(sub, kind)

        theta = _flat(prob.params).requires_grad_(True)
        (ref,) = torch.autograd.grad(dense_trace(theta), theta)
        torch.testing.assert_close(_flat(g), ref, **tol(torch.float64))


def _dense_trace_differentiable(prob: Problem, kind: str) -> Tensor:
    z = prob.model_fn(prob.params, prob.x)
    n = z.shape[0]
    if kind == "ggn":
        p = torch.softmax(z, 1)
        # tr(Jᵀ H J) = Σ_n tr(H_n J_n J_nᵀ) with J_n from jacrev (create_graph via torch.func)
        jac = torch.func.jacrev(lambda q: prob.model_fn(q, prob.x))(prob.params)
        jn = torch.cat([v.reshape(n, z.shape[1], -1) for v in flatten(jac)[0]], dim=2)
        h = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        return torch.einsum("nab,nap,nbp->", h, jn, jn) / n
    per = torch.func.vmap(
        torch.func.grad(lambda q, x, y: F.cross_entropy(prob.model_fn(q, x[None]), y[None])),
        in_dims=(None, 0, 0),
    )(prob.params, prob.x, prob.y)
    return sum((v**2).sum() for v in per.values()) / n


# --------------------------------------------------------------------------- errors


def _call(fn: Any, prob: Problem, y: Any = None) -> Any:
    return fn(prob.params, prob.x, prob.y if y is None else y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "hinge"}, "loss must be one of 'cross_entropy', 'mse', 'bce_with_logits'"),
        ({"loss": 3}, "loss must be one of"),
        ({"kind": "fisher"}, "kind must be one of 'ggn', 'empirical', 'mc'"),
        ({"kind": "mc", "loss": _nonconvex, "num_probes": 1}, 'kind="mc" samples targets'),
        ({"kind": "mc"}, "kind='mc' needs num_probes"),
        ({"reduction": "none"}, "reduction must be one of 'mean', 'sum'"),
        ({"num_probes": 0}, "num_probes must be None"),
        ({"chunk_size": 0}, "chunk_size must be None"),
        ({"method": "magic"}, "method must be one of"),
        ({"distribution": "cauchy"}, "distribution must be one of"),
        ({"path": "turbo"}, "path must be one of 'auto', 'generic', 'fast'"),
        ({"with_stderr": 1}, "with_stderr must be True or False"),
    ],
)
def test_construction_errors(kwargs: dict[str, Any], match: str) -> None:
    loss = kwargs.pop("loss", "cross_entropy")
    with pytest.raises((ValueError, TypeError), match=match):
        fisher_trace(_mlp, loss, **kwargs)


def test_model_fn_must_be_callable() -> None:
    with pytest.raises(TypeError, match=r"model_fn must be an nn\.Module or a callable"):
        fisher_diagonal(3, "mse")


def test_fisher_operator_num_samples() -> None:
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        fisher_operator(_mlp, "cross_entropy", kind="mc", num_samples=0)


def test_path_fast_with_hutchinson_is_refused() -> None:
    with pytest.raises(ValueError, match="path='fast' applies to the exact computations"):
        fisher_trace(nn.Linear(2, 2), "mse", num_probes=3, path="fast")


@pytest.mark.parametrize(
    ("name", "targets", "match"),
    [
        ("ce", lambda y: y.double(), "must be integer class indices"),
        ("ce", lambda y: y[:-1], r"must have shape \(N, d1, \.\.\.\) = \(5,\)"),
        ("ce", lambda y: y + 3, r"must lie in \[0, C\) = \[0, 3\)"),
        ("ce", lambda y: [1, 2], "must be a torch.Tensor"),
        ("ce_seq", lambda y: y[:, :2], r"\(5, 4\)"),
        ("mse", lambda y: y.reshape(5, 6), "must have the shape of the model outputs"),
        ("mse", lambda y: y[:3], r"batch size 3 vs 5"),
        ("mse", lambda y: y.long(), "must be floating point"),
        ("mse", lambda y: y.float(), "with the outputs' dtype torch.float64"),
        ("bce", lambda y: y * 3, r"must be probabilities in \[0, 1\]"),
        ("bce", lambda y: (y > 0.5).long(), "must be floating point"),
    ],
)
def test_target_errors(name: str, targets: Callable[[Tensor], Any], match: str) -> None:
    prob = make_problem(name)
    for kind in ("ggn", "empirical"):
        with pytest.raises((ValueError, TypeError), match=match):
            _call(fisher_trace(prob.model_fn, prob.loss, kind=kind), prob, targets(prob.y))


def test_cross_entropy_needs_class_dimension() -> None:
    prob = make_problem("ce")
    fn = fisher_trace(lambda p, x: _mlp(p, x)[:, 0], "cross_entropy")
    with pytest.raises(ValueError, match=r"logits\) of shape \(N, C\)"):
        _call(fn, prob)


def test_non_finite_outputs_name_the_samples() -> None:
    prob = make_problem("ce")
    x = prob.x.clone()
    x[2, 0] = float("nan")
    x[4, 1] = float("inf")
    # non-finite inputs are caught before the forward pass (secorder's NaN/Inf policy)
    with pytest.raises(ValueError, match=r"inputs must be finite.*in samples \[2, 4\]"):
        fisher_diagonal(lambda p, x: _mlp(p, x) + x.sum(1, keepdim=True), "cross_entropy")(
            prob.params, x, prob.y
        )


def test_model_must_return_floating_batched_outputs() -> None:
    prob = make_problem("ce")
    with pytest.raises(ValueError, match=r"floating tensor of shape \(N, \.\.\.\)"):
        _call(fisher_trace(lambda p, x: _mlp(p, x).sum(), "cross_entropy"), prob)


def test_forward_mode_failure_names_the_exact_method() -> None:
    class NoJvp(torch.autograd.Function):  # reverse mode and vmap, but no forward mode
        generate_vmap_rule = True

        @staticmethod
        def forward(x: Tensor) -> Tensor:
            return x.clone()

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            pass

        @staticmethod
        def backward(ctx: Any, g: Tensor) -> Tensor:
            return g

    prob = make_problem("ce")
    model = lambda p, x: NoJvp.apply(_mlp(p, x))
    with pytest.raises(RuntimeError, match=r"forward-mode derivatives are needed.*num_probes=None"):
        _call(fisher_trace(model, "cross_entropy", num_probes=2), prob)
    # exact: reverse mode only, and the same numbers as without the custom Function
    torch.testing.assert_close(
        _call(fisher_trace(model, "cross_entropy"), prob), _call(fisher_trace(_mlp, "cross_entropy"), prob)
    )


def test_callable_loss_target_errors() -> None:
    prob = make_problem("mse")
    with pytest.raises(ValueError, match="must have the batch size N=5 as its first dimension"):
        _call(fisher_trace(prob.model_fn, lambda z, y: F.mse_loss(z, y[0])), prob, prob.y[:1])

    def not_vmappable(z: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(z, y) * (1.0 if z.sum().item() > -1e9 else 2.0)

    with pytest.raises(ValueError, match=r"applicable to one sample at a time under torch\.func\.vmap"):
        _call(fisher_trace(prob.model_fn, not_vmappable), prob)


def test_model_must_return_a_tensor() -> None:
    prob = make_problem("ce")
    with pytest.raises(TypeError, match="model_fn must return a tensor"):
        _call(fisher_trace(lambda p, x: (_mlp(p, x),), "cross_entropy"), prob)


def test_callable_loss_reduction_mismatch() -> None:
    prob = make_problem("ce")
    with pytest.raises(ValueError, match=r"with reduction='mean' a callable loss must equal the mean"):
        _call(fisher_trace(prob.model_fn, _ce_sum), prob)
    with pytest.raises(ValueError, match=r"Pass reduction='mean'"):
        _call(fisher_trace(prob.model_fn, lambda z, y: F.cross_entropy(z, y), reduction="sum"), prob)


def test_callable_loss_coupling_samples_is_refused() -> None:
    prob = make_problem("mse")
    coupled = lambda z, y: ((z - z.mean(0)) ** 2).mean() + F.mse_loss(z, y)
    with pytest.raises(ValueError, match="must equal the mean of its per-sample values"):
        _call(fisher_trace(prob.model_fn, coupled, kind="empirical"), prob)


def test_callable_loss_must_return_scalar() -> None:
    prob = make_problem("mse")
    with pytest.raises(TypeError, match="must return a real floating scalar"):
        _call(fisher_trace(prob.model_fn, lambda z, y: (z - y) ** 2), prob)


def batch_reference(prob: Problem, reduction: str) -> dict[str, Tensor]:
    """G and E of the batch evaluation z = model_fn(θ, X), densely: J_n the rows of the whole
    batch's Jacobian, g_n = ∇_{z_n} l_n, E = c Σ_n (J_nᵀ g_n)(J_nᵀ g_n)ᵀ (no sample run alone)."""
    z_of, theta = flat_function(lambda p: prob.model_fn(p, prob.x), (prob.params,))
    z = z_of(theta)
    n = z.shape[0]
    jac = torch.autograd.functional.jacobian(z_of, theta).reshape(n, -1, theta.numel())
    hz = torch.autograd.functional.hessian(
        lambda zf: prob.ref(zf.reshape(z.shape), prob.y, reduction), z.reshape(-1)
    )
    jf = jac.reshape(-1, theta.numel())
    c = 1.0 / n if reduction == "mean" else 1.0
    per = []
    for i in range(n):
        g = torch.autograd.functional.jacobian(
            lambda zi, i=i: prob.ref(zi.reshape(1, *z.shape[1:]), prob.y[i : i + 1], reduction),
            z[i].reshape(-1),
        )
        per.append(jac[i].T @ g)
    per_t = torch.stack(per)
    return {"ggn": jf.T @ hz @ jf, "empirical": c * per_t.T @ per_t}


@pytest.mark.parametrize("coupling", ["data_mean", "output_mean"], ids=["data-centred", "theta-batch-mean"])
def test_coupled_plain_model_gets_the_batch_evaluation_quantities(coupling: str) -> None:
    """A model that couples samples: every quantity is that of the batch evaluation (J_n the rows
    of the whole batch's Jacobian), the same on the structured sweep (which accepts a θ-free
    coupling: the batch mean of the data is a constant) and the generic route (taken, with the
    sweep's refusal naming the op, when the coupling depends on θ), and by Hutchinson."""
    prob = make_problem("ce")
    if coupling == "data_mean":
        coupled = lambda p, x: _mlp(p, x - x.mean(0))
    else:
        coupled = lambda p, x: _mlp(p, x) - 0.5 * _mlp(p, x).mean(0)
    cprob = Problem("ce", coupled, prob.params, prob.x, prob.y, prob.loss, prob.ref)
    ref = batch_reference(cprob, "mean")
    args = (prob.params, prob.x, prob.y)
    for kind in ("ggn", "empirical"):
        fn = fisher_diagonal(coupled, "cross_entropy", kind=kind)
        torch.testing.assert_close(_flat(fn(*args)), ref[kind].diagonal())
        generic = fisher_diagonal(coupled, "cross_entropy", kind=kind, path="generic")
        torch.testing.assert_close(_flat(generic(*args)), ref[kind].diagonal())
        if coupling == "data_mean":
            assert fn.path_info.path == "fast", fn.path_info
        else:
            assert fn.path_info.path == "generic"
            assert "the structured sweep refused" in fn.path_info.reason, fn.path_info
            with pytest.raises(ValueError, match=r"path='fast' runs the structured sweep.*refused"):
                fisher_diagonal(coupled, "cross_entropy", kind=kind, path="fast")(*args)
        rows = fisher_diagonal(coupled, "cross_entropy", kind=kind, per_sample=True)(*args)
        torch.testing.assert_close(_flat({k: r.sum(0) for k, r in rows.items()}), ref[kind].diagonal())
    # the MC Fisher's expectation is the GGN: its mean over draws within 5 standard errors
    est, err = fisher_trace(coupled, "cross_entropy", kind="mc", num_probes=400, with_stderr=True)(
        *args, generator=torch.Generator().manual_seed(0)
    )
    assert abs(float(est - torch.trace(ref["ggn"]))) < 5 * float(err)
    for kind in ("ggn", "empirical"):
        est, err = fisher_trace(coupled, "cross_entropy", kind=kind, num_probes=2000, with_stderr=True)(
            *args, generator=torch.Generator().manual_seed(0)
        )
        exact = torch.trace(ref[kind])
        assert abs(float(est - exact)) < 5 * float(err), (kind, float(est), float(exact), float(err))


def test_bad_params_and_generator() -> None:
    prob = make_problem("ce")
    fn = fisher_trace(prob.model_fn, "cross_entropy", num_probes=2)
    with pytest.raises(TypeError, match="real floating-point"):
        fn({k: v.long() for k, v in prob.params.items()}, prob.x, prob.y)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        fn(prob.params, prob.x, prob.y, generator=0)


def test_public_exports() -> None:
    assert secorder.fisher_trace is fisher_trace and secorder.fisher_diagonal is fisher_diagonal
    assert "fisher_operator" in secorder.__all__


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_per_block_traces(kind: str) -> None:
    """Exact: the per-leaf sums of the exact diagonal. Randomized: the block estimator on one set
    of probes, whose blocks sum to the total estimate from the same generator state, and whose
    mean over 200 seeds lies within 4 standard errors of the exact blocks."""
    prob = make_problem("ce")
    p, x, y = prob.params, prob.x, prob.y
    diag = fisher_diagonal(prob.model_fn, prob.loss, kind=kind)(p, x, y)
    blocks = fisher_trace(prob.model_fn, prob.loss, kind=kind, per_block=True)(p, x, y)
    assert list(blocks) == list(p)
    for k in p:
        torch.testing.assert_close(blocks[k], diag[k].sum())
    est_fn = fisher_trace(prob.model_fn, prob.loss, kind=kind, num_probes=4, per_block=True, with_stderr=True)
    total_fn = fisher_trace(prob.model_fn, prob.loss, kind=kind, num_probes=4)
    samples = []
    for seed in range(200):
        b, err = est_fn(p, x, y, generator=torch.Generator().manual_seed(seed))
        if seed == 0:
            total = total_fn(p, x, y, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(sum(b.values()), total)
            assert all(float(e) >= 0 for e in err.values())
        samples.append(torch.stack([b[k] for k in p]))
    stack = torch.stack(samples)
    exact = torch.stack([blocks[k] for k in p])
    se = stack.std(0) / math.sqrt(len(samples))
    assert bool(((stack.mean(0) - exact).abs() <= 4 * se + 1e-12).all())


def test_per_block_traces_of_the_mc_fisher() -> None:
    prob = make_problem("ce")
    p, x, y = prob.params, prob.x, prob.y
    gen = lambda: torch.Generator().manual_seed(7)
    diag = fisher_diagonal(prob.model_fn, prob.loss, kind="mc", num_probes=3)(p, x, y, generator=gen())
    blocks = fisher_trace(prob.model_fn, prob.loss, kind="mc", num_probes=3, per_block=True)(
        p, x, y, generator=gen()
    )
    for k in p:
        torch.testing.assert_close(blocks[k], diag[k].sum())
    with pytest.raises(ValueError, match=r"per_block=True with with_stderr=True is available for kind='ggn'"):
        fisher_trace(prob.model_fn, prob.loss, kind="mc", num_probes=3, per_block=True, with_stderr=True)


def test_batch_size_dependent_model_works_on_every_route() -> None:
    """A model tied to its batch size (it only runs on batches of n): nothing evaluates a
    sub-batch or a sample alone, so every route runs and matches the dense references."""
    prob = make_problem("ce")
    n = prob.x.shape[0]
    tied = lambda p, x: _mlp(p, x.reshape(n, -1))  # only runs on batches of n
    ref = dense_reference(prob, "mean")
    for kind in ("ggn", "empirical"):
        for path in ("auto", "generic"):
            fn = fisher_diagonal(tied, "cross_entropy", kind=kind, path=path)
            torch.testing.assert_close(_flat(fn(prob.params, prob.x, prob.y)), ref[kind].diagonal())
            assert fn.path_info.path == ("fast" if path == "auto" else "generic"), fn.path_info
    est, err = fisher_trace(tied, "cross_entropy", num_probes=2000, with_stderr=True)(
        prob.params, prob.x, prob.y, generator=torch.Generator().manual_seed(0)
    )
    assert abs(float(est - torch.trace(ref["ggn"]))) < 5 * float(err)

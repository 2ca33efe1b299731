"""Per-sample curvature (``per_sample=True``) from the structured sweep.

Each model is checked two ways: the rows sum to the batch quantity, and row n equals the
quantity of sample n's term f_n alone (f = Σ_n f_n; for a mean f_n = l_n / N) against dense
float64 references — ``secorder.testing.dense_hessian`` for the Hessian diagonal, Jₙᵀ ∇²ℓ Jₙ
from ``torch.func.jacrev`` / ``torch.func.hessian`` for the GGN, ∇lₙ^⊙2 for the empirical
Fisher. Every refusal is matched by its message.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call

import secorder
from secorder._pytree import flatten, unflatten, unravel
from secorder.testing import dense_hessian

DT = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-12}


class Residual(nn.Module):
    """x → a = Wx; a + tanh(V LayerNorm(a)) → head (a model BackPACK refuses)."""

    def __init__(self, d_in: int = 5, d: int = 6, c: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.norm = nn.LayerNorm(d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, x: Tensor) -> Tensor:
        a = self.inp(x)
        return self.head(a + torch.tanh(self.mid(self.norm(a))))


class Block(nn.Module):
    """A transformer-like block on (N, T, d): pre-LayerNorm single-head attention (no biases),
    a residual, an MLP, mean over tokens, a linear head."""

    def __init__(self, d: int = 4, c: int = 3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 5, bias=False), nn.GELU(), nn.Linear(5, d, bias=False))
        self.head = nn.Linear(d, c, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(h.shape[-1]), dim=-1)
        x = x + att @ self.v(h)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise((5, 6, 6, 3)):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 3),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (5,)),
    "cnn": (_cnn, (2, 8, 8)),
    "residual_layernorm": (Residual, (5,)),
    "transformer_block": (Block, (3, 4)),
}


def _problem(name: str, n: int = 4, seed: int = 0) -> tuple[nn.Module, dict[str, Tensor], Tensor, Tensor]:
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    return model, params, torch.randn(n, *shape, dtype=DT), torch.randint(0, 3, (n,))


def _to_tree(flat: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    leaves, spec = flatten(params)  # dense_hessian's flat order
    return unflatten(spec, unravel(flat, [leaf.shape for leaf in leaves]))  # type: ignore[no-any-return]


def _dense_ggn_diag(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """diag Jᵀ ∇²_z ℓ J of one sample (x, y: one row each), ℓ = cross-entropy, dense float64."""
    z = functional_call(model, params, (x,))[0]
    jac = torch.func.jacrev(lambda p: functional_call(model, p, (x,))[0])(params)  # (C, *shape) per leaf
    h = torch.func.hessian(lambda zz: F.cross_entropy(zz[None], y))(z)  # (C, C)
    return {k: torch.einsum("a...,ab,b...->...", j, h, j) for k, j in jac.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_diagonal_rows(name: str) -> None:
    model, params, x, y = _problem(name)
    n = x.shape[0]

    def f(p: dict[str, Tensor], xx: Tensor, yy: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xx,)), yy)

    fn = secorder.hessian_diagonal(f, per_sample=True)
    rows = fn(params, x, y)
    assert fn.method_info.method == "sweep", fn.method_info
    batch = secorder.hessian_diagonal(f, exact="hvp")(params, x, y)
    for k in params:
        assert rows[k].shape == (n, *params[k].shape)
        torch.testing.assert_close(rows[k].sum(0), batch[k], **TOL)
    for i in range(n):  # f = mean_n l_n: row n is diag ∇² l_n / N
        ref = _to_tree(
            dense_hessian(lambda p, i=i: f(p, x[i : i + 1], y[i : i + 1]) / n, params).diagonal(), params
        )
        for k in params:
            torch.testing.assert_close(rows[k][i], ref[k], **TOL)
    traces = secorder.hessian_trace(f, per_sample=True)(params, x, y)
    torch.testing.assert_close(
        traces, torch.stack([sum(r[i].sum() for r in rows.values()) for i in range(n)])
    )
    blocks = secorder.hessian_trace(f, per_sample=True, per_block=True)(params, x, y)
    for k in params:
        torch.testing.assert_close(blocks[k], rows[k].flatten(1).sum(1))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_fisher_rows(name: str, kind: str) -> None:
    model, params, x, y = _problem(name, seed=1)
    n = x.shape[0]
    model_fn = lambda p, xx: functional_call(model, p, (xx,))
    for target in (model_fn, model):  # a plain model_fn and the nn.Module itself
        fn = secorder.fisher_diagonal(target, "cross_entropy", kind=kind, per_sample=True)
        rows = fn(params, x, y)
        batch = secorder.fisher_diagonal(target, "cross_entropy", kind=kind, path="generic")(params, x, y)
        for k in params:
            assert rows[k].shape == (n, *params[k].shape)
            torch.testing.assert_close(rows[k].sum(0), batch[k], **TOL)
    for i in range(n):
        xi, yi = x[i : i + 1], y[i : i + 1]
        if kind == "ggn":
            ref = _dense_ggn_diag(model, params, xi, yi)
        else:
            grad = torch.func.grad(lambda p, xi=xi, yi=yi: F.cross_entropy(model_fn(p, xi), yi))(params)
            ref = {k: g * g for k, g in grad.items()}
        for k in params:
            torch.testing.assert_close(rows[k][i], ref[k] / n, **TOL)
    traces = secorder.fisher_trace(model, "cross_entropy", kind=kind, per_sample=True)(params, x, y)
    torch.testing.assert_close(
        traces, torch.stack([sum(r[i].sum() for r in rows.values()) for i in range(n)])
    )
    blocks = secorder.fisher_trace(model, "cross_entropy", kind=kind, per_sample=True, per_block=True)(
        params, x, y
    )
    for k in params:
        torch.testing.assert_close(blocks[k], rows[k].flatten(1).sum(1))


def test_scaling_follows_the_function() -> None:
    """Rows are diag ∇² f_n of f = Σ f_n: a sum has rows l_n, a sample-weighted mean w_n l_n / Σw."""
    model, params, x, y = _problem("mlp", n=5, seed=2)
    w = torch.rand(5, dtype=DT) + 0.5

    def per(p: dict[str, Tensor], xx: Tensor, yy: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xx,)), yy, reduction="none")

    weighted = lambda p, xx, yy, ww: (ww / ww.sum() * per(p, xx, yy)).sum()
    summed = lambda p, xx, yy: per(p, xx, yy).sum()
    rows_w = secorder.hessian_diagonal(weighted, per_sample=True)(params, x, y, w)
    rows_s = secorder.hessian_diagonal(summed, per_sample=True)(params, x, y)
    for i in range(5):
        xi, yi = x[i : i + 1], y[i : i + 1]
        ref = _to_tree(dense_hessian(lambda p, xi=xi, yi=yi: per(p, xi, yi).sum(), params).diagonal(), params)
        for k in params:
            torch.testing.assert_close(rows_s[k][i], ref[k], **TOL)
            torch.testing.assert_close(rows_w[k][i], ref[k] * w[i] / w.sum(), **TOL)
    rows_f = secorder.fisher_diagonal(model, "cross_entropy", reduction="sum", per_sample=True)(params, x, y)
    for i in range(5):
        ref = _dense_ggn_diag(model, params, x[i : i + 1], y[i : i + 1])
        for k in params:
            torch.testing.assert_close(rows_f[k][i], ref[k], **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_dtype_kept_and_rows_sum(dtype: torch.dtype) -> None:
    model, params, x, y = _problem("cnn", seed=3)
    params = {k: v.to(dtype) for k, v in params.items()}
    model = model.to(dtype)
    x = x.to(dtype)
    f = lambda p, xx, yy: F.cross_entropy(functional_call(model, p, (xx,)), yy)
    rows = secorder.hessian_diagonal(f, per_sample=True)(params, x, y)
    batch = secorder.hessian_diagonal(f)(params, x, y)
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else TOL
    for k in params:
        assert rows[k].dtype == dtype
        torch.testing.assert_close(rows[k].sum(0), batch[k], **tol)
    d, err = secorder.fisher_diagonal(model, "cross_entropy", per_sample=True, with_stderr=True)(params, x, y)
    assert all(err[k].shape == d[k].shape and not err[k].any() for k in d)


# ---- refusals ------------------------------------------------------------------------------


def _mlp_f() -> tuple[Callable[..., Tensor], dict[str, Tensor], Tensor, Tensor]:
    model, params, x, y = _problem("mlp")
    return (lambda p, xx, yy: F.cross_entropy(functional_call(model, p, (xx,)), yy)), params, x, y


def test_parameter_only_curvature_refused() -> None:
    f, params, x, y = _mlp_f()
    reg = lambda p, xx, yy: f(p, xx, yy) + 0.1 * sum((v**2).sum() for v in p.values())
    with pytest.raises(
        ValueError, match=r"per_sample=True needs the structured sweep.*curvature in the parameters alone"
    ):
        secorder.hessian_diagonal(reg, per_sample=True)(params, x, y)
    with pytest.raises(ValueError, match=r"curvature in the parameters alone"):
        secorder.hessian_trace(reg, per_sample=True)(params, x, y)
    # a term linear in θ has no curvature: accepted, rows unchanged
    lin = lambda p, xx, yy: f(p, xx, yy) + 0.1 * sum(v.sum() for v in p.values())
    a = secorder.hessian_diagonal(lin, per_sample=True)(params, x, y)
    b = secorder.hessian_diagonal(f, per_sample=True)(params, x, y)
    for k in params:
        torch.testing.assert_close(a[k], b[k], **TOL)


def test_mixing_samples_refused() -> None:
    model, params, x, y = _problem("mlp")

    def centered(p: dict[str, Tensor], xx: Tensor, yy: Tensor) -> Tensor:
        z = functional_call(model, p, (xx,))
        return F.cross_entropy(z - z.mean(0), yy)  # the batch mean couples the samples

    with pytest.raises(
        ValueError, match=r"per_sample=True needs the structured sweep.*structured sweep refused"
    ):
        secorder.hessian_diagonal(centered, per_sample=True)(params, x, y)


def test_options_refused_at_construction() -> None:
    f, *_ = _mlp_f()
    with pytest.raises(ValueError, match=r"per_sample=True is exact.*num_probes=3"):
        secorder.hessian_diagonal(f, per_sample=True, num_probes=3)
    with pytest.raises(ValueError, match=r"per_sample=True is exact.*exact='hvp'"):
        secorder.hessian_trace(f, per_sample=True, exact="hvp")
    with pytest.raises(TypeError, match="per_sample"):
        secorder.hessian_diagonal(f, per_sample="yes")
    model = _mlp().to(DT)
    with pytest.raises(ValueError, match=r"per_sample=True is exact.*kind='mc'"):
        secorder.fisher_diagonal(model, "cross_entropy", kind="mc", num_probes=2, per_sample=True)
    with pytest.raises(ValueError, match=r"per_sample=True is exact.*num_probes=4"):
        secorder.fisher_trace(model, "cross_entropy", num_probes=4, per_sample=True)


def test_transforms_and_grad_hessian_refuses_fisher_goes_generic() -> None:
    f, params, x, y = _mlp_f()
    fn = secorder.hessian_diagonal(f, per_sample=True)
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}
    with pytest.raises(
        RuntimeError, match=r"per_sample=True needs the structured sweep.*torch.func transform"
    ):
        torch.func.vmap(fn, in_dims=(0, None, None))(stacked, x, y)
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    with pytest.raises(ValueError, match=r"per_sample=True returns values without a gradient.*torch.no_grad"):
        fn(live, x, y)
    with torch.no_grad():  # the fix the message names
        rows = fn(live, x, y)
    assert rows["0.weight"].shape[0] == x.shape[0]
    model = _mlp().to(DT)
    fd = secorder.fisher_diagonal(model, "cross_entropy", per_sample=True)
    with torch.no_grad():
        want = fd(dict(model.named_parameters()), x, y)
    assert fd.path_info.path == "fast"
    # the Fisher's generic route (vector-Jacobian products of the whole batch) gives the same rows
    # where the sweep cannot run: with parameters that require grad (rows carry the gradient) ...
    rows = fd(dict(model.named_parameters()), x, y)
    assert fd.path_info.path == "generic" and "require grad" in fd.path_info.reason
    assert rows["0.weight"].requires_grad
    for k in want:
        torch.testing.assert_close(rows[k].detach(), want[k], **TOL)
    # ... and under torch.func transforms
    stacked = {k: torch.stack([v.detach()] * 2) for k, v in model.named_parameters()}
    batched = torch.func.vmap(fd, in_dims=(0, None, None))(stacked, x, y)
    assert fd.path_info.path == "generic" and "torch.func transform" in fd.path_info.reason
    for k in want:
        torch.testing.assert_close(batched[k], torch.stack([want[k]] * 2), **TOL)


def test_fisher_unbatched_inputs_take_the_generic_route() -> None:
    model = _mlp().to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))
    model_fn = lambda p, inp: functional_call(model, p, (inp["x"],))
    fn = secorder.fisher_diagonal(model_fn, "cross_entropy", per_sample=True)
    rows = fn(params, {"x": x}, y)
    assert fn.path_info.path == "generic" and "batched along dimension 0" in fn.path_info.reason
    want = secorder.fisher_diagonal(model, "cross_entropy", per_sample=True)(params, x, y)
    for k in want:
        torch.testing.assert_close(rows[k], want[k], **TOL)


def test_select_with_per_sample() -> None:
    """``select=`` composes: rows only for the selected leaves, equal to the full rows there."""
    f, params, x, y = _mlp_f()
    full = secorder.hessian_diagonal(f, per_sample=True)(params, x, y)
    part = secorder.hessian_diagonal(f, per_sample=True, select="2.*")(params, x, y)
    assert set(part) == {"2.weight", "2.bias"}
    for k in part:
        torch.testing.assert_close(part[k], full[k], **TOL)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_fisher_generic_rows_equal_the_sweep_in_any_chunking(chunk_size: int | None) -> None:
    """The generic route's (sample, column) pairs chunked any way give the sweep's rows, and the
    aggregate diagonal with the same chunking their sum."""
    model = _mlp().to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(5, 5, dtype=DT), torch.randint(0, 3, (5,))
    for kind in ("ggn", "empirical"):
        want = secorder.fisher_diagonal(model, "cross_entropy", kind=kind, per_sample=True)(params, x, y)
        fn = secorder.fisher_diagonal(
            model, "cross_entropy", kind=kind, per_sample=True, path="generic", chunk_size=chunk_size
        )
        rows = fn(params, x, y)
        total = secorder.fisher_diagonal(
            model, "cross_entropy", kind=kind, path="generic", chunk_size=chunk_size
        )(params, x, y)
        for k in want:
            torch.testing.assert_close(rows[k], want[k], **TOL)
            torch.testing.assert_close(total[k], want[k].sum(0), **TOL)

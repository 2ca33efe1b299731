"""The structured sweep (module_hessian_diagonal) against dense float64 Hessians, each rule."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import secorder
from secorder.testing import dense_hessian

LOSS_FNS: dict[str, Callable[..., Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}


class Residual(nn.Module):
    """Residual adds, GELU, softplus, tanh: branches that sum per column."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.b1 = nn.Linear(5, 5)
        self.b2 = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = h + F.softplus(self.b1(h), beta=2.0)
        h = h + F.gelu(self.b2(h), approximate="tanh")
        return self.out(F.gelu(h))


class Sequence(nn.Module):
    """A Linear over sequence positions (weight shared across positions), SiLU, mean-pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, T, 3)
        h = F.silu(self.proj(x))
        h = torch.sigmoid(self.mix(h)) + h
        return self.head(h.mean(1))


def _conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 3, padding=1),
        nn.ELU(),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3))


def _bn_eval() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False), nn.Softplus(), nn.Linear(5, 3))
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "tanh_mlp": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), (4,)),
    "residual": (Residual, (4,)),
    "relu_kinks": (_relu_mlp, (4,)),
    "conv2d": (_conv, (2, 4, 4)),
    "sequence": (Sequence, (5, 3)),
    "bn_eval": (_bn_eval, (4,)),
}


def _problem(name: str, loss: str, dtype: torch.dtype, n: int = 6, seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    make, shape = MODELS[name]
    model = make().to(dtype)
    x = torch.randn(n, *shape, dtype=dtype)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (n,))
    elif loss == "mse":
        y = torch.randn(n, 3, dtype=dtype)
    else:
        y = torch.rand(n, 3, dtype=dtype)
    params = {k: p.detach() for k, p in model.named_parameters()}
    return model, params, x, y


def _dense_diag(model: nn.Module, loss: str, params: dict, x: Tensor, y: Tensor, reduction: str = "mean"):  # type: ignore[no-untyped-def]
    f, _ = secorder.module_loss(model, lambda z, t: LOSS_FNS[loss](z, t, reduction=reduction))
    h = dense_hessian(f, params, x, y)
    diag = torch.diagonal(h)
    out, pos = {}, 0
    for k in sorted(params):  # flat order: sorted dict keys
        out[k] = diag[pos : pos + params[k].numel()].reshape(params[k].shape)
        pos += params[k].numel()
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("loss", list(LOSS_FNS))
def test_sweep_matches_dense_hessian(name: str, loss: str) -> None:
    model, params, x, y = _problem(name, loss, torch.float64)
    fn = secorder.module_hessian_diagonal(model, loss, method="sweep")
    got = fn(params, x, y)
    ref = _dense_diag(model, loss, params, x, y)
    assert list(got) == list(params)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11)
    assert fn.method_info.method == "sweep"
    assert fn.method_info.num_params == sum(p.numel() for p in params.values())


def test_activation_terms_matter() -> None:
    """The tanh model's Hessian diagonal differs from its GGN diagonal: the activation columns count."""
    model, params, x, y = _problem("tanh_mlp", "cross_entropy", torch.float64)
    got = secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep")(params, x, y)
    ggn = secorder.fisher_diagonal(model, "cross_entropy")(params, x, y)
    assert not torch.allclose(got["0.weight"], ggn["0.weight"], rtol=1e-3)
    torch.testing.assert_close(got["2.weight"], ggn["2.weight"])  # no curvature after the last layer


def test_sum_reduction_trace_and_float32(dtype: torch.dtype) -> None:
    model, params, x, y = _problem("residual", "cross_entropy", dtype)
    ref = _dense_diag(model.double(), "cross_entropy", {k: v.double() for k, v in params.items()},
                      x.double(), y, reduction="sum")  # fmt: skip
    model = model.to(dtype)
    got = secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep", reduction="sum")(
        params, x, y
    )
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    for k in params:
        assert got[k].dtype == dtype
        torch.testing.assert_close(got[k].double(), ref[k], **tol)
    tr_fn = secorder.module_hessian_trace(model, "cross_entropy", method="sweep", reduction="sum")
    trace = tr_fn(params, x, y)
    torch.testing.assert_close(trace.double(), sum(r.sum() for r in ref.values()), **tol)
    assert tr_fn.method_info.method == "sweep"


def test_model_not_mutated() -> None:
    model, params, x, y = _problem("bn_eval", "mse", torch.float64)
    before = copy.deepcopy(model.state_dict())
    secorder.module_hessian_diagonal(model, "mse")(params, x, y)
    assert not model.training
    assert not model._forward_hooks and not model[0]._forward_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(not p.grad_fn for p in model.parameters())


def test_train_batchnorm_refused() -> None:
    """The sweep and curvature propagation refuse coupled samples naming the module; "auto"
    takes one-hot HVPs of the batch loss, exact for train-mode BatchNorm."""
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    for method in ("sweep", "curvature_propagation"):
        k = 3 if method == "curvature_propagation" else None
        with pytest.raises(secorder.SecorderError, match=r"BatchNorm1d at '1'.*model\.eval\(\)"):
            secorder.module_hessian_diagonal(model, "cross_entropy", method=method, num_probes=k)(
                params, x, y
            )
    fn = secorder.module_hessian_diagonal(model, "cross_entropy")
    got = fn(params, x, y)
    assert fn.method_info.method == "hvp" and "BatchNorm1d at '1'" in fn.method_info.reason
    ref = _dense_diag(model, "cross_entropy", params, x, y)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11)
    with pytest.raises(secorder.SecorderError, match=r"BatchNorm1d at '1'"):  # HVPs ruled out
        secorder.module_hessian_diagonal(model, "cross_entropy", max_hvp_params=1)(params, x, y)
    assert model.training


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(3, 3)
        self.k = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 3)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
        return self.head((a @ x).mean(1))


@pytest.mark.parametrize(
    ("make", "refused"),
    [
        (Attention, None),
        (lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2)), None),
        (lambda: nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).eval(), None),
    ],
)
def test_models_beyond_linear_layers(make: Callable[[], nn.Module], refused: str | None) -> None:
    """Attention and LayerNorm run on the sweep; a model the engine refuses raises naming the op
    for method="sweep", and "auto" takes one-hot HVPs with that reason."""
    torch.manual_seed(0)
    model = make().double()
    x = (
        torch.randn(4, 5, 3, dtype=torch.float64)
        if isinstance(model, Attention)
        else torch.randn(4, 4).double()
    )
    y = torch.randint(0, 2, (4,))
    params = {k: p.detach() for k, p in model.named_parameters()}
    ref = _dense_diag(model, "cross_entropy", params, x, y)
    for method in ("sweep", "auto"):
        fn = secorder.module_hessian_diagonal(model, "cross_entropy", method=method)
        if refused is not None and method == "sweep":
            with pytest.raises(secorder.SecorderError, match=f"method='sweep'.*{refused}.*method='hvp'"):
                fn(params, x, y)
            continue
        got = fn(params, x, y)
        info = fn.method_info
        if refused is None:
            assert info.method == "sweep" and "structured sweep" in info.reason
        else:
            assert info.method == "hvp" and refused in info.reason
        for k in params:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11)


def test_tied_weight() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(torch.tanh(self.a(x)))

    model = Tied().double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    ref = _dense_diag(model, "cross_entropy", params, x, y)
    # the second call's addmm(b, h(W), Wᵀ): closed-form cross columns, W's part through the
    # per-leaf fallback; the auto route (sweep or one-hot HVPs by cost) must agree
    for method in ("sweep", "auto"):
        fn = secorder.module_hessian_diagonal(model, "cross_entropy", method=method)
        got = fn(params, x, y)
        assert method == "auto" or fn.method_info.method == "sweep"
        for k in params:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11)


def test_option_errors() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(secorder.SecorderError, match="method must be one of"):
        secorder.module_hessian_diagonal(model, "cross_entropy", method="exact!")
    with pytest.raises(secorder.SecorderError, match="needs num_probes"):
        secorder.module_hessian_diagonal(model, "cross_entropy", method="curvature_propagation")
    with pytest.raises(secorder.SecorderError, match="only used by method='curvature_propagation'"):
        secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep", num_probes=3)
    with pytest.raises(TypeError, match="built-in loss"):
        secorder.module_hessian_diagonal(model, F.cross_entropy)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        secorder.module_hessian_diagonal(lambda p: p, "mse")  # type: ignore[arg-type]


def test_curvature_propagation_unbiased_and_calibrated() -> None:
    """Mean over 200 seeds within 4 stderr of the exact diagonal; 95% intervals cover ~95%."""
    model, params, x, y = _problem("residual", "cross_entropy", torch.float64, n=3)
    exact = secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep")(params, x, y)
    exact_flat = torch.cat([exact[k].reshape(-1) for k in sorted(exact)])
    fn = secorder.module_hessian_diagonal(
        model, "cross_entropy", method="curvature_propagation", num_probes=16, with_stderr=True
    )
    tr_fn = secorder.module_hessian_trace(
        model, "cross_entropy", method="curvature_propagation", num_probes=16, with_stderr=True
    )
    exact_trace = exact_flat.sum()
    seeds = 200
    ests, covered, traces, tr_covered = [], [], [], []
    for seed in range(seeds):
        est, err = fn(params, x, y, generator=torch.Generator().manual_seed(seed))
        tr, tr_err = tr_fn(params, x, y, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(tr, sum(v.sum() for v in est.values()))  # same probes
        traces.append(tr)
        tr_covered.append(float((tr - exact_trace).abs() <= 1.96 * tr_err))
        e = torch.cat([est[k].reshape(-1) for k in sorted(est)])
        s = torch.cat([err[k].reshape(-1) for k in sorted(err)])
        ests.append(e)
        nz = s > 0
        covered.append(((e - exact_flat).abs()[nz] <= 1.96 * s[nz]).double().mean())
    assert fn.method_info.method == "curvature_propagation"
    stack = torch.stack(ests)
    mean, se = stack.mean(0), stack.std(0) / math.sqrt(seeds)
    assert bool(((mean - exact_flat).abs() <= 4 * se + 1e-12).all())
    coverage = float(torch.stack(covered).mean())
    # t with 15 degrees of freedom at 1.96 covers about 93%; binomial noise over 200 seeds ~1.5%
    assert 0.88 <= coverage <= 0.98, coverage
    tr_stack = torch.stack(traces)
    assert float((tr_stack.mean() - exact_trace).abs()) <= 4 * float(tr_stack.std()) / math.sqrt(seeds)
    assert 0.88 <= sum(tr_covered) / seeds <= 0.99
    # same generator state => identical results
    a, _ = fn(params, x, y, generator=torch.Generator().manual_seed(7))
    b, _ = fn(params, x, y, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_cost_model_prefers_hvps_when_columns_exceed_params() -> None:
    """R = 36 MSE columns per sample against P = 10 parameters: auto takes one-hot HVPs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Flatten()).double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    x, y = torch.randn(3, 1, 6, 6, dtype=torch.float64), torch.randn(3, 36, dtype=torch.float64)
    fn = secorder.module_hessian_diagonal(model, "mse")
    got = fn(params, x, y)
    assert fn.method_info.method == "hvp"
    assert "36 products (R=36 columns per sample" in fn.method_info.reason
    assert "exceeds P=10 one-hot HVPs" in fn.method_info.reason
    forced = secorder.module_hessian_diagonal(model, "mse", method="sweep")
    swept = forced(params, x, y)
    assert forced.method_info.num_columns == 36
    ref = _dense_diag(model, "mse", params, x, y)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(swept[k], ref[k], rtol=1e-9, atol=1e-11)

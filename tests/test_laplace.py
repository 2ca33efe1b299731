"""secorder.laplace: laplace-torch backends equal laplace-torch's own backends and dense references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("laplace", reason="laplace-torch is an optional extra (secorder[laplace])")

from laplace import Laplace
from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian

import secorder
from secorder.laplace import (
    NegativeCurvatureWarning,
    SecorderEF,
    SecorderGGN,
    SecorderHessian,
)
from secorder.testing import dense_hessian

# BackPACK's hooks warn that no input requires grad; it is theirs and harmless.
BACKPACK_WARNING = "ignore:Full backward hook is firing:UserWarning"
pytestmark = pytest.mark.filterwarnings(BACKPACK_WARNING)


def mlp(out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, out)).double()


class ResidualLN(nn.Module):
    """A residual block with LayerNorm: BackPACK refuses it (no extension for LayerNorm, a branch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.block(h))


def data(likelihood: str, n: int = 40, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = (
        torch.randint(0, 3, (n,), generator=g)
        if likelihood == "classification"
        else torch.randn(n, 3, generator=g).double()
    )
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def fit(
    model: nn.Module, likelihood: str, backend: type, structure: str = "diag", weights: str = "all", **kw
):
    la = Laplace(
        model, likelihood, subset_of_weights=weights, hessian_structure=structure, backend=backend, **kw
    )
    la.fit(data(likelihood))
    return la


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(SecorderGGN, BackPackGGN), (SecorderGGN, CurvlinopsGGN), (SecorderEF, BackPackEF)],
    ids=["ggn-backpack", "ggn-curvlinops", "ef-backpack"],
)
def test_diag_fit_equals_laplace_backends(likelihood: str, ours: type, theirs: type) -> None:
    a, b = fit(mlp(), likelihood, ours), fit(mlp(), likelihood, theirs)
    assert close(a.H, b.H) and close(torch.as_tensor(a.loss), torch.as_tensor(b.loss))
    assert a.H.abs().max() > 0.1  # not a trivially zero curvature
    x = torch.randn(7, 5, dtype=torch.float64)
    if likelihood == "classification":  # the GLM predictive with the probit link
        assert close(a(x, pred_type="glm", link_approx="probit"), b(x, pred_type="glm", link_approx="probit"))
    else:  # the GLM predictive: mean and variance
        ma, va = a(x, pred_type="glm")
        mb, vb = b(x, pred_type="glm")
        assert close(ma, mb) and close(va, vb)


def test_diag_fit_residual_layernorm_equals_curvlinops() -> None:
    """BackPACK refuses this model; laplace-torch's curvlinops backend falls back to the full Jacobian."""
    with pytest.raises(Exception):  # noqa: B017 - whatever BackPACK raises
        fit(ResidualLN().double(), "classification", BackPackGGN)
    a, b = (
        fit(ResidualLN().double(), "classification", SecorderGGN),
        fit(ResidualLN().double(), "classification", CurvlinopsGGN),
    )
    assert close(a.H, b.H)
    x = torch.randn(7, 5, dtype=torch.float64)
    assert close(a(x, pred_type="glm"), b(x, pred_type="glm"))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(SecorderGGN, BackPackGGN), (SecorderEF, BackPackEF), (SecorderHessian, CurvlinopsHessian)],
    ids=["ggn", "ef", "hessian"],
)
def test_full_fit_equals_laplace_backends(likelihood: str, ours: type, theirs: type) -> None:
    a, b = fit(mlp(), likelihood, ours, "full"), fit(mlp(), likelihood, theirs, "full")
    # curvlinops forms its dense matrix with float32 basis vectors
    tol = {"rtol": 1e-5, "atol": 1e-6} if theirs is CurvlinopsHessian else {"rtol": 1e-8, "atol": 1e-10}
    assert torch.allclose(a.H, b.H, **tol)
    assert torch.equal(a.H, a.H.T)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_last_layer_equals_backpack(structure: str) -> None:
    a = fit(mlp(), "classification", SecorderGGN, structure, weights="last_layer")
    b = fit(mlp(), "classification", BackPackGGN, structure, weights="last_layer")
    assert a.H.shape == b.H.shape and close(a.H, b.H)
    x = torch.randn(7, 5, dtype=torch.float64)
    assert close(a(x, pred_type="glm"), b(x, pred_type="glm"))


def _model_and_loss(likelihood: str):
    model = mlp()
    X, y = next(iter(data(likelihood, n=16)))
    params = {k: p.detach() for k, p in model.named_parameters()}
    lossfunc = (
        nn.CrossEntropyLoss(reduction="sum")
        if likelihood == "classification"
        else nn.MSELoss(reduction="sum")
    )
    factor = 1.0 if likelihood == "classification" else 0.5

    def f(p):
        return factor * lossfunc(torch.func.functional_call(model, p, (X,)), y)

    return model, X, y, params, f


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_hessian_diag_equals_dense_float64(likelihood: str) -> None:
    model, X, y, params, f = _model_and_loss(likelihood)
    H = dense_hessian(f, params)  # secorder's flat order: keys sorted
    sizes = {k: p.numel() for k, p in params.items()}
    pieces = dict(zip(sorted(params), torch.diagonal(H).split([sizes[k] for k in sorted(params)])))
    ref = torch.cat([pieces[k] for k in params])  # named_parameters() order, as laplace-torch
    assert (ref < 0).any(), "the check needs negative entries"
    loss, d = SecorderHessian(model, likelihood, negative="keep").diag(X, y)
    assert close(d, ref) and close(loss, f(params))
    with pytest.warns(NegativeCurvatureWarning, match=r"entries below zero .*set to zero"):
        _, clipped = SecorderHessian(model, likelihood).diag(X, y)
    assert close(clipped, ref.clamp_min(0))
    with pytest.raises(
        ValueError, match=r"SecorderHessian.diag\(x, y\): a diagonal posterior precision needs a non-negative"
    ):
        SecorderHessian(model, likelihood, negative="raise").diag(X, y)


def test_hessian_diag_fit_clips_with_warning() -> None:
    with pytest.warns(NegativeCurvatureWarning):
        la = fit(mlp(), "classification", SecorderHessian)
    assert (la.H >= 0).all() and (la.posterior_precision > 0).all()


def test_mc_fisher_is_unbiased_and_reproducible() -> None:
    model, X, y, _, _ = _model_and_loss("classification")
    exact = SecorderGGN(model, "classification").diag(X, y)[1]
    draw = lambda seed: SecorderGGN(
        model, "classification", stochastic=True, num_samples=4, generator=torch.Generator().manual_seed(seed)
    ).diag(X, y)[1]
    assert torch.equal(draw(3), draw(3))
    samples = torch.stack([draw(s) for s in range(200)])
    mean, stderr = samples.mean(0), samples.std(0) / 200**0.5
    ok = (mean - exact).abs() <= 4 * stderr + 1e-12
    assert ok.float().mean() > 0.99


def test_errors() -> None:
    model, X, y, _, _ = _model_and_loss("classification")
    with pytest.raises(
        TypeError,
        match=r"SecorderGGN\(model, likelihood, stochastic=True\): the MC Fisher draws .* generator=None",
    ):
        SecorderGGN(model, "classification", stochastic=True)
    with pytest.raises(
        ValueError, match=r"negative must be one of 'clip', 'raise', 'keep', but received 'abs'"
    ):
        SecorderHessian(model, "classification", negative="abs")
    with pytest.raises(
        ValueError, match=r"method must be an exact method .* but received 'curvature_propagation'"
    ):
        SecorderHessian(model, "classification", method="curvature_propagation")
    with pytest.raises(
        NotImplementedError, match=r"SecorderGGN.kron\(x, y\): Kronecker-factored curvature is not available"
    ):
        fit(mlp(), "classification", SecorderGGN, "kron")
    with pytest.raises(
        NotImplementedError, match=r"SecorderEF.diag\(x, y\): inputs must be a tensor .* dict-like batch"
    ):
        SecorderEF(model, "classification").diag({"input_ids": X}, y)
    seq = nn.Sequential(nn.Linear(5, 3), nn.Unflatten(1, (1, 3))).double()
    with pytest.raises(ValueError, match=r"classification needs model outputs of shape \(batch, classes\)"):
        SecorderGGN(seq, "classification").diag(X, y)


def test_residual_layernorm_ef_and_hessian() -> None:
    """The empirical Fisher against laplace-torch's torch.func route, the Hessian against dense float64."""
    a, b = (
        fit(ResidualLN().double(), "classification", SecorderEF),
        fit(ResidualLN().double(), "classification", CurvlinopsEF),
    )
    assert close(a.H, b.H)
    model = ResidualLN().double()
    X, y = next(iter(data("classification", n=16)))
    params = {k: p.detach() for k, p in model.named_parameters()}
    f = lambda p: nn.functional.cross_entropy(torch.func.functional_call(model, p, (X,)), y, reduction="sum")
    H = dense_hessian(f, params)
    sizes = {k: p.numel() for k, p in params.items()}
    pieces = dict(zip(sorted(params), torch.diagonal(H).split([sizes[k] for k in sorted(params)])))
    ref = torch.cat([pieces[k] for k in params])
    _, d = SecorderHessian(model, "classification", negative="keep").diag(X, y)
    assert close(d, ref)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_subnetwork_laplace_equals_backpack(likelihood: str) -> None:
    idx = torch.tensor([0, 3, 17, 80, 150, 200, 230])
    fits = []
    for backend in (SecorderGGN, BackPackGGN):
        la = Laplace(
            mlp(),
            likelihood,
            subset_of_weights="subnetwork",
            hessian_structure="full",
            backend=backend,
            subnetwork_indices=idx,
        )
        la.fit(data(likelihood))
        fits.append(la)
    assert fits[0].H.shape == (7, 7) and close(fits[0].H, fits[1].H)


@pytest.mark.parametrize("backend", [SecorderGGN, SecorderEF])
def test_diag_evaluates_the_model_once_and_leaves_it_alone(backend: type) -> None:
    """The Fisher backends take the loss's outputs from the Fisher's own evaluation: one forward
    per batch, and a train-mode BatchNorm's running statistics stay untouched (a separate
    forward of the module would update them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    model.train()
    calls: list[int] = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    X = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    kind = "ggn" if backend is SecorderGGN else "empirical"
    params = {k: v.detach() for k, v in model.named_parameters()}
    secorder.fisher_diagonal(model, "cross_entropy", kind=kind, reduction="sum")(params, X, y)
    own = len(calls)  # the Fisher transform's own evaluations (the generic route here: BatchNorm)
    loss, _ = backend(model, "classification").diag(X, y)
    assert len(calls) == 2 * own
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    twin = copy.deepcopy(model)  # the same train-mode evaluation on a copy (its stats may move)
    with torch.no_grad():
        ref = nn.functional.cross_entropy(twin(X), y, reduction="sum")
    torch.testing.assert_close(loss, ref)

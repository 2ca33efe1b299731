"""The "taylor" strategy: quadratic forms vᵀHv by one reverse pass and a forward tangent pass.

Every model is checked against the dense float64 Hessian (torch.autograd.functional.hessian)
on random directions: the strategy must be exact, op by op, for linear ops, pointwise ops
(also with two parameter-dependent inputs and broadcasting), convolutions (stride, dilation,
1-d, grouped), matrix products of two parameter-dependent factors (attention, tied weights),
LayerNorm and eval BatchNorm (whose nested forward mode is wrong in PyTorch), and ops
recorded through in-place updates, ``.item()`` and ``detach``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import secorder
from secorder._engine.tape import TapeUnsupportedError, record
from secorder._engine.taylor import TaylorQuadform
from secorder._pytree import flatten, unravel
from secorder.testing import dense_hessian

F64 = torch.float64


class Attention(nn.Module):
    """LayerNorm, one attention head (q·kᵀ and softmax·v), a residual and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 2.0, dim=-1)
        z = a @ self.v(h) + h
        return self.out(z.mean(1)) @ self.out.weight @ self.out.weight.T  # the head used twice


class Gated(nn.Module):
    """Products and quotients of two parameter-dependent tensors, broadcast biases, ``where``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.randn(5))
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        u, w = self.a(x), self.b(x)
        g = torch.sigmoid(u) * torch.tanh(w) / (1.5 + w**2) + self.scale
        g = torch.where(x[:, :1] > 0, g, F.softplus(g))
        return self.head(torch.cat([g[:, :2], g[:, 2:].exp()], dim=1))


class Recorded(nn.Module):
    """In-place ReLU, ``.item()`` control flow, a ``detach`` and a constant made inside."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        h = torch.relu_(h) if h.sum().item() > -1e9 else h
        h = h * torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0, 1.0], dtype=x.dtype) + h.detach() ** 2
        return self.head(torch.tanh(h))


def _models() -> list[tuple[str, nn.Module, Tensor, Tensor]]:
    torch.manual_seed(0)
    img = torch.randn(4, 3, 6, 6, dtype=F64)
    vec = torch.randn(5, 4, dtype=F64)
    seq = torch.randn(5, 3, 4, dtype=F64)
    y4, y5 = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 1, 0])
    return [
        (
            "cnn",
            nn.Sequential(
                nn.Conv2d(3, 2, 3, padding=1),
                nn.Tanh(),
                nn.Conv2d(2, 2, 3, stride=2, padding=1, dilation=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(18, 3),
            ),
            img,
            y4,
        ),
        (
            "cnn_pool_bn_dilated",
            nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=2, dilation=2),
                nn.BatchNorm2d(4),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Conv2d(4, 4, 1, groups=2),
                nn.GELU(),
                nn.AvgPool2d(3),
                nn.Flatten(),
                nn.Linear(4, 3),
            ),
            img,
            y4,
        ),
        (
            "conv1d",
            nn.Sequential(
                nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 2), nn.Softplus(), nn.Flatten(), nn.Linear(6, 3)
            ),
            vec,
            y5,
        ),
        (
            "mlp_layernorm",
            nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.SiLU(), nn.Linear(6, 3)),
            vec,
            y5,
        ),
        ("attention", Attention(), seq, y5),
        ("gated", Gated(), vec, y5),
        ("recorded", Recorded(), vec, y5),
        ("embedding", nn.Sequential(nn.Embedding(7, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)), None, y5),
    ]


@pytest.mark.parametrize("name", [m[0] for m in _models()])
def test_quadratic_forms_match_dense_hessian(name: str) -> None:
    _, model, x, y = next(m for m in _models() if m[0] == name)
    model = model.double().eval()
    if x is None:
        x = torch.randint(0, 7, (5, 2))
    f, params = secorder.module_loss(model, F.cross_entropy)
    H = dense_hessian(f, params, x, y)
    leaves, _ = flatten(params)
    V = torch.randn(6, H.shape[0], dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = torch.einsum("ki,ij,kj->k", V, H, V)
    op, _ = secorder.hessian_operator(f, params, x, y, strategy="taylor")
    torch.testing.assert_close(op.quadform(V), expected, rtol=1e-10, atol=1e-10)
    assert op.quadform_strategy == "taylor"
    # sub-chunking inside the tape (one probe per forward pass) gives the same numbers
    g = lambda ls: f(unravel_params(params, ls), x, y)
    small = TaylorQuadform(g, leaves, budget_bytes=1)
    torch.testing.assert_close(small(unravel(V, [t.shape for t in leaves])), expected, rtol=1e-10, atol=1e-10)


def unravel_params(params: dict[str, Tensor], leaves: list[Tensor]) -> dict[str, Tensor]:
    keys = sorted(params)  # flatten's order
    return {k: leaves[keys.index(k)] for k in params}


@pytest.mark.parametrize("loss", [F.mse_loss, F.binary_cross_entropy_with_logits])
def test_regression_losses(loss) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.ELU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=F64), torch.rand(6, 3, dtype=F64)
    f, params = secorder.module_loss(model, loss)
    H = dense_hessian(f, params, x, y)
    V = torch.randn(4, H.shape[0], dtype=F64)
    op, _ = secorder.hessian_operator(f, params, x, y, strategy="taylor")
    torch.testing.assert_close(op.quadform(V), torch.einsum("ki,ij,kj->k", V, H, V))


def test_hutchinson_trace_is_identical_across_strategies_and_auto_takes_taylor() -> None:
    """Same probes ⇒ the same estimate (to rounding) whichever strategy forms vᵀHv."""
    _, model, x, y = _models()[0]
    f, params = secorder.module_loss(model.double(), F.cross_entropy)
    ests = {
        s: secorder.hessian_trace(f, num_probes=20, strategy=s)(
            params, x, y, generator=torch.Generator().manual_seed(3)
        )
        for s in ("auto", "taylor", "autograd", "rev_rev")
    }
    for s in ests:
        torch.testing.assert_close(ests[s], ests["autograd"], rtol=1e-10, atol=1e-10)
    op, _ = secorder.hessian_operator(f, params, x, y)
    op.quadform(torch.ones(3, op.size, dtype=F64))
    assert op.quadform_strategy == "taylor" and op.taylor_skipped is None


def test_float32_and_parameters_without_curvature() -> None:
    lin = nn.Linear(3, 2)
    f, params = secorder.module_loss(lin, F.mse_loss)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    op, _ = secorder.hessian_operator(f, params, x, y, strategy="taylor")
    V = torch.randn(5, op.size)
    out = op.quadform(V)
    assert out.dtype == torch.float32
    H = dense_hessian(f, {k: v.double() for k, v in params.items()}, x.double(), y.double())
    torch.testing.assert_close(
        out.double(), torch.einsum("ki,ij,kj->k", V.double(), H, V.double()), rtol=1e-4, atol=1e-4
    )
    # a function that does not depend on the parameters: zero curvature
    const = TaylorQuadform(lambda ls: torch.ones(()), [torch.ones(3)])
    assert torch.equal(const([torch.ones(2, 3)]), torch.zeros(2))


def test_random_ops_are_refused_and_auto_falls_back() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).double().train()
    f, params = secorder.module_loss(model, F.cross_entropy)
    x, y = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, 1, 0])
    with pytest.raises(TapeUnsupportedError, match="random op"):
        record(lambda ls: f(unravel_params(params, ls), x, y), flatten(params)[0])
    # a random f is refused by every strategy (the same generator must give the same number):
    # the refusal names f's randomness, not the strategy
    for strategy in ("taylor", "auto", "rev_rev"):
        op, _ = secorder.hessian_operator(f, params, x, y, strategy=strategy)
        with pytest.raises(ValueError, match=r"deterministic function.*global random generator.*model\.eval"):
            op.quadform(torch.ones(1, op.size, dtype=F64))


def test_inplace_update_of_an_aliased_tensor_is_refused() -> None:
    def fn(ls: list[Tensor]) -> Tensor:
        h = ls[0] * 2
        view = h[:2]
        h.mul_(3.0)  # the view sees this
        return (view**2).sum() + (h**2).sum()

    with pytest.raises(TapeUnsupportedError, match="in-place"):
        record(fn, [torch.ones(3, dtype=F64)])


def test_taylor_is_eager_only_and_fwd_fwd_is_gone() -> None:
    f = lambda w: (w**3).sum()
    trace = secorder.hessian_trace(f, num_probes=2, strategy="taylor")
    with pytest.raises(
        ValueError, match=r'strategy="taylor" uses torch\.autograd\.grad and runs only outside'
    ):
        torch.func.vmap(trace, randomness="different")(torch.ones(2, 3))
    with pytest.raises(
        ValueError, match=r'"fwd_fwd" \(jvp of jvp\) was removed.*layer_norm.*Use strategy="taylor"'
    ):
        secorder.hessian_trace(f, num_probes=2, strategy="fwd_fwd")


def test_tape_paths_reach_keyword_arguments() -> None:
    """Tensor keyword arguments are tape values: found, resolved and replaceable like positional ones."""
    from secorder._engine.tape import Ref, paths, replace_at, resolve

    args_kwargs = ((Ref(0), [Ref(1), 3]), {"bias": Ref(2), "alpha": 2.0})
    found = paths(args_kwargs)
    assert [(p, r.index) for p, r in found] == [((0, 0), 0), ((0, 1, 0), 1), ((1, "bias"), 2)]
    swapped = replace_at(args_kwargs, (1, "bias"), "b'")
    assert swapped[1] == {"bias": "b'", "alpha": 2.0} and args_kwargs[1]["bias"] == Ref(2)
    assert resolve(args_kwargs, ["x", "y", "z"]) == (("x", ["y", 3]), {"bias": "z", "alpha": 2.0})


def test_layer_norm_whose_weight_also_feeds_its_input() -> None:
    """torch.func.jacrev(jacrev(.)) gets the (weight, input) block of layer_norm wrong here
    (torch 2.13); every strategy of ours must agree with torch.autograd.functional.hessian."""
    torch.manual_seed(0)
    x, g = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)

    def f(p: dict[str, Tensor]) -> Tensor:
        return (g * F.layer_norm(x + p["w"], (4,), weight=p["w"])).sum() + (p["w"] ** 4).sum()

    p = {"w": torch.randn(4, dtype=F64)}
    H = dense_hessian(f, p)
    E = torch.eye(4, dtype=F64)
    for strategy in ("taylor", "rev_rev", "fwd_rev", "autograd"):
        op, _ = secorder.hessian_operator(f, p, strategy=strategy)
        torch.testing.assert_close(op.quadform(E), H.diagonal(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(op.matmat(E), H, rtol=1e-10, atol=1e-10)


def test_constant_pieces_and_class_weights() -> None:
    """cat/stack with a constant piece (its tangent is zero, not the constant) and nll_loss with
    constant class weights (PyTorch does not differentiate nll_loss in its weights)."""
    torch.manual_seed(3)
    c = torch.randn(3, dtype=F64)
    x, y = torch.randn(5, 4, dtype=F64), torch.tensor([0, 1, 2, 1, 0])
    cw = torch.tensor([0.5, 2.0, 1.0], dtype=F64)

    def f(p: dict[str, Tensor]) -> Tensor:
        z = torch.cat([p["w"][0], c])
        pieces = (torch.tanh(z) ** 2).sum() + torch.stack([p["w"][1, :3], c]).sin().sum()
        logits = torch.tanh(x @ p["w"][:, :3])
        return pieces + F.cross_entropy(logits, y, weight=cw)

    p = {"w": torch.randn(4, 4, dtype=F64)}
    H = dense_hessian(f, p)
    V = torch.randn(5, H.shape[0], dtype=F64)
    op, _ = secorder.hessian_operator(f, p, strategy="taylor")
    torch.testing.assert_close(op.quadform(V), torch.einsum("ki,ij,kj->k", V, H, V), rtol=1e-10, atol=1e-10)

"""The sweep's closed forms and chunking (module_hessian_diagonal on the engine of
secorder._engine.sweep): each path against dense float64 Hessians.

* activation columns e_j in closed form at the Linear layer producing the activation input
  (one hop) and through the next activation and Linear layer (two hops), with dense columns
  seeded further upstream (deep MLPs), and the graphs where the closed forms must not apply
  (residual adds, a Linear over positions, a layer output used twice, a weight outside params);
* convolutions (groups, stride, dilation, 'same' padding) with column chunks of any size, and a
  convolution called on two inputs (its weight at two interfaces).
"""

from __future__ import annotations

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


def _targets(loss: str, n: int, classes: int) -> Tensor:
    if loss == "cross_entropy":
        return torch.randint(0, classes, (n,))
    if loss == "mse":
        return torch.randn(n, classes, dtype=torch.float64)
    return torch.rand(n, classes, dtype=torch.float64)


def _dense_diag(
    model: nn.Module, loss: str, params: dict[str, Tensor], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    f, _ = secorder.module_loss(model, LOSS_FNS[loss])
    diag = torch.diagonal(dense_hessian(f, params, x, y))
    out, pos = {}, 0
    for k in sorted(params):  # flat order: sorted dict keys
        out[k] = diag[pos : pos + params[k].numel()].reshape(params[k].shape)
        pos += params[k].numel()
    return out


def _check(
    model: nn.Module,
    x: Tensor,
    loss: str,
    classes: int,
    params: dict[str, Tensor] | None = None,
    **options: object,
) -> dict[str, Tensor]:
    y = _targets(loss, x.shape[0], classes)
    params = {k: p.detach() for k, p in model.named_parameters()} if params is None else params
    fn = secorder.module_hessian_diagonal(model, loss, method="sweep", **options)  # type: ignore[arg-type]
    got = fn(params, x, y)
    assert fn.method_info.method == "sweep"
    ref = _dense_diag(model, loss, params, x, y)
    assert list(got) == list(params)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11)
    return got


class DeepTanh(nn.Module):
    """Four tanh layers: the last activations' columns reach layers two and more hops upstream."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 5), nn.Linear(5, 4)])
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        acts = [torch.tanh, torch.sigmoid, F.softplus, F.gelu]
        for layer, act in zip(self.layers, acts):
            x = act(layer(x))
        return self.head(x)


class SharedOutputs(nn.Module):
    """A layer output used twice (by the activation and a skip), an activation output read by two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(5, 5)
        self.d = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        u = self.a(x)
        h = torch.tanh(u) + 0.5 * u  # u reaches the loss also outside the activation
        v = self.b(h)  # b's input is an add, not an activation output: dense rows W_j at h
        g = F.silu(v)
        w = torch.sigmoid(self.c(g)) + self.d(g)  # g read by c and d
        return self.head(F.elu(w))


class Positions(nn.Module):
    """Linear layers over (N, T, d) and over (N, 1, d): the closed forms need a single position."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Linear(3, 4)
        self.one = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 3)
        h = torch.tanh(self.seq(x)).mean(1, keepdim=True)  # (N, 1, 4)
        h = torch.tanh(self.one(h))
        return self.head(h[:, 0])


@pytest.mark.parametrize("loss", list(LOSS_FNS))
def test_deep_mlp_closed_forms_and_dense_columns(loss: str) -> None:
    torch.manual_seed(0)
    model = DeepTanh().double()
    _check(model, torch.randn(5, 4, dtype=torch.float64), loss, 3)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_closed_forms_with_column_chunks(chunk_size: int | None) -> None:
    """Dense columns pulled back in chunks of 1, 2 or automatic size."""
    torch.manual_seed(1)
    model = DeepTanh().double()
    _check(model, torch.randn(4, 4, dtype=torch.float64), "cross_entropy", 3, chunk_size=chunk_size)


def test_shared_outputs_and_non_activation_inputs() -> None:
    torch.manual_seed(2)
    model = SharedOutputs().double()
    _check(model, torch.randn(6, 4, dtype=torch.float64), "cross_entropy", 3)


def test_linear_over_positions_and_single_position() -> None:
    torch.manual_seed(3)
    model = Positions().double()
    _check(model, torch.randn(5, 4, 3, dtype=torch.float64), "mse", 3)


def test_input_requiring_grad_is_not_a_parameter() -> None:
    """Columns pulled back to an input that requires grad reach no layer and add nothing."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    _check(model, x, "cross_entropy", 3)


@pytest.mark.parametrize("frozen", ["2.weight", "layers.1.weight"])
def test_weight_outside_params(frozen: str) -> None:
    """A layer whose weight is a frozen constant (only its bias is differentiated): one or two hops up."""
    torch.manual_seed(5)
    if frozen == "2.weight":
        model: nn.Module = nn.Sequential(
            nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
        ).double()
    else:
        model = DeepTanh().double()
    model.get_parameter(frozen).requires_grad_(False)  # a constant, left out of params
    params = {k: p.detach() for k, p in model.named_parameters() if k != frozen}
    got = _check(model, torch.randn(5, 4, dtype=torch.float64), "cross_entropy", 3, params=params)
    assert frozen not in got


def test_activation_input_by_keyword() -> None:
    """torch.tanh(input=u): on the ATen tape the keyword is gone; the sweep takes the model exactly."""

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.tanh(input=self.a(x)))

    torch.manual_seed(6)
    model = Keyword().double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    ref = _dense_diag(model, "cross_entropy", params, x, y)
    for method in ("sweep", "auto"):
        fn = secorder.module_hessian_diagonal(model, "cross_entropy", method=method)
        got = fn(params, x, y)
        assert fn.method_info.method == "sweep"
        assert fn.method_info.reason.startswith("structured sweep over the batch tape")
        for k in params:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11)


class TwoViews(nn.Module):
    """One grouped, strided, dilated convolution applied to two inputs (positions concatenated)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2)
        self.conv2 = nn.Conv2d(4, 3, 3, padding="same")
        self.head = nn.Linear(3 * 9, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x) + self.conv(x.flip(-1)))
        return self.head(F.softplus(self.conv2(h)).flatten(1))


def test_conv_called_twice() -> None:
    """A convolution called on two inputs (its weight at two interfaces), exact by the sweep."""
    torch.manual_seed(7)
    model = TwoViews().double()
    _check(model, torch.randn(3, 4, 6, 6, dtype=torch.float64), "cross_entropy", 3)
    _check(model, torch.randn(3, 4, 6, 6, dtype=torch.float64), "mse", 3, chunk_size=2)


def test_conv_relu_float32() -> None:
    """A ReLU CNN (the benchmark's shape, small) in float32 against the float64 dense Hessian."""
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 16, 4),
    )  # fmt: skip
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    params = {k: p.detach() for k, p in model.named_parameters()}
    got = secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep")(params, x, y)
    model64 = model.double()
    ref = _dense_diag(model64, "cross_entropy", {k: v.double() for k, v in params.items()}, x.double(), y)
    for k in params:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [0.1, 3.0, 300.0])
def test_cross_entropy_rank_columns_finite_when_saturated(scale: float) -> None:
    """C − 1 cross-entropy columns; exact and finite even for a saturated softmax (large logits)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 6)).double()
    with torch.no_grad():
        model[0].weight.mul_(scale)
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.zeros(40, dtype=torch.long)
    params = {k: p.detach() for k, p in model.named_parameters()}
    fn = secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep")
    got = fn(params, x, y)
    assert fn.method_info.num_columns <= 5  # at most C − 1 (columns zero for every sample dropped)
    ref = _dense_diag(model, "cross_entropy", params, x, y)
    for k in params:
        assert bool(torch.isfinite(got[k]).all())
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)


def test_cross_entropy_sweep_reports_rank_columns() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    fn = secorder.module_hessian_diagonal(model, "cross_entropy", method="sweep")
    fn(params, torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)))
    assert fn.method_info.num_columns == 2  # C − 1 loss columns, no curved activations


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_small_column_chunks(chunk_size: int) -> None:
    """Columns pulled back one (or three) at a time."""
    torch.manual_seed(11)
    _check(
        CurvedConvs().double(),
        torch.randn(3, 4, 6, 6, dtype=torch.float64),
        "cross_entropy",
        3,
        chunk_size=chunk_size,
    )
    _check(
        SharedOutputs().double(),
        torch.randn(4, 4, dtype=torch.float64),
        "bce_with_logits",
        3,
        chunk_size=chunk_size,
    )


def test_curvature_propagation_same_probes_any_chunking() -> None:
    """Probes mixed and walked many at a time or one at a time give the same estimate."""
    torch.manual_seed(12)
    model = CurvedConvs().double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    x, y = torch.randn(3, 4, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    out = []
    for chunk in (None, 1):
        fn = secorder.module_hessian_diagonal(
            model, "cross_entropy", method="curvature_propagation", num_probes=3, chunk_size=chunk
        )
        out.append(fn(params, x, y, generator=torch.Generator().manual_seed(5)))
    for k in params:
        torch.testing.assert_close(out[0][k], out[1][k], rtol=1e-12, atol=1e-14)


class CurvedConvs(nn.Module):
    """Curved activations right after single-call convolutions (grouped, strided, 'same', dilated)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.conv2 = nn.Conv2d(4, 3, 3, padding="same", dilation=2)
        self.head = nn.Linear(3 * 9, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv1(x))  # input without grad: the closed form is all
        h = torch.sigmoid(self.conv2(h))  # closed form for conv2, one-hot columns for conv1
        return self.head(h.flatten(1))


@pytest.mark.parametrize("chunk_size", [2, None])
def test_curved_activation_after_convolution(chunk_size: int | None) -> None:
    torch.manual_seed(13)
    _check(
        CurvedConvs().double(),
        torch.randn(3, 4, 6, 6, dtype=torch.float64),
        "cross_entropy",
        3,
        chunk_size=chunk_size,
    )
    _check(
        CurvedConvs().double(), torch.randn(2, 4, 5, 5, dtype=torch.float64), "mse", 3, chunk_size=chunk_size
    )

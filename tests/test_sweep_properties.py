"""Property test of module_hessian_diagonal on randomly assembled models.

Each example builds a small model from random parts: an optional Conv2d front-end (with or
without pooling), a chain of Linear layers of random widths, random elementwise activations
(curved and piecewise linear, and hand-written ones such as GPT-2's ``gelu_new``: pointwise
regions), optional residual blocks, LayerNorm and gated (SwiGLU-style) products, and a random
loss and reduction. The exact diagonal (the structured sweep, or one-hot HVPs where ``"auto"`` picks them)
must equal the dense float64 Hessian diagonal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import secorder
from secorder.testing import dense_hessian

F64 = torch.float64


class GeluNew(nn.Module):
    """GPT-2's hand-written activation (a pointwise region of several elementwise ops)."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


class HandSwish(nn.Module):
    """x·sigmoid(x) written out: a product of two operands of one value."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x) + 0.1 * x * x


class Gated(nn.Module):
    """SwiGLU-style silu(x W₁) ⊙ x W₂: an elementwise product of two different values."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, 2 * width)

    def forward(self, h: Tensor) -> Tensor:
        a, b = self.lin(h).chunk(2, dim=-1)
        return F.silu(a) * b


ACTS = {
    "gelu_new": GeluNew,
    "hand_swish": HandSwish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
}
LOSSES = {
    "cross_entropy": lambda z, y, r: F.cross_entropy(z, y, reduction=r),
    "mse": lambda z, y, r: F.mse_loss(z, y, reduction=r),
    "bce_with_logits": lambda z, y, r: F.binary_cross_entropy_with_logits(z, y, reduction=r),
}


class Residual(nn.Module):
    def __init__(self, width: int, act: str, norm: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.act = ACTS[act]()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(h + self.act(self.lin(h)))


@st.composite
def models(draw: st.DrawFn) -> tuple[nn.Module, Tensor, str, str]:
    layers: list[nn.Module] = []
    conv = draw(st.booleans())
    if conv:
        layers += [nn.Conv2d(2, 3, 3, padding=1), ACTS[draw(st.sampled_from(sorted(ACTS)))]()]
        if draw(st.booleans()):
            layers.append(nn.AvgPool2d(2) if draw(st.booleans()) else nn.MaxPool2d(2))
            width = 3 * 2 * 2
        else:
            width = 3 * 4 * 4
        layers.append(nn.Flatten())
    else:
        width = 4
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(2, 5))
        layers += [nn.Linear(width, out), ACTS[draw(st.sampled_from(sorted(ACTS)))]()]
        width = out
        if draw(st.integers(0, 3)) == 0:
            layers.append(Residual(width, draw(st.sampled_from(sorted(ACTS))), draw(st.booleans())))
        if draw(st.integers(0, 3)) == 0:
            layers.append(Gated(width))
    layers.append(nn.Linear(width, 3))
    # every random number comes from hypothesis (a seed it draws), never from torch's global
    # generator, so a failing example is reproduced from hypothesis's report alone; the layers'
    # own initialization is overwritten in the test from the drawn seed
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn((4, 2, 4, 4) if conv else (4, 4), dtype=F64, generator=g)
    return (
        nn.Sequential(*layers).double(),
        x,
        draw(st.sampled_from(sorted(LOSSES))),
        draw(st.sampled_from(["mean", "sum"])),
    )


@given(spec=models(), seed=st.integers(0, 2**16))
def test_module_sweep_equals_dense_diagonal(spec: tuple[nn.Module, Tensor, str, str], seed: int) -> None:
    model, x, loss, reduction = spec
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=F64, generator=g) / 2)
    y = (
        torch.randint(0, 3, (4,), generator=g)
        if loss == "cross_entropy"
        else torch.rand(4, 3, dtype=F64, generator=g)
    )
    params = {k: p.detach() for k, p in model.named_parameters()}
    fn = secorder.module_hessian_diagonal(model, loss, reduction=reduction, max_hvp_params=0)
    got = fn(params, x, y)
    f, _ = secorder.module_loss(model, lambda z, t: LOSSES[loss](z, t, reduction))
    H = dense_hessian(f, params, x, y)
    flat = torch.cat([got[k].flatten() for k in sorted(params)])  # dense order: sorted keys
    expected = H.diagonal()
    assert fn.method_info.method == "sweep", fn.method_info
    torch.testing.assert_close(flat, expected, rtol=1e-8, atol=1e-9 * (1 + float(expected.abs().max())))

"""Property tests of the tape engines (the "taylor" strategy and the structured sweep) over random
programs built from a catalogue of ops.

Each example draws a short program: a sequence of unary ops on the running tensor h and binary
ops that combine h with another parameter-dependent tensor z, mixed with constants (so jointly
linear ops see constant pieces, products see constant factors, pointwise ops broadcast). The
quadratic forms vᵀHv of the "taylor" strategy must equal those of the dense float64 Hessian
(torch.autograd.functional.hessian) on random directions, whatever the program.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import secorder
from secorder.testing import dense_hessian

F64 = torch.float64
_gen = torch.Generator().manual_seed(11)
C = torch.randn(3, 4, dtype=F64, generator=_gen)  # a constant of h's shape
A = torch.randn(4, 4, dtype=F64, generator=_gen) / 2
B = torch.randn(3, 3, dtype=F64, generator=_gen) / 2
K1 = torch.randn(2, 3, 2, dtype=F64, generator=_gen) / 2  # conv1d kernel: 3 channels in, 2 out

UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "exp": lambda h: torch.exp(0.3 * h),
    "square": lambda h: h**2,
    "relu": torch.relu,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "log_softmax": lambda h: torch.log_softmax(h, dim=-1),
    "softmax0": lambda h: torch.softmax(h, dim=0),
    "layer_norm": lambda h: F.layer_norm(h, (4,)),
    "flip_roll": lambda h: h.flip(0).roll(1, 1),
    "cat_const": lambda h: torch.cat([h[:, :2], C[:, :2]], dim=1),
    "stack_const": lambda h: torch.stack([h, C]).sum(0) * torch.stack([h, C])[0],
    "mul_const": lambda h: h * C,
    "div_const": lambda h: h / (1.0 + C**2),
    "mean_expand": lambda h: h.mean(0, keepdim=True).expand_as(h) * h,
    "reshape": lambda h: h.reshape(4, 3).t().contiguous().view(3, 4),
    "where": lambda h: torch.where(C > 0, h, h**2),
    "matmul_const": lambda h: h @ A,
    "left_matmul_const": lambda h: B @ h,
    "gram": lambda h: h @ h.t() @ h / 4.0,
    "conv1d": lambda h: torch.cat([F.conv1d(h.unsqueeze(0), K1, padding=1)[0, :, :4], h[:1]], 0),
    "clamp": lambda h: torch.clamp(h, -1.0, 1.0),
    "cumsum": lambda h: h.cumsum(1),
    "norm_scale": lambda h: h * h.norm(dim=1, keepdim=True),
    "pad_slice": lambda h: F.pad(h, (1, 1), value=0.5)[:, 1:5],
    "max_pool": lambda h: F.max_pool1d(h.unsqueeze(0), 2, 1, padding=1)[0, :, :4],
    "index": lambda h: h[torch.tensor([2, 0, 1])] + h[:, torch.tensor([1, 1, 3, 0])],
}
BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mul": lambda h, z: h * z,
    "add": lambda h, z: h + 0.5 * z,
    "div": lambda h, z: h / (2.0 + z**2),
    "maximum": torch.maximum,
    "bilinear": lambda h, z: h @ z.t() @ h / 4.0,
    "cat": lambda h, z: torch.cat([h[:, :2], z[:, 2:]], dim=1),
    "atan2": lambda h, z: torch.atan2(h, z + 3.0),
    "gate": lambda h, z: torch.sigmoid(z) * torch.tanh(h),
}

steps = st.lists(
    st.one_of(
        st.tuples(st.just("unary"), st.sampled_from(sorted(UNARY))),
        st.tuples(st.just("binary"), st.sampled_from(sorted(BINARY))),
    ),
    min_size=1,
    max_size=5,
)


def program(ops: list[tuple[str, str]]) -> Callable[[dict[str, Tensor]], Tensor]:
    def f(p: dict[str, Tensor]) -> Tensor:
        h = torch.tanh(p["a"] @ p["w"])
        z = p["b"] * 1.5 - p["a"]
        for kind, name in ops:
            h = UNARY[name](h) if kind == "unary" else BINARY[name](h, z)
            h = h / (1.0 + h.detach().abs().max())  # keep magnitudes tame; detach: no curvature
        return (h * C).sum() + 0.1 * (h**2).sum()

    return f


@given(ops=steps, seed=st.integers(0, 2**16))
def test_taylor_quadratic_forms_on_random_programs(ops: list[tuple[str, str]], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p = {
        "a": torch.randn(3, 4, dtype=F64, generator=g),
        "b": torch.randn(3, 4, dtype=F64, generator=g),
        "w": torch.randn(4, 4, dtype=F64, generator=g) / 2,
    }
    f = program(ops)
    H = dense_hessian(f, p)
    V = torch.randn(4, H.shape[0], dtype=F64, generator=g)
    op, _ = secorder.hessian_operator(f, p, strategy="taylor")
    expected = torch.einsum("ki,ij,kj->k", V, H, V)
    torch.testing.assert_close(
        op.quadform(V), expected, rtol=1e-9, atol=1e-9 * (1 + float(expected.abs().max()))
    )


def per_sample_program(ops: list[tuple[str, str]]) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """The mean over samples x_n (3×4 each) of a random program of x_n and the parameters."""

    def f(p: dict[str, Tensor], xs: Tensor) -> Tensor:
        losses = []
        for x in xs:
            h = torch.tanh(x @ p["w"] + p["a"])
            z = p["b"] * x - p["a"]
            for kind, name in ops:
                h = UNARY[name](h) if kind == "unary" else BINARY[name](h, z)
            losses.append((h * C).sum() + 0.1 * (h**2).sum())
        return torch.stack(losses).mean()

    return f


@given(ops=steps, seed=st.integers(0, 2**16))
def test_sweep_diagonal_on_random_programs(ops: list[tuple[str, str]], seed: int) -> None:
    """The same catalogue through hessian_diagonal(f, exact="sweep") (the structured sweep of
    secorder._engine.sweep on a tape of the whole batch): exact against the dense diagonal."""
    g = torch.Generator().manual_seed(seed)
    p = {
        "a": torch.randn(3, 4, dtype=F64, generator=g),
        "b": torch.randn(3, 4, dtype=F64, generator=g),
        "w": torch.randn(4, 4, dtype=F64, generator=g) / 2,
    }
    xs = torch.randn(3, 3, 4, dtype=F64, generator=g)
    f = per_sample_program(ops)
    H = dense_hessian(f, p, xs)
    got = secorder.hessian_diagonal(f, exact="sweep")(p, xs)
    flat = torch.cat([got[k].flatten() for k in sorted(p)])  # dense order: sorted keys
    expected = H.diagonal()
    torch.testing.assert_close(flat, expected, rtol=1e-8, atol=1e-8 * (1 + float(expected.abs().max())))

"""Squared per-sample parameter gradients where a parameter meets per-sample data.

MINIMAL PLACEHOLDER (helper A): ``mm``/``addmm`` (parameter on either side, bias of
``addmm``) and ``convolution`` (weight, bias) only, so that the sweep driver can be built and
tested. Helper B's module of the same name and signature replaces this file at the merge.

For an op y = op(x, W) linear in the parameter-side argument W, column c of the cotangent at
y and sample n give the per-sample gradient G_{cn} = ∂⟨c|_n, y⟩/∂W; :func:`param_squares`
returns Σ_c w_c Σ_n G_{cn}^⊙2, with the columns summed before squaring where the algebra
allows (y = x Wᵀ, one row per sample: Σ_c w_c Σ_n (δ_{cn} x_nᵀ)^⊙2 = (Σ_c w_c δ_c^⊙2)ᵀ x^⊙2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from secorder._engine.tape import TapeNode, resolve

__all__ = ["SampleAxis", "param_squares"]

SampleAxis = tuple[int, int]
aten = torch.ops.aten


def _weighted(cols: Tensor, weights: Tensor | None) -> Tensor:
    return cols if weights is None else cols * weights.reshape(-1, *[1] * (cols.dim() - 1))


def param_squares(
    node: TapeNode,
    values: Sequence[Any],
    position: tuple[Any, ...],
    axes: dict[tuple[Any, ...], SampleAxis],
    out_axis: SampleAxis,
    cols: Tensor,
    weights: Tensor | None,
    num_samples: int,
    per_sample: bool = False,
) -> Tensor | None:
    """Σ_c w_c Σ_n (∂⟨cols[c]|_n, op(args)⟩ / ∂arg)^⊙2, shaped like the argument at ``position``;
    None when the op/position has no rule."""
    if per_sample:
        return None
    func = node.func
    args = resolve(node.args, values)
    n = num_samples
    r = cols.shape[0]
    if func in (aten.mm.default, aten.addmm.default) and not node.kwargs:
        off = 1 if func is aten.addmm.default else 0
        a, _b = args[off], args[off + 1]
        if out_axis[0] != 0 or axes.get((0, off)) != out_axis:
            return None
        g = out_axis[1]
        d = cols.reshape(r, n, g, -1)  # (R, N, g, out)
        if off and position == (0, 0):
            bias = args[0]
            if bias.dim() != 1:
                return None
            s = d.sum(2)
            return (_weighted(s * s, weights)).sum((0, 1))
        if position != (0, off + 1):
            return None
        x = a.reshape(n, g, -1)  # (N, g, in)
        if g == 1:
            dd = _weighted(d[:, :, 0] ** 2, weights).sum(0)  # (N, out)
            return (x[:, 0] ** 2).T @ dd  # (in, out) = b's shape
        grads = torch.einsum("ngi,rngo->rnio", x, d)
        return _weighted(grads * grads, weights).sum((0, 1))
    if func is aten.convolution.default and not node.kwargs:
        if out_axis[0] != 0 or axes.get((0, 0)) != out_axis:
            return None
        x, w = args[0], args[1]
        g = out_axis[1]
        d = cols.reshape(r, n, g, *cols.shape[2:])
        if position == (0, 2):
            s = d.sum(2)
            s = s.reshape(r, n, s.shape[2], -1).sum(-1)  # (R, N, C_out)
            return (_weighted(s * s, weights)).sum((0, 1))
        if position != (0, 1):
            return None
        rest = list(args[3:])
        stride, padding, dilation, transposed, _, groups = rest
        if x.dim() == 4 and not transposed and groups == 1:  # im2col: one batched matmul per chunk
            cols_x = torch.nn.functional.unfold(
                x, w.shape[2:], dilation=dilation, padding=padding, stride=stride
            )
            u = cols_x.reshape(n, g, cols_x.shape[1], -1)  # (N, g, I·kh·kw, L)
            dd = d.reshape(r, n, g, d.shape[3], -1)  # (R, N, g, O, L)
            grads = torch.einsum("rngol,ngkl->rnok", dd, u)
            return _weighted(grads * grads, weights).sum((0, 1)).reshape(w.shape)
        xs = x.reshape(n, g, *x.shape[1:])

        def one(xn: Tensor, dn: Tensor) -> Tensor:  # dn: (R, g, ...)
            _, pull, *_ = vjp(lambda ww: aten.convolution.default(xn, ww, None, *rest), w)
            return vmap(lambda c: pull(c)[0])(dn)

        grads = vmap(one)(xs, d.transpose(0, 1))  # (N, R, *w.shape)
        return _weighted((grads * grads).transpose(0, 1), weights).sum((0, 1))
    return None

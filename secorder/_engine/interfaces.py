"""Parameter interfaces: squared per-sample gradients where a parameter meets per-sample data.

A tape of one evaluation on the whole batch holds ops such as ``addmm(b, x, Wᵀ)`` where one
operand (the *parameter side*: a leaf, or a leaf through views and dtype copies) is the same
for every sample and the others are batched along a sample axis. For R cotangent columns
δ_c at the op's output (batched over samples) and weights w_c, :func:`param_squares` returns

    S = Σ_c w_c Σ_n (∂⟨δ_c|_n, op(args)⟩ / ∂θ)^⊙2           (θ: the parameter-side argument)

where δ_c|_n is column c restricted to sample n's slice, without replaying the op per sample:
each rule below works on the whole batch, and sums the columns *before* squaring wherever the
algebra allows (the squares of a product of a column-independent factor and a column only
need Σ_c w_c δ_c^⊙2):

* ``mm`` / ``bmm`` / ``addmm`` / ``baddbmm`` (either operand the parameter side; ``alpha``,
  ``beta`` and the bias): with one row per sample, Σ_n (δ_{cn} x_nᵀ)^⊙2 summed over columns is
  (Σ_c w_c δ_c^⊙2)ᵀ x^⊙2, one matrix product; with T rows per sample the per-(column, sample)
  products x_nᵀ δ_{cn} are formed in chunks.
* ``convolution`` of any dimension: 2-d non-transposed by products with the unfolded input
  (chunks of samples and columns); every other case (1-d, 3-d, transposed, any groups,
  stride, padding, dilation, output padding) by ``vmap`` of ``convolution_backward`` over
  (column, sample) pairs. Bias: the column summed over positions.
* ``embedding``: the column's rows summed over repeated indices of one sample, squared, then
  added to the indexed rows. When no sample repeats an index the columns are summed first.
  Rows at ``padding_idx`` get zero (autograd gives them no gradient). ``scale_grad_by_freq``
  scales gradients by batch-wide counts (mixes samples): no rule.
* affine weights and biases of ``native_layer_norm``, ``native_group_norm`` and eval-mode
  batch norm (``native_batch_norm(training=False)``, ``_native_batch_norm_legit_no_training``):
  elementwise products with the normalized input x̂ (recomputed from the saved statistics).
* elementwise ops with a broadcast parameter (``add``/``sub``/``mul``/``div.Tensor``): the
  column times the local derivative, summed over the broadcast dimensions of one sample.

Each rule is registered as the ``interface`` field of its op's :class:`~secorder._engine.rules.OpRule`;
an op or parameter position without a rule returns ``None`` (the caller then falls back to
per-sample vector-Jacobian products for that leaf).

Memory: the per-(column, sample) gradients are formed in chunks of at most
``memory_budget() // 8`` bytes (:mod:`secorder._chunking`), and at most
``_CACHE_BYTES`` on CPU (the products stay in cache).

Conventions: a sample axis ``(dim, group)`` says that along dimension ``dim`` of a tensor
sample n owns the indices ``[n·group, (n+1)·group)``. ``position`` is a path into
``(node.args, node.kwargs)``: ``(0, i)`` the i-th positional argument, ``(1, name)`` a
keyword argument. Note for callers: the result is shaped like the *argument*; mapping it
back to the leaf through a view is exact only for injective views (permutations, reshapes,
dtype copies). Through ``expand`` it is exact only when every expanded copy belongs to a
different sample (squares do not commute with the sum over the copies of one sample).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import Tensor

from secorder._chunking import memory_budget
from secorder._engine.tape import TapeNode, resolve

__all__ = ["SampleAxis", "param_squares"]

SampleAxis = tuple[int, int]
aten = torch.ops.aten

# Bytes of per-(column, sample) gradients formed at once on CPU (kept in cache).
_CACHE_BYTES = 4 << 20


class _Ctx:
    """One call of :func:`param_squares`: the bound arguments and the common options."""

    def __init__(
        self,
        node: TapeNode,
        values: Sequence[Any],
        name: str,
        axes: dict[str, SampleAxis],
        out_axis: SampleAxis,
        cols: Tensor,
        weights: Tensor | None,
        num_samples: int,
        per_sample: bool,
    ) -> None:
        self.node = node
        self.values = values
        self.args = _bind(node, values)
        self.name = name  # the parameter-side argument
        self.axes = axes  # argument name -> sample axis
        self.out_axis = out_axis
        self.base_out_axis = out_axis  # out_axis as given (rules may rewrite out_axis)
        self.cols = cols
        self.weights = weights
        self.n = num_samples
        self.per_sample = per_sample
        self.squares: Tensor | None = None  # Σ_c w_c cols[c]^⊙2 given by the caller

    def arg(self, name: str) -> Any:
        return self.args[name]

    def output(self, i: int) -> Tensor:
        idx = self.node.outputs[i]
        assert idx is not None
        return self.values[idx]


def _bind(node: TapeNode, values: Sequence[Any]) -> dict[str, Any]:
    """The op's arguments by schema name (defaults filled in), with tape references resolved."""
    schema = node.func._schema
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:  # pragma: no cover - a recorded call always binds its required arguments
            out[a.name] = None
    return resolve(out, values)


def _arg_name(node: TapeNode, path: tuple[Any, ...]) -> str | None:
    if len(path) != 2:
        return None
    if path[0] == 0 and isinstance(path[1], int):
        arguments = node.func._schema.arguments
        return arguments[path[1]].name if 0 <= path[1] < len(arguments) else None
    if path[0] == 1 and isinstance(path[1], str):
        return path[1]
    return None


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
    squares: Tensor | None = None,
) -> Tensor | None:
    """Σ_c w_c Σ_n (∂⟨cols[c]|_n, op(args)⟩ / ∂arg)^⊙2 for the argument at ``position``.

    Args:
        node: one tape node.
        values: the tape values of this evaluation (a tensor per value index).
        position: path into ``(node.args, node.kwargs)`` of the parameter-side argument
            (the same for every sample).
        axes: the sample axis of each per-sample tensor argument, keyed by its path.
        out_axis: the sample axis of the node's first output.
        cols: ``(R, *out_shape)`` cotangent columns at the node's first output.
        weights: ``(R,)`` column weights, ``(R, N)`` weights of each column and sample (e.g.
            the signs of curvature columns), or ``None`` (all ones).
        num_samples: N.
        per_sample: keep a leading sample axis (row n: sample n's squares alone).
        squares: Σ_c w_c cols[c]^⊙2 when the caller has it (exact, no square roots): the rules
            that sum the columns before squaring use it, ``cols`` then only gives the shape
            (callers pass it only where every rule on the op does: mm/addmm with one row per
            sample).

    Returns:
        A tensor shaped like the argument at ``position`` (``(N, *shape)`` with
        ``per_sample``), or ``None`` when the op or position has no rule.
    """
    from secorder._engine.rules import rule  # the registry imports this module

    fn = rule(node.func).interface
    if fn is None:
        return None
    name = _arg_name(node, position)
    if name is None:
        return None
    named: dict[str, SampleAxis] = {}
    for path, axis in axes.items():
        arg = _arg_name(node, path)
        if arg is None:
            return None
        named[arg] = _norm_axis(axis, _ndim(node, values, path))
    ctx = _Ctx(node, values, name, named, out_axis, cols, weights, num_samples, per_sample)
    ctx.squares = squares
    if ctx.name in named:
        return None  # the parameter side must be the same for every sample
    ctx.out_axis = ctx.base_out_axis = _norm_axis(out_axis, cols.dim() - 1)
    result = fn(ctx)
    return None if result is None else result.to(cols.dtype)


def _ndim(node: TapeNode, values: Sequence[Any], path: tuple[Any, ...]) -> int:
    obj = resolve((node.args, node.kwargs), values)
    for p in path:
        obj = obj[p]
    return obj.dim() if isinstance(obj, Tensor) else 0


def _norm_axis(axis: SampleAxis, ndim: int) -> SampleAxis:
    dim, group = axis
    return (dim + ndim if dim < 0 else dim, group)


# ---------------------------------------------------------------------------------------------
# Shared machinery


def _budget(t: Tensor) -> int:
    cap = memory_budget() // 8
    return min(cap, _CACHE_BYTES) if t.device.type == "cpu" else cap


def _split(t: Tensor, axis: SampleAxis, n: int, lead: int = 0) -> Tensor:
    """``t`` (``lead`` leading dims, then the tensor) with its sample dim moved after the
    leading dims and split into (N, group): ``(*lead, N, group, *other dims in order)``."""
    dim, group = axis
    t = t.movedim(lead + dim, lead)
    return t.reshape(*t.shape[:lead], n, group, *t.shape[lead + 1 :])


def _wsum(sq: Tensor, w: Tensor | None) -> Tensor:
    """Σ_c w_c sq[c] over the leading column dimension (``w`` ``(k,)``, or ``(k, s)`` weights
    of each column and sample aligned with the two leading dimensions of ``sq``)."""
    if w is None:
        return sq.sum(0)
    if w.dim() == 1:
        return torch.tensordot(w.to(sq.dtype), sq, dims=1)
    return (sq * w.to(sq.dtype).reshape(*w.shape, *[1] * (sq.dim() - w.dim()))).sum(0)


def _wchunk(w: Tensor | None, c0: int, c1: int, s0: int, s1: int) -> Tensor | None:
    """The weights of columns c0..c1 (and samples s0..s1 for per-sample weights)."""
    if w is None:
        return None
    return w[c0:c1] if w.dim() == 1 else w[c0:c1, s0:s1]


def _at_sample_dim(w: Tensor, d: int, group: int, ndim: int) -> Tensor:
    """Per-(column, sample) weights ``(k, N)`` broadcastable to ``(k, *shape)`` whose dimension
    ``d`` (of ``ndim``) holds the samples, ``group`` entries each."""
    if group > 1:
        w = w.repeat_interleave(group, dim=1)
    return w.reshape(w.shape[0], *[1] * d, w.shape[1], *[1] * (ndim - d - 1))


_SQ_CACHE: list[Any] = [None]


def _col_squares(ctx: _Ctx) -> Tensor:
    """Σ_c w_c cols[c]^⊙2 of the call's columns, remembered for the last (cols, weights) pair:
    the weight and the bias of one layer are two calls with the same columns (held by weak
    reference, never kept alive)."""
    if ctx.squares is not None:
        return ctx.squares
    cols, w = ctx.cols, ctx.weights
    hit = _SQ_CACHE[0]
    if hit is not None:
        cref, version, wref, axis, value = hit
        same_w = (wref() if wref is not None else None) is w
        if cref() is cols and version == cols._version and same_w and axis == ctx.base_out_axis:
            return value
    if w is not None and w.dim() == 2:
        d, g = ctx.base_out_axis
        value = (cols * cols * _at_sample_dim(w, d, g, cols.dim() - 1).to(cols.dtype)).sum(0)
    else:
        value = _wsum(cols * cols, w)
    wref = None if w is None else weakref.ref(w)
    _SQ_CACHE[0] = (weakref.ref(cols), cols._version, wref, ctx.base_out_axis, value)
    return value


def _sum_squares(
    grads: Callable[[int, int, int, int], Tensor],
    num_cols: int,
    n: int,
    per: int,
    ctx: _Ctx,
    like: Tensor,
    extra: int = 0,
    squared: bool = False,
) -> Tensor:
    """Σ_c w_c Σ_n G_{c,n}^⊙2 (or rows over n) with G from ``grads(c0, c1, s0, s1)``
    shaped ``(c1 - c0, s1 - s0, *shape)`` (with ``squared``: ``grads`` returns the weighted
    squares summed over its columns, ``(s1 - s0, *shape)``), in chunks of columns and samples
    whose gradients take at most the chunk budget (``per``: entries of one G_{c,n} with its
    temporaries; ``extra``: entries per sample that do not depend on the column, e.g. an
    unfolded input). All columns go in one chunk when one sample allows it (larger products)."""
    entries = max(1, _budget(like) // like.element_size())
    s_step = entries // max(1, extra + num_cols * per)
    c_step = num_cols
    if s_step < 1:
        s_step = 1
        c_step = max(1, min(num_cols, (entries - extra) // max(1, per)))
    s_step = min(n, s_step)
    w = ctx.weights
    rows: list[Tensor] = []
    total: Tensor | None = None
    for s0 in range(0, n, s_step):
        s1 = min(n, s0 + s_step)
        part: Tensor | None = None
        for c0 in range(0, num_cols, c_step):
            c1 = min(num_cols, c0 + c_step)
            g = grads(c0, c1, s0, s1)
            sq = g if squared else _wsum(g * g, _wchunk(w, c0, c1, s0, s1))
            part = sq if part is None else part + sq
        assert part is not None
        if ctx.per_sample:
            rows.append(part)
        else:
            part = part.sum(0)
            total = part if total is None else total + part
    if ctx.per_sample:
        return torch.cat(rows)
    assert total is not None
    return total


def _block_rows(sq: Tensor, dim: int, n: int) -> Tensor:
    """Per-sample rows ``(N, *shape)`` of squares ``sq`` whose dimension ``dim`` is split over
    samples (each entry belongs to the one sample owning its index): zero elsewhere."""
    size = sq.shape[dim]
    group = size // n
    blocks = sq.unflatten(dim, (n, group)).movedim(dim, 0)  # (N, ..., group, ...)
    out = sq.new_zeros((n, *sq.shape[:dim], n, group, *sq.shape[dim + 1 :]))
    idx = torch.arange(n, device=sq.device)
    out.movedim(dim + 1, 1)[idx, idx] = blocks
    return out.flatten(dim + 1, dim + 2)


def _broadcast(ctx: _Ctx, factor: Any, pshape: Sequence[int], arg_shape: Sequence[int]) -> Tensor | None:
    """Elementwise interfaces: y = θ̃ ⊙ factor + (terms free of θ), θ̃ the parameter argument
    viewed as ``pshape`` and broadcast to the output. The per-sample gradient is the column
    times ``factor`` summed over the broadcast dimensions of one sample."""
    cols, n = ctx.cols, ctx.n
    out_shape = tuple(cols.shape[1:])
    nd = len(out_shape)
    if len(pshape) > nd:
        return None
    p = (1,) * (nd - len(pshape)) + tuple(pshape)
    if any(ps not in (1, os) for ps, os in zip(p, out_shape)):
        return None
    d, g = ctx.out_axis
    if out_shape[d] != n * g:
        return None
    summed = tuple(i for i in range(nd) if i != d and p[i] == 1 and out_shape[i] > 1)
    if isinstance(factor, Tensor):
        factor = factor.to(cols.dtype)
    split = p[d] == 1  # the parameter is shared by the samples along the sample dim
    w = ctx.weights

    if not summed and (g == 1 or not split):  # one entry of θ per sample entry: sum the columns first
        d2 = _col_squares(ctx)
        sq = d2 * (factor * factor) if factor is not None else d2
        sq = sq.expand(out_shape)
        if split:
            sq = sq.unflatten(d, (n, g)).sum(d + 1)  # (…, N, …)
            res = sq.movedim(d, 0).unsqueeze(d + 1) if ctx.per_sample else sq.sum(d, keepdim=True)
        else:
            res = _block_rows(sq, d, n) if ctx.per_sample else sq
        return res.reshape(((n,) if ctx.per_sample else ()) + tuple(arg_shape))

    def reduce(e: Tensor) -> Tensor:  # (k, *out_shape) -> per-sample gradients
        e = e.expand((e.shape[0], *out_shape))
        if summed:
            e = e.sum(tuple(i + 1 for i in summed), keepdim=True)
        if split:
            e = e.unflatten(d + 1, (n, g)).sum(d + 2)  # (k, …, N, …)
        return e

    per = math.prod(out_shape) // max(1, math.prod(out_shape[i] for i in summed))
    step = max(1, _budget(cols) // max(1, 3 * per * cols.element_size()))
    total: Tensor | None = None
    for c0 in range(0, cols.shape[0], step):
        c1 = min(cols.shape[0], c0 + step)
        e = cols[c0:c1] if factor is None else cols[c0:c1] * factor
        gr = reduce(e)
        if w is not None and w.dim() == 2:
            sq = (gr * gr * _at_sample_dim(w[c0:c1], d, 1 if split else g, nd).to(gr.dtype)).sum(0)
        else:
            sq = _wsum(gr * gr, None if w is None else w[c0:c1])
        total = sq if total is None else total + sq
    assert total is not None
    if split:
        res = total.movedim(d, 0).unsqueeze(d + 1) if ctx.per_sample else total.sum(d, keepdim=True)
    else:
        res = _block_rows(total, d, n) if ctx.per_sample else total
    return res.reshape(((n,) if ctx.per_sample else ()) + tuple(arg_shape))


# ---------------------------------------------------------------------------------------------
# Matrix products


def _bmm_right(
    x: Tensor, x_axis: SampleAxis, cols: Tensor, ctx: _Ctx, col_sq: Callable[[], Tensor]
) -> Tensor | None:
    """y = x @ P with x ``(B, M, k)`` per-sample along dim 0 (batch) or 1 (rows), P ``(B, k, m)``
    the same for every sample, cols ``(R, B, M, m)``: the squares shaped ``(B, k, m)``.
    ``col_sq()`` gives Σ_c w_c cols[c]^⊙2 ``(B, M, m)``."""
    n = ctx.n
    dim, g = x_axis
    if dim not in (0, 1) or ctx.out_axis != x_axis:
        return None
    b, rows, k = x.shape
    m = cols.shape[-1]
    r = cols.shape[0]
    if dim == 1:  # samples along the rows: sample n meets every batch slice
        xs = x.reshape(b, n, g, k)
        ds = cols.reshape(r, b, n, g, m)
        if g == 1:  # one row per sample and slice: sum the columns before squaring
            x2 = xs[:, :, 0] ** 2  # (B, N, k)
            d2 = col_sq()  # (B, N, m)
            if ctx.per_sample:
                return torch.einsum("bnk,bnm->nbkm", x2, d2)
            return x2.transpose(1, 2) @ d2
        xt = xs.permute(1, 0, 3, 2)  # (N, B, k, g)

        def grads(c0: int, c1: int, s0: int, s1: int) -> Tensor:
            dd = ds[c0:c1, :, s0:s1].permute(0, 2, 1, 3, 4)  # (c, s, B, g, m)
            return xt[s0:s1] @ dd  # (c, s, B, k, m)

        return _sum_squares(grads, r, n, 3 * b * k * m + b * g * m, ctx, cols)
    # samples along the batch: every slice belongs to one sample
    xs = x.reshape(n, g, rows, k)
    ds = cols.reshape(r, n, g, rows, m)
    if rows == 1:
        x2 = xs[:, :, 0] ** 2  # (N, g, k)
        d2 = col_sq().reshape(n, g, m)
        sq = x2.unsqueeze(-1) * d2.unsqueeze(-2)  # (N, g, k, m)
    else:
        xt = xs.transpose(-1, -2)  # (N, g, k, M)
        ctx_rows = ctx.per_sample
        ctx.per_sample = True  # keep the sample axis: each sample owns its slices

        def grads(c0: int, c1: int, s0: int, s1: int) -> Tensor:
            return xt[s0:s1] @ ds[c0:c1, s0:s1]  # (c, s, g, k, m)

        sq = _sum_squares(grads, r, n, 3 * g * k * m, ctx, cols)
        ctx.per_sample = ctx_rows
    sq = sq.reshape(b, k, m)
    return _block_rows(sq, 0, n) if ctx.per_sample else sq


def _matmul_interface(ctx: _Ctx) -> Tensor | None:
    """``mm(self, mat2)``, ``bmm(self, mat2)``, ``addmm(self, mat1, mat2, beta, alpha)``,
    ``baddbmm(self, batch1, batch2, beta, alpha)`` (``self``: the bias)."""
    func = ctx.node.func
    if func in (aten.addmm.default, aten.baddbmm.default):
        left, right = ("mat1", "mat2") if func is aten.addmm.default else ("batch1", "batch2")
        scale = ctx.arg("alpha")
        if ctx.name == "self":  # the bias
            beta = ctx.arg("beta")
            bias = ctx.arg("self")
            return _broadcast(ctx, None if beta == 1 else beta, bias.shape, bias.shape)
    else:
        left, right, scale = "self", "mat2", 1
    batched = func in (aten.bmm.default, aten.baddbmm.default)
    res = _matmul_squares(ctx, left, right, batched)
    return res if res is None or scale == 1 else res * (scale * scale)


def _matmul_squares(ctx: _Ctx, left: str, right: str, batched: bool) -> Tensor | None:
    cols = ctx.cols
    squeeze = 1 if ctx.per_sample else 0
    if ctx.name == right:  # y = x @ P
        if left not in ctx.axes:
            return None
        x, axis = ctx.arg(left), ctx.axes[left]
        if batched:
            return _bmm_right(x, axis, cols, ctx, lambda: _col_squares(ctx))
        out_axis = ctx.out_axis
        ctx.out_axis = (out_axis[0] + 1, out_axis[1])
        res = _bmm_right(
            x.unsqueeze(0),
            (axis[0] + 1, axis[1]),
            cols.unsqueeze(1),
            ctx,
            lambda: _col_squares(ctx)[None],
        )
        ctx.out_axis = out_axis
        return None if res is None else res.squeeze(squeeze)
    if ctx.name == left:  # y = P @ x, i.e. yᵀ = xᵀ Pᵀ
        if right not in ctx.axes:
            return None
        x, axis = ctx.arg(right), ctx.axes[right]
        bcols = cols
        if not batched:
            x, bcols = x.unsqueeze(0), cols.unsqueeze(1)
            axis = (axis[0] + 1, axis[1])
        nd = x.dim()
        t_axis = {nd - 1: (nd - 2, axis[1]), 0: (0, axis[1])}.get(axis[0])  # columns of x: rows of xᵀ
        o_dim = ctx.out_axis[0] + (0 if batched else 1)
        t_out = {nd - 1: (nd - 2, ctx.out_axis[1]), 0: (0, ctx.out_axis[1])}.get(o_dim)
        if t_axis is None or t_out is None:
            return None

        def col_sq() -> Tensor:
            sq = _col_squares(ctx)
            return (sq if batched else sq[None]).transpose(-1, -2)

        out_axis = ctx.out_axis
        ctx.out_axis = t_out
        res = _bmm_right(x.transpose(-1, -2), t_axis, bcols.transpose(-1, -2), ctx, col_sq)
        ctx.out_axis = out_axis
        if res is None:
            return None
        res = res.transpose(-1, -2)
        return res if batched else res.squeeze(squeeze)
    return None


# ---------------------------------------------------------------------------------------------
# Convolutions


def _conv_interface(ctx: _Ctx) -> Tensor | None:
    """``convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)``."""
    if "input" not in ctx.axes or ctx.axes["input"][0] != 0 or ctx.out_axis != ctx.axes["input"]:
        return None
    weight = ctx.arg("weight")
    if ctx.name == "bias":
        bias = ctx.arg("bias")
        spatial = ctx.cols.dim() - 3
        return _broadcast(ctx, None, (bias.shape[0], *([1] * spatial)), bias.shape)
    if ctx.name != "weight":
        return None
    x = ctx.arg("input")
    if x.dim() == 4 and not ctx.arg("transposed"):
        return _conv2d_weight(ctx, x, weight)
    return _conv_weight_vmap(ctx, x, weight)


def _conv2d_weight(ctx: _Ctx, x: Tensor, weight: Tensor) -> Tensor:
    """Per-(column, sample) weight gradients Δ_{c,n} U_nᵀ with U_n the unfolded input."""
    n, g = ctx.n, ctx.out_axis[1]
    groups = ctx.arg("groups")
    cols = ctx.cols
    r = cols.shape[0]
    cout = weight.shape[0]
    o = cout // groups
    i = math.prod(weight.shape[1:])
    kernel = tuple(weight.shape[2:])
    stride, padding, dilation = ctx.arg("stride"), ctx.arg("padding"), ctx.arg("dilation")
    positions = g * cols[0, 0, 0].numel()
    # (R, N, groups, o, g·L): the positions of one sample are its g rows times the output pixels
    ds = cols.reshape(r, n, g, groups, o, -1).permute(0, 1, 3, 4, 2, 5).reshape(r, n, groups, o, positions)
    xs = x.reshape(n, g, *x.shape[1:])
    w = ctx.weights

    def unfold(s0: int, s1: int) -> Tensor:  # (s, groups, i, g·L)
        xx = xs[s0:s1].reshape(-1, *x.shape[1:])
        u = F.unfold(xx, kernel, dilation=dilation, padding=padding, stride=stride)
        u = u.reshape(s1 - s0, g, groups, i, -1).permute(0, 2, 3, 1, 4)
        return u.reshape(s1 - s0, groups, i, positions)

    if positions == 1:  # one position per sample: sum the columns before squaring
        d2 = _col_squares(ctx).reshape(n, groups, o)
        u2 = unfold(0, n)[..., 0] ** 2  # (N, groups, i)
        sq = d2.unsqueeze(-1) * u2.unsqueeze(-2)  # (N, groups, o, i)
        return (sq if ctx.per_sample else sq.sum(0)).reshape(
            *sq.shape[: 1 if ctx.per_sample else 0], *weight.shape
        )

    cache: dict[tuple[int, int], Tensor] = {}

    def grads(c0: int, c1: int, s0: int, s1: int) -> Tensor:
        u = cache.get((s0, s1))
        if u is None:
            cache.clear()
            u = cache[(s0, s1)] = unfold(s0, s1).transpose(-1, -2)  # (s, groups, g·L, i)
        k = c1 - c0
        dd = ds[c0:c1, s0:s1].permute(1, 2, 0, 3, 4).reshape(s1 - s0, groups, k * o, positions)
        gw = dd @ u  # (s, groups, k·o, i): all k columns in one product
        sq = (gw * gw).reshape(s1 - s0, groups, k, o, i)
        if w is not None:
            wk = w[c0:c1].reshape(k, 1) if w.dim() == 1 else w[c0:c1, s0:s1]
            sq = sq * wk.T.to(sq.dtype).reshape(-1, 1, k, 1, 1)
        return sq.sum(2)

    per = cout * positions + 2 * cout * i  # the columns' deltas, the gradients and their squares
    sq = _sum_squares(grads, r, n, per, ctx, cols, extra=2 * groups * i * positions, squared=True)
    return sq.reshape(*((n,) if ctx.per_sample else ()), *weight.shape)


def _conv_weight_vmap(ctx: _Ctx, x: Tensor, weight: Tensor) -> Tensor:
    """Per-(column, sample) weight gradients by ``vmap`` of ``convolution_backward``."""
    n, g = ctx.n, ctx.out_axis[1]
    cols = ctx.cols
    r = cols.shape[0]
    xs = x.reshape(n, g, *x.shape[1:])
    ds = cols.reshape(r, n, g, *cols.shape[2:])
    opts = [ctx.arg(a) for a in ("stride", "padding", "dilation", "transposed", "output_padding", "groups")]

    def one(xn: Tensor, dn: Tensor) -> Tensor:
        return aten.convolution_backward(dn, xn, weight, None, *opts, [False, True, False])[1]

    per_pair = torch.func.vmap(torch.func.vmap(one), in_dims=(None, 0))

    def grads(c0: int, c1: int, s0: int, s1: int) -> Tensor:
        return per_pair(xs[s0:s1], ds[c0:c1, s0:s1])

    sq = _sum_squares(grads, r, n, 3 * weight.numel() + cols[0, 0].numel() * g, ctx, cols)
    return sq.reshape(*((n,) if ctx.per_sample else ()), *weight.shape)


# ---------------------------------------------------------------------------------------------
# Embedding


def _embedding_interface(ctx: _Ctx) -> Tensor | None:
    """``embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)``."""
    if ctx.name != "weight" or "indices" not in ctx.axes or ctx.arg("scale_grad_by_freq"):
        return None
    weight, idx = ctx.arg("weight"), ctx.arg("indices")
    axis = ctx.axes["indices"]
    if ctx.out_axis != axis or weight.dim() != 2:
        return None
    n, cols, w = ctx.n, ctx.cols, ctx.weights
    vocab, dim = weight.shape
    r = cols.shape[0]
    ids = _split(idx, axis, n).reshape(n, -1)  # (N, L)
    ds = _split(cols, axis, n, 1).reshape(r, n, -1, dim)  # (R, N, L, D)
    pad = ctx.arg("padding_idx")
    length = ids.shape[1]
    owner = torch.arange(n, device=ids.device).unsqueeze(1).expand(n, length)
    keys = (owner * vocab + ids).reshape(-1)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    if uniq.numel() == keys.numel():  # no sample repeats an index: sum the columns first
        sq = _split(_col_squares(ctx), axis, n).reshape(-1, dim)  # (N·L, D)
        rows_of, owners = ids.reshape(-1), owner.reshape(-1)
    else:  # per-(column, sample) row sums over repeated indices
        sq_total: Tensor | None = None
        step = max(1, _budget(cols) // max(1, 3 * uniq.numel() * dim * cols.element_size()))
        flat = ds.reshape(r, -1, dim)
        for c0 in range(0, r, step):
            c1 = min(r, c0 + step)
            summed = flat.new_zeros(c1 - c0, uniq.numel(), dim).index_add_(1, inverse, flat[c0:c1])
            wk = None if w is None else w[c0:c1] if w.dim() == 1 else w[c0:c1][:, uniq // vocab]
            part = _wsum(summed * summed, wk)
            sq_total = part if sq_total is None else sq_total + part
        assert sq_total is not None
        sq = sq_total
        rows_of, owners = uniq % vocab, uniq // vocab
    if pad is not None and pad >= 0:
        sq = sq * (rows_of != pad).unsqueeze(1).to(sq.dtype)
    if ctx.per_sample:
        out = sq.new_zeros(n * vocab, dim).index_add_(0, owners * vocab + rows_of, sq)
        return out.reshape(n, vocab, dim)
    return sq.new_zeros(vocab, dim).index_add_(0, rows_of, sq)


# ---------------------------------------------------------------------------------------------
# Normalization affines and elementwise ops


def _layer_norm_interface(ctx: _Ctx) -> Tensor | None:
    """``native_layer_norm(input, normalized_shape, weight, bias, eps)``: y = x̂ ⊙ γ + β."""
    if ctx.name not in ("weight", "bias") or "input" not in ctx.axes:
        return None
    param = ctx.arg(ctx.name)
    shape = tuple(ctx.arg("normalized_shape"))
    if ctx.name == "bias":
        return _broadcast(ctx, None, shape, param.shape)
    xhat = (ctx.arg("input") - ctx.output(1)) * ctx.output(2)
    return _broadcast(ctx, xhat, shape, param.shape)


def _group_norm_interface(ctx: _Ctx) -> Tensor | None:
    """``native_group_norm(input, weight, bias, N, C, HxW, group, eps)``: per-channel affine."""
    if ctx.name not in ("weight", "bias") or "input" not in ctx.axes:
        return None
    param = ctx.arg(ctx.name)
    x = ctx.arg("input")
    pshape = (param.shape[0], *([1] * (x.dim() - 2)))
    if ctx.name == "bias":
        return _broadcast(ctx, None, pshape, param.shape)
    groups = ctx.arg("group")
    mean, rstd = ctx.output(1), ctx.output(2)  # (N0, groups)
    xg = x.reshape(x.shape[0], groups, -1)
    xhat = ((xg - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.shape)
    return _broadcast(ctx, xhat, pshape, param.shape)


def _batch_norm_interface(ctx: _Ctx) -> Tensor | None:
    """Eval-mode batch norm (running statistics): y = (x − μ)/√(σ² + ε) ⊙ γ + β per channel."""
    if ctx.name not in ("weight", "bias") or "input" not in ctx.axes:
        return None
    if ctx.node.func is aten.native_batch_norm.default and ctx.arg("training"):
        return None  # batch statistics mix the samples
    mean, var = ctx.arg("running_mean"), ctx.arg("running_var")
    if mean is None or var is None:
        return None
    param = ctx.arg(ctx.name)
    x = ctx.arg("input")
    pshape = (param.shape[0], *([1] * (x.dim() - 2)))
    if ctx.name == "bias":
        return _broadcast(ctx, None, pshape, param.shape)
    xhat = (x - mean.reshape(pshape)) * torch.rsqrt(var.reshape(pshape) + ctx.arg("eps"))
    return _broadcast(ctx, xhat, pshape, param.shape)


def _elementwise_interface(ctx: _Ctx) -> Tensor | None:
    """``add``/``sub``/``mul``/``div.Tensor`` with a parameter operand broadcast to the output."""
    func = ctx.node.func
    if ctx.name not in ("self", "other"):
        return None
    param = ctx.arg(ctx.name)
    if not isinstance(param, Tensor):
        return None
    a, b = ctx.arg("self"), ctx.arg("other")
    factor: Any
    if func in (aten.add.Tensor, aten.sub.Tensor):
        alpha = ctx.arg("alpha")
        factor = None if ctx.name == "self" or alpha in (1, -1) else alpha
    elif func is aten.mul.Tensor:
        factor = b if ctx.name == "self" else a
    elif func is aten.div.Tensor:
        factor = 1 / b if ctx.name == "self" else -a / (b * b)
    else:
        return None
    return _broadcast(ctx, factor, param.shape, param.shape)


INTERFACES: dict[str, Callable[[_Ctx], Tensor | None]] = {
    "mm": _matmul_interface,
    "bmm": _matmul_interface,
    "addmm": _matmul_interface,
    "baddbmm": _matmul_interface,
    "convolution": _conv_interface,
    "embedding": _embedding_interface,
    "native_layer_norm": _layer_norm_interface,
    "native_group_norm": _group_norm_interface,
    "native_batch_norm": _batch_norm_interface,
    "_native_batch_norm_legit_no_training": _batch_norm_interface,
    "add.Tensor": _elementwise_interface,
    "sub.Tensor": _elementwise_interface,
    "mul.Tensor": _elementwise_interface,
    "div.Tensor": _elementwise_interface,
}
"""The interface rule of each op (registered as ``OpRule.interface`` in :mod:`secorder._engine.rules`)."""

"""Column-batched vector-Jacobian products written directly for the sweep's reverse walk.

The walk (:mod:`secorder._engine.sweep`) pulls a chunk of k columns (k, *value shape) back
through each op. Its generic road builds the op's ``vjp`` (re-running the op forward) and
``vmap``-s the pullback over the columns. For ops where that is wasteful, ``OpRule.vjp`` holds
a rule ``(node, values, positions, cts) -> list of (k, *argument shape) | None`` that forms
the products directly from the recorded values (None: the generic road):

* ``max_pool*_with_indices``: a scatter of the columns by the recorded indices (the generic
  VJP materializes and copies);
* ``convolution`` (input side): ``convolution_backward`` with only the input gradient and a
  zero-stride stand-in for the input (its values are not read), no forward re-run; on CPU,
  columns of a megabyte or more go one at a time (vmap folds them into one batch, which ran
  about 25% slower on the benchmark CNN: the (k, N, C, H, W) blocks leave the cache);
* ``mm`` / ``addmm`` (either matrix operand): one matrix product of all k columns with the
  other operand (``ct @ Bᵀ``, ``Aᵀ @ ct``), times ``alpha``;
* views (``t``, ``transpose``, ``permute``, ``view``/``reshape``/``_unsafe_view``,
  ``unsqueeze``, ``squeeze``): the inverse permutation or reshape of the columns;
* unary pointwise ops with a closed-form derivative in the registry (``OpRule.derivs``: tanh,
  sigmoid, exp, ...): the columns times f'(x); ``relu``: the columns where the output is
  positive (``threshold_backward``'s convention: zero at x = 0);
* the ops of an attention block: ``split``/``split_with_sizes`` (one concatenation of the
  pieces' columns), ``bmm`` (``ct @ Bᵀ``, ``Aᵀ @ ct``), ``native_layer_norm`` (input side, one
  fused ``native_layer_norm_backward`` with the recorded statistics), ``_softmax`` /
  ``_log_softmax`` (from the recorded output), ``masked_fill`` (the columns with the masked
  entries zeroed), ``add``/``sub``/``mul``/``div`` by the other operand's value (broadcast
  dimensions summed back; a denominator's side takes the generic road), ``clone``/``alias``/
  ``_to_copy`` (the columns as they are) and ``expand`` (summed over the broadcast dimensions).
  On the benchmark transformer block these were a third of the walk as generic ``vjp`` +
  ``vmap`` calls (the split's backward alone about 95 ms of 850).

Each of these replaced a ``vjp`` (a forward re-run under a functorch transform) and a
``vmap`` of its pullback per op and chunk: on the benchmark MLP that Python overhead was most
of the walk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from secorder._engine.tape import Ref, TapeNode, resolve

__all__ = ["VJPS"]

aten = torch.ops.aten

_LOOP_BYTES = 1 << 20  # CPU: columns this large go through convolution_backward one at a time


def _only_first(node: TapeNode, positions: list[tuple[Any, ...]], cts: dict[int, Tensor]) -> Tensor | None:
    """The columns at the first output when they are the only ones and ``args[0]`` the only position."""
    out = node.outputs[0]
    if positions != [(0, 0)] or out is None or out not in cts or len(cts) != 1:
        return None
    if not isinstance(node.args[0], Ref):
        return None
    return cts[out]


def max_pool_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``max_pool2d_with_indices``: scatter the columns by the recorded indices."""
    ct = _only_first(node, positions, cts)
    ind = node.outputs[1]
    if ct is None or ind is None:
        return None
    x = values[node.args[0].index]
    k = ct.shape[0]
    idx = values[ind].flatten(-2).expand(k, *values[ind].shape[:-2], -1)
    grad = ct.new_zeros(k, *x.shape[:-2], x.shape[-2] * x.shape[-1])
    grad.scatter_add_(-1, idx, ct.flatten(-2))
    return [grad.reshape(k, *x.shape)]


def convolution_vjp(
    node: TapeNode,
    values: Sequence[Any],
    positions: list[tuple[Any, ...]],
    cts: dict[int, Tensor],
    inplace: bool = False,
) -> list[Tensor] | None:
    """``convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
    groups)``: the input gradient of every column by ``convolution_backward``. With ``inplace``
    (the walk owns the columns) and columns taken one at a time, column j's gradient is written
    over column j when both have the same number of entries (the benchmark CNN's 3×3 convolutions
    with padding): no fresh (k, *input shape) block, whose page faults cost more than the copy."""
    ct = _only_first(node, positions, cts)
    if ct is None or node.kwargs or len(node.args) != 9:
        return None
    args = resolve(node.args, values)
    x, weight = args[0], args[1]
    if not isinstance(weight, Tensor):
        return None
    opts = list(args[3:9])
    k = ct.shape[0]

    def back(g: Tensor, shape: tuple[int, ...]) -> Tensor:
        stand_in = g.new_empty(1).expand(shape)  # convolution_backward reads the input's sizes only
        return aten.convolution_backward(g, stand_in, weight, None, *opts, [True, False, False])[0]

    column_bytes = ct[0].numel() * ct.element_size()
    if ct.device.type == "cpu" and column_bytes >= _LOOP_BYTES:
        if inplace and ct.is_contiguous() and ct[0].numel() == x.numel():
            buf = ct.view(k, -1)
            for j in range(k):  # column j is read before it is overwritten, and never again
                buf[j].copy_(back(ct[j], tuple(x.shape)).reshape(-1))
            return [buf.view(k, *x.shape)]
        return [torch.stack([back(ct[j], tuple(x.shape)) for j in range(k)])]
    if x.dim() != weight.dim():  # an unbatched input: no batch dimension to fold the columns into
        return [torch.stack([back(ct[j], tuple(x.shape)) for j in range(k)])]
    folded = back(ct.reshape(k * x.shape[0], *ct.shape[2:]), (k * x.shape[0], *x.shape[1:]))
    return [folded.reshape(k, *x.shape)]


def matmul_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``mm(self, mat2)``, ``addmm(self, mat1, mat2, beta, alpha)``: the matrix operands' columns."""
    out = node.outputs[0]
    if out is None or out not in cts or len(cts) != 1:
        return None
    ct = cts[out]
    args, kwargs = resolve(node.args, values), resolve(node.kwargs, values)
    if node.func is aten.addmm.default:
        names = ("self", "mat1", "mat2", "beta", "alpha")
        bound = {**dict(zip(names, args)), **kwargs}
        a, b, alpha, first = bound["mat1"], bound["mat2"], bound.get("alpha", 1), 1
    else:
        if kwargs or len(args) != 2:
            return None
        a, b, alpha, first = args[0], args[1], 1, 0
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.dim() != 2 or b.dim() != 2:
        return None
    res = []
    for p in positions:
        if p == (0, first):
            g = ct @ b.T.to(ct.dtype)  # (k, n, m) @ (m, p): one product over all columns
        elif p == (0, first + 1):
            g = a.T.to(ct.dtype) @ ct  # (p, n) @ (k, n, m)
        else:  # the bias of addmm (batched only in unusual programs): the generic road
            return None
        res.append(g if alpha == 1 else g * alpha)
    return res


def _inverse(perm: Sequence[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def view_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """Views that keep every entry once: the inverse permutation, or a reshape back."""
    ct = _only_first(node, positions, cts)
    if ct is None:
        return None
    x = values[node.args[0].index]
    if not isinstance(x, Tensor):
        return None
    func = node.func
    nd = x.dim()
    if func is aten.t.default or func is aten.transpose.int:
        if nd < 2 and func is aten.t.default:
            return [ct]
        d0, d1 = (0, 1) if func is aten.t.default else (int(node.args[1]) % nd, int(node.args[2]) % nd)
        return [ct.transpose(d0 + 1, d1 + 1)]
    if func is aten.permute.default:
        perm = [int(d) % nd for d in node.args[1]]
        return [ct.permute(0, *[1 + i for i in _inverse(perm)])]
    return [ct.reshape(ct.shape[0], *x.shape)]  # view, reshape, unsqueeze, squeeze


def pointwise_vjp(
    node: TapeNode,
    values: Sequence[Any],
    positions: list[tuple[Any, ...]],
    cts: dict[int, Tensor],
    inplace: bool = False,
) -> list[Tensor] | None:
    """Unary pointwise ops: the columns times f'(x) from the registry's closed form. With
    ``inplace`` (the walk owns the columns: a fresh tensor nothing else references) the product
    overwrites them: on CPU a fresh (k, *shape) block of tens of megabytes costs more in page
    faults than the product itself (the benchmark CNN's ReLUs: 23 ms -> 2.5 ms)."""
    from secorder._engine.rules import rule  # the registry imports this module

    ct = _only_first(node, positions, cts)
    derivs = rule(node.func).derivs
    if ct is None or derivs is None or any(isinstance(a, (Ref, list, tuple)) for a in node.args[1:]):
        return None
    if any(isinstance(v, (Ref, list, tuple)) for v in node.kwargs.values()):
        return None
    x = values[node.args[0].index]
    if node.func is aten.relu.default:  # threshold_backward: zero where the output is not positive
        out = node.outputs[0]
        assert out is not None
        y = values[out].to(ct.dtype).expand_as(ct)
        if inplace:  # elementwise: the output may be the gradient itself
            return [aten.threshold_backward.grad_input(ct, y, 0, grad_input=ct)]
        return [aten.threshold_backward(ct, y, 0)]  # (torch.where: 10x slower)
    from_output = rule(node.func).deriv_from_output
    out = node.outputs[0]
    if from_output is not None and out is not None and isinstance(values[out], Tensor):
        d1 = from_output(values[out])  # f' from the recorded output: f is not evaluated again
    else:
        d1 = derivs(node.func, x, *node.args[1:], **node.kwargs)[1]
    return [ct.mul_(d1.to(ct.dtype)) if inplace else ct * d1.to(ct.dtype)]


def _unbroadcast(g: Tensor, shape: Sequence[int]) -> Tensor:
    """(k, *out shape) columns of a broadcast result summed back to (k, *shape)."""
    k, nd = g.shape[0], len(shape)
    lead = g.dim() - 1 - nd
    if lead:
        g = g.sum(tuple(range(1, 1 + lead)))
    dims = tuple(1 + i for i, s in enumerate(shape) if s == 1 and g.shape[1 + i] != 1)
    if dims:
        g = g.sum(dims, keepdim=True)
    return g.reshape(k, *shape)


def _tensor_args(node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]]) -> list[Any] | None:
    """The resolved positional arguments when ``positions`` are positional tensor arguments and
    the node has no keyword arguments (else None: the generic road)."""
    if node.kwargs or any(len(p) != 2 or p[0] != 0 for p in positions):
        return None
    args = list(resolve(node.args, values))
    if any(not isinstance(args[p[1]], Tensor) for p in positions):
        return None
    return args


def identity_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``clone``, ``alias``, ``_to_copy`` (a dtype or device cast), ``lift_fresh_copy``: the
    columns as they are (cast back to the input's dtype and device)."""
    ct = _only_first(node, positions, cts)
    if ct is None:
        return None
    x = values[node.args[0].index]
    if not isinstance(x, Tensor) or tuple(x.shape) != tuple(ct.shape[1:]):
        return None
    return [ct.to(device=x.device, dtype=x.dtype)]


def expand_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``expand``: the columns summed over the broadcast dimensions."""
    ct = _only_first(node, positions, cts)
    if ct is None:
        return None
    x = values[node.args[0].index]
    return None if not isinstance(x, Tensor) else [_unbroadcast(ct, x.shape)]


def split_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``split`` / ``split_with_sizes``: the pieces' columns concatenated (zeros for pieces
    without columns)."""
    if positions != [(0, 0)] or node.kwargs or not isinstance(node.args[0], Ref):
        return None
    x = values[node.args[0].index]
    if not isinstance(x, Tensor) or x.dim() == 0:
        return None
    dim = int(node.args[2]) % x.dim() if len(node.args) > 2 else 0
    size = x.shape[dim]
    if node.func is aten.split.Tensor:
        step = int(node.args[1])
        sizes = [min(step, size - s) for s in range(0, size, step)] if step > 0 else []
    else:
        sizes = [int(s) for s in node.args[1]]
    if len(sizes) != len(node.outputs) or sum(sizes) != size:
        return None
    ct0 = next(iter(cts.values()))
    k = ct0.shape[0]
    pieces = [
        cts[o] if o is not None and o in cts else ct0.new_zeros(k, *x.shape[:dim], n, *x.shape[dim + 1 :])
        for o, n in zip(node.outputs, sizes)
    ]
    return [torch.cat(pieces, dim + 1).to(x.dtype)]


def bmm_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``bmm(self, mat2)``: ``ct @ mat2ᵀ`` and ``selfᵀ @ ct`` over all columns at once."""
    out = node.outputs[0]
    args = _tensor_args(node, values, positions)
    if out is None or out not in cts or len(cts) != 1 or args is None or len(args) != 2:
        return None
    a, b = args
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return None
    ct = cts[out]
    res = []
    for p in positions:
        if p == (0, 0):
            res.append(torch.matmul(ct, b.transpose(-1, -2).to(ct.dtype)).to(a.dtype))
        else:
            res.append(torch.matmul(a.transpose(-1, -2).to(ct.dtype), ct).to(b.dtype))
    return res


def arith_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``add``/``sub`` (with ``alpha``), ``mul`` and ``div`` by an argument the columns do not
    flow into (either operand, broadcasting summed back): the columns times the local factor."""
    out = node.outputs[0]
    args = _tensor_args(node, values, positions)
    if out is None or out not in cts or len(cts) != 1 or args is None:
        return None
    func = node.func
    ct = cts[out]
    if func in (aten.add.Tensor, aten.sub.Tensor):
        if len(args) not in (2, 3):
            return None
        alpha = args[2] if len(args) == 3 else 1
        if isinstance(alpha, Tensor):
            return None
        factors: list[Any] = [1, alpha if func is aten.add.Tensor else -alpha]
    elif func is aten.mul.Tensor and len(args) == 2:
        factors = [args[1], args[0]]
    elif func is aten.div.Tensor and len(args) == 2 and positions == [(0, 0)]:
        factors = [None, None]  # ct / other
    else:
        return None
    res = []
    for p in positions:
        j = p[1]
        x = args[j]
        if func is aten.div.Tensor:
            other = args[1]
            g = ct / (other.to(ct.dtype) if isinstance(other, Tensor) else other)
        else:
            f = factors[j]
            factor = f.to(ct.dtype) if isinstance(f, Tensor) else f
            g = ct if isinstance(factor, (int, float)) and factor == 1 else ct * factor
        res.append(_unbroadcast(g, x.shape).to(x.dtype))
    return res


def masked_fill_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``masked_fill(self, mask, value)`` (a constant value): the columns with the masked entries zeroed."""
    ct = _only_first(node, positions, cts)
    if ct is None or node.kwargs or len(node.args) != 3 or not isinstance(node.args[1], Ref):
        return None
    x, mask = values[node.args[0].index], values[node.args[1].index]
    if not isinstance(x, Tensor) or not isinstance(mask, Tensor) or tuple(x.shape) != tuple(ct.shape[1:]):
        return None
    return [ct.masked_fill(mask, 0).to(x.dtype)]


def softmax_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``_softmax`` / ``_log_softmax`` (no half-to-float) from the recorded output y:
    y ⊙ (ct − ⟨ct, y⟩) and ct − exp(y) Σ ct over the reduced dimension."""
    ct = _only_first(node, positions, cts)
    out = node.outputs[0]
    if ct is None or out is None or node.kwargs or len(node.args) != 3 or node.args[2]:
        return None
    y = values[out]
    if not isinstance(y, Tensor) or y.dim() == 0:
        return None
    dim = 1 + int(node.args[1]) % y.dim()
    y = y.to(ct.dtype)
    if node.func is aten._softmax.default:
        return [y * (ct - (ct * y).sum(dim, keepdim=True))]
    return [ct - y.exp() * ct.sum(dim, keepdim=True)]


def layer_norm_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``native_layer_norm(input, normalized_shape, weight, bias, eps)`` (input side): one fused
    ``native_layer_norm_backward`` over all k columns with the recorded mean and 1/std (no
    forward re-run, no vmap). The kernel needs materialized (k, ...) copies of the input and
    the statistics (expanded zero-stride stand-ins give wrong results); still about 8× faster
    than the same formula in elementwise ops on the (k, N, d) columns of the benchmark MLP."""
    ct = _only_first(node, positions, cts)
    m_out, r_out = node.outputs[1:3] if len(node.outputs) == 3 else (None, None)
    if ct is None or node.kwargs or len(node.args) != 5 or m_out is None or r_out is None:
        return None
    args = resolve(node.args, values)
    x, shape, weight = args[0], list(args[1]), args[2]
    mean, rstd = values[m_out], values[r_out]
    if not isinstance(x, Tensor) or not isinstance(mean, Tensor) or not isinstance(rstd, Tensor):
        return None
    if ct.dtype != x.dtype or (isinstance(weight, Tensor) and weight.dtype != x.dtype):
        return None
    k = ct.shape[0]

    def copies(t: Tensor) -> Tensor:
        return t.unsqueeze(0).expand(k, *t.shape).contiguous()

    grad = aten.native_layer_norm_backward(
        ct.contiguous(),
        copies(x),
        shape,
        copies(mean),
        copies(rstd),
        weight if isinstance(weight, Tensor) else None,
        None,
        [True, False, False],
    )[0]
    return [grad]


_VIEW_OPS = (
    "t", "transpose.int", "permute", "view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "squeeze.dim",
    "squeeze.dims",
)  # fmt: skip
_POINTWISE_OPS = (
    "tanh", "sigmoid", "sin", "cos", "exp", "log", "sqrt", "rsqrt", "reciprocal", "pow.Tensor_Scalar", "relu",
    "silu", "softplus",
)  # fmt: skip

FRESH = frozenset({max_pool_vjp, convolution_vjp, matmul_vjp, pointwise_vjp})
"""Rules whose results are tensors of their own (no storage shared with the recorded values or
with columns the walk still needs; with ``inplace`` they may return the storage of the columns
they were given, which the walk owned): the walk may update them in place. ``view_vjp`` returns
views of the columns."""

INPLACE = frozenset({pointwise_vjp, convolution_vjp})
"""Rules that accept ``inplace=True`` (overwrite columns the walk owns)."""

VJPS: dict[str, Any] = {
    "max_pool2d_with_indices": max_pool_vjp,
    "convolution": convolution_vjp,
    "mm": matmul_vjp,
    "addmm": matmul_vjp,
    **dict.fromkeys(_VIEW_OPS, view_vjp),
    **dict.fromkeys(_POINTWISE_OPS, pointwise_vjp),
    **dict.fromkeys(("clone", "alias", "_to_copy", "lift_fresh_copy"), identity_vjp),
    "expand": expand_vjp,
    "split.Tensor": split_vjp,
    "split_with_sizes": split_vjp,
    "bmm": bmm_vjp,
    **dict.fromkeys(("add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor"), arith_vjp),
    "masked_fill.Scalar": masked_fill_vjp,
    **dict.fromkeys(("_softmax", "_log_softmax"), softmax_vjp),
    "native_layer_norm": layer_norm_vjp,
}

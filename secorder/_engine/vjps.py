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
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """``convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
    groups)``: the input gradient of every column by ``convolution_backward``."""
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
        return [torch.stack([back(ct[j], tuple(x.shape)) for j in range(k)])]
    if x.dim() != weight.dim():  # an unbatched input: no batch dimension to fold the columns into
        return [torch.stack([back(ct[j], tuple(x.shape)) for j in range(k)])]
    folded = back(ct.reshape(k * x.shape[0], *ct.shape[2:]), (k * x.shape[0], *x.shape[1:]))
    return [folded.reshape(k, *x.shape)]


VJPS: dict[str, Any] = {
    "max_pool2d_with_indices": max_pool_vjp,
    "convolution": convolution_vjp,
}

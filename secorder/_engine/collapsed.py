"""Collapsed Taylor mode over a tape: values, K directional derivatives and summed second derivatives.

:func:`evaluate` replays a recorded :class:`~secorder._engine.tape.Tape` of ``u(leaves, inputs)``
with jets (:mod:`secorder._engine.jet`) on the inputs: every op whose arguments carry a jet is
pushed through by its rule from the one registry (:func:`secorder._engine.rules.rule`, field
``collapsed``); ops without one take the generic road of their registry entry (linear ops pass the
directions through themselves, curvature-free ops by forward-mode products, elementwise ops by
their partials, anything else by nested forward-mode AD on the op alone, counted in
``ctx.fallbacks``). Ops whose arguments carry no jet are replayed as recorded, so parameters
enter as ordinary tensors and the result is differentiable in them.

The batch axis of the points is an ordinary axis of every value: one pass serves every point,
which is exact when the function treats the points independently (the same contract as
:func:`torch.func.vmap` over points).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from secorder._engine import jet as _jet
from secorder._engine.rules import rule
from secorder._engine.tape import _STOPS, Tape, refs_in, resolve

__all__ = ["evaluate"]


def evaluate(tape: Tape, leaves: Sequence[Tensor], inputs: Sequence[Any], ctx: _jet.Ctx) -> Any:
    """Replay ``tape`` at ``leaves`` with ``inputs`` (tensors, or :class:`~secorder._engine.jet.Jet`
    for the point-dependent ones); returns the output value (a jet if it depends on a jet input)."""
    values: list[Any] = [None] * tape.num_values
    values[: tape.num_leaves] = list(leaves)
    values[tape.num_leaves : tape.num_leaves + tape.num_inputs] = list(inputs)
    last = _last_uses(tape)
    for i, node in enumerate(tape.nodes):
        args = resolve(node.args, values)
        kwargs = resolve(node.kwargs, values)
        for r in last.get(i, ()):  # dropped after their last use: only autograd keeps what it needs
            values[r] = None
        if not _jet.has_jet((args, kwargs)) or node.func in _STOPS:
            out = node.func(*_jet.primal(args), **_jet.primal(kwargs))
        else:
            out = _apply(ctx, node.func, args, kwargs)
        outs = list(out) if node.multi else [out]
        for idx, o in zip(node.outputs, outs):
            if idx is not None:
                values[idx] = o
    if tape.output is None:
        return tape.result
    return values[tape.output.index]


def _last_uses(tape: Tape) -> dict[int, list[int]]:
    """Node index → the values whose last use it is (the output is never dropped)."""
    last: dict[int, int] = {}
    for i, node in enumerate(tape.nodes):
        for r in refs_in((node.args, node.kwargs)):
            last[r.index] = i
    if tape.output is not None:
        last.pop(tape.output.index, None)
    out: dict[int, list[int]] = {}
    for v, i in last.items():
        out.setdefault(i, []).append(v)
    return out


def _apply(ctx: _jet.Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    r = rule(func)
    if r.collapsed is not None:
        return r.collapsed(ctx, func, args, kwargs)
    if r.linear:
        return _jet.linear(ctx, func, args, kwargs)
    if r.no_curvature or r.linear_first or (r.multilinear and len(_jet._jet_paths((args, kwargs))) == 1):
        return _jet.no_curvature(ctx, func, args, kwargs)
    if torch.Tag.pointwise in func.tags:
        return _jet.pointwise_generic(ctx, func, args, kwargs)
    return _jet.fallback(ctx, func, args, kwargs)

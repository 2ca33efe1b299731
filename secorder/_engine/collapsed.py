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
from secorder._engine.tape import _STOPS, Ref, Tape, refs_in, resolve

__all__ = ["evaluate"]


def evaluate(
    tape: Tape, leaves: Sequence[Tensor], inputs: Sequence[Any], ctx: _jet.Ctx, *, first_order: bool = True
) -> Any:
    """Replay ``tape`` at ``leaves`` with ``inputs`` (tensors, or :class:`~secorder._engine.jet.Jet`
    for the point-dependent ones); returns the output value (a jet if it depends on a jet input).
    ``first_order=False``: the output's directional derivatives are not wanted, and ops whose
    first-order part feeds nothing else skip it (see :func:`_skippable`)."""
    values: list[Any] = [None] * tape.num_values
    values[: tape.num_leaves] = list(leaves)
    values[tape.num_leaves : tape.num_leaves + tape.num_inputs] = list(inputs)
    jet_inputs = {tape.num_leaves + i for i, x in enumerate(inputs) if isinstance(x, _jet.Jet)}
    skip = set() if first_order else _skippable(tape, jet_inputs)
    last = _last_uses(tape)
    for i, node in enumerate(tape.nodes):
        args = resolve(node.args, values)
        kwargs = resolve(node.kwargs, values)
        for r in last.get(i, ()):  # dropped after their last use: only autograd keeps what it needs
            values[r] = None
        if not _jet.has_jet((args, kwargs)) or node.func in _STOPS:
            out = node.func(*_jet.primal(args), **_jet.primal(kwargs))
        else:
            ctx.skip_v1 = i in skip
            try:
                out = _apply(ctx, node.func, args, kwargs)
            finally:
                ctx.skip_v1 = False
        outs = list(out) if node.multi else [out]
        for idx, o in zip(node.outputs, outs):
            if idx is not None:
                values[idx] = o
    if tape.output is None:
        return tape.result
    return values[tape.output.index]


_SKIP_RULES = frozenset(
    {_jet.add_rule, _jet.scalar_affine_rule, _jet.view_rule, _jet.matmul_rule, _jet.mul_rule, _jet.gelu_rule}
)
_AFFINE_RULES = frozenset({_jet.add_rule, _jet.scalar_affine_rule, _jet.view_rule, _jet.constant_rule})
_BILINEAR_RULES = frozenset({_jet.matmul_rule, _jet.mul_rule, _jet.div_rule})


def _skippable(tape: Tape, jet_inputs: set[int]) -> set[int]:
    """Nodes whose first-order output (the K directional derivatives) nothing downstream uses.

    Liveness backwards from the output, whose first-order part is not wanted: an op's inputs need
    theirs if its own is needed, or if the op is not affine in them (the second-order term of a
    nonlinear op is built from its inputs' first-order parts). Only rules that know how to skip
    (``Ctx.skip_v1``) are listed; e.g. the last hidden layer of an MLP then computes its summed
    second-order channel without the K directional derivatives nothing reads."""
    dep = [False] * tape.num_values
    for i in jet_inputs:
        dep[i] = True
    node_deps: list[list[int]] = []
    for node in tape.nodes:
        refs = [r.index for r in refs_in((node.args, node.kwargs)) if dep[r.index]]
        node_deps.append(refs)
        if refs and node.func not in _STOPS:
            for o in node.outputs:
                if o is not None:
                    dep[o] = True
    need: set[int] = set()
    skip: set[int] = set()
    for i in range(len(tape.nodes) - 1, -1, -1):
        node, refs = tape.nodes[i], node_deps[i]
        if not refs or node.func in _STOPS:
            continue
        r = rule(node.func)
        out_needed = any(o in need for o in node.outputs if o is not None)
        one_input = len(refs) == 1  # x * x has one distinct input but is not affine
        if r.collapsed is not None:
            affine = r.collapsed in _AFFINE_RULES or (r.collapsed in _BILINEAR_RULES and one_input)
            if r.collapsed is _jet.div_rule:  # affine only in the numerator
                affine = affine and isinstance(node.args[0], Ref) and dep[node.args[0].index]
            can_skip = r.collapsed in _SKIP_RULES or (
                r.collapsed is not None and _is_pointwise_rule(r.collapsed)
            )
        else:
            affine = r.linear and not node.multi
            can_skip = affine
        can_skip = can_skip or affine  # an affine op whose output is dead gets dead inputs
        if out_needed or not affine:
            need.update(refs)
        if not out_needed and can_skip and not node.multi:
            skip.add(i)
    return skip


def _is_pointwise_rule(f: Any) -> bool:
    return getattr(f, "__qualname__", "").startswith("pointwise_rule.")


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

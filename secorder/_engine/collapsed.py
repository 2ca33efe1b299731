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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from secorder._engine import jet as _jet
from secorder._engine.rules import rule
from secorder._engine.tape import _STOPS, Ref, Tape, refs_in, resolve

__all__ = ["Plan", "evaluate", "plan"]


@dataclass(frozen=True)
class Plan:
    """What :func:`evaluate` needs to know about a tape before it runs, computed once per call
    (not per op, and not again for every chunk of directions): which nodes may skip their
    first-order output and after which node each value is dropped."""

    skip: frozenset[int]
    last: dict[int, list[int]]
    lazy: frozenset[int] = frozenset()  # nodes whose one output has one consumer (Ctx.lazy_out)
    # the most elements of a value whose K first-order tangents are held whole (the others are
    # broadcast along the points, skipped, or streamed a block at a time); -1: not estimated
    held: int = -1


def plan(
    tape: Tape,
    jet_positions: Sequence[int],
    *,
    first_order: bool = True,
    numels: Sequence[int] | None = None,
    broadcast: bool = False,
) -> Plan:
    """The :class:`Plan` of ``tape`` when the inputs at ``jet_positions`` carry jets.
    ``numels``: the element count of every tape value (to estimate :attr:`Plan.held`);
    ``broadcast``: the input tangents are the same at every point (unit directions)."""
    jet_inputs = {tape.num_leaves + i for i in jet_positions}
    node_refs = [[r.index for r in refs_in((node.args, node.kwargs))] for node in tape.nodes]
    skip = frozenset() if first_order else frozenset(_skippable(tape, jet_inputs, node_refs))
    lazy = _single_use(tape, node_refs)
    held = -1 if numels is None else _held(tape, jet_inputs, skip, lazy, numels, broadcast, node_refs)
    return Plan(skip, _last_uses(tape, node_refs), lazy, held)


def _held(
    tape: Tape, jet_inputs: set[int], skip: frozenset[int], lazy: frozenset[int], numels: Sequence[int],
    broadcast: bool, node_refs: list[list[int]],
) -> int:  # fmt: skip
    """Estimate of :attr:`Plan.held`, mirroring where the rules build :class:`~secorder._engine.jet.Lazy`
    tangents: a matmul whose left factor alone carries the jet, or an elementwise rule whose
    input's tangent is broadcast along the points, makes one when its output has one consumer;
    it stays streamed when that consumer is such a matmul or an elementwise rule whose own
    first-order part is skipped (it then needs only Σ_k u1_k²). Tangents that are broadcast
    (affine maps of broadcast input directions) are not counted."""
    dep = [False] * tape.num_values
    bc = [False] * tape.num_values
    for i in jet_inputs:
        dep[i], bc[i] = True, broadcast
    consumer: dict[int, int] = {}
    makes_lazy: dict[int, bool] = {}
    out_of: dict[int, int] = {}
    cheap: dict[int, bool] = {}
    for i, node in enumerate(tape.nodes):
        for v in node_refs[i]:
            consumer.setdefault(v, i)
        refs = [v for v in node_refs[i] if dep[v]]
        if not refs or node.func in _STOPS:
            continue
        r = rule(node.func)
        c = r.collapsed
        pointwise = c is not None and (_is_pointwise_rule(c) or c is _jet.gelu_rule)
        left_only = False
        if c is _jet.matmul_rule:
            off = 1 if node.func in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) else 0
            a = node.args[off] if len(node.args) > off else None
            left_only = len(refs) == 1 and isinstance(a, Ref) and dep[a.index]
        affine = c in _AFFINE_RULES or left_only or (c is None and r.linear)
        out_bc = all(bc[x] for x in refs) and affine
        cheap_in = (
            len(refs) == 1 and cheap.get(refs[0], False) and makes_lazy.get(out_of.get(refs[0], -1), False)
        )
        makes_lazy[i] = (
            i in lazy
            and i not in skip
            and (left_only or (pointwise and (all(bc[x] for x in refs) or cheap_in)))
        )
        if left_only and makes_lazy[i]:  # mirrors jet.Lazy.cheap: contracted width ≤ a quarter
            a_idx = node.args[
                1 if node.func in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) else 0
            ].index
            src = out_of.get(a_idx)
            a_streamed = src is not None and makes_lazy.get(src, False)
            for o in node.outputs:
                if o is not None:
                    cheap[o] = not a_streamed and not bc[a_idx] and 4 * numels[a_idx] <= numels[o]
        for o in node.outputs:
            if o is not None:
                dep[o], bc[o] = True, out_bc
                out_of[o] = i
    held = max((numels[i] for i in jet_inputs if not bc[i]), default=0)
    for v, i in out_of.items():
        if bc[v] or i in skip:
            continue
        if makes_lazy.get(i):
            c = consumer.get(v)
            if c is not None and (makes_lazy.get(c) or c in skip):
                cr = rule(tape.nodes[c].func).collapsed
                if cr is _jet.matmul_rule or (
                    cr is not None and (_is_pointwise_rule(cr) or cr is _jet.gelu_rule)
                ):
                    continue
        held = max(held, numels[v])
    return held


def evaluate(
    tape: Tape,
    leaves: Sequence[Tensor],
    inputs: Sequence[Any],
    ctx: _jet.Ctx,
    *,
    first_order: bool = True,
    prepared: Plan | None = None,
) -> Any:
    """Replay ``tape`` at ``leaves`` with ``inputs`` (tensors, or :class:`~secorder._engine.jet.Jet`
    for the point-dependent ones); returns the output value (a jet if it depends on a jet input).
    ``first_order=False``: the output's directional derivatives are not wanted, and ops whose
    first-order part feeds nothing else skip it (see :func:`_skippable`). ``prepared``: the
    :func:`plan` of this tape and these jet inputs (computed here when not given)."""
    values: list[Any] = [None] * tape.num_values
    values[: tape.num_leaves] = list(leaves)
    values[tape.num_leaves : tape.num_leaves + tape.num_inputs] = list(inputs)
    if prepared is None:
        jets = [i for i, x in enumerate(inputs) if isinstance(x, _jet.Jet)]
        prepared = plan(tape, jets, first_order=first_order)
    skip, last, lazy = prepared.skip, prepared.last, prepared.lazy
    for i, node in enumerate(tape.nodes):
        args = resolve(node.args, values)
        kwargs = resolve(node.kwargs, values)
        for r in last.get(i, ()):  # dropped after their last use: only autograd keeps what it needs
            values[r] = None
        ctx.node = i
        if not _jet.has_jet((args, kwargs)) or node.func in _STOPS:
            out = ctx.once("value", lambda: node.func(*_jet.primal(args), **_jet.primal(kwargs)))  # noqa: B023
        else:
            ctx.skip_v1 = i in skip
            ctx.lazy_out = i in lazy and ctx.block < ctx.K  # one block: nothing to stream
            try:
                out = _apply(ctx, node.func, args, kwargs)
            finally:
                ctx.skip_v1 = ctx.lazy_out = False
            if i not in lazy:  # a pass-through rule may forward an input's Lazy: compute it now
                for o in out if node.multi else (out,):
                    if isinstance(o, _jet.Jet) and isinstance(o.v1, _jet.Lazy):
                        o.d1  # noqa: B018 - materializes
        outs = list(out) if node.multi else [out]
        for idx, o in zip(node.outputs, outs):
            if idx is not None:
                values[idx] = o
    if tape.output is None:
        return tape.result
    return values[tape.output.index]


_SKIP_RULES = frozenset(
    {
        _jet.add_rule,
        _jet.scalar_affine_rule,
        _jet.view_rule,
        _jet.reshape_rule,
        _jet.matmul_rule,
        _jet.mul_rule,
        _jet.gelu_rule,
        _jet.reduce_rule,
    }
)
_AFFINE_RULES = frozenset(
    {
        _jet.add_rule,
        _jet.scalar_affine_rule,
        _jet.view_rule,
        _jet.reshape_rule,
        _jet.constant_rule,
        _jet.reduce_rule,
    }
)
_BILINEAR_RULES = frozenset({_jet.matmul_rule, _jet.mul_rule, _jet.div_rule})


def _skippable(tape: Tape, jet_inputs: set[int], node_refs: list[list[int]]) -> set[int]:
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
    for i, node in enumerate(tape.nodes):
        refs = [v for v in node_refs[i] if dep[v]]
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


def _single_use(tape: Tape, node_refs: list[list[int]]) -> frozenset[int]:
    """Nodes with one output whose value one later op uses once (not the tape's output): their
    first-order part may be left to that op to compute (:class:`~secorder._engine.jet.Lazy`)."""
    uses = [0] * tape.num_values
    for refs in node_refs:
        for v in refs:
            uses[v] += 1
    out = tape.output.index if tape.output is not None else -1
    return frozenset(
        i
        for i, node in enumerate(tape.nodes)
        if not node.multi
        and node.outputs[0] is not None
        and node.outputs[0] != out
        and uses[node.outputs[0]] == 1
    )


def _last_uses(tape: Tape, node_refs: list[list[int]]) -> dict[int, list[int]]:
    """Node index → the values whose last use it is (the output is never dropped)."""
    last: dict[int, int] = {}
    for i, refs in enumerate(node_refs):
        for v in refs:
            last[v] = i
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

"""Per-leaf fallback of the structured sweep: per-sample vector-Jacobian products for parameter
leaves that no interface covers.

An *interface* (:mod:`secorder._engine.interfaces`) forms the squared per-sample gradients of
a leaf where it meets per-sample data at ONE op, through views only. A leaf used otherwise —
tied or twice-called weights, a position embedding computed from the leaf by ``embedding``
and added to the tokens, the weight stacks of decomposed RNN kernels — needs the per-sample
gradients of all its uses summed before squaring. Here, for such leaves (closed under sharing
a meeting: every leaf of a fallback meeting argument is a fallback leaf):

* at each *meeting* (op i, argument u, u the same for every sample and parameter-dependent,
  an output batched), the per-sample gradient G_{c,n} = ∂⟨ct_{c,n}, op_i(x_n, u)⟩/∂u of every
  column c of the chunk, by evaluating op i on sample n's slice of its batched arguments under
  ``vmap`` (legitimate: the batch-axis proof of :mod:`secorder._engine.batch` says slice n of
  the output depends on slice n of the inputs only; the per-sample call must return exactly
  slice n's shape). Where the op cannot be called on one sample's slice (an argument sized by
  the batch although the same for every sample, such as an expanded weight), the whole-batch
  op's VJP with the cotangent restricted to sample n (exact; N times the op's cost);
* the sum over meetings is pulled back through the parameter-only sub-program u(θ) to the
  leaves (vmapped over columns and samples), then squared and summed over columns with the
  columns' signs and weights: Σ_c σ_{c,n} w_c (∂_θ ⟨s_{n,c}, J_n⟩)^⊙2.

Memory per column: N times (the meeting arguments plus the fallback leaves), counted by
:func:`column_entries` in the sweep's chunk size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from secorder._chunking import memory_budget
from secorder._engine.batch import BatchAnalysis
from secorder._engine.tape import Ref, Tape, TapeNode, replace_at, resolve

__all__ = ["Fallback", "column_entries", "plan_fallback"]


@dataclass
class Fallback:
    """The fallback leaves and meetings of a plan."""

    leaves: list[int]  # fallback leaf indices (sorted)
    meetings: dict[int, list[tuple[Any, ...]]]  # node position → paths of its fallback arguments
    values_: list[int]  # meeting argument values (sorted)
    nodes: list[int]  # parameter-only nodes computing them from the leaves (tape order)
    sliceable: dict[int, bool] = field(default_factory=dict)  # node → per-sample call works

    def __bool__(self) -> bool:
        return bool(self.leaves)


def _leaf_set(
    tape: Tape, producer: dict[int, int], v: int, memo: dict[int, frozenset[int]]
) -> frozenset[int]:
    if v in memo:
        return memo[v]
    if v < tape.num_leaves:
        res = frozenset({v})
    elif v not in producer or not tape.depends[v]:
        res = frozenset()
    else:
        node = tape.nodes[producer[v]]
        res = frozenset().union(*[_leaf_set(tape, producer, r.index, memo) for _, r in node.arg_paths()])
    memo[v] = res
    return res


def plan_fallback(
    tape: Tape,
    producer: dict[int, int],
    meetings: list[tuple[int, tuple[Any, ...], Ref, bool]],
    used: dict[int, list[int]],
) -> tuple[Fallback, set[tuple[int, tuple[Any, ...]]]]:
    """Split the meetings (node, path, ref, resolved through views to one leaf) into interfaces
    and fallbacks. ``used``: leaf → nodes where it meets data through views. Returns the
    fallback and the set of (node, path) meetings left to interfaces."""
    memo: dict[int, frozenset[int]] = {}
    sets = {(i, p): _leaf_set(tape, producer, r.index, memo) for i, p, r, _ in meetings}
    fb: set[int] = set()
    for i, p, _, views in meetings:
        if not views or len(set(used.get(next(iter(sets[(i, p)])), [i]))) > 1:
            fb |= sets[(i, p)]
    changed = True
    while changed:  # close: a meeting touching a fallback leaf falls back with all its leaves
        changed = False
        for i, p, _, _ in meetings:
            s = sets[(i, p)]
            if s & fb and not s <= fb:
                fb |= s
                changed = True
    kept = {(i, p) for i, p, _, _ in meetings if not (sets[(i, p)] & fb)}
    fmeet: dict[int, list[tuple[Any, ...]]] = {}
    vals: set[int] = set()
    for i, p, r, _ in meetings:
        if (i, p) not in kept:
            fmeet.setdefault(i, []).append(p)
            vals.add(r.index)
    need: set[int] = set()
    stack = [v for v in vals if v >= tape.num_leaves]
    while stack:
        v = stack.pop()
        j = producer[v]
        if j in need:
            continue
        need.add(j)
        node = tape.nodes[j]
        stack += [
            r.index for _, r in node.arg_paths() if r.index >= tape.num_leaves and tape.depends[r.index]
        ]
    return Fallback(sorted(fb), fmeet, sorted(vals), sorted(need)), kept


def column_entries(fb: Fallback, values: Sequence[Any], n: int) -> int:
    """Entries one column costs the fallback (per-sample gradients of meetings and leaves)."""
    return n * (
        sum(int(values[v].numel()) for v in fb.values_) + sum(int(values[v].numel()) for v in fb.leaves)
    )


class _NotSliceableError(Exception):
    pass


def meeting_grads(
    fb: Fallback,
    i: int,
    node: TapeNode,
    values: Sequence[Any],
    batch: BatchAnalysis,
    cts: dict[int, Tensor],
    n: int,
) -> dict[int, Tensor]:
    """Per-sample gradients (k, N, *u.shape) of the chunk's columns w.r.t. the fallback
    arguments u of node ``i`` (keyed by u's value index) from the cotangents ``cts`` on its outputs."""
    fpaths = fb.meetings[i]
    outs = [o for o in node.outputs if o is not None and o in cts]
    if not outs:
        return {}
    refs = {p: r for p, r in node.arg_paths()}
    us = [values[refs[p].index] for p in fpaths]
    if fb.sliceable.get(i, True):
        try:
            res = _sliced(node, i, values, batch, fpaths, us, outs, cts, n)
            fb.sliceable[i] = True
        except (_NotSliceableError, RuntimeError, ValueError, IndexError):
            fb.sliceable[i] = False
    if not fb.sliceable[i]:
        try:
            res = _masked(node, values, batch, fpaths, us, outs, cts, n)
        except RuntimeError as exc:  # refuse (the caller takes another route), never crash
            from secorder._engine.sweep import EngineUnsupportedError

            raise EngineUnsupportedError(
                f"per-sample vector-Jacobian products of {node.func} (tape position {i}) w.r.t. "
                f"its parameter-side arguments {fpaths} failed: {exc}"
            ) from exc
    grads: dict[int, Tensor] = {}
    for p, g in zip(fpaths, res):
        u = refs[p].index
        grads[u] = grads[u] + g if u in grads else g
    return grads


def _call(
    node: TapeNode, base: Any, repl: dict[tuple[Any, ...], Tensor], outs_at: list[int]
) -> tuple[Tensor, ...]:
    ak = base
    for p, x in repl.items():
        ak = replace_at(ak, p, x)
    out = node.func(*ak[0], **ak[1])
    res = list(out) if node.multi else [out]
    return tuple(res[k] for k in outs_at)


def _sliced(
    node: TapeNode,
    i: int,
    values: Sequence[Any],
    batch: BatchAnalysis,
    fpaths: list[tuple[Any, ...]],
    us: list[Tensor],
    outs: list[int],
    cts: dict[int, Tensor],
    n: int,
) -> list[Tensor]:
    """The op called on each sample's slice (its batched arguments unflattened (N, group) at the
    sample axis, vmapped over N)."""
    base = resolve((node.args, node.kwargs), values)
    tags = batch.arg_tags(i, node)
    bpaths = [p for p, t in tags.items() if isinstance(t, tuple)]
    xs = []
    for p in bpaths:
        obj: Any = base
        for q in p:
            obj = obj[q]
        d, g = tags[p]
        xs.append(obj.unflatten(d, (n, g)))
    xdims = tuple(tags[p][0] for p in bpaths)
    outs_at = [node.outputs.index(o) for o in outs]
    otags = [batch.tags[o] for o in outs]
    if not all(isinstance(t, tuple) for t in otags):
        raise _NotSliceableError
    shapes = []
    for o, (d, g) in zip(outs, otags):
        s = list(values[o].shape)
        s[d] = g
        shapes.append(tuple(s))
    ct_in = [cts[o].unflatten(1 + d, (n, g)) for o, (d, g) in zip(outs, otags)]
    cdims = tuple(1 + d for d, _ in otags)

    def one(xs_n: tuple[Tensor, ...], cts_n: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        def f(*u: Tensor) -> tuple[Tensor, ...]:
            repl = dict(zip(bpaths, xs_n))
            repl.update(zip(fpaths, u))
            return _call(node, base, repl, outs_at)

        ys, pull, *_ = vjp(f, *us)
        if tuple(tuple(y.shape) for y in ys) != tuple(shapes):
            raise _NotSliceableError
        return vmap(pull)(tuple(cts_n))

    res = vmap(one, in_dims=(xdims, cdims), out_dims=1)(tuple(xs), tuple(ct_in))
    return list(res)


def _masked(
    node: TapeNode,
    values: Sequence[Any],
    batch: BatchAnalysis,
    fpaths: list[tuple[Any, ...]],
    us: list[Tensor],
    outs: list[int],
    cts: dict[int, Tensor],
    n: int,
) -> list[Tensor]:
    """The whole-batch op's VJP with each column's cotangent restricted to one sample (blocks
    of samples within the memory budget)."""
    base = resolve((node.args, node.kwargs), values)
    outs_at = [node.outputs.index(o) for o in outs]

    def f(*u: Tensor) -> tuple[Tensor, ...]:
        return _call(node, base, dict(zip(fpaths, u)), outs_at)

    _, pull, *_ = vjp(f, *us)
    masks = []
    for o in outs:
        d, g = batch.tags[o]
        shape = values[o].shape
        owner = torch.arange(shape[d], device=values[o].device) // g  # sample of each index
        m = owner[None, :] == torch.arange(n, device=owner.device)[:, None]  # (N, size)
        masks.append(m.reshape(n, *[1] * d, shape[d], *[1] * (len(shape) - d - 1)))
    k = cts[outs[0]].shape[0]
    per = k * sum(int(values[o].numel()) for o in outs) * cts[outs[0]].element_size()
    block = max(1, min(n, memory_budget() // (4 * max(1, per))))
    parts: list[list[Tensor]] = []
    for s0 in range(0, n, block):
        s1 = min(n, s0 + block)
        masked = tuple(
            (cts[o][:, None] * m[None, s0:s1]).flatten(0, 1) for o, m in zip(outs, masks)
        )  # (k·b, *shape)
        gs = vmap(pull)(masked)
        parts.append([gr.unflatten(0, (k, s1 - s0)) for gr in gs])
    return [torch.cat([p[j] for p in parts], 1) for j in range(len(fpaths))]


def leaf_pullback(fb: Fallback, tape: Tape, values: Sequence[Any], leaves: Sequence[Tensor]) -> Any:
    """The VJP of the parameter-only sub-program θ_F ↦ (u for the meeting arguments)."""

    def sub(*ls: Tensor) -> tuple[Tensor, ...]:
        env: dict[int, Any] = dict(zip(fb.leaves, ls))
        for j in fb.nodes:
            node = tape.nodes[j]
            args = _resolve_env((node.args, node.kwargs), env, values)
            out = node.func(*args[0], **args[1])
            res = list(out) if node.multi else [out]
            for o, r in zip(node.outputs, res):
                if o is not None:
                    env[o] = r
        return tuple(env[v] for v in fb.values_)

    _, pull, *_ = vjp(sub, *[leaves[j] for j in fb.leaves])
    return pull


def _resolve_env(obj: Any, env: dict[int, Any], values: Sequence[Any]) -> Any:
    if isinstance(obj, Ref):
        return env[obj.index] if obj.index in env else values[obj.index]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve_env(o, env, values) for o in obj)
    if isinstance(obj, dict):
        return {k: _resolve_env(o, env, values) for k, o in obj.items()}
    return obj


def column_grads(
    pull: Any, fb: Fallback, values: Sequence[Any], grads: dict[int, Tensor], k: int, n: int
) -> list[tuple[int, Tensor]]:
    """The per-sample gradients (k, N, *leaf.shape) of every fallback leaf, per column: the
    meeting gradients ``grads`` pulled back through the parameter-only sub-program."""
    cot = tuple(
        grads[v].flatten(0, 1) if v in grads else values[v].new_zeros(k * n, *values[v].shape)
        for v in fb.values_
    )
    gs = vmap(pull)(cot)
    return [(leaf, g.unflatten(0, (k, n))) for leaf, g in zip(fb.leaves, gs)]


def squares(
    pull: Any,
    fb: Fallback,
    values: Sequence[Any],
    grads: dict[int, Tensor],
    signs: Tensor,
    weights: Tensor | None,
    per_sample: bool,
) -> list[tuple[int, Tensor]]:
    """Σ_c σ_{c,n} w_c (J_uᵀ G_{c,n})^⊙2 per fallback leaf (rows (N, ...) with ``per_sample``)."""
    k, n = signs.shape
    w = signs if weights is None else signs * weights[:, None]
    out = []
    for leaf, g in column_grads(pull, fb, values, grads, k, n):
        ww = w.to(g.dtype)
        sq = (
            torch.einsum("kn,kn...->n...", ww, g * g)
            if per_sample
            else torch.einsum("kn,kn...->...", ww, g * g)
        )
        out.append((leaf, sq))
    return out

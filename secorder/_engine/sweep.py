"""The exact Hessian diagonal of ``f(θ, *batch)`` by a second-order sweep over a tape of the whole batch.

With the batch-axis proof of :mod:`secorder._engine.batch` (f = Σ_n l_n(θ) + r(θ), slice n of
every batched value a function of sample n's data only), adjoints ḡ_k of every op from one
reverse pass of the batch loss, and each op's local Hessian M_k = ∇²_u ⟨ḡ_k, op_k(u)⟩ written
as signed columns Σ_c σ_c s_c s_cᵀ (block-diagonal over the samples for a batched u),

    diag H = Σ_k Σ_c Σ_n σ_{n,c} (J_{n,k}ᵀ s_{n,c})^⊙2.

Columns, one *group* per op with curvature (``R`` = columns per sample, summed over groups):

* pointwise ops with one parameter-dependent input (tanh, GELU, exp, pow, ...) and the
  elementwise losses ``mse_loss``/``binary_cross_entropy_with_logits``: the local Hessian is
  diagonal, m = ḡ ⊙ f''(u) (reverse over reverse with a ones tangent); one column per entry
  of a sample, e_i √|m_i|, sign of m_i;
* ``_softmax``/``_log_softmax`` rows (closed form, see :func:`_softmax_rows`), split by a
  batched ``eigh`` per row; the null direction of log-softmax is dropped, so cross-entropy
  has C−1 columns per row;
* ``native_layer_norm`` over the last dimension: per-row closed-form columns, d one-hot and
  three vectors per row (:func:`_layer_norm_group`); a vector norm over the last dimension:
  per-row d×d Hessians (:func:`_row_group`);
* ``bmm`` of two parameter-dependent operands (attention): closed-form SVD columns
  (:class:`_BilinearGroup`), split per inner index over the live rows where the left operand
  is a softmax with exact zeros (a causal mask: :func:`_dead_entries`);
* a *pointwise region*, elementwise ops computing one value from one parameter-dependent value
  x (hand-written activations such as GPT-2's ``gelu_new``, products of two operands of x
  included): one diagonal group m = ḡ ⊙ φ''(x) (:func:`_pointwise_regions`);
* an elementwise product a ⊙ b of two different parameter-dependent values (SwiGLU): two
  closed-form columns per entry (:class:`_ProductGroup`);
* ``mm``/``addmm`` of a batched operand and a parameter-only one sharing its leaves (a tied LM
  head): closed-form cross columns whose parameter-only part is a per-sample gradient for the
  per-leaf fallback (:class:`_CrossGroup`);
* any other op: the dense local Hessian per sample over its parameter-dependent inputs
  (:func:`_dense_group`, at most ``MAX_LOCAL`` entries per sample).

Each group's columns, batched over the samples (column c holds every sample's s_{n,c} in its
own slice), go through ONE batched reverse walk per chunk of columns over the tape (per-op
vector-Jacobian products vmapped over the columns; no per-sample replay): since every op acts
on each sample separately, the cotangent in sample n's slice is J_nᵀ s_{n,c}. Where a parameter
meets per-sample data (an *interface*: mm/addmm/convolution/...), the squared per-sample
gradient products Σ_c σ_c Σ_n G_{cn}^⊙2 are formed there by
:func:`secorder._engine.interfaces.param_squares` (columns summed before squaring where the
algebra allows) and mapped back to the parameter leaf through its views. Columns of ops on
parameter-only values (a regularizer) are pulled back to the leaves and squared directly.
Columns that live in one row of a (N·T, C) value are first walked packed over the rows
through row-local ops and compressed per row where every path meets one value
(:func:`_pack_rows`, the "row packing" section below).

Curvature propagation (:func:`engine_cp_diagonal`) mixes the same columns by random signs into
two cotangents per probe and sample, walked back in one batch per block of probes, for an
unbiased estimate with per-entry standard errors (the squares of interfaces and of the per-leaf
fallback kept per probe).

Refused (:class:`EngineUnsupportedError`, the caller falls back to one-hot HVPs): a tape that
cannot be replayed faithfully, an op that mixes samples (:class:`~secorder._engine.batch.BatchAxisError`),
a generic op over more than ``MAX_LOCAL`` entries per sample or with a non-finite local
Hessian, an interface with no rule. A parameter no interface covers (used at two ops, tied
weights, or computed by non-view ops before meeting the data) falls back, per leaf, to
per-sample vector-Jacobian products (:mod:`secorder._engine.leafvjp`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from secorder import _cost
from secorder._chunking import memory_budget
from secorder._engine import interfaces, leafvjp, vjps
from secorder._engine.batch import SAME, SUMMED, BatchAnalysis, BatchAxisError, Tag, analyze
from secorder._engine.plancache import PlanCache, fingerprint
from secorder._engine.rules import rule
from secorder._engine.tape import (
    Ref,
    Tape,
    TapeNode,
    TapeUnsupportedError,
    record,
    replace_at,
    resolve,
)
from secorder._kernels import with_plain_kernels

__all__ = ["EngineTooCostlyError", "EngineUnsupportedError", "engine_cp_diagonal", "engine_diagonal"]

aten = torch.ops.aten


class EngineUnsupportedError(Exception):
    """The engine cannot compute this function's diagonal (``args[0]`` says why)."""


class EngineTooCostlyError(EngineUnsupportedError):
    """More work than allowed: ``args[0]`` is the sweep's :class:`secorder._cost.Route`
    (products and how they were counted)."""


_VIEWS = frozenset(
    getattr(getattr(aten, n), o)
    for n, o in [
        ("t", "default"), ("transpose", "int"), ("permute", "default"), ("view", "default"),
        ("_unsafe_view", "default"), ("reshape", "default"), ("alias", "default"), ("clone", "default"),
        ("_to_copy", "default"), ("lift_fresh_copy", "default"), ("unsqueeze", "default"),
        ("squeeze", "dim"), ("squeeze", "dims"), ("squeeze", "default"), ("slice", "Tensor"),
        ("select", "int"), ("narrow", "default"),
    ]
)  # fmt: skip
_DIAG_LOSSES = frozenset({aten.mse_loss.default, aten.binary_cross_entropy_with_logits.default})


_PARAMETER_ONLY = (
    "per_sample=True: the function has curvature in the parameters alone (a term such as "
    "λ‖θ‖² or a reparametrized weight), which belongs to no sample"
)


def _floating(v: Any) -> bool:
    return isinstance(v, Tensor) and v.is_floating_point()


def _node_fn(node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], outs: list[int]) -> Any:
    """The node's op as a function of the arguments at ``positions`` (tuple of outputs ``outs``)."""
    base = resolve((node.args, node.kwargs), values)

    def fn(*xs: Tensor) -> tuple[Tensor, ...]:
        ak = base
        for p, x in zip(positions, xs):
            ak = replace_at(ak, p, x)
        out = node.func(*ak[0], **ak[1])
        res = list(out) if node.multi else [out]
        return tuple(res[k] for k in outs)

    return fn


@dataclass
class _Layout:
    """Sample-major layout of a value: ``permute(perm)`` then reshape to (N, T, C)."""

    perm: list[int]
    permuted: tuple[int, ...]
    n: int
    t: int
    c: int

    def to_major(self, x: Tensor) -> Tensor:
        return x.permute(self.perm).reshape(self.n, self.t, self.c)

    def to_major_batched(self, x: Tensor) -> Tensor:
        """(k, *value shape) → (k, N, T·C)."""
        return x.permute(0, *[1 + p for p in self.perm]).reshape(x.shape[0], self.n, self.t * self.c)

    def from_major(self, cols: Tensor) -> Tensor:
        """(k, N, T, C) → (k, *value shape)."""
        inv = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inv[p] = i
        return cols.reshape(cols.shape[0], *self.permuted).permute(0, *[1 + i for i in inv])


def _layout(shape: tuple[int, ...], tag: Tag, n: int, row_dim: int | None) -> _Layout:
    nd = len(shape)
    first = [] if tag is SAME else [tag[0]]
    last = [] if row_dim is None else [row_dim]
    perm = first + [k for k in range(nd) if k not in first and k not in last] + last
    permuted = tuple(shape[k] for k in perm)
    samples = 1 if tag is SAME else n
    c = 1 if row_dim is None else shape[row_dim]
    total = math.prod(shape)
    return _Layout(perm, permuted, samples, total // max(1, samples * c), c)


@dataclass
class _Group:
    """The signed columns of one op's local Hessian, living at tape value ``value``."""

    value: int
    tag: Tag
    layout: _Layout
    scale: Tensor  # (N, T, K): √|λ| per sample, row t and eigen index (K = 1 for diagonal groups)
    sign: Tensor  # (N, T, K)
    vecs: Tensor | None  # rows: (N, T, C, K) eigenvectors; None: one-hot (diagonal groups)
    keep: list[tuple[int, int]]  # (t, j) of the kept columns

    @property
    def count(self) -> int:
        return len(self.keep)

    def get(self, c0: int, c1: int) -> tuple[Tensor, Tensor]:
        """Columns ``c0:c1`` as (k, *value shape) and their signs (k, N)."""
        sel = self.keep[c0:c1]
        k = len(sel)
        ts = torch.tensor([t for t, _ in sel], device=self.scale.device)
        js = torch.tensor([j for _, j in sel], device=self.scale.device)
        n, t, c = self.layout.n, self.layout.t, self.layout.c
        cols = self.scale.new_zeros(k, n, t, c)
        s = self.scale[:, ts, js].T  # (k, N)
        ar = torch.arange(k, device=cols.device)
        if self.vecs is None:
            cols[ar, :, ts, 0] = s
        else:
            v = self.vecs[:, ts, :, js]  # (k, N, C): advanced indices first
            cols[ar, :, ts, :] = s[:, :, None] * v
        return self.layout.from_major(cols), self.sign[:, ts, js].T


def _softmax_rows(func: Any, y: Tensor, g: Tensor) -> Tensor:
    """(..., C, C) Hessians of ⟨ḡ_row, softmax(u_row)⟩ or ⟨ḡ_row, log_softmax(u_row)⟩ from the
    output rows y: log_softmax gives −(Σ_j ḡ_j)(diag p − p pᵀ) with p = exp(y); softmax gives
    diag(p ⊙ a) − (p ⊙ a) pᵀ − p (p ⊙ a)ᵀ with p = y, a = ḡ − ⟨ḡ, p⟩ 1."""
    if func is aten._log_softmax.default:
        p = y.exp()
        return -g.sum(-1)[..., None, None] * (torch.diag_embed(p) - p[..., :, None] * p[..., None, :])
    pa = y * (g - (g * y).sum(-1, keepdim=True))
    return torch.diag_embed(pa) - pa[..., :, None] * y[..., None, :] - y[..., :, None] * pa[..., None, :]


def _group_from_local(
    value: int, tag: Tag, layout: _Layout, lam: Tensor, vecs: Tensor | None, tol_scale: float
) -> _Group:
    """Keep the columns (t, j) that are nonzero for some sample (relative tolerance), ordered
    by sign pattern (positive for every sample, mixed, negative for every sample): a chunk of
    columns of one sign takes one pass at each interface, a mixed chunk two masked ones."""
    mag = lam.abs()
    tol = tol_scale * float(mag.max()) if mag.numel() else 0.0
    if vecs is not None and lam.shape[-1] > 1:
        # eigenpairs in the order positive, negative, zero per sample and row (stable): ``eigh``
        # puts the zero eigenvalues between the negative and the positive ones, at positions
        # that differ between samples, so a column index j kept because it is nonzero for SOME
        # sample would be walked for all; in this order the kept indices per row are the first
        # max_n rank_n(t) (a causal softmax row t: t columns, not up to T − 1)
        key = torch.where(mag > tol, (lam < -tol).to(torch.int64), torch.full_like(lam, 2, dtype=torch.int64))
        order = torch.sort(key, dim=-1, stable=True).indices
        lam = lam.gather(-1, order)
        mag = mag.gather(-1, order)
        vecs = vecs.gather(-1, order[..., None, :].expand_as(vecs))
    alive = (mag > tol).any(0)  # (T, K)
    scale = torch.where(mag > tol, mag.sqrt(), torch.zeros_like(mag))
    sign = torch.where(lam < -tol, -torch.ones_like(lam), torch.ones_like(lam))  # dropped: +1
    pattern = (sign < 0).any(0).to(torch.int64) + (sign < 0).all(0).to(torch.int64)  # 0, 1 (mixed), 2
    ts, js = alive.nonzero().unbind(1)
    order = torch.sort(pattern[ts, js], stable=True).indices
    keep = list(zip(ts[order].tolist(), js[order].tolist()))
    return _Group(value, tag, layout, scale, sign, vecs, keep)


@dataclass
class _Plan:
    tape: Tape
    values: list[Any]
    batch: BatchAnalysis
    producer: dict[int, int]
    interfaces: dict[int, list[tuple[tuple[Any, ...], int, list[int]]]]  # node → (path, leaf, view chain)
    fallback: leafvjp.Fallback  # leaves no interface covers: per-sample VJPs


def _resolve_leaf(tape: Tape, producer: dict[int, int], ref: Ref) -> tuple[int, list[int]] | None:
    """The parameter leaf behind ``ref`` through injective views (each entry of the argument is
    a distinct leaf entry, so squares map back by the views' VJP), and the view nodes (leaf first)."""
    chain: list[int] = []
    v = ref.index
    while v >= tape.num_leaves:
        i = producer.get(v)
        if i is None:
            return None
        node = tape.nodes[i]
        refs = [r for _, r in node.arg_paths()]
        if node.func not in _VIEWS or len(refs) != 1 or not isinstance(node.args[0], Ref) or node.multi:
            return None
        chain.append(i)
        v = node.args[0].index
    return v, chain[::-1]


# structural fingerprint → (batch analysis, producer, interfaces, fallback); 64 entries, at most
# 200k tape nodes + values in all (a few hundred bytes each: tens of MiB at most)
_PLANS = PlanCache(64, 200_000)


def _plan(
    tape: Tape, values: list[Any], data: Sequence[Tensor], n: int, batched_output: bool = False
) -> _Plan:
    """The per-sample proof and the interfaces of ``tape``: a pure function of its structure
    (:mod:`secorder._engine.plancache`), taken from the cache when an equal structure was analyzed."""
    key = fingerprint(tape, values, data, n, batched_output)
    hit = _PLANS.get(key)
    if hit is not None:
        batch, producer, ifaces, fallback = hit
        # the fallback's per-node memo (sliceable) is filled by the walk: a fresh one per plan
        return _Plan(tape, values, batch, producer, ifaces, dataclasses.replace(fallback, sliceable={}))
    plan = _analyze_plan(tape, values, data, n, batched_output)
    fallback = dataclasses.replace(plan.fallback, sliceable={})
    _PLANS.put(key, (plan.batch, plan.producer, plan.interfaces, fallback), len(tape.nodes) + tape.num_values)
    return plan


def _analyze_plan(
    tape: Tape, values: list[Any], data: Sequence[Tensor], n: int, batched_output: bool = False
) -> _Plan:
    batch = analyze(tape, values, data, n, batched_output=batched_output)
    producer = {o: i for i, node in enumerate(tape.nodes) for o in node.outputs if o is not None}
    ifaces: dict[int, list[tuple[tuple[Any, ...], int, list[int]]]] = {}
    meetings: list[tuple[int, tuple[Any, ...], Ref, bool]] = []
    resolved: dict[tuple[int, tuple[Any, ...]], tuple[int, list[int]]] = {}
    used: dict[int, list[int]] = {}
    for i, node in enumerate(tape.nodes):
        out_tags = [batch.tags[o] for o in node.outputs if o is not None]
        if not any(isinstance(t, tuple) for t in out_tags):
            continue
        for p, r in node.arg_paths():
            if batch.tags[r.index] is not SAME or not tape.depends[r.index] or not _floating(values[r.index]):
                continue
            found = _resolve_leaf(tape, producer, r)
            meetings.append((i, p, r, found is not None))
            if found is not None:
                resolved[(i, p)] = found
                used.setdefault(found[0], []).append(i)
    # leaves no interface covers (tied, or computed by non-view ops): per-sample VJPs (leafvjp)
    fallback, kept = leafvjp.plan_fallback(tape, producer, meetings, used)
    for i, p, _, _ in meetings:
        if (i, p) in kept:
            leaf, chain = resolved[(i, p)]
            ifaces.setdefault(i, []).append((p, leaf, chain))
    return _Plan(tape, values, batch, producer, ifaces, fallback)


def _groups(plan: _Plan, adj: dict[int, Tensor], n: int, tol_scale: float) -> list[Any]:
    tape, values, tags = plan.tape, plan.values, plan.batch.tags
    groups: list[Any] = []
    regions, inside = _pointwise_regions(plan)
    for i, node in enumerate(tape.nodes):
        if i in inside:
            if i in regions:
                group = _region_group(plan, regions[i], adj, n, tol_scale)
                if group is not None:
                    groups.append(group)
            continue
        outs = [o for o in node.outputs if o is not None and o in adj]
        if not outs:
            continue
        found = [(p, r) for p, r in node.arg_paths() if tape.depends[r.index] and _floating(values[r.index])]
        func = node.func
        if not found or rule(func).curvature_free:
            continue
        multilinear = rule(func).multilinear or _eval_batch_norm(node)
        if len(found) > 1 and multilinear and _disjoint(plan, [r for _, r in found]):
            continue
        if len(found) == 1 and multilinear:
            continue  # linear in its one parameter-dependent argument
        if func is aten.div.Tensor and [p for p, _ in found] == [(0, 0)]:
            continue
        side = _LINEAR_SIDE.get(func, ())
        bat = [(q, r) for q, r in found if isinstance(tags[r.index], tuple)]
        sam = [(q, r) for q, r in found if tags[r.index] is SAME]
        if bat and sam and all(q in side for q, _ in sam) and _disjoint_sets(plan, bat, sam):
            found = bat  # linear in the parameter side, no shared leaves: no diagonal curvature there
        if (
            func is aten.bmm.default
            and [q for q, _ in found] == [(0, 0), (0, 1)]
            and outs == [node.outputs[0]]
            and tags[found[0][1].index] == tags[found[1][1].index]
            and isinstance(tags[found[0][1].index], tuple)
            and tags[found[0][1].index][0] == 0
        ):
            groups.append(_bilinear_group(plan, i, found, outs[0], adj, n, tol_scale))
            continue
        cross = _cross_operands(plan, i, found, outs)
        if cross is not None:
            groups.append(_cross_group(plan, i, cross, outs[0], adj, n, tol_scale))
            continue
        if _elementwise_product(plan, node, found, outs):
            groups.append(_product_group(plan, found, outs[0], adj, n, tol_scale))
            continue
        if len(found) != 1:
            groups.append(_dense_group(plan, i, found, outs, adj, n, tol_scale))
            continue
        if found[0][0] == (0, 0) and outs == [node.outputs[0]] and _rowwise_last(node, values):
            if func is aten.native_layer_norm.default:
                groups.extend(_layer_norm_group(plan, i, found[0][1], outs[0], adj, n, tol_scale))
            else:
                groups.append(_row_group(plan, i, found[0][1], outs[0], adj, n, tol_scale))
            continue
        (p, r) = found[0]
        o = outs[0]
        u = values[r.index]
        tag = tags[r.index]
        if tag == SUMMED:  # pragma: no cover - refused by the batch analysis
            raise EngineUnsupportedError(f"{func} after the sum over samples")
        if rule(func).family == "softmax" and p == (0, 0) and outs == [o]:
            dim = int(node.args[1]) % max(1, u.dim())
            lay = _layout(tuple(u.shape), tag, n, dim)
            hr = _softmax_rows(func, lay.to_major(values[o]), lay.to_major(adj[o].to(u.dtype)))
            lam, vecs = _eigh(hr, func, i)  # (N, T, C), (N, T, C, C)
            groups.append(_group_from_local(r.index, tag, lay, lam, vecs, tol_scale))
            continue
        if (torch.Tag.pointwise in func.tags and not node.multi) or (func in _DIAG_LOSSES and p == (0, 0)):
            if outs != [o]:
                raise EngineUnsupportedError(f"{func} (tape position {i}) with several outputs used")
            derivs = rule(func).derivs
            if derivs is not None and p == (0, 0) and len(node.arg_paths()) == 1:
                # closed form f'' from the registry (no double backward)
                args_ = resolve((node.args, node.kwargs), values)
                d2 = derivs(func, u, *args_[0][1:], **args_[1])[2]
                if d2 is None:  # piecewise linear
                    continue
                m = (adj[o].to(u.dtype) * d2).detach()
                m = torch.where(adj[o] == 0, torch.zeros_like(m), m)
                lay = _layout(tuple(u.shape), tag, n, None)
                lam = lay.to_major(m).reshape(lay.n, -1, 1)
                groups.append(_group_from_local(r.index, tag, lay, lam, None, tol_scale))
                continue
            fn = _node_fn(node, values, [p], [0])
            with torch.enable_grad():
                uu = u.detach().requires_grad_(True)
                (y,) = fn(uu)
                (gr,) = torch.autograd.grad(y, uu, adj[o].to(y.dtype), create_graph=True)
                m = (
                    torch.autograd.grad(gr, uu, torch.ones_like(gr), allow_unused=True)[0]
                    if gr.requires_grad
                    else None
                )
            if m is None:
                continue
            m = torch.where(adj[o] == 0, torch.zeros_like(m), m) if m.shape == adj[o].shape else m
            lay = _layout(tuple(u.shape), tag, n, None)
            lam = lay.to_major(m.detach()).reshape(lay.n, -1, 1)
            groups.append(_group_from_local(r.index, tag, lay, lam, None, tol_scale))
            continue
        groups.append(_dense_group(plan, i, found, outs, adj, n, tol_scale))
    return groups


# ---- pointwise regions (issue 13): a chain of elementwise ops of one source as one diagonal group ----
# Hand-written activations (GPT-2's gelu_new 0.5·x·(1 + tanh(c(x + 0.044715x³))), x·sigmoid(x))
# are several pointwise ops of ONE parameter-dependent value x, some of them products of two
# operands that both depend on x. Each op alone would need a group (the product a dense local
# Hessian over 2·(entries per sample), refused past MAX_LOCAL); together they are one function
# y = φ(x) acting on every entry separately, so the local Hessian of ⟨ḡ, φ(x)⟩ is diagonal,
# m = ḡ ⊙ φ''(x): one double backward of the region with a ones tangent, one column per entry.


@dataclass
class _Region:
    """Pointwise nodes (tape order) computing the value ``sink`` from the one value ``source``."""

    source: int
    sink: int
    nodes: list[int]


def _pointwise_regions(plan: _Plan) -> tuple[dict[int, _Region], set[int]]:
    """Maximal pointwise regions: every node pointwise with one floating output of the shape,
    dtype and batch tag of its parameter-dependent floating arguments, all of which trace back
    through such nodes to one source value; the region's values are used only inside it except
    one (the sink, its last value outside). Only regions of two or more nodes with some curvature
    are kept. Returns {index of the region's last node: region} and every node of a region."""
    tape, values, tags = plan.tape, plan.values, plan.batch.tags
    src: dict[int, int] = {}  # value → its region's source
    members: dict[int, list[int]] = {}  # source → nodes
    for i, node in enumerate(tape.nodes):
        if node.multi or len(node.outputs) != 1 or node.outputs[0] is None:
            continue
        o = node.outputs[0]
        y = values[o]
        if not tape.depends[o] or not _floating(y) or torch.Tag.pointwise not in node.func.tags:
            continue
        dep = [r.index for _, r in node.arg_paths() if tape.depends[r.index] and _floating(values[r.index])]
        if not dep or any(
            tuple(values[v].shape) != tuple(y.shape) or values[v].dtype != y.dtype or tags[v] != tags[o]
            for v in dep
        ):
            continue
        sources = {src.get(v, v) for v in dep}
        if len(sources) != 1:
            continue
        s = sources.pop()
        src[o] = s
        members.setdefault(s, []).append(i)
    consumers: dict[int, set[int]] = {}  # consumers that pass an adjoint back (not ``detach``)
    for i, node in enumerate(tape.nodes):
        if not any(o is not None and tape.depends[o] and _floating(values[o]) for o in node.outputs):
            continue
        for _, r in node.arg_paths():
            consumers.setdefault(r.index, set()).add(i)
    out = tape.output.index if tape.output is not None else -1
    regions: dict[int, _Region] = {}
    inside: set[int] = set()
    wanted = set(_wanted(tape, values))  # values with an adjoint (missing there: exactly zero)
    for s, nodes in members.items():
        if len(nodes) < 2 or all(rule(tape.nodes[j].func).curvature_free for j in nodes):
            continue
        mine = set(nodes)
        escaping = [
            int(tape.nodes[j].outputs[0] or 0)
            for j in nodes
            if int(tape.nodes[j].outputs[0] or 0) == out
            or consumers.get(int(tape.nodes[j].outputs[0] or 0), set()) - mine
        ]
        if len(escaping) != 1 or escaping[0] != tape.nodes[nodes[-1]].outputs[0] or escaping[0] not in wanted:
            continue  # several values leave the region (or no adjoint kept): the ops take their own groups
        regions[nodes[-1]] = _Region(s, escaping[0], nodes)
        inside |= mine
    return regions, inside


def _region_group(plan: _Plan, region: _Region, adj: dict[int, Tensor], n: int, tol: float) -> _Group | None:
    """The diagonal group m = ḡ ⊙ φ''(x) of a pointwise region y = φ(x) (None: its adjoint is
    zero, the sink being one of the :func:`_wanted` values)."""
    tape, values, tags = plan.tape, plan.values, plan.batch.tags
    if region.sink not in adj:
        return None

    def phi(x: Tensor) -> Tensor:
        env = {region.source: x}
        for j in region.nodes:
            node = tape.nodes[j]
            ak: Any = (node.args, node.kwargs)
            for p, r in node.arg_paths():
                if r.index in env:
                    ak = replace_at(ak, p, env[r.index])
            a, k = resolve(ak, values)
            env[int(node.outputs[0] or 0)] = node.func(*a, **k)
        return env[region.sink]

    u = values[region.source]
    gbar = adj[region.sink].to(u.dtype)
    with torch.enable_grad():
        x = u.detach().requires_grad_(True)
        (gr,) = torch.autograd.grad(phi(x), x, gbar, create_graph=True)
        m = (
            torch.autograd.grad(gr, x, torch.ones_like(gr), allow_unused=True)[0]
            if gr.requires_grad
            else None
        )
    if m is None:
        return None
    # ⟨ḡ, φ(x)⟩ has exactly zero curvature where ḡ is zero (autograd could give 0·∞ = NaN there)
    m = torch.where(gbar == 0, torch.zeros_like(m), m.detach())
    if not bool(torch.isfinite(m).all()):
        where = f"tape position {region.nodes[-1]}"
        raise EngineUnsupportedError(
            f"the local Hessian of the pointwise region ending at {where} is not finite"
        )
    tag = tags[region.source]
    lay = _layout(tuple(u.shape), tag, n, None)
    return _group_from_local(region.source, tag, lay, lay.to_major(m).reshape(lay.n, -1, 1), None, tol)


@dataclass
class _ProductGroup:
    """Closed-form columns of ⟨ḡ, a ⊙ b⟩ for two parameter-dependent operands of one shape and
    batch tag (SwiGLU's silu(x W₁) ⊙ x W₂): per entry i the local Hessian over (a_i, b_i) is
    [[0, ḡ_i], [ḡ_i, 0]], eigenvalues ±ḡ_i with eigenvectors (1, ±1)/√2, so two columns per
    entry, √(|ḡ_i|/2)(e_i, ±e_i) with signs ±sign(ḡ_i): R = 2 · entries per sample, no dense
    local Hessian, no ``eigh``."""

    values_: tuple[int, int]
    tag: Tag
    layout: _Layout
    scale: Tensor  # (N, T): √(|ḡ|/2) per sample and entry
    sign: Tensor  # (N, T): sign of ḡ (+1 where zero)
    keep: list[tuple[int, int]]  # (entry, ±1)
    per_sample_b: bool = False  # b parameter-only (a fallback meeting): its part per sample

    @property
    def count(self) -> int:
        return len(self.keep)

    def get(self, c0: int, c1: int) -> tuple[dict[int, Tensor], Tensor]:
        sel = self.keep[c0:c1]
        k = len(sel)
        dev = self.scale.device
        ts = torch.tensor([t for t, _ in sel], device=dev)
        pm = torch.tensor([float(q) for _, q in sel], device=dev, dtype=self.scale.dtype)
        lay = self.layout
        cols = self.scale.new_zeros(k, lay.n, lay.t, lay.c)
        cols[torch.arange(k, device=dev), :, ts, 0] = self.scale[:, ts].T
        a = lay.from_major(cols)
        if self.per_sample_b:  # (k, N, *b.shape): column c of sample n in sample n's slice only
            ar = torch.arange(lay.n, device=dev)
            own = cols.new_zeros(k, lay.n, lay.n, lay.t, lay.c)
            own[:, ar, ar] = cols
            b = lay.from_major(own.reshape(k * lay.n, lay.n, lay.t, lay.c)).reshape(k, lay.n, *a.shape[1:])
        else:
            b = a
        b = b * pm.reshape(k, *[1] * (b.dim() - 1))
        return {self.values_[0]: a, self.values_[1]: b}, self.sign[:, ts].T * pm[:, None]


def _elementwise_product(plan: _Plan, node: TapeNode, found: list[tuple[Any, Ref]], outs: list[int]) -> bool:
    """``mul.Tensor(a, b)`` of two different parameter-dependent values of the output's shape
    and dtype (no broadcasting: entry i of the output is a_i b_i), both of its batch tag, or
    one parameter-only and a meeting argument of the per-leaf fallback (the GRU's first step)."""
    if node.func is not aten.mul.Tensor or node.kwargs or outs != [node.outputs[0]]:
        return False
    if [p for p, _ in found] != [(0, 0), (0, 1)] or found[0][1] == found[1][1]:
        return False
    values, tags = plan.values, plan.batch.tags
    y = values[outs[0]]
    if not all(
        tuple(values[r.index].shape) == tuple(y.shape) and values[r.index].dtype == y.dtype for _, r in found
    ):
        return False
    out_tag = tags[outs[0]]
    same = [(p, r) for p, r in found if tags[r.index] is SAME and out_tag is not SAME]
    if not same:
        return all(tags[r.index] == out_tag for _, r in found)
    (p, r), (_, other) = same[0], next(pr for pr in found if pr[0] != same[0][0])
    return (
        tags[other.index] == out_tag
        and r.index in plan.fallback.values_
        and p in plan.fallback.meetings.get(plan.producer[outs[0]], [])
    )


def _product_group(
    plan: _Plan, found: list[tuple[Any, Ref]], out: int, adj: dict[int, Tensor], n: int, tol: float
) -> _ProductGroup:
    values, tags = plan.values, plan.batch.tags
    found = sorted(found, key=lambda pr: tags[pr[1].index] is SAME)  # the batched operand first
    (_, ra), (_, rb) = found
    u = values[ra.index]
    tag = tags[ra.index]
    lay = _layout(tuple(u.shape), tag, n, None)
    g = lay.to_major(adj[out].to(u.dtype)).reshape(lay.n, -1)  # (N, T)
    mag = g.abs()
    cut = tol * float(mag.max()) if mag.numel() else 0.0
    scale = torch.where(mag > cut, (mag / 2).sqrt(), torch.zeros_like(mag))
    sign = torch.where(g < 0, -torch.ones_like(g), torch.ones_like(g))
    alive = (mag > cut).any(0).nonzero().flatten().tolist()
    keep = [(t, q) for q in (1, -1) for t in alive]
    per_sample_b = tags[rb.index] is SAME and tag is not SAME
    return _ProductGroup((ra.index, rb.index), tag, lay, scale, sign, keep, per_sample_b)


# ---- end of pointwise regions ----


def _eval_batch_norm(node: TapeNode) -> bool:
    """``native_batch_norm(training=False)`` (what eval-mode ``F.batch_norm`` records on CPU):
    (x − μ)/√(σ² + ε) ⊙ γ + β with the running statistics is affine in each of x, γ, β alone,
    like its ``_native_batch_norm_legit_no_training`` twin (registered multilinear)."""
    if node.func is not aten.native_batch_norm.default:
        return False
    training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training")
    return training is False


_LINEAR_SIDE: dict[Any, tuple[tuple[Any, ...], ...]] = {
    aten.native_layer_norm.default: ((0, 2), (0, 3)),  # y = x̂ ⊙ w + b: linear in (w, b)
    aten.native_group_norm.default: ((0, 1), (0, 2)),
}


def _disjoint_sets(plan: _Plan, a: list[tuple[Any, Ref]], b: list[tuple[Any, Ref]]) -> bool:
    la = frozenset().union(*[_leaves_of(plan, r.index) for _, r in a])
    lb = frozenset().union(*[_leaves_of(plan, r.index) for _, r in b])
    return not (la & lb)


@dataclass
class _BilinearGroup:
    """Closed-form columns of ⟨ḡ, Ȧ Ḃ⟩ for a batched product A B of two parameter-dependent
    operands (per batch matrix, ḡ = Σ_r s_r u_r v_rᵀ by SVD): columns (u_r e_jᵀ, ±e_j v_rᵀ) with
    weights ±s_r / 2, since ⟨ḡ, Ȧ Ḃ⟩ = Σ_r s_r Σ_j (u_rᵀ Ȧ)_j (Ḃ v_r)_j and
    2ab = ((a + b)² − (a − b)²)/2. R = 2 · rank · K per batch matrix; no dense matrix, no eigh.

    Where entries of A are constant in θ (``dead``: a causal softmax's exact zeros), the form
    splits over the inner index j, Σ_j Ȧ[:, j]ᵀ (D_j ḡ) Ḃ[j, :] with D_j keeping the rows i
    where A[i, j] is live, and each block has its own SVD (``per_inner``: u, s, v carry an
    axis over j): R = 2 Σ_j rank(D_j ḡ), about half for a causal mask."""

    values_: tuple[int, int]
    tag: Tag
    u: Tensor  # (N, g, J, m, r); J = K with per_inner, else 1
    s: Tensor  # (N, g, J, r)
    v: Tensor  # (N, g, J, n, r)
    inner: int  # K
    keep: list[tuple[int, int, int, int]]  # (t, r, j, ±1)
    skip: frozenset[int] = frozenset()  # interfaces where each ± pair cancels (:func:`_pair_cancels`)
    per_inner: bool = False

    @property
    def count(self) -> int:
        return len(self.keep)

    def get(self, c0: int, c1: int) -> tuple[dict[int, Tensor], Tensor]:
        sel = self.keep[c0:c1]
        k = len(sel)
        dev = self.s.device
        ts = torch.tensor([t for t, _, _, _ in sel], device=dev)
        rs = torch.tensor([r for _, r, _, _ in sel], device=dev)
        js = torch.tensor([j for _, _, j, _ in sel], device=dev)
        bs = js if self.per_inner else torch.zeros_like(js)  # the block of each column's SVD
        pm = torch.tensor([float(q) for _, _, _, q in sel], device=dev, dtype=self.s.dtype)
        n, g, _, m, _ = self.u.shape
        nn_ = self.v.shape[3]
        root = (self.s[:, ts, bs, rs] / 2).sqrt()  # (N, k)
        a = self.s.new_zeros(k, n, g, m, self.inner)
        b = self.s.new_zeros(k, n, g, self.inner, nn_)
        ar = torch.arange(k, device=dev)
        # advanced indices first: (k, N, m)
        a[ar, :, ts, :, js] = root.T[:, :, None] * self.u[:, ts, bs, :, rs]
        b[ar, :, ts, js, :] = pm[:, None, None] * root.T[:, :, None] * self.v[:, ts, bs, :, rs]
        av, bv = self.values_
        a = a.reshape(k, n * g, m, self.inner)
        b = b.reshape(k, n * g, self.inner, nn_)
        out = {av: a} if av != bv else {av: a + b}
        if av != bv:
            out[bv] = b
        return out, pm[:, None].expand(k, n)


_KEEPS_ENTRIES = frozenset(
    getattr(getattr(aten, n), o)
    for n, o in [
        ("view", "default"), ("_unsafe_view", "default"), ("reshape", "default"), ("expand", "default"),
        ("clone", "default"), ("alias", "default"), ("transpose", "int"), ("permute", "default"),
        ("t", "default"), ("unsqueeze", "default"), ("squeeze", "dim"), ("squeeze", "default"),
    ]
)  # fmt: skip


def _dead_entries(plan: _Plan, v: int) -> Tensor | None:
    """Entries of value ``v`` constant in θ, when ``v`` is a softmax output through views and
    copies that keep each entry (its exact zeros: ∂p_i = p_i (e_i − p) vanishes where p_i = 0,
    a masked position); None when nothing is known."""
    tape, values = plan.tape, plan.values
    u = v
    while True:
        j = plan.producer.get(u)
        if j is None:
            return None
        node = tape.nodes[j]
        refs = [r for _, r in node.arg_paths() if tape.depends[r.index]]
        if len(refs) != 1 or not isinstance(node.args[0], Ref) or node.args[0] != refs[0] or node.multi:
            return None
        if node.func is aten._softmax.default:
            break
        if node.func not in _KEEPS_ENTRIES:
            return None
        u = refs[0].index
    dead = values[v] == 0
    return dead if bool(dead.any()) else None


def _bilinear_group(
    plan: _Plan, i: int, found: list[tuple[Any, Ref]], out: int, adj: dict[int, Tensor], n: int, tol: float
) -> _BilinearGroup:
    values, tags = plan.values, plan.batch.tags
    (_, ra), (_, rb) = found
    tag = tags[ra.index]
    a = values[ra.index]
    g = int(a.shape[0]) // n
    gbar = adj[out].to(values[out].dtype)  # (N·g, m, n)
    inner = int(a.shape[-1])
    dead = _dead_entries(plan, ra.index) if ra.index != rb.index else None
    if dead is not None and gbar.numel() * inner * gbar.element_size() > memory_budget() // 8:
        dead = None  # the K masked copies of ḡ would not fit: one SVD, all columns
    if dead is not None:  # block j: the rows of ḡ where A[:, j] is live
        gbar = gbar[:, None] * (~dead).transpose(1, 2)[..., None].to(gbar.dtype)  # (N·g, K, m, n)
    u, s, vh = torch.linalg.svd(gbar, full_matrices=False)  # (b, [K,] m, r), (b, [K,] r), (b, [K,] r, n)
    r = s.shape[-1]
    cut = tol * float(s.max()) if s.numel() else 0.0
    s = torch.where(s > cut, s, torch.zeros_like(s))
    blocks = inner if dead is not None else 1
    s3 = s.reshape(n, g, blocks, r)
    if dead is not None:
        alive = (s3 > 0).any(0)  # (g, K, r)
        pairs = [(t, q, j) for t, j, q in alive.nonzero().tolist()]
    else:
        alive2 = (s3[:, :, 0] > 0).any(0)  # (g, r)
        pairs = [(t, q, j) for t, q in alive2.nonzero().tolist() for j in range(inner)]
    # the + columns first, then the − ones: chunks of one sign (one pass at each interface)
    keep = [(t, q, j, sg) for sg in (1, -1) for t, q, j in pairs]
    return _BilinearGroup(
        (ra.index, rb.index),
        tag,
        u.reshape(n, g, blocks, *u.shape[-2:]),
        s3,
        vh.transpose(-1, -2).reshape(n, g, blocks, vh.shape[-1], r),
        inner,
        keep,
        _pair_cancels(plan, ra.index, rb.index),
        dead is not None,
    )


@dataclass
class _CrossGroup:
    """Closed-form columns of ⟨ḡ, A Ḃ⟩ + ⟨ḡ, Ȧ B⟩'s cross term for a Linear-like product A B of a
    batched operand A (g rows per sample) and a parameter-only operand B that shares leaves with
    A (a tied LM head, out = h Wᵀ with W the token embedding): per sample, ḡ_n = Σ_r s_r u_r v_rᵀ
    by SVD, ⟨ḡ_n, Ȧ_n Ḃ⟩ = Σ_r s_r Σ_j (u_rᵀ Ȧ_n)_j (Ḃ v_r)_j, columns (u_r e_jᵀ at A_n,
    ±e_j v_rᵀ at B for sample n) with weights ±s_r/2: R = 2 · rank · K per sample. The B part of
    a column differs per sample: it is a per-sample gradient at B, a meeting argument of the
    per-leaf fallback (:mod:`secorder._engine.leafvjp`), which adds it to the per-sample
    gradients of B's leaves before squaring (the value ``bv`` of :meth:`get` holds it as
    (k, N, *B.shape))."""

    values_: tuple[int, int]  # (A, B)
    tag: Tag
    u: Tensor  # (N, g, r)
    s: Tensor  # (N, r)
    v: Tensor  # (N, V, r)
    inner: int  # K
    keep: list[tuple[int, int, int]]  # (r, j, ±1)

    @property
    def count(self) -> int:
        return len(self.keep)

    def get(self, c0: int, c1: int) -> tuple[dict[int, Tensor], Tensor]:
        sel = self.keep[c0:c1]
        k = len(sel)
        dev = self.s.device
        rs = torch.tensor([r for r, _, _ in sel], device=dev)
        js = torch.tensor([j for _, j, _ in sel], device=dev)
        pm = torch.tensor([float(q) for _, _, q in sel], device=dev, dtype=self.s.dtype)
        n, g, _ = self.u.shape
        root = (self.s[:, rs] / 2).sqrt().T  # (k, N)
        ar = torch.arange(k, device=dev)
        a = self.s.new_zeros(k, n, g, self.inner)
        b = self.s.new_zeros(k, n, self.inner, self.v.shape[1])
        a[ar, :, :, js] = root[:, :, None] * self.u[:, :, rs].permute(2, 0, 1)  # (k, N, g)
        b[ar, :, js, :] = (pm[:, None] * root)[:, :, None] * self.v[:, :, rs].permute(2, 0, 1)
        av, bv = self.values_
        return {av: a.reshape(k, n * g, self.inner), bv: b}, pm[:, None].expand(k, n)


def _cross_operands(
    plan: _Plan, i: int, found: list[tuple[Any, Ref]], outs: list[int]
) -> tuple[Ref, Ref] | None:
    """(A, B) for ``mm(A, B)``/``addmm(c, A, B)`` with A batched (2-D, samples along rows),
    B parameter-only and a meeting argument of the per-leaf fallback (shared leaves), the bias
    (if parameter-dependent) parameter-only; None otherwise."""
    node = plan.tape.nodes[i]
    tags = plan.batch.tags
    if node.func not in (aten.mm.default, aten.addmm.default) or node.kwargs or outs != [node.outputs[0]]:
        return None
    off = 1 if node.func is aten.addmm.default else 0
    at = {p: r for p, r in found}
    a, b = at.get((0, off)), at.get((0, off + 1))
    if a is None or b is None or set(at) - {(0, 0), (0, off), (0, off + 1)}:
        return None
    if off and (0, 0) in at and tags[at[(0, 0)].index] is not SAME:
        return None
    ta = tags[a.index]
    if (
        not isinstance(ta, tuple)
        or ta[0] != 0
        or plan.values[a.index].dim() != 2
        or tags[b.index] is not SAME
    ):
        return None
    if b.index not in plan.fallback.values_ or (0, off + 1) not in plan.fallback.meetings.get(i, []):
        return None
    return a, b


def _cross_group(
    plan: _Plan, i: int, ab: tuple[Ref, Ref], out: int, adj: dict[int, Tensor], n: int, tol: float
) -> _CrossGroup:
    values, tags = plan.values, plan.batch.tags
    ra, rb = ab
    a = values[ra.index]
    g = int(a.shape[0]) // n
    gbar = adj[out].to(values[out].dtype).reshape(n, g, -1)  # (N, g, V)
    u, s, vh = torch.linalg.svd(gbar, full_matrices=False)
    cut = tol * float(s.max()) if s.numel() else 0.0
    s = torch.where(s > cut, s, torch.zeros_like(s))
    alive = (s > 0).any(0).nonzero().flatten().tolist()
    inner = int(a.shape[1])
    keep = [(r, j, sg) for sg in (1, -1) for r in alive for j in range(inner)]
    return _CrossGroup((ra.index, rb.index), tags[ra.index], u, s, vh.transpose(-1, -2), inner, keep)


_CHAIN_VIEWS = _VIEWS | frozenset({aten.split.Tensor, aten.split_with_sizes.default, aten.expand.default})


def _pair_cancels(plan: _Plan, av: int, bv: int) -> frozenset[int]:
    """The interface where both operands of a bilinear product come from one ``mm``/``addmm``
    (data on the left, weight on the right) through views alone, in disjoint output features
    (q and k of one qkv projection): there the A-part and the B-part of a column reach disjoint
    weight columns and bias entries, so the squares of (a + b) and (a − b) are equal and the
    pair, weighted ±s/2, adds exactly zero; the walk skips that interface's squares."""
    if av == bv:
        return frozenset()
    tape, values, tags = plan.tape, plan.values, plan.batch.tags
    ends: list[tuple[int, Tensor]] = []
    for v in (av, bv):
        ct = torch.ones_like(values[v])
        while True:
            j = plan.producer.get(v)
            if j is None:
                return frozenset()
            node = tape.nodes[j]
            if j in plan.interfaces:
                break
            refs = [r for _, r in node.arg_paths() if tape.depends[r.index]]
            if node.func not in _CHAIN_VIEWS or len(refs) != 1 or node.args[0] != refs[0]:
                return frozenset()
            k = node.outputs.index(v)
            _, pull, *_ = vjp(_node_fn(node, values, [(0, 0)], [k]), values[refs[0].index])
            (ct,) = pull((ct,))
            v = refs[0].index
        ends.append((j, ct))
    (ja, ca), (jb, cb) = ends
    if ja in plan.fallback.meetings:  # per-leaf VJPs sum over meetings before squaring: no cancellation
        return frozenset()
    node = tape.nodes[ja]
    if ja != jb or node.func not in (aten.mm.default, aten.addmm.default) or node.kwargs or ca.dim() != 2:
        return frozenset()
    off = 1 if node.func is aten.addmm.default else 0
    data = node.args[off]
    if not isinstance(data, Ref) or not isinstance(tags[data.index], tuple):
        return frozenset()
    if {p for p, _, _ in plan.interfaces[ja]} - {(0, off + 1), (0, 0)}:
        return frozenset()
    fa, fb = (ca != 0).any(0), (cb != 0).any(0)
    return frozenset({ja}) if not bool((fa & fb).any()) else frozenset()


def _rowwise_last(node: TapeNode, values: Sequence[Any]) -> bool:
    """The op acts on each row of its first argument's last dimension separately (LayerNorm over
    the last dimension, a vector norm over it)."""
    x = node.args[0]
    if not isinstance(x, Ref) or not isinstance(values[x.index], Tensor) or values[x.index].dim() < 1:
        return False
    nd = values[x.index].dim()
    if node.func is aten.native_layer_norm.default:
        return len(node.args[1]) == 1
    if node.func is aten.linalg_vector_norm.default and not node.kwargs.get("dtype"):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        return isinstance(dim, (list, tuple)) and len(dim) == 1 and int(dim[0]) % nd == nd - 1
    return False


def _row_group(plan: _Plan, i: int, ref: Ref, out: int, adj: dict[int, Tensor], n: int, tol: float) -> _Group:
    """Rows treated independently (LayerNorm or a vector norm over the last dimension): the d×d
    local Hessian of every row at once from d reverse-over-reverse products (one-hot tangent at position c of
    every row), then a batched ``eigh`` per row: R = rows per sample · d, cost O(rows · d³)."""
    tape, values, tags = plan.tape, plan.values, plan.batch.tags
    node = tape.nodes[i]
    u = values[ref.index]
    d = int(u.shape[-1])
    lay = _layout(tuple(u.shape), tags[ref.index], n, u.dim() - 1)
    fn = _node_fn(node, values, [(0, 0)], [0])
    gbar = (adj[out].to(values[out].dtype),)

    def grad_fn(x: Tensor) -> Tensor:
        _, pull, *_ = vjp(fn, x)
        return pull(gbar)[0]

    _, hpull, *_ = vjp(grad_fn, u)
    eye = torch.eye(d, dtype=u.dtype, device=u.device)
    tangents = eye.reshape(d, *[1] * (u.dim() - 1), d).expand(d, *u.shape)
    cols = vmap(lambda t: hpull(t)[0])(tangents)  # (d, *shape): column c of every row's Hessian
    h = torch.stack([lay.to_major(c) for c in cols], -2)  # (N, T, d, d)
    h = (h + h.transpose(-1, -2)) / 2
    a = adj[out]
    if a.dim() == u.dim() - 1:  # a norm without keepdim
        a = a.unsqueeze(-1)
    zero = (a.permute(lay.perm).reshape(lay.n, lay.t, -1) == 0).all(-1)  # zero adjoint: exactly zero
    h = torch.where(zero[..., None, None], torch.zeros_like(h), h)
    lam, vecs = _eigh(h, node.func, i)
    return _group_from_local(ref.index, tags[ref.index], lay, lam, vecs, tol)


def _layer_norm_group(
    plan: _Plan, i: int, ref: Ref, out: int, adj: dict[int, Tensor], n: int, tol: float
) -> list[_Group]:
    """LayerNorm over the last dimension d, in closed form (no d×d products, no ``eigh``).

    Per row, with x̂ = (x − μ)/s, s = √(var + ε), g = ḡ ⊙ w (ḡ the output adjoint, w the
    affine weight or ones), g_c = g − mean(g), a = ⟨g, x̂⟩ and P = I − 11ᵀ/d, the Hessian of
    ⟨ḡ, LN(x)⟩ in x is

        H = −(g_c x̂ᵀ + x̂ g_cᵀ − 3a x̂x̂ᵀ/d + a P) / (s² d) = α (I − e eᵀ) + L,

    α = −a/(s² d), e = 1/√d, L of rank ≤ 2 in span{x̂, g_c}. Columns per row: d one-hot columns
    of weight α, e of weight −α, and L's two eigenvectors (a 2×2 ``eigh`` in the orthonormal
    basis q₁ = x̂/‖x̂‖, q₂ ∝ g_c − ⟨g_c, q₁⟩q₁): R = rows per sample · (d + 3). Two groups: the
    one-hot columns as a diagonal group (m = α on every entry of the row; closed-form transport
    applies to it) and the three vector columns per row."""
    tape, values, tags = plan.tape, plan.values, plan.batch.tags
    node = tape.nodes[i]
    args, _ = resolve((node.args, node.kwargs), values)
    x = values[ref.index]
    d = int(x.shape[-1])
    weight = args[2] if len(args) > 2 else None
    eps = float(args[4]) if len(args) > 4 else 1e-5
    lay = _layout(tuple(x.shape), tags[ref.index], n, x.dim() - 1)
    xm = lay.to_major(x)  # (N, T, d)
    g = lay.to_major(adj[out].to(x.dtype))
    if isinstance(weight, Tensor):
        g = g * weight.to(x.dtype)
    z = xm - xm.mean(-1, keepdim=True)
    s2 = (z * z).mean(-1, keepdim=True) + eps  # s²
    xh = z * s2.rsqrt()
    gc = g - g.mean(-1, keepdim=True)
    a = (gc * xh).sum(-1, keepdim=True)  # (N, T, 1)
    c = -1.0 / (s2 * d)
    alpha = c * a  # (N, T, 1)
    nx = xh.norm(dim=-1, keepdim=True)
    safe = torch.where(nx > 0, nx, torch.ones_like(nx))
    q1 = torch.where(nx > 0, xh / safe, torch.zeros_like(xh))
    b1 = (gc * q1).sum(-1, keepdim=True)
    r2 = gc - b1 * q1
    b2 = r2.norm(dim=-1, keepdim=True)
    q2 = torch.where(b2 > 0, r2 / torch.where(b2 > 0, b2, torch.ones_like(b2)), torch.zeros_like(r2))
    # L = c (g_c x̂ᵀ + x̂ g_cᵀ − 3a x̂x̂ᵀ/d) with x̂ = ‖x̂‖q₁, g_c = b₁q₁ + b₂q₂, in the basis (q₁, q₂)
    b11 = c * nx * (2 * b1 - 3 * a * nx / d)
    b12 = c * nx * b2
    small = torch.cat(
        [torch.cat([b11, b12], -1)[..., None, :], torch.cat([b12, 0 * b12], -1)[..., None, :]], -2
    )
    mu, v = torch.linalg.eigh(small)  # (N, T, 2), (N, T, 2, 2)
    w = q1[..., :, None] * v[..., 0:1, :] + q2[..., :, None] * v[..., 1:2, :]  # (N, T, d, 2)
    e = torch.full_like(xm, d**-0.5)[..., None]
    vecs = torch.cat([e, w], -1)  # (N, T, d, 3)
    lam = torch.cat([-alpha, mu], -1)
    if not bool(torch.isfinite(lam).all() and torch.isfinite(vecs).all()):
        raise EngineUnsupportedError(f"the local Hessian of {node.func} (tape position {i}) is not finite")
    flat = _layout(tuple(x.shape), tags[ref.index], n, None)
    diag = flat.to_major(lay.from_major(alpha.expand_as(xm)[None])[0]).reshape(flat.n, -1, 1)
    return [
        _group_from_local(ref.index, tags[ref.index], flat, diag, None, tol),
        _group_from_local(ref.index, tags[ref.index], lay, lam, vecs, tol),
    ]


def _eigh(h: Tensor, func: Any, i: int) -> tuple[Tensor, Tensor]:
    """Batched ``eigh`` of local Hessians, refused (not wrong) when they are not finite or it fails."""
    if not bool(torch.isfinite(h).all()):
        raise EngineUnsupportedError(f"the local Hessian of {func} (tape position {i}) is not finite")
    try:
        lam, vecs = torch.linalg.eigh(h)
    except RuntimeError as exc:
        raise EngineUnsupportedError(
            f"eigh of the local Hessian of {func} (tape position {i}) failed: {exc}"
        ) from exc
    return lam, vecs


MAX_LOCAL = 2048  # entries per sample of a dense local Hessian (generic ops)


@dataclass
class _DenseGroup:
    """Columns of a dense per-sample local Hessian over several inputs (values)."""

    values_: list[int]
    tag: Tag
    layouts: list[_Layout]
    sizes: list[int]
    scale: Tensor  # (N, K)
    sign: Tensor  # (N, K)
    vecs: Tensor  # (N, S, K)
    keep: list[int]

    @property
    def count(self) -> int:
        return len(self.keep)

    def get(self, c0: int, c1: int) -> tuple[dict[int, Tensor], Tensor]:
        js = torch.tensor(self.keep[c0:c1], device=self.scale.device)
        v = (self.vecs[:, :, js] * self.scale[:, None, js]).permute(2, 0, 1)  # (k, N, S)
        out: dict[int, Tensor] = {}
        start = 0
        for value, lay, size in zip(self.values_, self.layouts, self.sizes):
            part = v[:, :, start : start + size].reshape(v.shape[0], lay.n, lay.t, lay.c)
            piece = lay.from_major(part)
            out[value] = out[value] + piece if value in out else piece
            start += size
        return out, self.sign[:, js].T


def _dense_group(
    plan: _Plan,
    i: int,
    found: list[tuple[Any, Ref]],
    outs: list[int],
    adj: dict[int, Tensor],
    n: int,
    tol: float,
) -> _DenseGroup:
    """Any other op: the dense local Hessian of ⟨ḡ, op(u)⟩ per sample over its parameter-dependent
    inputs (all batched alike, or all parameter-only), by S reverse-over-reverse products with
    one-hot tangents placed in every sample at once (the Hessian is block-diagonal over samples),
    then a batched ``eigh``: R ≤ S columns per sample."""
    tape, values, tags = plan.tape, plan.values, plan.batch.tags
    node = tape.nodes[i]
    batched = [(p, r) for p, r in found if isinstance(tags[r.index], tuple)]
    same = [(p, r) for p, r in found if tags[r.index] is SAME]
    if batched and same:
        raise EngineUnsupportedError(
            f"no curvature rule yet for {node.func} (tape position {i}) with parameter-only and "
            "per-sample parameter-dependent arguments together"
        )
    use = batched or same
    tag = tags[use[0][1].index]
    if any(tags[r.index] != tag for _, r in use):
        raise EngineUnsupportedError(f"{node.func} (tape position {i}): inputs batched along different axes")
    layouts = [_layout(tuple(values[r.index].shape), tag, n, None) for _, r in use]
    sizes = [lay.t for lay in layouts]
    total = sum(sizes)
    if total > MAX_LOCAL:
        raise EngineUnsupportedError(
            f"no closed-form curvature rule for {node.func} (tape position {i}) and its "
            f"{total} parameter-dependent entries per sample exceed the dense local Hessian limit {MAX_LOCAL}"
        )
    positions = [p for p, _ in use]
    out_idx = [node.outputs.index(o) for o in outs]
    fn = _node_fn(node, values, positions, out_idx)
    xs = [values[r.index] for _, r in use]
    gbar = tuple(adj[o].to(values[o].dtype) for o in outs)

    def grad_fn(*us: Tensor) -> tuple[Tensor, ...]:
        _, pull, *_ = vjp(fn, *us)
        return tuple(pull(gbar))

    _, hpull, *_ = vjp(grad_fn, *xs)
    samples = layouts[0].n
    eye = xs[0].new_zeros(total, samples, total)
    eye[torch.arange(total), :, torch.arange(total)] = 1
    tangents = []
    start = 0
    for lay, size in zip(layouts, sizes):
        tangents.append(lay.from_major(eye[:, :, start : start + size].reshape(total, lay.n, lay.t, lay.c)))
        start += size
    cols = vmap(lambda *t: hpull(tuple(t)))(*tangents)  # per input: (S, *shape)
    hs = torch.cat([lay.to_major_batched(c) for lay, c in zip(layouts, cols)], -1)  # (S, N, S)
    h = hs.permute(1, 0, 2)
    h = (h + h.transpose(1, 2)) / 2
    # a sample whose adjoint is zero has ⟨ḡ_n, op(u)⟩ ≡ 0: its local Hessian is exactly zero
    # (autograd would give 0·∞ = NaN where the op's second derivative is unbounded there)
    zero = torch.ones(samples, dtype=torch.bool, device=h.device)
    for o in outs:
        t = tags[o]
        g_o = adj[o]
        rows = g_o.reshape(1, -1) if not isinstance(t, tuple) else g_o.movedim(t[0], 0).reshape(samples, -1)
        zero &= (rows == 0).all(1) if rows.shape[0] == samples else bool((rows == 0).all())
    h = torch.where(zero[:, None, None], torch.zeros_like(h), h)
    lam, vecs = _eigh(h, node.func, i)
    mag = lam.abs()
    cut = tol * float(mag.max()) if mag.numel() else 0.0
    keep = [int(j) for j in (mag > cut).any(0).nonzero().flatten().tolist()]
    scale = torch.where(mag > cut, mag.sqrt(), torch.zeros_like(mag))
    sign = torch.where(lam < -cut, -torch.ones_like(lam), torch.ones_like(lam))  # dropped: +1
    return _DenseGroup([r.index for _, r in use], tag, layouts, sizes, scale, sign, vecs, keep)


def _disjoint(plan: _Plan, refs: list[Ref]) -> bool:
    sets = [_leaves_of(plan, r.index) for r in refs]
    return all(not (sets[a] & sets[b]) for a in range(len(sets)) for b in range(a))


def _leaves_of(plan: _Plan, v: int, memo: dict[int, frozenset[int]] | None = None) -> frozenset[int]:
    cache = plan.__dict__.setdefault("_leafsets", {})
    if v in cache:
        return cache[v]
    tape = plan.tape
    if v < tape.num_leaves:
        res = frozenset({v})
    elif v not in plan.producer or not tape.depends[v]:
        res = frozenset()
    else:
        node = tape.nodes[plan.producer[v]]
        res = frozenset().union(*[_leaves_of(plan, r.index) for _, r in node.arg_paths()])
    cache[v] = res
    return res


def _batched_vjp(
    node: TapeNode,
    values: Sequence[Any],
    positions: list[tuple[Any, ...]],
    cts: dict[int, Tensor],
    inplace: bool = False,
) -> list[Tensor] | None:
    """The op's column-batched VJP from the registry (:mod:`secorder._engine.vjps`); None: the
    generic vmapped ``vjp``. ``inplace``: the caller owns ``cts`` (the rule may overwrite them)."""
    fn = rule(node.func).vjp
    if fn is None:
        return None
    if inplace and fn in vjps.INPLACE:
        return fn(node, values, positions, cts, inplace=True)
    return fn(node, values, positions, cts)


class _Walker:
    """One batched reverse walk per chunk of columns; accumulates the diagonal per leaf."""

    def __init__(
        self,
        plan: _Plan,
        leaves: list[Tensor],
        n: int,
        per_sample: bool = False,
        defer: bool = False,
        trace: bool = False,
    ) -> None:
        self.plan = plan
        self.leaves = leaves
        self.n = n
        self.per_sample = per_sample  # diag rows (N, *leaf.shape): sample n's squares alone
        # trace: per leaf only the sum of its diagonal (0-dim); the deferred mm/addmm squares
        # then need no product with x^⊙2 (see _linear_squares)
        self.trace = trace and not per_sample
        # rows allocated on first use (N·P entries: one pass fewer over them); the first addend of
        # a leaf is kept as it is (no zero-filled buffer, no pass over it) and never written in
        # place: it may be a view of a value the walk still holds, so the second addend makes a
        # new tensor, which later addends update in place (``owned``)
        self.diag: list[Any] = [None] * len(leaves)
        self.owned: set[int] = set()
        self.pulls: dict[tuple[int, tuple[Any, ...]], tuple[Any, list[int]]] = {}
        # defer: at mm/addmm interfaces with one row per sample the squares depend on the columns
        # only through Σ_c w_c δ_c^⊙2 (see _diagonal_squares), summed here over every group and
        # chunk and turned into squares once by result() (one product with x^⊙2 per layer, not
        # one per group and chunk)
        self.defer = defer
        self.pending: dict[int, Tensor] = {}
        self.rows: dict[int, Any] = {}  # node → _linear_rows(node), memoized
        self.fb_pull: Any = None  # VJP of the fallback leaves' parameter-only sub-program

    def _add(self, leaf: int, x: Tensor) -> None:
        d = self.diag[leaf]
        if self.trace:
            x = x.sum().to(self.leaves[leaf].dtype)
            self.diag[leaf] = x if d is None else d + x
            return
        if d is None:
            p = self.leaves[leaf]
            shape = (self.n, *p.shape) if self.per_sample else p.shape
            if x.shape == shape and x.dtype == p.dtype and x.device == p.device:
                self.diag[leaf] = x  # borrowed: never updated in place
                return
            d = self.diag[leaf] = p.new_zeros(shape)
            self.owned.add(leaf)
        if leaf in self.owned:
            d += x
        else:
            self.diag[leaf] = d + x
            self.owned.add(leaf)

    def result(self) -> list[Tensor]:
        for i in list(self.pending):
            self._diagonal_squares(i, self.pending.pop(i), now=True)

        def zeros(leaf: Tensor) -> Tensor:
            shape = () if self.trace else (self.n, *leaf.shape) if self.per_sample else leaf.shape
            return leaf.new_zeros(shape)

        return [d if d is not None else zeros(leaf) for d, leaf in zip(self.diag, self.leaves)]

    def _pull(self, i: int, positions: list[tuple[Any, ...]]) -> tuple[Any, list[int]]:
        key = (i, tuple(positions))
        if key not in self.pulls:
            node = self.plan.tape.nodes[i]
            values = self.plan.values
            outs = [k for k, o in enumerate(node.outputs) if o is not None and _floating(values[o])]
            xs = [values[r.index] for r in (self._ref(node, p) for p in positions)]
            _, pull, *_ = vjp(_node_fn(node, values, positions, outs), *xs)
            self.pulls[key] = (pull, outs)
        return self.pulls[key]

    @staticmethod
    def _ref(node: TapeNode, path: tuple[Any, ...]) -> Ref:
        obj: Any = (node.args, node.kwargs)
        for p in path:
            obj = obj[p]
        return obj

    def _linear_rows(self, i: int) -> tuple[int, tuple[Any, ...]] | None:
        """For an interface ``mm``/``addmm`` with one row per sample (2-D, sample axis (0, 1)) and
        the parameter on the right: (offset of the data operand, path of the weight)."""
        node = self.plan.tape.nodes[i]
        if (
            node.func not in (aten.mm.default, aten.addmm.default)
            or node.kwargs
            or i in self.plan.fallback.meetings
        ):
            return None
        off = 1 if node.func is aten.addmm.default else 0
        tags = self.plan.batch.arg_tags(i, node)
        out = node.outputs[0]
        if out is None or self.plan.batch.tags[out] != (0, 1) or tags.get((0, off)) != (0, 1):
            return None
        if {p for p, _, _ in self.plan.interfaces.get(i, [])} - {(0, 0), (0, off + 1)}:
            return None
        return off, (0, off + 1)

    def _norm_rows(self, i: int) -> tuple[int, tuple[Any, ...]] | None:
        """For an interface ``native_layer_norm`` over the last dimension of a (N, d) input with
        one row per sample, whose only interfaces are its affine weight and bias: like
        :meth:`_linear_rows`, the affine squares (δ^⊙2 ⊙ x̂^⊙2 and δ^⊙2 per sample) depend on
        the columns only through Σ_c w_c δ_c^⊙2, so they are deferred the same way."""
        node = self.plan.tape.nodes[i]
        if node.func is not aten.native_layer_norm.default or node.kwargs or i in self.plan.fallback.meetings:
            return None
        out, x = node.outputs[0], node.args[0]
        if out is None or not isinstance(x, Ref) or len(node.args) < 2 or len(node.args[1]) != 1:
            return None
        tags = self.plan.batch.arg_tags(i, node)
        if (
            self.plan.batch.tags[out] != (0, 1)
            or tags.get((0, 0)) != (0, 1)
            or self.plan.values[x.index].dim() != 2
        ):
            return None
        if not {p for p, _, _ in self.plan.interfaces.get(i, [])} <= {(0, 2), (0, 3)}:
            return None
        return 0, (0, 2)

    def _diagonal_squares(self, i: int, dgram: Tensor, now: bool = False) -> None:
        """Feed Σ_c w_c δ_c^⊙2 = ``dgram`` (signed, one row per sample) to the interfaces of node
        ``i`` as the squares their rules sum the columns into (exact where every parameter
        entry receives one output entry per sample: mm/addmm with one row per sample, the
        affine parameters of a layer norm over one row per sample). With ``defer`` (and not
        ``now``) only added to the node's pending sum."""
        if self.defer and not now:
            self.pending[i] = self.pending[i] + dgram if i in self.pending else dgram
            return
        node = self.plan.tape.nodes[i]
        out = node.outputs[0]
        cols = dgram.unsqueeze(0)  # the shape only: the rules take the squares as given (exact)
        weights = None
        axes = {p: t for p, t in self.plan.batch.arg_tags(i, node).items() if isinstance(t, tuple)}
        for path, leaf, chain in self.plan.interfaces.get(i, []):
            direct = None if self.per_sample else self._linear_squares(i, node, path, dgram, chain)
            if direct is not None:  # trace: the views in chain keep every entry once (the same sum)
                self._add(leaf, direct if self.trace else self._to_leaf(leaf, chain, direct))
                continue
            sq = interfaces.param_squares(
                node,
                self.plan.values,
                path,
                axes,
                self.plan.batch.tags[out or 0],
                cols,
                weights,
                self.n,
                per_sample=self.per_sample,
                squares=dgram,
            )
            if sq is None:
                raise EngineUnsupportedError(
                    f"no per-sample rule for the parameter argument {path} of {node.func} (tape position {i})"
                )
            self._add(leaf, self._to_leaf(leaf, chain, sq))

    def _linear_squares(
        self, i: int, node: TapeNode, path: tuple[Any, ...], dgram: Tensor, chain: Sequence[int] = ()
    ) -> Tensor | None:
        """The squares of node ``i`` (mm/addmm, one row per sample, see :meth:`_linear_rows`) at
        ``path`` from ``dgram`` = Σ_c w_c δ_c^⊙2 (N, m), shaped like the argument, without the
        interface rule's general machinery (:func:`interfaces.param_squares` gives the same):
        the weight (x^⊙2)ᵀ dgram, a bias of m entries Σ_n dgram_n. With ``trace`` their sums:
        Σ_n ‖x_n‖² Σ_j dgram_nj without the product, and Σ dgram. None otherwise. ``chain``:
        the view nodes from the leaf to the argument; when it is one transpose (``F.linear``'s
        ``t(W)``) the weight's squares are formed as (dgramᵀ x^⊙2)ᵀ, whose transpose back to the
        leaf is contiguous (no strided copy of the leaf's diagonal later)."""
        rows = self._linear_rows(i)
        if rows is None or node.kwargs:
            return None
        off, wpath = rows
        values = self.plan.values
        args = resolve(node.args, values)
        if path == wpath:
            x = args[off]
            alpha = args[off + 3] if len(args) > off + 3 and node.func is aten.addmm.default else 1
            if not isinstance(x, Tensor) or x.dim() != 2:
                return None
            x = x.to(dgram.dtype)
            if self.trace:  # ‖x_n‖² by the norm kernel: no (N, k) temporary (5x faster on the MLP)
                return torch.dot(torch.linalg.vector_norm(x, dim=1).square(), dgram.sum(1)) * (alpha * alpha)
            leaf_t = len(chain) == 1 and self.plan.tape.nodes[chain[0]].func is aten.t.default
            sq = (dgram.T @ (x * x)).T if leaf_t else (x * x).T @ dgram
            return sq if alpha == 1 else sq * (alpha * alpha)
        if path == (0, 0) and node.func is aten.addmm.default:
            bias, beta = args[0], args[3] if len(args) > 3 else 1
            m = dgram.shape[1]
            if not isinstance(bias, Tensor) or bias.numel() != m or bias.shape[-1] != m:
                return None
            sq = dgram.sum() if self.trace else dgram.sum(0).reshape(bias.shape)
            return sq if beta == 1 else sq * (beta * beta)
        return None

    def closed_form(self, group: Any, step: int) -> bool:
        """Closed-form transport of a diagonal group (a pointwise op's one-hot columns) at the
        output of a Linear-like interface: there Σ_c w_c δ_c^⊙2 = m; one hop back through the
        weight B (out = a B) the columns are m_j-scaled rows of Bᵀ, so at a, Σ_c w_c δ_c^⊙2 =
        m (B^⊙2)ᵀ, carried through unary pointwise ops (times f'^⊙2) to the next Linear-like
        interface. When more interfaces lie behind that one, explicit columns start from its
        output (√|m_j| B[:, j] ⊙ f', formed by broadcasting, not by a product with B) and walk
        on, skipping the two interfaces already served. When the chain from a meets an op that
        is neither unary nor such an interface (a layer norm), the same explicit columns start
        at that op's output and walk on from there (False: not applicable)."""
        plan, tape, values, tags = self.plan, self.plan.tape, self.plan.values, self.plan.batch.tags
        if (
            not isinstance(group, _Group)
            or group.vecs is not None
            or group.tag != (0, 1)
            or values[group.value].dim() != 2
        ):
            return False
        i0 = plan.producer.get(group.value)
        if i0 is None or self._linear_rows(i0) is None:
            return False
        off, wpath = self._linear_rows(i0)  # type: ignore[misc]
        node0 = tape.nodes[i0]
        steps: list[int] = []
        a = node0.args[off]
        stop: int | None = None
        start: int | None = None  # explicit columns from this value on (the chain met another op)
        beyond = False
        if isinstance(a, Ref) and tape.depends[a.index]:
            v = a.index
            while True:
                j = plan.producer.get(v)
                if j is None:
                    return False
                node = tape.nodes[j]
                if self._linear_rows(j) is not None and node.outputs[0] == v:
                    data = node.args[self._linear_rows(j)[0]]  # type: ignore[index]
                    beyond = isinstance(data, Ref) and tape.depends[data.index]  # more interfaces behind
                    stop = j
                    break
                refs = [r for _, r in node.arg_paths() if tape.depends[r.index]]
                unary = (torch.Tag.pointwise in node.func.tags or rule(node.func).batch == "same_shape") and (
                    not node.multi
                )
                if not unary:
                    start = v
                    break
                if len(refs) != 1 or not isinstance(node.args[0], Ref) or node.args[0] != refs[0]:
                    return False
                if tuple(values[refs[0].index].shape) != tuple(values[v].shape) or tags[refs[0].index] != (
                    0,
                    1,
                ):
                    return False
                steps.append(j)
                v = refs[0].index
        m = (group.sign * group.scale * group.scale)[..., 0]  # (N, d): the layout is the identity
        self._diagonal_squares(i0, m)
        if stop is None and start is None:
            return True
        w = values[_Walker._ref(node0, wpath).index]
        derivs = []
        for j in steps:
            node = tape.nodes[j]
            x = values[node.args[0].index]
            d = rule(node.func).derivs
            if d is not None and len(node.arg_paths()) == 1:
                args_ = resolve((node.args, node.kwargs), values)
                deriv = d(node.func, x, *args_[0][1:], **args_[1])[1]  # f' in closed form
            else:
                _, pull, *_ = vjp(_node_fn(node, values, [(0, 0)], [0]), x)
                (deriv,) = pull((torch.ones_like(values[int(node.outputs[0] or 0)]),))
            derivs.append(deriv)
        if stop is not None:
            dgram = m @ (w * w).T
            for deriv in derivs:
                dgram = dgram * deriv * deriv
            self._diagonal_squares(stop, dgram)
        if beyond or start is not None:  # explicit columns: e_j √|m_j| → √|m_j| B[:, j] ⊙ f'
            v_stop = int(tape.nodes[stop].outputs[0] or 0) if stop is not None else start
            assert v_stop is not None
            for c0 in range(0, group.count, step):
                sel = torch.tensor([t for t, _ in group.keep[c0 : c0 + step]], device=w.device)
                cols = group.scale[:, sel, 0].T[:, :, None] * w.T[sel][:, None, :]  # (k, N, d_in)
                for deriv in derivs:
                    cols = cols * deriv
                stand_in = _Group(v_stop, (0, 1), group.layout, group.scale, group.sign, None, [])
                self.walk(stand_in, cols, group.sign[:, sel, 0].T, skip=set() if stop is None else {stop})
        return True

    def walk(
        self,
        group: Any,
        cols: Tensor | dict[int, Tensor],
        signs: Tensor,
        weights: Tensor | None = None,
        skip: frozenset[int] | set[int] = frozenset(),
    ) -> None:
        """Pull a chunk of columns (at ``group.value``, or a dict value → columns) back to the
        interfaces (batched groups) or the leaves (parameter-only groups)."""
        plan, tape, values, tags = self.plan, self.plan.tape, self.plan.values, self.plan.batch.tags
        cot: dict[int, Tensor] = dict(cols) if isinstance(cols, dict) else {group.value: cols}
        # cot entries this walk allocated that nothing else references (fresh products of the
        # registry's VJPs, sums, views of such after their columns were popped): the VJPs may
        # overwrite them (vjps.INPLACE). The given columns are the caller's: never owned.
        owned: set[int] = set()
        unit: bool | None = None  # every sign and weight 1 (decided at the first deferred interface)
        k = next(iter(cot.values())).shape[0]
        same = group.tag is SAME
        fb_grads: dict[int, Tensor] = {}  # per-sample gradients at the fallback meetings (leafvjp)
        if not same:  # a column's part at a parameter-only meeting argument (:class:`_CrossGroup`)
            for v in [v for v in cot if tags[v] is SAME]:
                fb_grads[v] = cot.pop(v)
        start = max(plan.producer.get(v, -1) for v in cot)
        for i in range(start, -1, -1):
            node = tape.nodes[i]
            if not any(o is not None and o in cot for o in node.outputs):
                continue
            cts = {o: cot.pop(o) for o in node.outputs if o is not None and o in cot}
            mine = len(cts) == 1 and next(iter(cts)) in owned
            owned.difference_update(cts)
            if not same and i not in skip and i in plan.interfaces:  # skip: served in closed form
                if i not in self.rows:
                    self.rows[i] = self._linear_rows(i) or self._norm_rows(i)
                out0 = int(node.outputs[0] or 0)
                if self.defer and self.rows[i] is not None and list(cts) == [out0]:
                    ct = cts[out0]  # (k, N, d): Σ_c w_c δ_c^⊙2 with the signs per column and sample
                    if unit is None:  # all weights one (the Fisher's columns): a plain sum of squares
                        unit = weights is None and bool((signs == 1).all())
                    if unit:
                        self._diagonal_squares(i, torch.linalg.vecdot(ct, ct, dim=0))
                    else:
                        w = signs.to(ct.dtype) if weights is None else signs.to(ct.dtype) * weights[:, None]
                        # one pass over the (k, N, d) columns (three elementwise passes cost more
                        # than the walk): a sum of squares for one sign throughout, else one pass
                        # to square and the weighted sum over the columns as a batched product
                        if bool((w.abs() == 1).all()) and bool((w == w.reshape(-1)[0]).all()):
                            sq = torch.linalg.vecdot(ct, ct, dim=0)
                            self._diagonal_squares(i, sq if float(w.reshape(-1)[0]) > 0 else -sq)
                        else:
                            self._diagonal_squares(i, torch.einsum("kn,knd->nd", w, ct * ct))
                else:
                    for path, leaf, chain in plan.interfaces[i]:
                        self._interface(i, node, path, leaf, chain, cts, signs, weights)
            if not same and i in plan.fallback.meetings:  # never in skip (see _pair_cancels)
                mine = False  # the per-sample gradients kept below may be views of the columns
                for u, gr in leafvjp.meeting_grads(
                    plan.fallback, i, node, values, plan.batch, cts, self.n
                ).items():
                    fb_grads[u] = fb_grads[u] + gr if u in fb_grads else gr
            positions = [
                p
                for p, r in node.arg_paths()
                if tape.depends[r.index]
                and _floating(values[r.index])
                and (tags[r.index] is SAME) == same
                and (r.index >= tape.num_leaves or same)
            ]
            if not positions:
                continue
            fast = _batched_vjp(node, values, positions, cts, inplace=mine)
            if fast is not None:
                fn = rule(node.func).vjp
                fresh = fn in vjps.FRESH or (fn is vjps.view_vjp and mine)
                for p, gr in zip(positions, fast):
                    idx = self._ref(node, p).index
                    if idx in cot:
                        cot[idx] = cot[idx] + gr
                        owned.add(idx)
                    else:
                        cot[idx] = gr
                        if fresh and len(positions) == 1:
                            owned.add(idx)
                continue
            pull, outs = self._pull(i, positions)
            ct_list = [
                cts.get(int(node.outputs[j] or 0)) if node.outputs[j] is not None else None for j in outs
            ]
            full = tuple(
                c
                if c is not None
                else values[int(node.outputs[j] or 0)].new_zeros(k, *values[int(node.outputs[j] or 0)].shape)
                for c, j in zip(ct_list, outs)
            )
            grads = vmap(pull)(full)
            for p, gr in zip(positions, grads):
                idx = self._ref(node, p).index
                cot[idx] = cot[idx] + gr if idx in cot else gr
                owned.discard(idx)  # (a sum is fresh, but an addend may alias the columns: keep it simple)
        if fb_grads:  # per-sample gradients of the fallback leaves: summed over meetings, then squared
            if self.fb_pull is None:
                self.fb_pull = leafvjp.leaf_pullback(plan.fallback, tape, values, self.leaves)
            self._fallback_squares(fb_grads, signs, weights)
        if same:
            if self.per_sample:
                raise EngineUnsupportedError(_PARAMETER_ONLY)
            w = signs[:, 0]
            for leaf in range(tape.num_leaves):
                if leaf in cot:
                    g = cot.pop(leaf)
                    self._add(leaf, torch.einsum("k,k...->...", w.to(g.dtype), g * g))
        elif any(idx < tape.num_leaves for idx in cot):  # pragma: no cover - interfaces cover leaves
            raise EngineUnsupportedError("a per-sample column reached a parameter outside an interface")

    def _fallback_squares(self, fb_grads: dict[int, Tensor], signs: Tensor, weights: Tensor | None) -> None:
        """Square and add the chunk's per-sample gradients of the fallback leaves (:mod:`leafvjp`)."""
        values = self.plan.values
        for leaf, sq in leafvjp.squares(
            self.fb_pull, self.plan.fallback, values, fb_grads, signs, weights, self.per_sample
        ):
            self._add(leaf, sq.to(self.leaves[leaf].dtype))

    def _interface(
        self,
        i: int,
        node: TapeNode,
        path: tuple[Any, ...],
        leaf: int,
        chain: list[int],
        cts: dict[int, Tensor],
        signs: Tensor,
        weights: Tensor | None = None,
    ) -> None:
        plan, values = self.plan, self.plan.values
        out = node.outputs[0]
        if out is None or out not in cts or len(cts) != 1:
            raise EngineUnsupportedError(
                f"{node.func} (tape position {i}): columns on an output other than the first"
            )
        ct = cts[out]
        out_axis = plan.batch.tags[out]
        axes = {p: t for p, t in plan.batch.arg_tags(i, node).items() if isinstance(t, tuple)}
        # one sign throughout: the column weights as they are, the squares negated for −1; mixed
        # signs: one call with the signs as (column, sample) weights (every rule weighs each
        # sample's squares, see interfaces.param_squares), not one masked call per sign
        pos, neg = bool((signs > 0).any()), bool((signs < 0).any())
        if not (pos or neg):
            return
        w = weights
        if pos and neg:
            s = signs.to(ct.dtype)
            w = s if weights is None else s * weights.to(ct.dtype)[:, None]
        sq = interfaces.param_squares(
            node, values, path, axes, out_axis, ct, w, self.n, per_sample=self.per_sample
        )
        if sq is None:
            raise EngineUnsupportedError(
                f"no per-sample rule for the parameter argument {path} of {node.func} (tape position {i})"
            )
        self._add(leaf, self._to_leaf(leaf, chain, sq if pos else -sq))

    def _to_leaf(self, leaf: int, chain: list[int], sq: Tensor) -> Tensor:
        """Map entries of an injective view of the leaf back to the leaf (the views' VJP)."""
        if not chain:
            return sq.to(self.leaves[leaf].dtype)
        tape, values = self.plan.tape, self.plan.values
        lead = sq.to(values[int(tape.nodes[chain[-1]].outputs[0] or 0)].dtype)
        fast: Tensor | None = lead if self.per_sample else lead.unsqueeze(0)  # the rules: a column axis
        for i in reversed(chain):  # the registry's view VJPs (no vjp transform per call)
            node = tape.nodes[i]
            out = (
                _batched_vjp(node, values, [(0, 0)], {int(node.outputs[0] or 0): fast})
                if fast is not None
                else None
            )
            fast = None if out is None else out[0]
        if fast is not None:
            return (fast if self.per_sample else fast[0]).to(self.leaves[leaf].dtype)

        def views(x: Tensor) -> Tensor:
            for i in chain:
                x = _node_fn(tape.nodes[i], values, [(0, 0)], [0])(x)[0]
            return x

        _, pull, *_ = vjp(views, self.leaves[leaf])
        sq = sq.to(values[int(tape.nodes[chain[-1]].outputs[0] or 0)].dtype)
        return vmap(pull)(sq)[0] if self.per_sample else pull(sq)[0]


# ---- row packing (helper B2, issue 11): one-row columns walked packed, compressed at a cut ----
# Columns of LayerNorm rows and of pointwise ops on (N·T rows, C) values each live in one row of
# one sample. Through ops that act on every row separately (pointwise, Linear on the last
# dimension, LayerNorm, reshapes keeping the last dimension, residual adds) the columns of the
# T rows of a sample stay in their own rows, so the columns (t, k) for t = 1..T travel as ONE
# packed column k (per-row signs), with the parameter squares taken per row (a row's columns
# touch only that row's entries: the column-summed closed forms Σ_k σ_k δ_k^⊙2 of
# :meth:`_Walker._diagonal_squares` with rows as samples). Where every path from the group meets
# one row-shaped value (a *cut*, e.g. the residual stream below a transformer's MLP), the
# columns of every group arriving there are summed per row, M_r = Σ_k σ_k s_k s_kᵀ (C×C), and
# split again by a batched ``eigh``: at most C columns per row go on through the regular walk,
# instead of the sum of the groups' counts.


def _row_count(plan: _Plan, v: int) -> int | None:
    """Rows of value ``v`` when it is sample-major (N·T rows of its last dimension), else None."""
    tag, x = plan.batch.tags[v], plan.values[v]
    if not isinstance(tag, tuple) or tag[0] != 0 or not isinstance(x, Tensor) or x.dim() < 2:
        return None
    return math.prod(x.shape[:-1])


_ROW_VIEWS = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})
_ROW_ADDS = frozenset({aten.add.Tensor, aten.sub.Tensor})


def _row_local(plan: _Plan, i: int, rows: int) -> list[Ref] | None:
    """The batched parameter-dependent inputs of node ``i`` when it maps row r of them to row r
    of its first output (``rows`` rows) and every parameter-side argument is an interface with a
    per-row closed form (:func:`_row_squares`); None otherwise."""
    tape, values, tags = plan.tape, plan.values, plan.batch.tags
    node = tape.nodes[i]
    out = node.outputs[0]
    if out is None or _row_count(plan, out) != rows:
        return None
    dep = [(p, r) for p, r in node.arg_paths() if tape.depends[r.index] and _floating(values[r.index])]
    bat = [(p, r) for p, r in dep if isinstance(tags[r.index], tuple)]
    ifaces = {p for p, _, _ in plan.interfaces.get(i, [])}
    if {p for p, r in dep if tags[r.index] is SAME} != ifaces:
        return None
    if any(_row_count(plan, r.index) != rows for _, r in bat):
        return None
    func, y = node.func, values[out]
    c = int(y.shape[-1])
    if func in (aten.mm.default, aten.addmm.default):
        off = 1 if func is aten.addmm.default else 0
        ok = not node.kwargs and [p for p, _ in bat] == [(0, off)] and ifaces <= {(0, off + 1), (0, 0)}
        return [r for _, r in bat] if ok and y.dim() == 2 else None
    if func is aten.native_layer_norm.default:
        ok = [p for p, _ in bat] == [(0, 0)] and len(node.args[1]) == 1 and ifaces <= {(0, 2), (0, 3)}
        return [r for _, r in bat] if ok else None
    if func is aten.embedding.default:
        pad = node.args[2] if len(node.args) > 2 else -1
        ok = not bat and ifaces == {(0, 0)} and not (len(node.args) > 3 and node.args[3]) and not node.kwargs
        return [] if ok and isinstance(pad, int) else None
    if func in _ROW_VIEWS:
        ok = len(bat) == 1 and int(values[bat[0][1].index].shape[-1]) == c
        return [r for _, r in bat] if ok else None
    if torch.Tag.pointwise in func.tags or rule(func).batch == "same_shape":
        if node.multi or any(tuple(values[r.index].shape) != tuple(y.shape) for _, r in bat):
            return None
        if ifaces:  # a broadcast parameter added to the rows: its last dimension must be C
            if func not in _ROW_ADDS or node.kwargs or len(node.args) > 2:
                return None
            for p in ifaces:
                prm = values[_Walker._ref(node, p).index]
                if (
                    not isinstance(prm, Tensor)
                    or prm.dim() < 1
                    or int(prm.shape[-1]) != c
                    or prm.dim() > y.dim()
                ):
                    return None
        return [r for _, r in bat]
    return None


def _row_cut(plan: _Plan, v: int, n: int) -> tuple[int | None, list[int]] | None:
    """From value ``v`` (one-row columns), the lowest row-shaped value every path passes through
    by row-local ops, and those ops (tape order); cut None: every path ends at an interface.
    None: no cut below ``v`` (the columns take the regular walk)."""
    rows = _row_count(plan, v)
    if rows is None or rows == n:  # one row per sample: nothing to pack
        return None
    frontier = {v}
    done: list[int] = []
    best: tuple[int | None, list[int]] | None = (v, [])
    while frontier:
        j = max(plan.producer.get(u, -1) for u in frontier)
        if j < 0:
            break
        node = plan.tape.nodes[j]
        if any(o in frontier for o in node.outputs[1:] if o is not None):
            break
        ins = _row_local(plan, j, rows)
        if ins is None:
            break
        frontier.discard(int(node.outputs[0] or 0))
        frontier.update(r.index for r in ins)
        done.append(j)
        if not frontier:
            return None, done
        if len(frontier) == 1:
            best = (next(iter(frontier)), list(done))
    return best


def _row_squares(plan: _Plan, i: int, path: tuple[Any, ...], dsq: Tensor) -> Tensor | None:
    """Σ_k Σ_rows σ (∂⟨δ_k|_row, op⟩/∂θ)^⊙2 for the interface at ``path`` of row-local node ``i``
    from ``dsq`` = Σ_k σ_k δ_k^⊙2 at its output (rows as samples)."""
    node, values = plan.tape.nodes[i], plan.values
    func = node.func
    c = int(dsq.shape[-1])
    if func in (aten.mm.default, aten.addmm.default):
        off = 1 if func is aten.addmm.default else 0
        cols = torch.stack([dsq.clamp(min=0).sqrt(), (-dsq).clamp(min=0).sqrt()])
        w = torch.tensor([1.0, -1.0], dtype=cols.dtype, device=cols.device)
        rows = int(dsq.shape[0])
        return interfaces.param_squares(node, values, path, {(0, off): (0, 1)}, (0, 1), cols, w, rows)
    if func is aten.native_layer_norm.default:
        if path == (0, 3):
            return dsq.reshape(-1, c).sum(0)
        x = values[node.args[0].index]
        eps = float(node.args[4]) if len(node.args) > 4 else 1e-5
        z = x - x.mean(-1, keepdim=True)
        xh2 = z * z / ((z * z).mean(-1, keepdim=True) + eps)
        return (dsq * xh2.to(dsq.dtype)).reshape(-1, c).sum(0)
    if func is aten.embedding.default:
        weight = values[node.args[0].index]
        idx = values[node.args[1].index] if isinstance(node.args[1], Ref) else node.args[1]
        sq = dsq.new_zeros(weight.shape).index_add_(0, idx.reshape(-1), dsq.reshape(-1, c))
        pad = node.args[2] if len(node.args) > 2 else -1
        if isinstance(pad, int) and pad >= 0:
            sq[pad] = 0
        return sq
    prm = values[_Walker._ref(node, path).index]
    return dsq.sum_to_size(prm.shape)  # a broadcast parameter added to the rows (factor ±1)


MAX_ROW_WIDTH = 256  # widest cut compressed per row (the eigh costs rows · C³, M takes rows · C² entries)


def _pack_rows(walker: _Walker, groups: list[Any], n: int, tol: float) -> list[Any]:
    """Walk the one-row groups packed over their row-local segments (serving the interfaces
    there) and replace them by the compressed columns at their cuts (see the section comment).
    A group whose cut is wider than ``MAX_ROW_WIDTH`` or whose per-row matrices exceed a quarter
    of the memory budget takes the regular walk."""
    plan = walker.plan
    tags = plan.batch.tags
    keep: list[Any] = []
    at_cut: dict[int, list[tuple[Any, Tensor, Tensor]]] = {}  # cut → [(group, columns, signs)]
    for group in groups:
        found = _row_cut(plan, group.value, n) if isinstance(group, _Group) else None
        if found is not None and found[0] is not None:
            x = plan.values[found[0]]
            c = int(x.shape[-1])
            if c > MAX_ROW_WIDTH or x.numel() * c * x.element_size() > memory_budget() // 4:
                found = None
        start = None if found is None else _packed_closed_form(walker, group, found[1])
        packed = None if found is None or start is not None else _packed_columns(plan, group)
        if (packed is None and start is None) or found is None:
            keep.append(group)
            continue
        cut, nodes = found
        value = group.value
        if start is not None:  # served at its Linear in closed form: explicit columns below it
            value, cols, signs, nodes = start
        else:
            assert packed is not None
            cols, signs = packed  # (K, *value shape), (K, R)
        if not cols.shape[0]:  # every column zero: no contribution
            continue
        touched = [int(plan.tape.nodes[j].outputs[0] or 0) for j in nodes] + [value]
        per_col = 4 * cols.element_size() * sum(int(plan.values[v].numel()) for v in touched)
        step = max(1, memory_budget() // max(1, per_col))
        ends = []
        for c0 in range(0, cols.shape[0], step):
            end = _row_walk(walker, value, cols[c0 : c0 + step], signs[c0 : c0 + step], nodes)
            if cut is not None:
                ends.append(end[cut])
        if cut is not None:
            own = group if not nodes and start is None else None  # one group still at its own value
            at_cut.setdefault(cut, []).append((own, torch.cat(ends), signs))
    for cut, parts in at_cut.items():
        if len(parts) == 1 and parts[0][0] is not None:  # one group at its own value: nothing to merge
            keep.append(parts[0][0])
            continue
        x = plan.values[cut]
        c = int(x.shape[-1])
        m = None
        for _, cols, signs in parts:
            s = cols.reshape(cols.shape[0], -1, c)
            term = torch.einsum("kr,kri,krj->rij", signs.to(s.dtype), s, s)
            m = term if m is None else m + term
        assert m is not None
        lay = _layout(tuple(x.shape), tags[cut], n, x.dim() - 1)
        lam, vecs = _eigh((m + m.transpose(-1, -2)) / 2, "the summed row columns", cut)
        keep.append(
            _group_from_local(cut, tags[cut], lay, lam.reshape(n, -1, c), vecs.reshape(n, -1, c, c), tol)
        )
    return keep


def _row_walk(
    walker: _Walker, value: int, cols: Tensor, signs: Tensor, nodes: list[int]
) -> dict[int, Tensor]:
    """Pull packed columns at ``value`` back through the row-local ``nodes``, serving their
    interfaces per row; the columns left at the cut (an empty dict when none is left)."""
    plan = walker.plan
    tags = plan.batch.tags
    cot = {value: cols}
    for j in sorted(nodes, reverse=True):
        node = plan.tape.nodes[j]
        o = int(node.outputs[0] or 0)
        ct = cot.pop(o)
        if j in plan.interfaces:
            s = signs.reshape(signs.shape[0], *ct.shape[1:-1], 1).to(ct.dtype)
            dsq = (ct * ct * s).sum(0)
            for path, leaf, chain in plan.interfaces[j]:
                sq = _row_squares(plan, j, path, dsq)
                if sq is None:  # pragma: no cover - _row_local admits only closed forms
                    raise EngineUnsupportedError(f"{node.func} (tape position {j}): no per-row rule")
                walker._add(leaf, walker._to_leaf(leaf, chain, sq))
        positions = [
            p
            for p, r in node.arg_paths()
            if plan.tape.depends[r.index]
            and _floating(plan.values[r.index])
            and isinstance(tags[r.index], tuple)
        ]
        if not positions:
            continue
        grads = _batched_vjp(node, plan.values, positions, {o: ct})
        if grads is None:
            pull, outs = walker._pull(j, positions)
            zeros = [plan.values[int(node.outputs[k] or 0)] for k in outs]
            grads = vmap(pull)(
                tuple(ct if k == 0 else z.new_zeros(ct.shape[0], *z.shape) for k, z in zip(outs, zeros))
            )
        for p, gr in zip(positions, grads):
            idx = _Walker._ref(node, p).index
            cot[idx] = cot[idx] + gr if idx in cot else gr
    return cot


def _packed_closed_form(
    walker: _Walker, group: Any, nodes: list[int]
) -> tuple[int, Tensor, Tensor, list[int]] | None:
    """A one-hot (pointwise) group at the output of a row-local mm/addmm (out = a B): its
    squares there are m itself (served now), and one hop back its packed column j is
    √|m_{r,j}| B[:, j] in every row r, formed by broadcasting instead of one-hot columns
    through the product. Returns (the value a, those columns (K, *a's shape), their signs
    (K, rows), the row-local nodes below the mm); None where this does not apply."""
    plan = walker.plan
    if not isinstance(group, _Group) or group.vecs is not None or not nodes or group.layout.c != 1:
        return None
    j = plan.producer.get(group.value)
    passed: list[int] = []  # row views between the mm and the group's value (row order kept)
    while j is not None and j in nodes and plan.tape.nodes[j].func in _ROW_VIEWS:
        passed.append(j)
        src = plan.tape.nodes[j].args[0]
        j = plan.producer.get(src.index) if isinstance(src, Ref) else None
    node = plan.tape.nodes[j] if j is not None else None
    if node is None or j not in nodes or node.func not in (aten.mm.default, aten.addmm.default):
        return None
    off = 1 if node.func is aten.addmm.default else 0
    x, data, wref = plan.values[group.value], node.args[off], node.args[off + 1]
    alpha = node.args[4] if off and len(node.args) > 4 else 1
    if node.kwargs or not isinstance(data, Ref) or not isinstance(wref, Ref) or alpha != 1:
        return None
    out = plan.values[int(node.outputs[0] or 0)]
    if group.layout.perm != list(range(x.dim())) or out.dim() != 2 or plan.values[data.index].dim() != 2:
        return None
    c = int(x.shape[-1])
    if tuple(out.shape) != (x.numel() // c, c):
        return None
    scale = group.scale.reshape(-1, c)  # (R, C)
    sign = group.sign.reshape(-1, c)
    m = sign * scale * scale
    for path, leaf, chain in plan.interfaces.get(j, []):
        sq = _row_squares(plan, j, path, m)
        if sq is None:  # pragma: no cover - _row_local admits only closed forms
            raise EngineUnsupportedError(f"{node.func} (tape position {j}): no per-row rule")
        walker._add(leaf, walker._to_leaf(leaf, chain, sq))
    live = (scale != 0).any(0)
    b = plan.values[wref.index].to(scale.dtype)  # (d_in, C)
    cols = scale.T[live][:, :, None] * b.T[live][:, None, :]  # (K, R, d_in)
    return (
        data.index,
        cols.to(x.dtype),
        sign.T[live].contiguous(),
        [q for q in nodes if q != j and q not in passed],
    )


def _packed_columns(plan: _Plan, group: Any) -> tuple[Tensor, Tensor] | None:
    """A group's columns packed over rows: (K, *value shape) with column k of every row in its
    row, and the signs (K, rows); None when its columns are not one-row (or not sample-major)."""
    if not isinstance(group, _Group) or not isinstance(group.tag, tuple) or group.tag[0] != 0:
        return None
    x = plan.values[group.value]
    rows = _row_count(plan, group.value)
    lay = group.layout
    if rows is None or lay.perm != list(range(x.dim())) or not group.keep:
        return None
    c = int(x.shape[-1])
    if group.vecs is None:  # one-hot entries (t·C + j): packed column j
        if lay.c != 1:
            return None
        scale = group.scale.reshape(-1, c)  # (R, C)
        sign = group.sign.reshape(-1, c)
        eye = torch.eye(c, dtype=scale.dtype, device=scale.device)
        cols = scale.T[:, :, None] * eye[:, None, :]  # (C, R, C): column j holds scale[r, j] e_j in row r
        live = (scale != 0).any(0)
        return cols[live].reshape(-1, *x.shape), sign.T[live].contiguous()
    if lay.c != c:
        return None
    k = group.vecs.shape[-1]
    cols = (group.vecs * group.scale[:, :, None, :]).reshape(-1, c, k).permute(2, 0, 1)  # (K, R, C)
    live = (group.scale != 0).reshape(-1, k).any(0)
    return cols[live].reshape(-1, *x.shape), group.sign.reshape(-1, k).T[live].contiguous()


# ---- end of row packing ----


@with_plain_kernels  # the walks call ATen ops on recorded values (recording enters the kernels again)
def engine_diagonal(
    g: Callable[[list[Tensor]], Tensor],
    leaves: Sequence[Tensor],
    data: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
    max_columns: int | None = None,
    per_sample: bool = False,
    report: dict[str, Any] | None = None,
) -> tuple[list[Tensor], int]:
    """diag ∇²_θ g(θ) per leaf, and R (columns per sample), for ``g`` evaluated on the whole batch.

    Args:
        g: ``g(leaves)`` → the scalar batch loss; it reads the batched tensors ``data``
            (samples along dimension 0), which the tape sees as constants.
        leaves: the parameter leaves θ.
        data: the batched arguments (inputs, targets, per-sample weights).
        chunk_size: columns per batched reverse walk (``None``: from the memory budget).
        max_columns: raise :class:`EngineTooCostlyError` when the sweep's estimated products
            (R, weighted where the plan needs per-leaf VJPs: :func:`secorder._cost.sweep`)
            exceed it.
        per_sample: rows ``(N, *leaf.shape)``: row n is diag ∇²_θ of sample n's term g_n of
            g = Σ_n g_n (the adjoints come from g, so a mean's 1/N or a sample weight is in the
            row); the rows sum to the diagonal. Refused (:class:`EngineUnsupportedError`) when
            g has curvature in the parameters alone (a regularizer λ‖θ‖², a reparametrized
            weight): it belongs to no sample.
        report: if given, receives ``"route"``: the sweep's :class:`secorder._cost.Route`.

    Raises:
        EngineUnsupportedError: see the module docstring.

    Example:
        >>> import torch
        >>> w, x = torch.tensor([[0.5], [-1.0]], dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> loss = lambda ls: torch.tanh(x @ ls[0]).pow(2).mean()
        >>> (d,), r = engine_diagonal(loss, [w], [x])
        >>> ref = torch.autograd.functional.hessian(lambda v: loss([v]), w).reshape(2, 2).diagonal()
        >>> torch.allclose(d.flatten(), ref), r  # tanh then square: one pointwise region
        (True, 1)
    """
    leaves = [leaf.detach() for leaf in leaves]
    n = int(data[0].shape[0])
    try:  # the adjoints from the recording pass itself (no replay of the tape)
        recorded = record(g, leaves, adjoints=_recorded_adjoints)
    except TapeUnsupportedError as exc:
        raise EngineUnsupportedError(str(exc.args[0])) from exc
    prepared = _prepare(g, leaves, data, n, batched_output=False, tape=recorded)
    if prepared is None:
        return [
            leaf.new_zeros(n, *leaf.shape) if per_sample else torch.zeros_like(leaf) for leaf in leaves
        ], 0
    tape, values, plan = prepared
    adj = tape.extra if tape.extra is not None else _adjoints(tape, leaves, values)
    tol_scale = 64 * torch.finfo(leaves[0].dtype).eps
    groups = _groups(plan, adj, n, tol_scale)
    r_total = sum(gr.count for gr in groups if gr.tag is not SAME)  # per sample
    pulled = r_total + sum(  # parameter-only groups cost one pullback per column (not on a leaf)
        gr.count
        for gr in groups
        if gr.tag is SAME and not (isinstance(gr, _Group) and gr.value < tape.num_leaves)
    )
    route = _cost.sweep(pulled, len(plan.fallback.meetings))
    if report is not None:
        report["route"] = route
    if max_columns is not None and route.products > max_columns:
        raise EngineTooCostlyError(route)
    if per_sample and any(gr.tag is SAME and gr.count for gr in groups):
        raise EngineUnsupportedError(_PARAMETER_ONLY)
    walker = _Walker(plan, leaves, n, per_sample, defer=True)
    if not per_sample:
        groups = _pack_rows(walker, groups, n, tol_scale)
    step = chunk_size or _default_step(plan, leaves, n)
    for group in groups:
        if (
            isinstance(group, _Group)
            and group.tag is SAME
            and group.vecs is None
            and group.value < tape.num_leaves
        ):
            # a pointwise op on a leaf itself (a regularizer): its diagonal columns pull back as is
            m = group.sign * group.scale * group.scale
            walker._add(group.value, group.layout.from_major(m.reshape(1, 1, -1, 1))[0])
            continue
        if walker.closed_form(group, step):
            continue
        group_step = _balanced(step, group.count)
        for c0 in range(0, group.count, group_step):
            cols, signs = group.get(c0, min(group.count, c0 + group_step))
            walker.walk(group, cols, signs, skip=getattr(group, "skip", frozenset()))
    return walker.result(), r_total


def _prepare(
    g: Callable[[list[Tensor]], Tensor],
    leaves: list[Tensor],
    data: Sequence[Tensor],
    n: int,
    *,
    batched_output: bool,
    tape: Tape | None = None,
) -> tuple[Tape, list[Any], _Plan] | None:
    """Record (unless ``tape``, a recording of ``g`` at ``leaves``, is given), take the values and
    prove the per-sample structure (None: output independent of θ)."""
    if tape is None:
        try:
            tape = record(g, leaves)
        except TapeUnsupportedError as exc:
            raise EngineUnsupportedError(str(exc.args[0])) from exc
    if tape.output is None or not tape.depends[tape.output.index]:
        return None
    if tape.values is not None:
        values = tape.values
    else:
        with torch.no_grad():
            values = tape.replay(leaves)
    try:
        plan = _plan(tape, values, data, n, batched_output)
    except BatchAxisError as exc:
        raise EngineUnsupportedError(str(exc.args[0])) from exc
    return tape, values, plan


def _default_step(plan: _Plan, leaves: list[Tensor], n: int) -> int:
    """Columns per walk from the memory budget: each column's cotangents on the batched values,
    plus the per-sample gradients an interface may form per column (convolutions, several
    rows per sample)."""
    tape, values = plan.tape, plan.values
    item = leaves[0].element_size()
    sizes = [
        int(v.numel())
        for j, v in enumerate(values)
        if isinstance(plan.batch.tags[j], tuple) and tape.depends[j]
    ]
    per_col = item * sum(sizes)
    formed = [
        leaves[leaf].numel()
        for i, ifs in plan.interfaces.items()
        for _, leaf, _ in ifs
        if tape.nodes[i].func not in (aten.mm.default, aten.addmm.default)
        or plan.batch.tags[tape.nodes[i].outputs[0]][1] != 1  # type: ignore[index]
    ]
    per_col += item * n * max(formed, default=0)
    per_col += item * leafvjp.column_entries(plan.fallback, values, n)
    return max(1, memory_budget() // (4 * max(1, per_col)))


def _balanced(step: int, count: int) -> int:
    """The chunk size that splits ``count`` columns into as few chunks of at most ``step`` as
    possible, all of about the same size (9 columns in steps of 4: 3 + 3 + 3, not 4 + 4 + 1)."""
    if count <= step:
        return max(1, step)
    chunks = -(-count // step)
    return -(-count // chunks)


@with_plain_kernels
def engine_output_diagonal(
    model: Callable[[list[Tensor]], Tensor],
    leaves: Sequence[Tensor],
    data: Sequence[Tensor],
    columns: Callable[[int, int], Tensor],
    weights: Callable[[int, int], Tensor | None],
    num_columns: int,
    *,
    chunk_size: int | None = None,
    per_sample: bool = False,
    tape: Tape | None = None,
    fallback: bool = True,
    trace: bool = False,
) -> list[Tensor]:
    """Σ_r Σ_n w_{n,r} (J_nᵀ s_{n,r})^⊙2 per leaf, J_n the Jacobian of sample n's outputs: the
    GGN / empirical Fisher diagonal from the loss node's columns only.

    Args:
        model: ``model(leaves)`` → the outputs (N, ...) on the whole batch (reads ``data``).
        columns: ``columns(a, b)`` → (k, N, ...) columns s_{n,r} for r in a..b.
        weights: ``weights(a, b)`` → (k, N) real weights w (None: all ones).
        num_columns: R.
        per_sample: rows ``(N, *leaf.shape)``, row n = Σ_r w_{n,r} (J_nᵀ s_{n,r})^⊙2.
        tape: a recording of ``model`` at ``leaves`` (:func:`secorder._engine.tape.record`)
            when the caller already made one to get the outputs (no second forward pass).
        fallback: allow per-leaf VJPs (:mod:`secorder._engine.leafvjp`) for parameters no
            interface covers; ``False`` refuses such a plan instead (its caller has a cheaper
            route: the Fisher's VJPs of the whole batch, see ``benchmarks/bench_leafvjp.py``).
        trace: per leaf only the sum of its diagonal (0-dim tensors; ignored with
            ``per_sample``): Linear layers then cost O(N·(k + m)) instead of a k×m product.

    Raises:
        EngineUnsupportedError: as for :func:`engine_diagonal` (the outputs must be batched along
            dimension 0, one row per sample), or a plan with fallback leaves when ``fallback`` is
            ``False``.
    """
    leaves = [leaf.detach() for leaf in leaves]
    n = int(data[0].shape[0])
    prepared = _prepare(model, leaves, data, n, batched_output=True, tape=tape)
    if prepared is None:
        return [leaf.new_zeros(n, *leaf.shape) if per_sample else torch.zeros_like(leaf) for leaf in leaves]
    tape, values, plan = prepared
    if plan.fallback and not fallback:
        raise EngineUnsupportedError(
            f"{len(plan.fallback.leaves)} parameter(s) that no interface covers (tied or reused "
            "weights, embeddings added to the tokens, recurrent weight stacks) would take per-leaf "
            "vector-Jacobian products, slower than the whole-batch route on the models measured "
            "(benchmarks/bench_leafvjp.py); path='fast' forces them"
        )
    assert tape.output is not None
    z = tape.output.index
    walker = _Walker(plan, leaves, n, per_sample, defer=True, trace=trace)
    dummy = values[z].new_zeros(1, 1, 1)
    group = _Group(z, (0, 1), _layout(tuple(values[z].shape), (0, 1), n, None), dummy, dummy, None, [])
    step = chunk_size or _balanced(_default_step(plan, leaves, n), num_columns)
    for c0 in range(0, num_columns, step):
        c1 = min(num_columns, c0 + step)
        cols = columns(c0, c1).detach().to(values[z].dtype)
        w = weights(c0, c1)
        per_column = None
        if w is None:
            signs = cols.new_ones(cols.shape[0], n)
        elif bool((w == w[:, :1]).all()):  # one weight per column (MSE): exact, no square roots
            per_column = w[:, 0].detach().to(cols.dtype)
            signs = cols.new_ones(cols.shape[0], n)
        else:
            w = w.detach().to(cols.dtype)
            signs = torch.sign(w)
            cols = cols * w.abs().sqrt().reshape(*w.shape, *[1] * (cols.dim() - 2))
        walker.walk(group, cols, signs, per_column)
    return walker.result()


def _wanted(tape: Tape, values: list[Any]) -> list[int]:
    """The values whose adjoints the columns need: floating, parameter-dependent op outputs of
    ops with curvature, and of curvature-free pointwise ops on such outputs of pointwise ops
    (the last value of a pointwise region may be one, e.g. the ``+ 1`` of ``exp(tanh(h)) + 1``)."""
    out: list[int] = []
    pointwise: set[int] = set()  # wanted outputs of pointwise ops
    for node in tape.nodes:
        is_pw = torch.Tag.pointwise in node.func.tags and not node.multi
        free = rule(node.func).curvature_free
        if free and not (is_pw and any(r.index in pointwise for _, r in node.arg_paths())):
            continue
        for o in node.outputs:
            if o is not None and tape.depends[o] and _floating(values[o]):
                out.append(o)
                if is_pw:
                    pointwise.add(o)
    return out


def _recorded_adjoints(tape: Tape) -> dict[int, Tensor] | None:
    """ḡ of the :func:`_wanted` values by one backward pass of the graph built while recording
    (:func:`secorder._engine.tape.record` with ``adjoints``): no replay of the tape. None where
    the result does not depend on the leaves."""
    values = tape.values
    assert values is not None
    if tape.output is None or not tape.depends[tape.output.index] or not tape.result.requires_grad:
        return None
    wanted = [o for o in _wanted(tape, values) if values[o].requires_grad]
    if not wanted:
        return {}
    with torch.enable_grad():
        grads = torch.autograd.grad(tape.result, [values[o] for o in wanted], allow_unused=True)
    return {o: gr for o, gr in zip(wanted, grads) if gr is not None}


def _adjoints(tape: Tape, leaves: list[Tensor], values: list[Any]) -> dict[int, Tensor]:
    """ḡ of every floating, parameter-dependent op output that reaches the loss (one reverse pass)."""
    assert tape.output is not None
    wanted = _wanted(tape, values)
    with torch.enable_grad():
        eps = {o: torch.zeros_like(values[o]).requires_grad_(True) for o in wanted}
        vals = tape.replay(leaves, (), eps)
        out = vals[tape.output.index]
        grads = torch.autograd.grad(out, list(eps.values()), allow_unused=True) if eps else ()
    return {o: gr for o, gr in zip(eps, grads) if gr is not None}


def _sample_major(x: Tensor, tag: Tag) -> Tensor:
    """(k, *value shape) → (k, N, rest): sample n's entries (along the tag's axis) in row n;
    a parameter-only value (``SAME``) is one row."""
    k = x.shape[0]
    if tag is SAME:
        return x.reshape(k, 1, -1)
    return x.movedim(1 + tag[0], 1).reshape(k, x.shape[1 + tag[0]] // tag[1], -1)


def _from_sample_major(x: Tensor, tag: Tag, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`_sample_major` for a value of ``shape`` (``x``: (k, N, rest))."""
    k = x.shape[0]
    if tag is SAME:
        return x.reshape(k, *shape)
    d = tag[0]
    moved = (shape[d], *shape[:d], *shape[d + 1 :])
    return x.reshape(k, *moved).movedim(1, 1 + d)


@dataclass
class _Mixed:
    """Stand-in group for a walk of mixed columns (only ``tag`` is read; columns come as a dict)."""

    tag: Tag
    value: int = -1


class _ProbeWalker(_Walker):
    """A walk of 2k mixed columns (P_1..P_k, then Q_1..Q_k): at each interface the squares of probe
    q's pair, (J P_q)^⊙2 − (J Q_q)^⊙2, go to its own row ``per_probe[leaf][offset + q]`` (the
    reverse pass is batched over all 2k columns, the squares are not summed over probes)."""

    def __init__(
        self, plan: _Plan, leaves: list[Tensor], n: int, per_probe: list[Tensor], offset: int
    ) -> None:
        super().__init__(plan, leaves, n, per_sample=True)  # per_sample: _to_leaf maps rows (probes)
        self.per_probe = per_probe
        self.offset = offset

    def _interface(
        self,
        i: int,
        node: TapeNode,
        path: tuple[Any, ...],
        leaf: int,
        chain: list[int],
        cts: dict[int, Tensor],
        signs: Tensor,
        weights: Tensor | None = None,
    ) -> None:
        out = node.outputs[0]
        if out is None or out not in cts or len(cts) != 1:
            raise EngineUnsupportedError(
                f"{node.func} (tape position {i}): columns on an output other than the first"
            )
        ct = cts[out]
        k = ct.shape[0] // 2
        axes = {p: t for p, t in self.plan.batch.arg_tags(i, node).items() if isinstance(t, tuple)}
        out_axis = self.plan.batch.tags[out]
        pm = ct.new_tensor([1.0, -1.0])
        rows = []
        for q in range(k):
            sq = interfaces.param_squares(
                node, self.plan.values, path, axes, out_axis, ct[[q, k + q]], pm, self.n
            )
            if sq is None:
                raise EngineUnsupportedError(
                    f"no per-sample rule for the parameter argument {path} of {node.func} (tape position {i})"
                )
            rows.append(sq)
        self.per_probe[leaf][self.offset : self.offset + k] += self._to_leaf(leaf, chain, torch.stack(rows))

    def _fallback_squares(self, fb_grads: dict[int, Tensor], signs: Tensor, weights: Tensor | None) -> None:
        """Per probe q: Σ_n (∂_θ⟨P_q⟩)_n^⊙2 − (∂_θ⟨Q_q⟩)_n^⊙2 for the fallback leaves, from the
        per-sample gradients of every column (summed over meetings before squaring)."""
        k2, n = signs.shape
        k = k2 // 2
        for leaf, g in leafvjp.column_grads(
            self.fb_pull, self.plan.fallback, self.plan.values, fb_grads, k2, n
        ):
            sq = (g * g).sum(1)  # (2k, *leaf.shape)
            self.per_probe[leaf][self.offset : self.offset + k] += (sq[:k] - sq[k:]).to(
                self.leaves[leaf].dtype
            )


def engine_cp_diagonal(
    g: Callable[[list[Tensor]], Tensor],
    leaves: Sequence[Tensor],
    data: Sequence[Tensor],
    *,
    num_probes: int,
    generator: torch.Generator | None,
    chunk_size: int | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], int]:
    """Curvature propagation (Martens, Sutskever and Swersky 2012) on the engine: an unbiased
    estimate of diag ∇²_θ g from random signed mixtures of the exact sweep's columns.

    With the signed columns (σ_{n,c}, s_{n,c}) of every op's local Hessian (the groups of
    :func:`engine_diagonal`, the same for both), probe q draws independent signs v_{q,n,c} ∈ {±1}
    per sample and column and forms two cotangents per sample

        P_{q,n} = Σ_{σ_{n,c} > 0} v_{q,n,c} s_{n,c},    Q_{q,n} = Σ_{σ_{n,c} < 0} v_{q,n,c} s_{n,c};

    since E[v vᵀ] = I, E[(J_nᵀ P_{q,n})^⊙2 − (J_nᵀ Q_{q,n})^⊙2] = Σ_c σ_{n,c} (J_nᵀ s_{n,c})^⊙2,
    sample n's share of the exact diagonal. Probe q's estimate d_q is the sum over samples of
    these squares (formed at the interfaces as in the exact sweep, plus the columns of
    parameter-only ops mixed the same way), and exact contributions (a pointwise op on a leaf
    itself) are added unmixed. The estimate is the mean of d_q over the K probes, its per-entry
    standard error the spread of the d_q / √K (NaN for K = 1).

    Cost: the groups' columns as for the exact sweep (formed chunk by chunk, ``chunk_size``
    columns at a time, never all at once), then per probe one batched reverse walk of 2
    columns (P and Q), instead of R columns: cheaper than the exact sweep when K ≪ R / 2.
    Memory: the mixed cotangents of ``max(1, chunk_size // 2)`` probes at a time.

    Randomness: one ``generator`` draw per probe of (columns, samples) signs in a fixed order,
    so results do not depend on ``chunk_size``; the same generator state gives the same result.

    Args:
        g, leaves, data: as for :func:`engine_diagonal`.
        num_probes: K ≥ 1.
        generator: the source of the signs (``None``: the global generator).
        chunk_size: columns per mixing step (``None``: from the memory budget).

    Returns:
        The estimate per leaf, its standard errors per leaf, the K per-probe estimates per leaf
        ((K, *leaf.shape): traces and block traces take their standard errors from them), and
        R (columns per sample).

    Raises:
        EngineUnsupportedError: as for :func:`engine_diagonal`.

    Example:
        >>> import torch
        >>> w, x = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> loss = lambda ls: torch.tanh(x * ls[0]).sum()  # one column per entry: no mixing noise
        >>> (d,), (e,), _, r = engine_cp_diagonal(
        ...     loss, [w], [x], num_probes=3, generator=torch.Generator().manual_seed(0)
        ... )
        >>> ref = torch.autograd.functional.hessian(lambda v: loss([v]), w).diagonal()
        >>> torch.allclose(d, ref), bool(e.abs().max() < 1e-12), r
        (True, True, 2)

    References:
        J. Martens, I. Sutskever, K. Swersky. Estimating the Hessian by back-propagating
        curvature. ICML 2012.
    """
    leaves = [leaf.detach() for leaf in leaves]
    k_all = num_probes
    n = int(data[0].shape[0])
    try:  # recorded as for engine_diagonal (the adjoints from the recording pass itself)
        recorded = record(g, leaves, adjoints=_recorded_adjoints)
    except TapeUnsupportedError as exc:
        raise EngineUnsupportedError(str(exc.args[0])) from exc
    prepared = _prepare(g, leaves, data, n, batched_output=False, tape=recorded)
    if prepared is None:
        zeros = [leaf.new_zeros(k_all, *leaf.shape) for leaf in leaves]
        return *_cp_summary(zeros), zeros, 0
    tape, values, plan = prepared
    adj = tape.extra if tape.extra is not None else _adjoints(tape, leaves, values)
    tol_scale = 64 * torch.finfo(leaves[0].dtype).eps
    groups = _groups(plan, adj, n, tol_scale)
    r_total = sum(gr.count for gr in groups if gr.tag is not SAME)
    walker = _Walker(plan, leaves, n)
    exact = [torch.zeros_like(leaf) for leaf in leaves]  # no mixing noise: added to every probe
    mixed: list[tuple[Any, int]] = []  # (group, offset of its first column among the signs)
    width = 0
    for group in groups:
        if (
            isinstance(group, _Group)
            and group.tag is SAME
            and group.vecs is None
            and group.value < tape.num_leaves
        ):
            m = group.sign * group.scale * group.scale
            exact[group.value] += group.layout.from_major(m.reshape(1, 1, -1, 1))[0]
        elif group.count:
            mixed.append((group, width))
            width += group.count
    step = chunk_size or _default_step(plan, leaves, n)
    block = max(1, step // 2)  # probes whose mixed cotangents are held at once
    like = leaves[0]
    per_probe = [leaf.new_zeros(k_all, *leaf.shape) for leaf in leaves]
    dt = like.dtype
    for q0 in range(0, k_all, block):
        q1 = min(k_all, q0 + block)
        kb = q1 - q0
        # one draw per probe (chunk-invariant): signs of every column in every sample
        v = torch.stack(
            [
                2 * torch.randint(0, 2, (width, n), generator=generator, device=like.device, dtype=dt) - 1
                for _ in range(q0, q1)
            ]
        ) if width else like.new_zeros(kb, 0, n)  # fmt: skip
        acc: dict[bool, dict[int, list[Tensor]]] = {True: {}, False: {}}  # SAME? → value → [P, Q]
        for group, off in mixed:
            same = group.tag is SAME
            if isinstance(group, _Group) and group.vecs is None:  # one-hot columns: mix entrywise
                ts = torch.tensor([t for t, _ in group.keep], device=like.device)
                sc, sg = group.scale[:, ts, 0].to(dt), group.sign[:, ts, 0]  # (N or 1, k)
                vv = v[:, off : off + group.count, : sc.shape[0]].transpose(1, 2)  # (kb, N or 1, k)
                mixes = []
                for m in (sg > 0, sg < 0):
                    mix = sc.new_zeros(kb, sc.shape[0], group.layout.t)
                    mix[:, :, ts] = vv * (sc * m.to(dt))
                    mixes.append(mix)
                pq = acc[same].get(group.value)
                acc[same][group.value] = mixes if pq is None else [pq[0] + mixes[0], pq[1] + mixes[1]]
                continue
            for c0 in range(0, group.count, step):
                c1 = min(group.count, c0 + step)
                cols, signs = group.get(c0, c1)
                col_dict = cols if isinstance(cols, dict) else {group.value: cols}
                vs = v[:, off + c0 : off + c1, : signs.shape[1]]  # (kb, k, N or 1)
                for value, c in col_dict.items():
                    if plan.batch.tags[value] is SAME and not same:  # per sample at a fallback meeting
                        x = c.reshape(c.shape[0], n, -1).to(dt)  # (k, N, rest) (:class:`_CrossGroup`)
                    else:
                        x = _sample_major(c, plan.batch.tags[value]).to(dt)  # (k, N or 1, rest)
                    mixes = [torch.einsum("qkn,knr->qnr", vs * m.to(dt), x) for m in (signs > 0, signs < 0)]
                    pq = acc[same].get(value)
                    acc[same][value] = mixes if pq is None else [pq[0] + mixes[0], pq[1] + mixes[1]]
        for leaf, e in enumerate(exact):
            per_probe[leaf][q0:q1] += e
        if acc[False]:  # per-sample columns: one walk of the block's 2·kb columns
            cot = {
                value: (
                    torch.cat(pq).reshape(2 * kb, n, *values[value].shape)  # per-sample parts at a meeting
                    if plan.batch.tags[value] is SAME
                    else _from_sample_major(torch.cat(pq), plan.batch.tags[value], tuple(values[value].shape))
                ).to(values[value].dtype)
                for value, pq in acc[False].items()
            }
            signs2 = torch.cat([like.new_ones(kb, n), -like.new_ones(kb, n)])
            _ProbeWalker(plan, leaves, n, per_probe, q0).walk(_Mixed((0, 1)), cot, signs2)
        for q in range(kb if acc[True] else 0):  # parameter-only columns (a regularizer): per probe
            walker.diag = [torch.zeros_like(leaf) for leaf in leaves]
            cot = {
                value: torch.stack([pq[0][q], pq[1][q]])
                .reshape(2, *values[value].shape)
                .to(values[value].dtype)
                for value, pq in acc[True].items()
            }
            walker.walk(_Mixed(SAME), cot, like.new_tensor([[1.0], [-1.0]]))
            for leaf, d in enumerate(walker.diag):
                per_probe[leaf][q0 + q] += d
    mean, err = _cp_summary(per_probe)
    return mean, err, per_probe, r_total


def _cp_summary(per_probe: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Mean over the probes (dimension 0) and its standard error (NaN for one probe)."""
    k = per_probe[0].shape[0] if per_probe else 1
    mean = [p.mean(0) for p in per_probe]
    if k > 1:  # (not Tensor.std(0), slow over a long trailing dimension)
        err = [((p - m) ** 2).sum(0).div(k - 1).sqrt() / math.sqrt(k) for p, m in zip(per_probe, mean)]
    else:
        err = [torch.full_like(m, math.nan) for m in mean]
    return mean, err

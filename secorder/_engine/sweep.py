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
* ``native_layer_norm`` over the last dimension: per-row d×d Hessians (:func:`_row_group`);
* ``bmm`` of two parameter-dependent operands (attention): closed-form SVD columns
  (:class:`_BilinearGroup`);
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

Refused (:class:`EngineUnsupportedError`, the caller falls back to one-hot HVPs): a tape that
cannot be replayed faithfully, an op that mixes samples (:class:`~secorder._engine.batch.BatchAxisError`),
a generic op over more than ``MAX_LOCAL`` entries per sample or with a non-finite local
Hessian, an interface with no rule. A parameter no interface covers (used at two ops, tied
weights, or computed by non-view ops before meeting the data) falls back, per leaf, to
per-sample vector-Jacobian products (:mod:`secorder._engine.leafvjp`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from secorder._chunking import memory_budget
from secorder._engine import interfaces, leafvjp
from secorder._engine.batch import SAME, SUMMED, BatchAnalysis, BatchAxisError, Tag, analyze
from secorder._engine.rules import rule
from secorder._engine.tape import (
    Ref,
    Tape,
    TapeNode,
    TapeUnsupportedError,
    paths,
    record,
    replace_at,
    resolve,
)

__all__ = ["EngineTooCostlyError", "EngineUnsupportedError", "engine_diagonal"]

aten = torch.ops.aten


class EngineUnsupportedError(Exception):
    """The engine cannot compute this function's diagonal (``args[0]`` says why)."""


class EngineTooCostlyError(EngineUnsupportedError):
    """More columns per sample than allowed (``args[0]`` says how many)."""


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
    """Keep the columns (t, j) that are nonzero for some sample (relative tolerance)."""
    mag = lam.abs()
    tol = tol_scale * float(mag.max()) if mag.numel() else 0.0
    alive = (mag > tol).any(0)  # (T, K)
    keep = [(int(t), int(j)) for t, j in alive.nonzero().tolist()]
    scale = torch.where(mag > tol, mag.sqrt(), torch.zeros_like(mag))
    sign = torch.where(lam < -tol, -torch.ones_like(lam), torch.ones_like(lam))  # dropped: +1
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
        refs = [r for _, r in paths((node.args, node.kwargs))]
        if node.func not in _VIEWS or len(refs) != 1 or not isinstance(node.args[0], Ref) or node.multi:
            return None
        chain.append(i)
        v = node.args[0].index
    return v, chain[::-1]


def _plan(
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
        for p, r in paths((node.args, node.kwargs)):
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
    for i, node in enumerate(tape.nodes):
        outs = [o for o in node.outputs if o is not None and o in adj]
        if not outs:
            continue
        found = [
            (p, r)
            for p, r in paths((node.args, node.kwargs))
            if tape.depends[r.index] and _floating(values[r.index])
        ]
        func = node.func
        if not found or rule(func).curvature_free:
            continue
        if len(found) > 1 and rule(func).multilinear and _disjoint(plan, [r for _, r in found]):
            continue
        if len(found) == 1 and rule(func).multilinear:
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
        if len(found) != 1:
            groups.append(_dense_group(plan, i, found, outs, adj, n, tol_scale))
            continue
        if found[0][0] == (0, 0) and outs == [node.outputs[0]] and _rowwise_last(node, values):
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
            if derivs is not None and p == (0, 0) and len(paths((node.args, node.kwargs))) == 1:
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
    2ab = ((a + b)² − (a − b)²)/2. R = 2 · rank · K per batch matrix; no dense matrix, no eigh."""

    values_: tuple[int, int]
    tag: Tag
    u: Tensor  # (N, g, m, r)
    s: Tensor  # (N, g, r)
    v: Tensor  # (N, g, n, r)
    inner: int  # K
    keep: list[tuple[int, int, int, int]]  # (t, r, j, ±1)

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
        pm = torch.tensor([float(q) for _, _, _, q in sel], device=dev, dtype=self.s.dtype)
        n, g, m, _ = self.u.shape
        nn_ = self.v.shape[2]
        root = (self.s[:, ts, rs] / 2).sqrt()  # (N, k)
        a = self.s.new_zeros(k, n, g, m, self.inner)
        b = self.s.new_zeros(k, n, g, self.inner, nn_)
        ar = torch.arange(k, device=dev)
        a[ar, :, ts, :, js] = root.T[:, :, None] * self.u[:, ts, :, rs]  # advanced indices first: (k, N, m)
        b[ar, :, ts, js, :] = pm[:, None, None] * root.T[:, :, None] * self.v[:, ts, :, rs]
        av, bv = self.values_
        a = a.reshape(k, n * g, m, self.inner)
        b = b.reshape(k, n * g, self.inner, nn_)
        out = {av: a} if av != bv else {av: a + b}
        if av != bv:
            out[bv] = b
        return out, pm[:, None].expand(k, n)


def _bilinear_group(
    plan: _Plan, i: int, found: list[tuple[Any, Ref]], out: int, adj: dict[int, Tensor], n: int, tol: float
) -> _BilinearGroup:
    values, tags = plan.values, plan.batch.tags
    (_, ra), (_, rb) = found
    tag = tags[ra.index]
    a = values[ra.index]
    g = int(a.shape[0]) // n
    gbar = adj[out].to(values[out].dtype)  # (N·g, m, n)
    u, s, vh = torch.linalg.svd(gbar, full_matrices=False)  # (b, m, r), (b, r), (b, r, n)
    r = s.shape[-1]
    cut = tol * float(s.max()) if s.numel() else 0.0
    s = torch.where(s > cut, s, torch.zeros_like(s))
    inner = int(a.shape[-1])
    s3 = s.reshape(n, g, r)
    alive = (s3 > 0).any(0)  # (g, r)
    keep = [(t, q, j, sg) for t, q in alive.nonzero().tolist() for j in range(inner) for sg in (1, -1)]
    return _BilinearGroup(
        (ra.index, rb.index),
        tag,
        u.reshape(n, g, *u.shape[1:]),
        s3,
        vh.transpose(-1, -2).reshape(n, g, vh.shape[-1], r),
        inner,
        keep,
    )


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
        res = frozenset().union(*[_leaves_of(plan, r.index) for _, r in paths((node.args, node.kwargs))])
    cache[v] = res
    return res


def _batched_vjp(
    node: TapeNode, values: Sequence[Any], positions: list[tuple[Any, ...]], cts: dict[int, Tensor]
) -> list[Tensor] | None:
    """The op's column-batched VJP from the registry (:mod:`secorder._engine.vjps`); None: the
    generic vmapped ``vjp``."""
    fn = rule(node.func).vjp
    return None if fn is None else fn(node, values, positions, cts)


class _Walker:
    """One batched reverse walk per chunk of columns; accumulates the diagonal per leaf."""

    def __init__(self, plan: _Plan, leaves: list[Tensor], n: int, per_sample: bool = False) -> None:
        self.plan = plan
        self.leaves = leaves
        self.n = n
        self.per_sample = per_sample  # diag rows (N, *leaf.shape): sample n's squares alone
        # per sample: rows allocated on first use (N·P entries: one pass fewer over them)
        self.diag: list[Any] = [None if per_sample else torch.zeros_like(leaf) for leaf in leaves]
        self.pulls: dict[tuple[int, tuple[Any, ...]], tuple[Any, list[int]]] = {}
        self.fb_pull: Any = None  # VJP of the fallback leaves' parameter-only sub-program

    def _add(self, leaf: int, x: Tensor) -> None:
        if self.diag[leaf] is None:
            self.diag[leaf] = x
        else:
            self.diag[leaf] += x

    def result(self) -> list[Tensor]:
        return [
            d if d is not None else leaf.new_zeros(self.n, *leaf.shape)
            for d, leaf in zip(self.diag, self.leaves)
        ]

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

    def _diagonal_squares(self, i: int, dgram: Tensor) -> None:
        """Feed Σ_c w_c δ_c^⊙2 = ``dgram`` (signed, one row per sample) to the interfaces of node
        ``i`` as two columns √dgram⁺, √dgram⁻ with weights +1, −1 (exact where every parameter
        entry receives one output entry per sample: mm/addmm with one row per sample)."""
        node = self.plan.tape.nodes[i]
        out = node.outputs[0]
        cols = torch.stack([dgram.clamp(min=0).sqrt(), (-dgram).clamp(min=0).sqrt()])
        weights = torch.tensor([1.0, -1.0], dtype=cols.dtype, device=cols.device)
        axes = {p: t for p, t in self.plan.batch.arg_tags(i, node).items() if isinstance(t, tuple)}
        for path, leaf, chain in self.plan.interfaces.get(i, []):
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
            )
            if sq is None:
                raise EngineUnsupportedError(
                    f"no per-sample rule for the parameter argument {path} of {node.func} (tape position {i})"
                )
            self._add(leaf, self._to_leaf(leaf, chain, sq))

    def closed_form(self, group: Any, step: int) -> bool:
        """Closed-form transport of a diagonal group (a pointwise op's one-hot columns) at the
        output of a Linear-like interface: there Σ_c w_c δ_c^⊙2 = m; one hop back through the
        weight B (out = a B) the columns are m_j-scaled rows of Bᵀ, so at a, Σ_c w_c δ_c^⊙2 =
        m (B^⊙2)ᵀ, carried through unary pointwise ops (times f'^⊙2) to the next Linear-like
        interface. When more interfaces lie behind that one, explicit columns start from its
        output (√|m_j| B[:, j] ⊙ f', formed by broadcasting, not by a product with B) and walk
        on, skipping the two interfaces already served (False: not applicable)."""
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
                refs = [r for _, r in paths((node.args, node.kwargs)) if tape.depends[r.index]]
                unary = (torch.Tag.pointwise in node.func.tags or rule(node.func).batch == "same_shape") and (
                    not node.multi
                )
                if (
                    not unary
                    or len(refs) != 1
                    or not isinstance(node.args[0], Ref)
                    or node.args[0] != refs[0]
                ):
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
        if stop is None:
            return True
        w = values[_Walker._ref(node0, wpath).index]
        dgram = m @ (w * w).T
        derivs = []
        for j in steps:
            node = tape.nodes[j]
            x = values[node.args[0].index]
            d = rule(node.func).derivs
            if d is not None and len(paths((node.args, node.kwargs))) == 1:
                args_ = resolve((node.args, node.kwargs), values)
                deriv = d(node.func, x, *args_[0][1:], **args_[1])[1]  # f' in closed form
            else:
                _, pull, *_ = vjp(_node_fn(node, values, [(0, 0)], [0]), x)
                (deriv,) = pull((torch.ones_like(values[int(node.outputs[0] or 0)]),))
            derivs.append(deriv)
            dgram = dgram * deriv * deriv
        self._diagonal_squares(stop, dgram)
        if beyond:  # explicit columns from the next interface's output on: e_j √|m_j| → √|m_j| B[:, j] ⊙ f'
            v_stop = int(tape.nodes[stop].outputs[0] or 0)
            for c0 in range(0, group.count, step):
                sel = torch.tensor([t for t, _ in group.keep[c0 : c0 + step]], device=w.device)
                cols = group.scale[:, sel, 0].T[:, :, None] * w.T[sel][:, None, :]  # (k, N, d_in)
                for deriv in derivs:
                    cols = cols * deriv
                stand_in = _Group(v_stop, (0, 1), group.layout, group.scale, group.sign, None, [])
                self.walk(stand_in, cols, group.sign[:, sel, 0].T, skip={stop})
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
        k = next(iter(cot.values())).shape[0]
        same = group.tag is SAME
        fb_grads: dict[int, Tensor] = {}  # per-sample gradients at the fallback meetings (leafvjp)
        start = max(plan.producer.get(v, -1) for v in cot)
        for i in range(start, -1, -1):
            node = tape.nodes[i]
            if not any(o is not None and o in cot for o in node.outputs):
                continue
            cts = {o: cot.pop(o) for o in node.outputs if o is not None and o in cot}
            if not same and i not in skip:  # skip: interfaces already served in closed form
                for path, leaf, chain in plan.interfaces.get(i, []):
                    self._interface(i, node, path, leaf, chain, cts, signs, weights)
                if i in plan.fallback.meetings:
                    for u, gr in leafvjp.meeting_grads(
                        plan.fallback, i, node, values, plan.batch, cts, self.n
                    ).items():
                        fb_grads[u] = fb_grads[u] + gr if u in fb_grads else gr
            positions = [
                p
                for p, r in paths((node.args, node.kwargs))
                if tape.depends[r.index]
                and _floating(values[r.index])
                and (tags[r.index] is SAME) == same
                and (r.index >= tape.num_leaves or same)
            ]
            if not positions:
                continue
            fast = _batched_vjp(node, values, positions, cts)
            if fast is not None:
                for p, gr in zip(positions, fast):
                    idx = self._ref(node, p).index
                    cot[idx] = cot[idx] + gr if idx in cot else gr
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
        if fb_grads:  # per-sample gradients of the fallback leaves: summed over meetings, then squared
            if self.fb_pull is None:
                self.fb_pull = leafvjp.leaf_pullback(plan.fallback, tape, values, self.leaves)
            for leaf, sq in leafvjp.squares(
                self.fb_pull, plan.fallback, values, fb_grads, signs, weights, self.per_sample
            ):
                self._add(leaf, sq.to(self.leaves[leaf].dtype))
        if same:
            if self.per_sample:
                raise EngineUnsupportedError(_PARAMETER_ONLY)
            w = signs[:, 0]
            for leaf in range(tape.num_leaves):
                if leaf in cot:
                    g = cot.pop(leaf)
                    self.diag[leaf] += torch.einsum("k,k...->...", w.to(g.dtype), g * g)
        elif any(idx < tape.num_leaves for idx in cot):  # pragma: no cover - interfaces cover leaves
            raise EngineUnsupportedError("a per-sample column reached a parameter outside an interface")

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
        d, g = out_axis
        s = signs if g == 1 else signs.repeat_interleave(g, dim=1)
        s = s.reshape(s.shape[0], *[1] * d, s.shape[1], *[1] * (ct.dim() - 2 - d))
        has = {sgn: bool((s * sgn > 0).any()) for sgn in (1, -1)}
        parts = []
        for sgn in (1, -1):
            if not has[sgn]:
                continue
            part = ct if not has[-sgn] else ct * (s * sgn > 0)  # one sign throughout: no mask
            sq = interfaces.param_squares(
                node, values, path, axes, out_axis, part, weights, self.n, per_sample=self.per_sample
            )
            if sq is None:
                raise EngineUnsupportedError(
                    f"no per-sample rule for the parameter argument {path} of {node.func} (tape position {i})"
                )
            parts.append(sq if sgn > 0 else -sq)
        if not parts:
            return
        total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        self._add(leaf, self._to_leaf(leaf, chain, total))

    def _to_leaf(self, leaf: int, chain: list[int], sq: Tensor) -> Tensor:
        """Map entries of an injective view of the leaf back to the leaf (the views' VJP)."""
        if not chain:
            return sq.to(self.leaves[leaf].dtype)
        tape, values = self.plan.tape, self.plan.values

        def views(x: Tensor) -> Tensor:
            for i in chain:
                x = _node_fn(tape.nodes[i], values, [(0, 0)], [0])(x)[0]
            return x

        _, pull, *_ = vjp(views, self.leaves[leaf])
        sq = sq.to(values[int(tape.nodes[chain[-1]].outputs[0] or 0)].dtype)
        return vmap(pull)(sq)[0] if self.per_sample else pull(sq)[0]


def engine_diagonal(
    g: Callable[[list[Tensor]], Tensor],
    leaves: Sequence[Tensor],
    data: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
    max_columns: int | None = None,
    per_sample: bool = False,
) -> tuple[list[Tensor], int]:
    """diag ∇²_θ g(θ) per leaf, and R (columns per sample), for ``g`` evaluated on the whole batch.

    Args:
        g: ``g(leaves)`` → the scalar batch loss; it reads the batched tensors ``data``
            (samples along dimension 0), which the tape sees as constants.
        leaves: the parameter leaves θ.
        data: the batched arguments (inputs, targets, per-sample weights).
        chunk_size: columns per batched reverse walk (``None``: from the memory budget).
        max_columns: raise :class:`EngineTooCostlyError` when R exceeds it.
        per_sample: rows ``(N, *leaf.shape)``: row n is diag ∇²_θ of sample n's term g_n of
            g = Σ_n g_n (the adjoints come from g, so a mean's 1/N or a sample weight is in the
            row); the rows sum to the diagonal. Refused (:class:`EngineUnsupportedError`) when
            g has curvature in the parameters alone (a regularizer λ‖θ‖², a reparametrized
            weight): it belongs to no sample.

    Raises:
        EngineUnsupportedError: see the module docstring.

    Example:
        >>> import torch
        >>> w, x = torch.tensor([[0.5], [-1.0]], dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> loss = lambda ls: torch.tanh(x @ ls[0]).pow(2).mean()
        >>> (d,), r = engine_diagonal(loss, [w], [x])
        >>> ref = torch.autograd.functional.hessian(lambda v: loss([v]), w).reshape(2, 2).diagonal()
        >>> torch.allclose(d.flatten(), ref), r
        (True, 2)
    """
    leaves = [leaf.detach() for leaf in leaves]
    n = int(data[0].shape[0])
    prepared = _prepare(g, leaves, data, n, batched_output=False)
    if prepared is None:
        return [
            leaf.new_zeros(n, *leaf.shape) if per_sample else torch.zeros_like(leaf) for leaf in leaves
        ], 0
    tape, values, plan = prepared
    adj = _adjoints(tape, leaves, values)
    tol_scale = 64 * torch.finfo(leaves[0].dtype).eps
    groups = _groups(plan, adj, n, tol_scale)
    r_total = sum(gr.count for gr in groups if gr.tag is not SAME)  # per sample
    pulled = r_total + sum(  # parameter-only groups cost one pullback per column (not on a leaf)
        gr.count
        for gr in groups
        if gr.tag is SAME and not (isinstance(gr, _Group) and gr.value < tape.num_leaves)
    )
    if max_columns is not None and pulled > max_columns:
        raise EngineTooCostlyError(pulled)
    if per_sample and any(gr.tag is SAME and gr.count for gr in groups):
        raise EngineUnsupportedError(_PARAMETER_ONLY)
    walker = _Walker(plan, leaves, n, per_sample)
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
            walker.diag[group.value] += group.layout.from_major(m.reshape(1, 1, -1, 1))[0]
            continue
        if walker.closed_form(group, step):
            continue
        for c0 in range(0, group.count, step):
            cols, signs = group.get(c0, min(group.count, c0 + step))
            walker.walk(group, cols, signs)
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
    per_col = item * sum(
        int(v.numel())
        for j, v in enumerate(values)
        if isinstance(plan.batch.tags[j], tuple) and tape.depends[j]
    )
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

    Raises:
        EngineUnsupportedError: as for :func:`engine_diagonal` (the outputs must be batched along
            dimension 0, one row per sample).
    """
    leaves = [leaf.detach() for leaf in leaves]
    n = int(data[0].shape[0])
    prepared = _prepare(model, leaves, data, n, batched_output=True, tape=tape)
    if prepared is None:
        return [leaf.new_zeros(n, *leaf.shape) if per_sample else torch.zeros_like(leaf) for leaf in leaves]
    tape, values, plan = prepared
    assert tape.output is not None
    z = tape.output.index
    walker = _Walker(plan, leaves, n, per_sample)
    dummy = values[z].new_zeros(1, 1, 1)
    group = _Group(z, (0, 1), _layout(tuple(values[z].shape), (0, 1), n, None), dummy, dummy, None, [])
    step = chunk_size or _default_step(plan, leaves, n)
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


def _adjoints(tape: Tape, leaves: list[Tensor], values: list[Any]) -> dict[int, Tensor]:
    """ḡ of every floating, parameter-dependent op output that reaches the loss (one reverse pass)."""
    assert tape.output is not None
    wanted = [
        o
        for node in tape.nodes
        for o in node.outputs
        if o is not None and tape.depends[o] and _floating(values[o]) and not rule(node.func).curvature_free
    ]
    with torch.enable_grad():
        eps = {o: torch.zeros_like(values[o]).requires_grad_(True) for o in wanted}
        vals = tape.replay(leaves, (), eps)
        out = vals[tape.output.index]
        grads = torch.autograd.grad(out, list(eps.values()), allow_unused=True) if eps else ()
    return {o: gr for o, gr in zip(eps, grads) if gr is not None}

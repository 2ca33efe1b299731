"""Exact Hessian diagonal by an op-level second-order sweep over a per-sample ATen tape.

The generic path of :func:`secorder.module_hessian_diagonal` (issue 7), for models the
module-level sweep (:mod:`secorder._sweep`) refuses: LayerNorm, attention, tied weights,
affine eval-mode BatchNorm, unknown ops. With per-sample losses l_n(θ) and L = c Σ_n l_n, and
for sample n ops y_k = f_k(u_k) with adjoints ḡ_k, input Jacobians J_k = ∂u_k/∂θ and local
Hessians M_k = ∇²_u ⟨ḡ_k, f_k(u)⟩ = Σ_c σ_c s_c s_cᵀ,

    diag H = c Σ_n Σ_k Σ_c σ_{n,c} (J_{n,k}ᵀ s_{n,c})²,

every J_kᵀ s_c a vector-Jacobian product of θ ↦ u_k (the full per-sample gradient, so weights
shared over positions or tied between layers are covered automatically).

Implementation: the loss of ONE sample is recorded as an ATen tape (:func:`secorder._engine.tape.record`)
with that sample's inputs and targets as tape inputs, then replayed for every sample under
``torch.func.vmap`` (chunks of samples). Per chunk: one reverse pass gives the adjoint of every
node (a zero perturbation added to each node output, differentiated); the local Hessians are
taken by reverse over reverse (never nested forward mode: it is wrong for layer_norm and
batch_norm in PyTorch 2.x):

* ops linear in their tensor inputs (views, sums, concatenation, ReLU, pooling, ``nll_loss``)
  and multilinear ops (``mm``/``bmm``/``addmm``/convolution/eval BatchNorm, ``mul``/``div``)
  whose parameter-dependent inputs depend on DISJOINT sets of parameter leaves contribute
  nothing to the diagonal (for every parameter at most one Jacobian row is nonzero, and the
  diagonal blocks of a multilinear map vanish): skipped;
* pointwise ops: per element the m×m block ḡ ∂_i∂_j f over the m parameter-dependent inputs
  (expanded to the output's shape), cross entries between inputs with disjoint leaf sets set to
  zero (exact, see above); one signed column per element for m = 1, otherwise the eigenpairs of
  each block;
* row-wise ops, per row of the normalized dimension(s) (the limit ``MAX_LOCAL`` applies per
  row): ``_softmax``/``_safe_softmax`` (p the output, a = ḡ − ⟨ḡ, p⟩ 1: the row Hessian
  diag(p ⊙ a) − (p ⊙ a) pᵀ − p (p ⊙ a)ᵀ, closed form) and ``_log_softmax`` (−(Σ ḡ)(diag p − p pᵀ));
  ``native_layer_norm`` (y = x̂ ⊙ w + b): per row the Hessian of ⟨ḡ_row, x̂_row ⊙ w⟩ over x_row,
  plus the (x_row, w) cross block when the weight shares parameter leaves with the input
  (∂²/∂w² = 0, the bias is linear), closed form: with x̂ = (x − μ)/σ, c = ḡ ⊙ w, a = ⟨c, x̂⟩ and
  P = I − 11ᵀ/d, ∂²/∂x² = −σ⁻²/d · (a (P − 3 x̂x̂ᵀ/d) + Pc x̂ᵀ + x̂ (Pc)ᵀ) and
  ∂²/∂x∂w = σ⁻¹ (P − x̂x̂ᵀ/d) diag(ḡ) (no autodiff, O(d²) per row). Each row's Hessian is
  eigendecomposed (batched ``eigh``) and its columns are supported on that row (and w): cost
  O(rows · d³) instead of O((rows · d)³), R ≤ rows · d (+ d per row for a shared weight);
* ``mm``/``bmm`` of two operands with shared parameter leaves (q kᵀ, attention · v): the local
  Hessian of ⟨ḡ, A B⟩ is its cross block. With the SVD ḡ = Σ_r s_r u_r v_rᵀ per batch matrix,
  ⟨ḡ, Ȧ Ḃ⟩ = Σ_r s_r Σ_j (u_rᵀ Ȧ)_j (Ḃ v_r)_j and 2ab = ((a + b)² − (a − b)²)/2 give the closed-form
  columns (u_r e_jᵀ, ±e_j v_rᵀ) with weights ±s_r/2: R = 2 · rank(ḡ) · K for (b, m, K) @ (b, K, n),
  no dense (|A| + |B|)² matrix and no size limit;
* any other op (mse_loss, binary_cross_entropy_with_logits, batch norm with shared leaves,
  other multilinear ops with shared leaves, ...): the dense local Hessian over its flattened
  parameter-dependent inputs (at most ``MAX_LOCAL`` entries per sample, else refused), disjoint
  cross blocks zeroed, eigendecomposed into signed columns, zero eigenvalues dropped. A
  layer_norm whose mean/rstd outputs reach the loss would land here; it is refused when its
  weight shares leaves with its input (torch.func's second derivative of ``native_layer_norm``
  has a wrong (w, x) block, PyTorch 2.13).

Then every column is pulled back by one vmapped VJP of θ ↦ (inputs of the contributing nodes)
(``chunk_size`` columns at a time), squared, weighted and summed. R (columns per sample) is the
cost: about R/chunk_size replays of the forward pass plus R batched backward passes.

Curvature propagation (:func:`graph_sweep_cp_diagonal`; Martens, Sutskever and Swersky 2012):
the same tape, plan and columns, but per sample and probe the columns are mixed by Rademacher
signs into two cotangents P = Σ_{w_c>0} v_c √w_c s_c and Q = Σ_{w_c<0} v_c √(−w_c) s_c (built
``chunk_size`` columns at a time), pulled back by the same vmapped VJP: (JᵀP)² − (JᵀQ)² is an
unbiased estimate of diag H_n at 2 VJPs per probe instead of R, with standard errors over probes.

Refused (:class:`GraphSweepUnsupportedError`): tapes that cannot be replayed faithfully (random
ops, aliased in-place updates), Python control flow on the data (``.item()``), train-mode
BatchNorm and any other coupling of samples (checked: c Σ_n l_n must equal the batch loss),
generic ops too large for a dense local Hessian, rows over ``MAX_LOCAL`` entries.

References:
    C. Bishop. Exact calculation of the Hessian matrix for the multilayer perceptron.
    Neural Computation, 1992.
    F. Dangel, S. Harmeling, P. Hennig. Modular block-diagonal curvature approximations for
    feedforward architectures. AISTATS 2020.
    J. Martens, I. Sutskever, K. Swersky. Estimating the Hessian by back-propagating
    curvature. ICML 2012.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jacrev, vjp, vmap

from secorder._engine.rules import rule
from secorder._engine.tape import (
    Ref,
    Tape,
    TapeNode,
    TapeUnsupportedError,
    paths,
    record,
    refs_in,
    replace_at,
    resolve,
)

__all__ = [
    "MAX_LOCAL",
    "GraphSweepTooCostlyError",
    "GraphSweepUnsupportedError",
    "graph_sweep_cp_diagonal",
    "graph_sweep_diagonal",
]

aten = torch.ops.aten

MAX_LOCAL = 4096  # largest per-sample input (entries) of a generic op's dense local Hessian


class GraphSweepUnsupportedError(Exception):
    """The op-level sweep cannot handle this loss (``args[0]`` says why)."""


class GraphSweepTooCostlyError(GraphSweepUnsupportedError):
    """More columns per sample than ``max_columns`` (``args[0]`` is R)."""


_BATCH_NORMS = frozenset(
    {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
     "cudnn_batch_norm", "miopen_batch_norm", "batch_norm"}
)  # fmt: skip


def _trains_batch_norm(node: TapeNode) -> bool:
    """A batch norm normalizing with batch statistics (its ``training`` argument true)."""
    if node.func._schema.name.split("::")[-1] not in _BATCH_NORMS:
        return False
    names = [a.name for a in node.func._schema.arguments]
    if "training" not in names:
        return False
    i = names.index("training")
    value = node.args[i] if i < len(node.args) else node.kwargs.get("training", False)
    return bool(value)


@dataclass
class _Node:
    """A tape node that may contribute curvature."""

    node: TapeNode
    kind: str  # "pointwise" or "generic"
    positions: list[tuple[Any, ...]]  # paths into (args, kwargs) of the θ-dependent inputs
    refs: list[Ref]
    outputs: list[int]  # floating outputs that reach the loss
    mask: Tensor = field(default_factory=lambda: torch.ones(1, 1, dtype=torch.bool))  # i, j: keep
    shape: tuple[int, ...] = ()  # pointwise: the output shape per sample
    sizes: list[int] = field(default_factory=list)  # generic: entries per input
    dim: int = -1  # rows (softmax family): the normalized dimension
    row: int = 0  # rows: entries per row of the first input (layer_norm: prod(normalized_shape))


def _arg(node: TapeNode, i: int) -> Any:
    return node.args[i] if i < len(node.args) else None


def _structured(
    node: TapeNode, found: list[tuple[Any, Ref]], leaf_sets: list[int], outs: list[int], values: Sequence[Any]
) -> _Node | str | None:
    """A row-wise or bilinear node (closed-form or per-row local Hessians), ``"skip"``, or None."""
    func = node.func
    pos = [p for p, _ in found]
    refs = [r for _, r in found]
    if rule(func).family == "softmax" and pos == [(0, 0)] and outs == [node.outputs[0]]:
        dim = int(_arg(node, 1)) % max(1, values[refs[0].index].dim())
        row = int(values[refs[0].index].shape[dim]) if values[refs[0].index].dim() else 1
        return _Node(node, "rows", pos, refs, outs, dim=dim, row=row)
    if func is aten.native_layer_norm.default and not node.kwargs and outs == [node.outputs[0]]:
        if (0, 0) not in pos:
            return "skip"  # y = x̂ ⊙ w + b is linear in (w, b) when x is constant
        i = pos.index((0, 0))
        keep = [i]  # the bias is linear; the weight only through x̂ ⊙ w, i.e. its cross block with x
        if (0, 2) in pos and leaf_sets[pos.index((0, 2))] & leaf_sets[i]:
            keep.append(pos.index((0, 2)))  # disjoint leaves: the x–w block is zero on the diagonal
        row = math.prod(int(k) for k in _arg(node, 1))
        if row + (row if len(keep) == 2 else 0) > MAX_LOCAL:
            raise GraphSweepUnsupportedError(
                f"the op {func} on rows of {row} parameter-dependent entries per sample (a dense "
                f"local Hessian per row is limited to {MAX_LOCAL})"
            )
        return _Node(node, "rows", [pos[k] for k in keep], [refs[k] for k in keep], outs, row=row)
    if func in (aten.mm.default, aten.bmm.default) and pos == [(0, 0), (0, 1)]:
        inner = int(values[refs[0].index].shape[-1])  # K in (b, m, K) @ (b, K, n)
        return _Node(node, "bilinear", pos, refs, outs, row=inner)
    return None


@dataclass
class _Plan:
    tape: Tape
    nodes: list[_Node]
    adjoint: list[int]  # value indices whose adjoints are needed


def _classify(tape: Tape, values: Sequence[Any]) -> _Plan:
    """Which nodes contribute curvature, from the tape of one sample."""
    assert tape.output is not None
    nv = tape.num_values
    deps = [0] * nv  # bit mask of parameter leaves each value depends on
    for i in range(tape.num_leaves):
        deps[i] = 1 << i
    for node in tape.nodes:
        d = 0
        for r in refs_in((node.args, node.kwargs)):
            d |= deps[r.index]
        for o in node.outputs:
            if o is not None:
                deps[o] = d if tape.depends[o] else 0
    reaches = [False] * nv
    reaches[tape.output.index] = True
    for node in reversed(tape.nodes):
        if any(o is not None and reaches[o] for o in node.outputs):
            for r in refs_in((node.args, node.kwargs)):
                reaches[r.index] = True

    def floating(i: int) -> bool:
        v = values[i]
        return isinstance(v, Tensor) and v.is_floating_point()

    nodes: list[_Node] = []
    for node in tape.nodes:
        func = node.func
        if _trains_batch_norm(node):
            raise GraphSweepUnsupportedError(
                "BatchNorm normalizing with batch statistics (train mode couples the samples)"
            )
        outs = [o for o in node.outputs if o is not None and reaches[o] and tape.depends[o] and floating(o)]
        if not outs:
            continue
        found = [
            (p, r)
            for p, r in paths((node.args, node.kwargs))
            if r.index < len(deps) and tape.depends[r.index] and floating(r.index)
        ]
        if not found or rule(func).curvature_free:
            continue
        leaf_sets = [deps[r.index] for _, r in found]
        disjoint = all(leaf_sets[i] & leaf_sets[j] == 0 for i in range(len(found)) for j in range(i))
        if rule(func).multilinear and disjoint:
            continue
        if func is aten.div.Tensor and [p for p, _ in found] == [(0, 0)]:
            continue  # division by a constant
        structured = _structured(node, found, leaf_sets, outs, values)
        if isinstance(structured, str):  # "skip"
            continue
        if structured is not None:
            nodes.append(structured)
            continue
        m = len(found)
        mask = torch.tensor(
            [[leaf_sets[i] & leaf_sets[j] != 0 for j in range(m)] for i in range(m)], dtype=torch.bool
        )
        positions, refs = [p for p, _ in found], [r for _, r in found]
        if torch.Tag.pointwise in func.tags and not node.multi:
            shape = tuple(values[outs[0]].shape)
            nodes.append(_Node(node, "pointwise", positions, refs, outs, mask, shape=shape))
        else:
            if func is aten.native_layer_norm.default and not disjoint:
                raise GraphSweepUnsupportedError(
                    "layer_norm whose weight shares parameters with its input, with its mean/rstd "
                    "outputs used (torch.func's second derivative of native_layer_norm is wrong there)"
                )
            sizes = [int(values[r.index].numel()) for r in refs]
            if sum(sizes) > MAX_LOCAL:
                raise GraphSweepUnsupportedError(
                    f"the op {func} on {sum(sizes)} parameter-dependent entries per sample (a dense "
                    f"local Hessian is limited to {MAX_LOCAL})"
                )
            nodes.append(_Node(node, "generic", positions, refs, outs, mask, sizes=sizes))
    adjoint = sorted({o for n in nodes for o in n.outputs})
    return _Plan(tape, nodes, adjoint)


def _op_fn(nd: _Node, values: Sequence[Any]) -> Callable[..., list[Tensor]]:
    """The node's op as a function of its θ-dependent inputs (other arguments fixed)."""
    node = nd.node
    base = resolve((node.args, node.kwargs), values)
    wanted = [node.outputs.index(o) for o in nd.outputs]

    def f(*xs: Tensor) -> list[Tensor]:
        ak = base
        for p, x in zip(nd.positions, xs):
            ak = replace_at(ak, p, x)
        out = node.func(*ak[0], **ak[1])
        outs = list(out) if node.multi else [out]
        return [outs[i] for i in wanted]

    return f


def _softmax_rows(nd: _Node, values: Sequence[Any], adj: dict[int, Tensor]) -> Tensor:
    """(rows, d, d) Hessians of ⟨ḡ_row, softmax(u_row)⟩ or ⟨ḡ_row, log_softmax(u_row)⟩, closed form.

    With p = softmax(u): log_softmax gives −(Σ_j ḡ_j)(diag p − p pᵀ); softmax gives
    diag(p ⊙ a) − (p ⊙ a) pᵀ − p (p ⊙ a)ᵀ with a = ḡ − ⟨ḡ, p⟩ 1.
    """
    out = nd.outputs[0]
    y = values[out].movedim(nd.dim, -1).reshape(-1, nd.row)
    g = adj[out].movedim(nd.dim, -1).reshape(-1, nd.row).to(y.dtype)
    if nd.node.func is aten._log_softmax.default:
        p = y.exp()
        return -g.sum(-1)[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    pa = y * (g - (g * y).sum(-1, keepdim=True))
    return torch.diag_embed(pa) - pa[:, :, None] * y[:, None, :] - y[:, :, None] * pa[:, None, :]


def _layer_norm_rows(nd: _Node, values: Sequence[Any], adj: dict[int, Tensor]) -> Tensor:
    """(rows, d + d_w, d + d_w) Hessians of ⟨ḡ_row, x̂_row ⊙ w⟩ over (x_row[, w]), closed form.

    Per row of d entries (d = prod(normalized_shape)) with x̂ = (x − μ)/σ, σ = sqrt(var(x) + eps)
    (biased variance), c = ḡ ⊙ w (w = 1 without a weight), a = ⟨c, x̂⟩, P = I − 11ᵀ/d and
    Pc = c − mean(c) 1: ∂x̂/∂x = J = σ⁻¹ (P − x̂x̂ᵀ/d) (symmetric), ∇φ = Jc = σ⁻¹ (Pc − a x̂/d) and

        ∂²φ/∂x² = −σ⁻²/d · (a (P − 3 x̂x̂ᵀ/d) + Pc x̂ᵀ + x̂ Pcᵀ),
        ∂²φ/∂x∂w = J diag(ḡ),   ∂²φ/∂w² = 0

    (the last two only when the weight shares parameter leaves with x). O(rows · d²), no autodiff:
    torch.func's reverse over reverse of ``aten.native_layer_norm`` has a wrong (w, x) block
    (PyTorch 2.13), and differentiating the explicit normalization costs d reverse passes per row.
    """
    node = nd.node
    x = values[nd.refs[0].index].reshape(-1, nd.row)
    g = adj[nd.outputs[0]].reshape(-1, nd.row).to(x.dtype)
    weight = resolve(_arg(node, 2), values)
    return _layer_norm_row_hessian(x, g, weight, float(_arg(node, 4)), shared=len(nd.refs) == 2)


def _layer_norm_row_hessian(x: Tensor, g: Tensor, weight: Tensor | None, eps: float, shared: bool) -> Tensor:
    """The closed form of :func:`_layer_norm_rows` for rows x, adjoints g (rows, d) and the weight
    (d entries, or None): (rows, d, d), or (rows, 2d, 2d) over (x_row, w) when ``shared``."""
    d = x.shape[-1]
    weight = None if weight is None else weight.reshape(1, d).to(x.dtype)
    xc = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)  # (rows, 1)
    xh = xc * rstd
    c = g if weight is None else g * weight
    pc = c - c.mean(-1, keepdim=True)
    a = (c * xh).sum(-1)[:, None, None]  # (rows, 1, 1)
    proj = torch.eye(d, dtype=x.dtype, device=x.device) - 1.0 / d  # P
    xx = xh[:, :, None] * xh[:, None, :]  # x̂x̂ᵀ
    cross = pc[:, :, None] * xh[:, None, :]  # Pc x̂ᵀ
    scale = (rstd * rstd / d)[:, :, None]  # σ⁻²/d
    hxx = -scale * (a * (proj - (3.0 / d) * xx) + cross + cross.transpose(1, 2))
    if not shared:
        return hxx
    hxw = rstd[:, :, None] * (proj - xx / d) * g[:, None, :]  # [x_k, w_j] = J_kj ḡ_j
    top = torch.cat([hxx, hxw], 2)
    bottom = torch.cat([hxw.transpose(1, 2), torch.zeros_like(hxx)], 2)
    return torch.cat([top, bottom], 1)


def _local(nd: _Node, values: Sequence[Any], adj: dict[int, Tensor]) -> Tensor:
    """Per sample: pointwise (m, m, *shape) blocks ḡ ∂_i∂_j f, row-wise (rows, d, d) local
    Hessians, the bilinear op's adjoint ḡ as (b, m, n), or the generic (d, d) local Hessian."""
    if nd.kind == "rows":
        return (
            _softmax_rows(nd, values, adj)
            if rule(nd.node.func).family == "softmax"
            else _layer_norm_rows(nd, values, adj)
        )
    if nd.kind == "bilinear":
        g = adj[nd.outputs[0]]
        return g.reshape(-1, *g.shape[-2:])
    f = _op_fn(nd, values)
    gbars = [adj[o] for o in nd.outputs]
    prim = [values[r.index] for r in nd.refs]
    m = len(prim)
    if nd.kind == "pointwise":
        us = tuple(p.expand(nd.shape) for p in prim)

        def phi(*xs: Tensor) -> Tensor:
            return (gbars[0] * f(*xs)[0]).sum()

        rows = []
        for i in range(m):
            gi = grad(phi, argnums=i)
            hij = grad(lambda *xs, gi=gi: gi(*xs).sum(), argnums=tuple(range(m)))(*us)
            rows.append(torch.stack([h.expand(nd.shape) for h in hij]))
        block = torch.stack(rows)  # (m, m, *shape)
        return block * nd.mask.to(block.device).reshape(m, m, *([1] * len(nd.shape)))
    shapes = [p.shape for p in prim]
    flat = torch.cat([p.reshape(-1) for p in prim])

    def phi_flat(v: Tensor) -> Tensor:
        xs, pos = [], 0
        for s, k in zip(shapes, nd.sizes):
            xs.append(v[pos : pos + k].reshape(s))
            pos += k
        return sum(((g * y).sum() for g, y in zip(gbars, f(*xs))), start=v.new_zeros(()))

    hess = jacrev(jacrev(phi_flat))(flat)
    hess = (hess + hess.T) / 2
    keep = nd.mask.to(hess.device).repeat_interleave(torch.tensor(nd.sizes, device=hess.device), 0)
    keep = keep.repeat_interleave(torch.tensor(nd.sizes, device=hess.device), 1)
    return hess * keep


@dataclass
class _Columns:
    """Signed columns of one node for a chunk of samples: ``get(a, b)`` → (cots (n, k, D), weights (n, k))."""

    count: int
    get: Callable[[int, int], tuple[Tensor, Tensor]]


def _columns(nd: _Node, local: Tensor, tol_scale: float) -> _Columns:
    n = local.shape[0]
    if nd.kind == "pointwise":
        m = local.shape[1]
        e = math.prod(nd.shape)
        blocks = local.reshape(n, m, m, e).permute(0, 3, 1, 2)  # (n, E, m, m)
        if m == 1:
            lam, vec = blocks[..., 0, 0], None
            lam_flat = lam  # (n, E)
        else:
            lam, vec = torch.linalg.eigh(blocks)  # (n, E, m), (n, E, m, m)
            lam_flat = lam.reshape(n, e * m)
        big = lam_flat.abs().amax() if lam_flat.numel() else lam_flat.new_zeros(())
        keep = (
            (lam_flat.abs() > tol_scale * big).any(0).nonzero().flatten()
            if big > 0
            else lam_flat.new_zeros(0).long()
        )

        def get_pw(a: int, b: int) -> tuple[Tensor, Tensor]:
            idx = keep[a:b]
            el, c = idx // m, idx % m
            onehot = torch.nn.functional.one_hot(el, e).to(local.dtype)  # (k, E)
            if vec is None:
                cots = onehot.unsqueeze(0).expand(n, -1, -1)
                return cots, lam_flat[:, idx]
            comp = vec.transpose(-1, -2)[:, el, c]  # (n, k, m): the c-th eigenvector of element el
            cots = comp.unsqueeze(-1) * onehot[None, :, None, :]  # (n, k, m, E)
            return cots.reshape(n, b - a, m * e), lam_flat[:, idx]

        return _Columns(int(keep.numel()), get_pw)
    if nd.kind == "rows":
        return _row_columns(nd, local, tol_scale)
    if nd.kind == "bilinear":
        return _bilinear_columns(nd, local, tol_scale)
    lam, vec = torch.linalg.eigh(local)  # (n, d), (n, d, d)
    big = lam.abs().amax() if lam.numel() else lam.new_zeros(())
    keep = (lam.abs() > tol_scale * big).any(0).nonzero().flatten() if big > 0 else lam.new_zeros(0).long()

    def get_gen(a: int, b: int) -> tuple[Tensor, Tensor]:
        idx = keep[a:b]
        return vec[:, :, idx].transpose(1, 2), lam[:, idx]

    return _Columns(int(keep.numel()), get_gen)


def _keep(lam: Tensor, tol_scale: float) -> Tensor:
    """Indices (last dim of (n, K) ``lam``) with |λ| above tolerance for some sample."""
    big = lam.abs().amax() if lam.numel() else lam.new_zeros(())
    if not big > 0:
        return lam.new_zeros(0).long()
    return (lam.abs() > tol_scale * big).any(0).nonzero().flatten()


def _row_columns(nd: _Node, local: Tensor, tol_scale: float) -> _Columns:
    """Eigencolumns of each row's local Hessian, supported on that row (and the shared weight)."""
    n, rows, m = local.shape[:3]
    lam, vec = torch.linalg.eigh(local)  # (n, rows, m), (n, rows, m, m)
    lam_flat = lam.reshape(n, rows * m)
    keep = _keep(lam_flat, tol_scale)
    vecs = vec.transpose(-1, -2)  # (n, rows, c, m): eigenvector c of each row

    def get(a: int, b: int) -> tuple[Tensor, Tensor]:
        idx = keep[a:b]
        row, c = idx // m, idx % m
        comp = vecs[:, row, c]  # (n, k, m)
        k = int(idx.numel())
        cx = comp.new_zeros(n, k, rows, nd.row)
        cx[:, torch.arange(k, device=idx.device), row] = comp[..., : nd.row]
        cots = torch.cat([cx.reshape(n, k, rows * nd.row), comp[..., nd.row :]], 2)
        return cots, lam_flat[:, idx]

    return _Columns(int(keep.numel()), get)


def _bilinear_columns(nd: _Node, gbar: Tensor, tol_scale: float) -> _Columns:
    """Columns of ⟨ḡ, A B⟩ (A: (b, m, K), B: (b, K, n)) from the SVD ḡ = Σ_r s_r u_r v_rᵀ per batch
    matrix: ⟨ḡ, Ȧ Ḃ⟩ = Σ_r s_r Σ_j (u_rᵀ Ȧ)_j (Ḃ v_r)_j, and 2ab = ((a + b)² − (a − b)²)/2 gives the
    columns (u_r e_jᵀ, ±e_j v_rᵀ) with weights ±s_r/2."""
    n, bsz, rows, cols = gbar.shape
    inner = nd.row
    u, sv, vh = torch.linalg.svd(gbar, full_matrices=False)  # (n,b,m,q), (n,b,q), (n,b,q,n)
    q = sv.shape[-1]
    keep = _keep(sv.reshape(n, bsz * q), tol_scale)
    ut = u.transpose(-1, -2)  # (n, b, q, m)

    def get(a: int, b: int) -> tuple[Tensor, Tensor]:
        t = torch.arange(a, b, device=gbar.device)
        flat = keep[t // (2 * inner)]
        j, sign = (t // 2) % inner, 1 - 2 * (t % 2)
        bb, r = flat // q, flat % q
        k = b - a
        ar = torch.arange(k, device=gbar.device)
        ca = gbar.new_zeros(n, k, bsz, inner, rows)
        ca[:, ar, bb, j] = ut[:, bb, r]
        cb = gbar.new_zeros(n, k, bsz, inner, cols)
        cb[:, ar, bb, j] = sign.to(gbar.dtype)[:, None] * vh[:, bb, r]
        cots = torch.cat([ca.transpose(-1, -2).reshape(n, k, -1), cb.reshape(n, k, -1)], 2)
        return cots, sv[:, bb, r] * sign.to(gbar.dtype) / 2

    return _Columns(int(keep.numel()) * 2 * inner, get)


def _node_vector(nd: _Node, values: Sequence[Any]) -> Tensor:
    prim = [values[r.index] for r in nd.refs]
    if nd.kind == "rows" and rule(nd.node.func).family == "softmax":
        return prim[0].movedim(nd.dim, -1).reshape(-1)
    if nd.kind == "pointwise":
        return torch.stack([p.expand(nd.shape) for p in prim]).reshape(-1)
    return torch.cat([p.reshape(-1) for p in prim])


def _local_numel(nd: _Node, values: Sequence[Any]) -> int:
    """Entries per sample of the node's local quantities (for the memory budget)."""
    if nd.kind == "pointwise":
        return len(nd.refs) ** 2 * math.prod(nd.shape)
    if nd.kind == "rows":
        m = nd.row * len(nd.refs)
        return values[nd.refs[0].index].numel() // nd.row * m * m
    if nd.kind == "bilinear":
        g = values[nd.outputs[0]]
        return 3 * g.numel() + sum(values[r.index].numel() for r in nd.refs)
    return sum(nd.sizes) ** 2


_Chunk = Callable[[list[Tensor], int, "_Plan", list[_Columns]], list[Tensor]]


def _pull_reduce(
    plan: _Plan,
    leaves: Sequence[Tensor],
    sub: list[_Node],
    chunk: list[Tensor],
    cots: list[Tensor],
    extra: Tensor,
    reduce: Callable[[Tensor, Tensor], Tensor],
) -> list[Tensor]:
    """Per sample of ``chunk``: the rows of ``cots`` (one (n, k, D_j) tensor per node of ``sub``)
    pulled back by one vmapped VJP of θ ↦ (inputs of the nodes), each leaf's (k, *shape) gradients
    reduced by ``reduce(g, extra_n)``; returns the per-sample results (n, ...) per leaf."""
    tape = plan.tape

    def pass2(sample: list[Tensor], cts: list[Tensor], ex: Tensor) -> list[Tensor]:
        def phi(ls: list[Tensor]) -> list[Tensor]:
            vals = tape.replay(ls, sample, {})
            return [_node_vector(nd, vals) for nd in sub]

        pull = vjp(phi, list(leaves))[1]
        (g,) = vmap(pull)(cts)  # per leaf (k, *shape)
        return [reduce(gl, ex) for gl in g]

    out: list[Tensor] = vmap(pass2)(chunk, cots, extra)
    return out


def _sweep(
    loss_fn: Callable[[list[Tensor], list[Tensor]], Tensor],
    leaves: list[Tensor],
    data: Sequence[Tensor],
    *,
    scale: float | None,
    batch_loss: Tensor,
    chunk_size: int,
    max_columns: int | None,
    budget_bytes: int,
    rows: int,
    make_chunk: Callable[[_Plan], _Chunk],
) -> tuple[list[Tensor] | None, int, float]:
    """The shared machinery: tape, plan, per sample chunk pass 1 (adjoints, local Hessians) and
    the signed columns, handed to ``make_chunk(plan)(chunk, n, plan, columns)`` whose per-leaf
    results are summed over sample chunks. Returns (sums or None when the loss does not depend
    on θ, R, scale); ``rows`` cotangents per sample are pulled back at once (memory budget)."""
    n_total = int(data[0].shape[0])
    first = [d[0:1] for d in data]
    try:
        tape = record(lambda ls, xs: loss_fn(ls, xs), leaves, first)
    except TapeUnsupportedError as exc:
        raise GraphSweepUnsupportedError(str(exc.args[0])) from exc
    ref = tape.result
    if tape.output is None or not tape.depends[tape.output.index]:
        return None, 0, 1.0 if scale is None else scale
    if ref.dim() != 0:  # pragma: no cover - the losses are reductions
        raise GraphSweepUnsupportedError("a per-sample loss that is not a scalar")
    with torch.no_grad():
        values0 = tape.replay(leaves, first, {})
    plan = _classify(tape, values0)
    shapes0 = {i: values0[i].shape for i in plan.adjoint}
    p_count = sum(leaf.numel() for leaf in leaves)
    item = leaves[0].element_size()
    node_numel = sum(_node_vector(nd, values0).numel() for nd in plan.nodes) if plan.nodes else 1
    local_numel = sum(_local_numel(nd, values0) for nd in plan.nodes)
    per_sample = item * max(rows * (p_count + node_numel), 4 * local_numel + 1)
    step = max(1, min(n_total, budget_bytes // per_sample))
    tol_scale = 64 * torch.finfo(leaves[0].dtype).eps
    batched_data = [d.unsqueeze(1) for d in data]  # (N, 1, ...): one sample keeps a batch of one

    def pass1(sample: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        eps = {
            i: torch.zeros(shapes0[i], dtype=values0[i].dtype, device=values0[i].device) for i in plan.adjoint
        }

        def total(e: dict[int, Tensor]) -> tuple[Tensor, tuple[Tensor, list[Any]]]:
            vals = tape.replay(leaves, sample, e)
            out = vals[tape.output.index]  # type: ignore[union-attr]
            return out, (out, vals)

        adj, (out, vals) = grad(total, has_aux=True)(eps)
        return out, [_local(nd, vals, adj) for nd in plan.nodes]

    on_chunk = make_chunk(plan)
    acc: list[Tensor] | None = None
    r_max = 0
    loss_sum = batch_loss.new_zeros(())
    for s0 in range(0, n_total, step):
        chunk = [d[s0 : s0 + step] for d in batched_data]
        n = chunk[0].shape[0]
        try:
            losses, locals_ = vmap(pass1)(chunk)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            raise GraphSweepUnsupportedError(
                f"replaying the per-sample tape under vmap failed ({type(exc).__name__}: {exc})"
            ) from exc
        loss_sum = loss_sum + losses.sum()
        cols = [_columns(nd, loc, tol_scale) for nd, loc in zip(plan.nodes, locals_)]
        r = sum(c.count for c in cols)
        r_max = max(r_max, r)
        if max_columns is not None and r > max_columns:
            raise GraphSweepTooCostlyError(r)
        part = on_chunk(chunk, n, plan, cols)
        acc = part if acc is None else [a + p for a, p in zip(acc, part)]
    tol = math.sqrt(torch.finfo(batch_loss.dtype).eps) * 10

    def matches(c: float) -> bool:
        return torch.allclose(
            loss_sum * c, batch_loss.detach(), rtol=tol, atol=tol * (1 + float(batch_loss.abs()))
        )

    if scale is None:
        scale = next((c for c in (1.0 / n_total, 1.0) if matches(c)), None)
        if scale is None:
            raise GraphSweepUnsupportedError(
                f"a function that is neither the mean nor the sum of its per-sample values: "
                f"Σ_n f(sample_n) = {float(loss_sum):.6g} over N = {n_total} samples, but f(batch) = "
                f"{float(batch_loss):.6g} (samples interact, or a term is added once per batch)"
            )
    combined = loss_sum * scale
    if not matches(scale):
        raise GraphSweepUnsupportedError(
            f"a model whose samples interact: the per-sample losses combine to {float(combined):.6g} "
            f"but the batch loss is {float(batch_loss):.6g} (e.g. batch statistics)"
        )
    return acc, r_max, scale


def _spans(cols: list[_Columns]) -> list[tuple[int, int, int]]:
    """(node, start, stop) of each node's columns in the global column order (node by node)."""
    spans, pos = [], 0
    for j, c in enumerate(cols):
        spans.append((j, pos, pos + c.count))
        pos += c.count
    return spans


def graph_sweep_diagonal(
    loss_fn: Callable[[list[Tensor], list[Tensor]], Tensor],
    leaves: Sequence[Tensor],
    data: Sequence[Tensor],
    *,
    scale: float | None,
    batch_loss: Tensor,
    chunk_size: int,
    max_columns: int | None = None,
    budget_bytes: int = 64 << 20,
) -> tuple[list[Tensor], int]:
    """diag ∇²_θ (scale · Σ_n l_n) per leaf, and R (columns per sample; the maximum over chunks).

    Args:
        loss_fn: ``loss_fn(leaves, sample)`` → l_n, with ``sample`` the per-sample slices
            ``[d[n:n+1] for d in data]`` (the batch dimension kept, of size 1).
        leaves: the parameter leaves θ.
        data: per-sample tensors (inputs and targets), batch dimension first.
        scale: c in L = c Σ_n l_n; ``None``: the mean (1/N) or the sum (1), whichever matches
            ``batch_loss`` (refused if neither does).
        batch_loss: L computed on the whole batch (checks that the samples do not interact).
        chunk_size: columns per vmapped VJP.
        max_columns: raise :class:`GraphSweepTooCostlyError` when R exceeds it.
        budget_bytes: memory budget that sets how many samples are processed together.

    Returns:
        The diagonal as one tensor per leaf, and R.

    Raises:
        GraphSweepUnsupportedError: see the module docstring.

    Example:
        >>> import torch
        >>> w, x = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> loss = lambda ls, s: (torch.tanh(ls[0] * s[0]).sum(1) ** 2).sum()  # sum of l_n(w)
        >>> (d,), r = graph_sweep_diagonal(
        ...     loss, [w], [x], scale=0.25, batch_loss=loss([w], [x]) / 4, chunk_size=8
        ... )
        >>> ref = torch.autograd.functional.hessian(lambda v: loss([v], [x]) / 4, w).diagonal()
        >>> torch.allclose(d, ref), r
        (True, 3)
    """
    leaves = [leaf.detach() for leaf in leaves]

    def make_chunk(plan: _Plan) -> _Chunk:
        def on_chunk(chunk: list[Tensor], n: int, plan: _Plan, cols: list[_Columns]) -> list[Tensor]:
            diag = [torch.zeros_like(leaf) for leaf in leaves]
            spans = _spans(cols)
            r = spans[-1][2] if spans else 0
            for c0 in range(0, r, chunk_size):
                c1 = min(r, c0 + chunk_size)
                used: list[int] = []
                cots: list[Tensor] = []
                weights: list[Tensor] = []
                for j, a, b in spans:
                    lo, hi = max(a, c0), min(b, c1)
                    if lo >= hi:
                        continue
                    ct, w = cols[j].get(lo - a, hi - a)
                    used.append(j)
                    pad_l, pad_r = lo - c0, c1 - hi
                    full = ct.new_zeros(n, c1 - c0, ct.shape[2])
                    full[:, pad_l : c1 - c0 - pad_r] = ct
                    cots.append(full)
                    weights.append(w)
                w_all = torch.cat(weights, 1)  # (n, k), in column order (nodes in order)
                part = _pull_reduce(
                    plan, leaves, [plan.nodes[j] for j in used], chunk, cots, w_all,
                    lambda g, w: torch.einsum("k,k...->...", w, g * g),
                )  # fmt: skip
                diag = [d + p.sum(0) for d, p in zip(diag, part)]
            return diag

        return on_chunk

    acc, r_max, c = _sweep(
        loss_fn, leaves, data, scale=scale, batch_loss=batch_loss, chunk_size=chunk_size,
        max_columns=max_columns, budget_bytes=budget_bytes, rows=chunk_size, make_chunk=make_chunk,
    )  # fmt: skip
    if acc is None:
        return [torch.zeros_like(leaf) for leaf in leaves], 0
    return [d * c for d in acc], r_max


def graph_sweep_cp_diagonal(
    loss_fn: Callable[[list[Tensor], list[Tensor]], Tensor],
    leaves: Sequence[Tensor],
    data: Sequence[Tensor],
    *,
    num_probes: int,
    generator: torch.Generator | None,
    scale: float | None,
    batch_loss: Tensor,
    chunk_size: int,
    budget_bytes: int = 64 << 20,
) -> tuple[list[Tensor], list[Tensor], Tensor, int]:
    """Curvature propagation on the op-level tape: an unbiased estimate of diag ∇²_θ L.

    Per sample n and probe k, independent Rademacher signs v_c ∈ {±1} mix the signed columns
    (s_c, w_c) of every contributing node into two cotangents

        P = Σ_{w_c > 0} v_c √w_c s_c,    Q = Σ_{w_c < 0} v_c √(−w_c) s_c,

    and (J_nᵀ P)² − (J_nᵀ Q)² estimates diag H_n without bias, since E[(Jᵀ P)²] = Σ_{w_c>0}
    w_c (Jᵀ s_c)² (Martens, Sutskever and Swersky 2012). The estimate is c Σ_n of these, averaged
    over the K probes. Cost: pass 1 as for the exact sweep, then 2K vector-Jacobian products per
    sample (instead of R), ``chunk_size`` of them per vmapped VJP; P and Q are built from
    ``chunk_size`` columns at a time (never all R dense columns).

    Randomness: the signs of one chunk of samples are drawn at once from ``generator`` as an
    (n, K, R) tensor, so results do not depend on ``chunk_size``; they may depend on the
    sample chunking (set by ``budget_bytes``) through R, the columns kept per sample chunk.

    Args:
        loss_fn, leaves, data, scale, batch_loss, budget_bytes: as in :func:`graph_sweep_diagonal`.
        num_probes: K ≥ 1.
        generator: source of the signs (``None``: the global RNG); same state ⇒ same result.
        chunk_size: cotangents per vmapped VJP (at least 2: one probe's P and Q) and columns per
            mixing step.

    Returns:
        The estimate per leaf, its per-entry standard errors (std over the K probes / √K, NaN
        for K = 1), the standard error of the trace estimate (the same over the per-probe
        traces), and R.

    Raises:
        GraphSweepUnsupportedError: see the module docstring.

    Example:
        >>> import torch
        >>> w, x = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> loss = lambda ls, s: torch.tanh(ls[0] * s[0]).sum()  # one column per element: exact
        >>> (d,), (e,), t, r = graph_sweep_cp_diagonal(
        ...     loss, [w], [x], num_probes=3, generator=torch.Generator().manual_seed(0),
        ...     scale=1.0, batch_loss=loss([w], [x]), chunk_size=8,
        ... )
        >>> ref = torch.autograd.functional.hessian(lambda v: loss([v], [x]), w).diagonal()
        >>> torch.allclose(d, ref), bool(e.abs().max() < 1e-12), r
        (True, True, 2)

    References:
        J. Martens, I. Sutskever, K. Swersky. Estimating the Hessian by back-propagating
        curvature. ICML 2012.
    """
    leaves = [leaf.detach() for leaf in leaves]
    k_all = num_probes
    per_vjp = max(1, chunk_size // 2)  # probes per vmapped VJP (2 cotangents each)
    like = leaves[0]

    def make_chunk(plan: _Plan) -> _Chunk:
        def on_chunk(chunk: list[Tensor], n: int, plan: _Plan, cols: list[_Columns]) -> list[Tensor]:
            spans = [s for s in _spans(cols) if s[2] > s[1]]
            r = spans[-1][2] if spans else 0
            bits = torch.randint(0, 2, (n, k_all, r), generator=generator, device=like.device)
            signs = (2 * bits - 1).to(like.dtype)
            out = [leaf.new_zeros(k_all, *leaf.shape) for leaf in leaves]
            if not spans:
                return out
            sub = [plan.nodes[j] for j, _, _ in spans]
            for k0 in range(0, k_all, per_vjp):
                k1 = min(k_all, k0 + per_vjp)
                kk = k1 - k0
                cots = []
                for j, a, b in spans:
                    p: Tensor | None = None
                    q: Tensor | None = None
                    for c0 in range(0, b - a, chunk_size):
                        c1 = min(b - a, c0 + chunk_size)
                        ct, w = cols[j].get(c0, c1)  # (n, k, D), (n, k)
                        v = signs[:, k0:k1, a + c0 : a + c1].to(ct.dtype)  # (n, kk, k)
                        dp = torch.einsum("nqk,nk,nkd->nqd", v, w.clamp(min=0).sqrt(), ct)
                        dq = torch.einsum("nqk,nk,nkd->nqd", v, (-w).clamp(min=0).sqrt(), ct)
                        p, q = (dp, dq) if p is None or q is None else (p + dp, q + dq)
                    assert p is not None and q is not None
                    cots.append(torch.cat([p, q], 1))  # (n, 2 kk, D)

                def difference(g: Tensor, _unused: Tensor, kk: int = kk) -> Tensor:
                    return g[:kk] * g[:kk] - g[kk:] * g[kk:]  # (J^T P)^2 - (J^T Q)^2 per probe

                part = _pull_reduce(plan, leaves, sub, chunk, cots, signs.new_zeros(n), difference)
                for o, p_ in zip(out, part):
                    o[k0:k1] += p_.sum(0)
            return out

        return on_chunk

    acc, r_max, c = _sweep(
        loss_fn, leaves, data, scale=scale, batch_loss=batch_loss, chunk_size=chunk_size,
        max_columns=None, budget_bytes=budget_bytes, rows=max(2, chunk_size), make_chunk=make_chunk,
    )  # fmt: skip
    if acc is None:
        acc = [leaf.new_zeros(k_all, *leaf.shape) for leaf in leaves]
    per_probe = [a * c for a in acc]  # (K, *shape) per leaf
    mean = [a.mean(0) for a in per_probe]
    traces = sum((a.reshape(k_all, -1).sum(1) for a in per_probe), start=like.new_zeros(k_all))
    if k_all > 1:
        err = [a.std(0, correction=1) / math.sqrt(k_all) for a in per_probe]
        trace_err = traces.std(correction=1) / math.sqrt(k_all)
    else:
        err = [torch.full_like(m, math.nan) for m in mean]
        trace_err = like.new_tensor(math.nan)
    return mean, err, trace_err, r_max

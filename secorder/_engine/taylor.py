"""Quadratic forms vᵀHv by one reverse pass and a forward (Taylor) pass per batch of probes.

For a scalar function built from operations y_k = f_k(u_k) (a recorded :class:`~secorder._engine.tape.Tape`),
the second derivative along a direction v is

    vᵀHv = d²/dt² g(θ + t v) |_{t=0} = Σ_k ⟨ḡ_k, d²f_k(u_k)[u̇_k, u̇_k]⟩,

with ḡ_k = ∂g/∂y_k the adjoint of op k's output (one reverse pass, shared by every probe)
and u̇_k the forward-mode tangent of op k's inputs along v. Per op:

* ops linear in their inputs (views, sums, concatenation, ...): the tangent is the op
  applied to the tangents; no second-order term;
* pointwise ops: the first and second partial derivatives are computed once at the point
  (nested ``jvp`` with all-ones tangents: each output element depends on one element of each
  input); per probe the tangent is Σ_i ∂_i f ⊙ u̇_i and the term
  Σ_{i,j} ⟨ḡ ⊙ ∂_i∂_j f, u̇_i u̇_j⟩ (zero for ReLU and other piecewise-linear maps);
* convolutions and matrix products (multilinear): tangent Σ_i f(.., u̇_i, ..) and term
  2⟨ḡ, f(.., u̇_a, .., u̇_b, ..)⟩ per pair of parameter-dependent factors; for a convolution
  the term is evaluated as ⟨convᵀ(ḡ, ẇ), u̇⟩ so that every kernel call stays a dense
  convolution with the probes folded into its batch or channel dimension (a convolution of
  two probe-batched tensors would be a slow grouped convolution on CPU);
* any other op: ``vmap`` over the probes of a nested ``jvp`` of the op.

Cost per probe: about one forward pass in tangent mode plus one extra product per
multilinear op whose operands both depend on the parameters, against the forward tangent
*and* a double backward pass of a Hessian-vector product. Only quadratic forms come out
(Hutchinson's trace estimator needs nothing else); Hv itself still needs another strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from secorder._engine.rules import rule
from secorder._engine.tape import Ref, Tape, TapeNode, paths, record, replace_at, resolve
from secorder._pytree import accumulation_dtype

__all__ = ["TaylorQuadform"]

aten = torch.ops.aten


def _zero_floats(obj: Any) -> Any:
    """A nested args structure with every floating tensor replaced by zeros (others kept)."""
    if isinstance(obj, Tensor):
        return torch.zeros_like(obj) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_zero_floats(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _zero_floats(v) for k, v in obj.items()}
    return obj


def _floating(x: object) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _align(t: Tensor, ndim: int) -> Tensor:
    """A probe-batched tangent ``(k, *s)`` viewed to broadcast against ``(k, *S)``, len(S) = ndim."""
    extra = ndim - (t.dim() - 1)
    return t if extra <= 0 else t.reshape(t.shape[0], *([1] * extra), *t.shape[1:])


def _contract(w: Tensor, t: Tensor) -> Tensor:
    """Σ over everything but the probe dimension of ``w ⊙ t`` (w unbatched or batched)."""
    k = t.shape[0]
    acc = accumulation_dtype(t.dtype)
    if acc != t.dtype:  # float16/bfloat16: the products in their dtype, the sum in float32
        return (w * t).reshape(k, -1).sum(1, dtype=acc)
    if w.shape == t.shape[1:]:  # one matrix-vector product, no temporary
        return t.reshape(k, -1) @ w.reshape(-1)
    return (w * t).reshape(k, -1).sum(1)


class _Plan:
    """What one tape node does in the forward pass over probes."""

    __slots__ = ("extra", "kind", "node", "positions")

    def __init__(
        self, kind: str, node: TapeNode, positions: list[tuple[Any, ...]], extra: Any = None
    ) -> None:
        self.kind = kind
        self.node = node
        self.positions = positions  # paths into args of the parameter-dependent floating tensors
        self.extra = extra


class TaylorQuadform:
    """vᵀHv for batches of probes v, for ``fn(leaves) -> scalar`` at ``leaves``.

    Raises :class:`secorder._engine.tape.TapeUnsupportedError` at construction when the function
    cannot be recorded faithfully (random ops, aliased in-place updates, no tensor result).
    """

    def __init__(
        self,
        fn: Callable[[list[Tensor]], Tensor],
        leaves: Sequence[Tensor],
        *,
        budget_bytes: int | None = None,
    ) -> None:
        self.tape: Tape = record(fn, leaves)
        self.shapes = [leaf.shape for leaf in leaves]
        self.budget_bytes = budget_bytes
        self._prepare([leaf.detach() for leaf in leaves])

    # -- one reverse pass -------------------------------------------------------
    def _prepare(self, leaves: list[Tensor]) -> None:
        tape = self.tape
        self.zero = tape.output is None or not tape.depends[tape.output.index]
        if self.zero:
            return
        inputs = [leaf.requires_grad_(True) for leaf in leaves]
        with torch.enable_grad():
            values = tape.replay(inputs)
        assert tape.output is not None
        out = values[tape.output.index]
        assert out is not None
        self.differentiable = [
            i < tape.num_leaves or (tape.depends[i] and _floating(v) and v.requires_grad)
            for i, v in enumerate(values)
        ]
        plans: list[_Plan | None] = []
        need: dict[int, None] = {}
        for node in tape.nodes:
            plan = self._plan(node, values)
            plans.append(plan)
            if plan is not None and plan.kind != "linear":
                for o in node.outputs:
                    if o is not None and self.differentiable[o]:
                        need[o] = None
        wrt = [values[i] for i in need]
        with torch.enable_grad():
            adj = torch.autograd.grad(out, wrt, allow_unused=True) if wrt else ()
        self.adjoints: dict[int | None, Tensor] = {i: a.detach() for i, a in zip(need, adj) if a is not None}
        self.values: list[Any] = [v.detach() if isinstance(v, Tensor) else v for v in values]
        for plan in plans:
            if plan is not None and plan.kind == "pointwise":
                self._pointwise_partials(plan)
        self.plans = [p for p in plans if p is not None]
        self.max_numel = max(
            [int(v.numel()) for i, v in enumerate(self.values) if self.differentiable[i] and v is not None]
            or [1]
        )

    def _plan(self, node: TapeNode, values: list[Any]) -> _Plan | None:
        if not any(o is not None and self.differentiable[o] for o in node.outputs):
            return None
        found = [(p, r) for p, r in paths((node.args, node.kwargs)) if self.differentiable[r.index]]
        if not found:
            return None
        positions = [p for p, _ in found]
        func = node.func
        r = rule(func)
        if (r.linear and not node.multi) or (r.linear_first and positions == [(0, 0)]):
            return _Plan("linear", node, positions)
        if r.family == "softmax" and (len(node.args) < 3 or not node.args[2]):  # half_to_float=False
            return _Plan("softmax", node, positions)
        if r.family == "conv":
            transposed, groups = node.args[6], node.args[8]
            if not transposed and groups == 1 and all(p[0] == 0 and p[1] in (0, 1, 2) for p in positions):
                return _Plan("conv", node, positions)
        if r.family in ("matmul", "addmm") and all(p[0] == 0 for p in positions) and not node.kwargs:
            return _Plan("matmul", node, positions)
        if torch.Tag.pointwise in func.tags and not node.multi:
            return _Plan("pointwise", node, positions)
        return _Plan("generic", node, positions)

    def _primal_fn(self, plan: _Plan, zero_constants: bool = False) -> Callable[..., Any]:
        """The op as a function of its parameter-dependent floating arguments; with
        ``zero_constants`` every other floating tensor argument is replaced by zeros (the
        tangent of a jointly linear op such as ``cat`` gets nothing from its constant pieces)."""
        node = plan.node
        base = resolve((node.args, node.kwargs), self.values)
        if zero_constants:
            base = _zero_floats(base)
        floats = [i for i, o in enumerate(node.outputs) if o is not None and self.differentiable[o]]

        def f(*xs: Tensor) -> Any:
            args_kwargs = base
            for p, x in zip(plan.positions, xs):
                args_kwargs = replace_at(args_kwargs, p, x)
            out = node.func(*args_kwargs[0], **args_kwargs[1])
            outs = list(out) if node.multi else [out]
            return tuple(outs[i] for i in floats)

        return f

    def _arg(self, plan: _Plan, j: int) -> Tensor:
        p = plan.positions[j]
        obj: Any = (plan.node.args, plan.node.kwargs)
        for i in p:
            obj = obj[i]
        return self.values[obj.index]

    def _pointwise_partials(self, plan: _Plan) -> None:
        """∂_i f and ḡ ⊙ ∂_i∂_j f at the point, by double backward on inputs expanded to the
        output's shape (then every element of the output depends on one element of each input)."""
        f = self._primal_fn(plan)
        out_idx = plan.node.outputs[0]
        shape = self._out(plan.node).shape
        gbar = self.adjoints.get(out_idx) if out_idx is not None else None
        m = len(plan.positions)
        with torch.enable_grad():
            xs = [self._arg(plan, j).expand(shape).detach().requires_grad_(True) for j in range(m)]
            (y,) = f(*xs)
            firsts = torch.autograd.grad(y.sum(), xs, create_graph=gbar is not None, allow_unused=True)
            firsts = tuple(torch.zeros_like(y) if d is None else d for d in firsts)
            weights: list[tuple[int, int, Tensor]] = []
            if gbar is not None:
                for i in range(m):
                    if not firsts[i].requires_grad:
                        continue
                    seconds = torch.autograd.grad(
                        firsts[i].sum(), xs[i:], retain_graph=True, allow_unused=True
                    )
                    for j, second in enumerate(seconds, start=i):
                        if second is not None and bool((second != 0).any()):
                            w = gbar * second.detach()
                            weights.append((i, j, w if i == j else 2 * w))
        plan.extra = ([d.detach() for d in firsts], weights)

    # -- forward pass over a batch of probes -------------------------------------
    def __call__(self, rows: Sequence[Tensor]) -> Tensor:
        """The ``k`` values vᵀHv for probes given per leaf as ``(k, *leaf.shape)`` tensors."""
        k = rows[0].shape[0]
        if self.zero or k == 0:
            return rows[0].new_zeros(k)
        item = rows[0].element_size()
        step = self._probes_per_pass(item, rows[0].device)
        parts = [self._chunk([r[s : s + step] for r in rows]) for s in range(0, k, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _probes_per_pass(self, item: int, device: torch.device) -> int:
        """Probes per forward tangent pass: every tangent of one pass holds at most
        ``budget_bytes`` per intermediate (its largest one decides). Default on CPU, measured on
        the MLP and CNN of ``benchmarks/bench_hessian.py``: one probe per pass when one probe's
        largest tangent reaches 1 MiB (the CNN: 0.9 s for 100 probes against 1.9 s two at a
        time), else 16 MiB per tangent; other devices 256 MiB (larger kernels pay off there)."""
        per_probe = max(1, self.max_numel * item)
        if self.budget_bytes is not None:
            return max(1, self.budget_bytes // per_probe)
        if device.type == "cpu":
            return 1 if per_probe >= 1 << 20 else max(1, (16 << 20) // per_probe)
        return max(1, (256 << 20) // per_probe)

    def _chunk(self, rows: list[Tensor]) -> Tensor:
        k = rows[0].shape[0]
        tan: dict[int, Tensor] = dict(enumerate(rows))
        total = rows[0].new_zeros(k, dtype=accumulation_dtype(rows[0].dtype))  # float32 for half
        for plan in self.plans:
            ts = [tan.get(self._ref(plan, j).index) for j in range(len(plan.positions))]
            if all(t is None for t in ts):
                continue
            outs, term = getattr(self, "_" + plan.kind)(plan, ts, k)
            if term is not None:
                total = total + term
            for idx, t in zip(
                (o for o in plan.node.outputs if o is not None and self.differentiable[o]), outs
            ):
                if t is not None:
                    tan[idx] = t
        return total

    def _out(self, node: TapeNode) -> Tensor:
        """The (single) output value of a node."""
        idx = node.outputs[0]
        assert idx is not None
        return self.values[idx]

    def _ref(self, plan: _Plan, j: int) -> Ref:
        obj: Any = (plan.node.args, plan.node.kwargs)
        for i in plan.positions[j]:
            obj = obj[i]
        return obj

    def _linear(self, plan: _Plan, ts: list[Tensor | None], k: int) -> tuple[list[Tensor | None], None]:
        view = rule(plan.node.func).view_twin
        if view is not None:  # a probe-batched tangent may not be viewable: reshape copies if needed
            (t,) = [t for t in ts if t is not None]
            return [view(t, [k, *plan.node.args[1]])], None
        # jointly linear ops: constant floating pieces (cat with a constant) contribute no tangent
        f = self._primal_fn(plan, zero_constants=rule(plan.node.func).linear)
        zeros = [torch.zeros_like(self._arg(plan, j)) if t is None else None for j, t in enumerate(ts)]

        def g(*xs: Tensor) -> Any:
            it = iter(xs)
            return f(*(z if z is not None else next(it) for z in zeros))

        outs = vmap(g)(*[t for t in ts if t is not None])
        return list(outs), None

    def _second_order(self, plan: _Plan) -> Callable[..., Any] | None:
        """The linearized map u̇ ↦ ∇²_u⟨ḡ, f(u)⟩ u̇ of one op (reverse over reverse, cached)."""
        if plan.extra is None:
            f = self._primal_fn(plan)
            outs = [o for o in plan.node.outputs if o is not None and self.differentiable[o]]
            gbars = [self.adjoints.get(o) for o in outs]
            if all(g is None for g in gbars):
                plan.extra = False
                return None
            prim = tuple(self._arg(plan, j) for j in range(len(plan.positions)))

            def phi(*xs: Tensor) -> Tensor:
                ys = f(*xs)
                return sum(
                    ((g * y).sum() for g, y in zip(gbars, ys) if g is not None), start=prim[0].new_zeros(())
                )

            plan.extra = vjp(grad(phi, argnums=tuple(range(len(prim)))), *prim)[1]
        return plan.extra or None

    def _generic(
        self, plan: _Plan, ts: list[Tensor | None], k: int
    ) -> tuple[list[Tensor | None], Tensor | None]:
        f = self._primal_fn(plan)
        prim = tuple(self._arg(plan, j) for j in range(len(plan.positions)))
        full = [torch.zeros_like(x).expand(k, *x.shape) if t is None else t for x, t in zip(prim, ts)]
        first = vmap(lambda *vs: jvp(f, prim, vs)[1])(*full)
        hess = self._second_order(plan)
        term = None
        if hess is not None:
            hv = vmap(hess)(tuple(full))
            for t, h in zip(ts, hv):
                if t is not None:
                    c = _contract(h, t)
                    term = c if term is None else term + c
        return list(first), term

    def _softmax(
        self, plan: _Plan, ts: list[Tensor | None], k: int
    ) -> tuple[list[Tensor | None], Tensor | None]:
        """(log-)softmax along ``dim``: with s = softmax(u), m1 = Σ s u̇ and m2 = Σ s u̇²,
        d log s = u̇ − m1, d² log s = −(m2 − m1²); ds = s (u̇ − m1), d²s = s ((u̇ − m1)² − (m2 − m1²))."""
        node = plan.node
        (t,) = ts
        assert t is not None
        out = self._out(node)
        dim = node.args[1] % out.dim() + 1
        log = node.func is aten._log_softmax.default
        s = out.exp() if log else out
        m1 = (s * t).sum(dim, keepdim=True)
        centred = t - m1
        g = self.adjoints.get(node.outputs[0])
        term = None
        if g is not None:
            var = (s * t * t).sum(dim, keepdim=True) - m1 * m1
            if log:
                term = -_contract(g.sum(dim - 1, keepdim=True), var)
            else:
                gs = g * s
                term = _contract(gs, centred * centred) - _contract(gs.sum(dim - 1, keepdim=True), var)
        return [centred if log else s * centred], term

    def _pointwise(
        self, plan: _Plan, ts: list[Tensor | None], k: int
    ) -> tuple[list[Tensor | None], Tensor | None]:
        firsts, weights = plan.extra
        out_val = self._out(plan.node)
        nd = out_val.dim()
        aligned = [None if t is None else _align(t, nd) for t in ts]
        tangent: Tensor | None = None
        for a, p in zip(aligned, firsts):
            if a is not None:
                tangent = p * a if tangent is None else tangent.addcmul_(p, a)
        if tangent is not None and tangent.shape[1:] != out_val.shape:
            tangent = tangent.expand(k, *out_val.shape)
        term: Tensor | None = None
        for i, j, w in weights:
            ai, aj = aligned[i], aligned[j]
            if ai is None or aj is None:
                continue
            prod = ai * ai if i == j else ai * aj
            c = _contract(w, prod)
            term = c if term is None else term + c
        return [tangent], term

    def _matmul(
        self, plan: _Plan, ts: list[Tensor | None], k: int
    ) -> tuple[list[Tensor | None], Tensor | None]:
        node = plan.node
        args = resolve(node.args, self.values)
        addmm = rule(node.func).family == "addmm"
        beta = args[3] if addmm and len(args) > 3 else 1
        alpha = args[4] if addmm and len(args) > 4 else 1
        off = 1 if addmm else 0
        tmap = {plan.positions[j][1]: t for j, t in enumerate(ts) if t is not None}
        a, b = args[off], args[off + 1]
        da, db = tmap.get(off), tmap.get(off + 1)
        tangent: Tensor | None = None
        if da is not None:
            tangent = torch.matmul(da, b)
        if db is not None:
            c = torch.matmul(a, db)
            tangent = c if tangent is None else tangent + c
        if tangent is not None and alpha != 1:
            tangent = alpha * tangent
        out_val = self._out(node)
        if addmm and 0 in tmap:
            c = _align(tmap[0], out_val.dim())
            c = c if beta == 1 else beta * c
            tangent = c.expand(k, *out_val.shape) if tangent is None else tangent + c
        term = None
        g = self.adjoints.get(node.outputs[0])
        if da is not None and db is not None and g is not None:
            term = 2 * alpha * _contract(g, torch.matmul(da, db))
        return [tangent], term

    def _conv(
        self, plan: _Plan, ts: list[Tensor | None], k: int
    ) -> tuple[list[Tensor | None], Tensor | None]:
        node = plan.node
        x, w, _bias, stride, padding, dilation, _tr, out_pad, _groups = resolve(node.args, self.values)
        tmap = {plan.positions[j][1]: t for j, t in enumerate(ts) if t is not None}
        dx, dw, db = tmap.get(0), tmap.get(1), tmap.get(2)
        out_val = self._out(node)
        n, o = out_val.shape[0], out_val.shape[1]
        spatial = out_val.shape[2:]
        tangent: Tensor | None = None
        if dx is not None:
            y = aten.convolution(
                dx.reshape(k * n, *x.shape[1:]), w, None, stride, padding, dilation, False, out_pad, 1
            )
            tangent = y.view(k, n, o, *spatial)
        if dw is not None:
            y = aten.convolution(
                x, dw.reshape(k * o, *w.shape[1:]), None, stride, padding, dilation, False, out_pad, 1
            )
            y = y.view(n, k, o, *spatial).transpose(0, 1)
            tangent = y.contiguous() if tangent is None else tangent.add_(y)  # fresh: in place
        if db is not None:
            c = db.reshape(k, 1, o, *([1] * len(spatial)))
            tangent = c.expand(k, n, o, *spatial) if tangent is None else tangent.add_(c)
        term = None
        g = self.adjoints.get(node.outputs[0])
        if dx is not None and dw is not None and g is not None:
            # ⟨ḡ, conv(u̇, ẇ)⟩ = ⟨convᵀ(ḡ, ẇ), u̇⟩, probes folded into the output channels
            c_in = x.shape[1]
            wt = dw.transpose(0, 1).reshape(o, k * c_in, *w.shape[2:])
            pads = [
                x.shape[2 + i]
                - ((spatial[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (w.shape[2 + i] - 1) + 1)
                for i in range(len(spatial))
            ]
            ct = aten.convolution(g, wt, None, stride, padding, dilation, True, pads, 1)
            ct = ct.view(n, k, c_in, *x.shape[2:]).transpose(0, 1)
            term = 2 * _contract(ct, dx)
        return [tangent], term

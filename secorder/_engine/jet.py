"""Collapsed second-order Taylor arithmetic: jets and the per-op rules that push them through.

A :class:`Jet` carries, for one tape value y(x) of shape ``S`` at the point, along K first-order
directions ``v_k`` grouped into G groups of m = K / G:

* ``v0``: the value y (shape ``S``);
* ``v1``: the K directional derivatives ``∂_{v_k} y`` (shape ``(K, *S)``, or a shape that
  broadcasts to it: unit directions are the same at every point, so until the first
  nonlinearity the derivatives have size 1 along the batch axis and cost nothing per point);
* ``v2``: the *collapsed* second-order channel, per group g the sum
  Σ_{k ∈ g} ∂²_{v_k} y (shape ``(G, *S)``); ``None`` stands for zeros.

G = 1 is collapsed Taylor mode (Dangel, Siebert, Zeinhofer, Walther 2025): with the standard
basis as directions ``v2`` is the Laplacian. G = K keeps one second-order channel per direction
(per-probe values, for standard errors). Every rule follows from the chain rule
y2 = f'(u)[u2] + Σ_k f''(u)[u1_k, u1_k], summed per group (:func:`pair`); the rules are built
from differentiable torch ops, so a result can be differentiated in the parameters.

The rules are registered in :mod:`secorder._engine.rules` (field ``collapsed``); an op with no
rule goes through :func:`fallback` (nested forward-mode AD on that op alone), or for an
elementwise op :func:`pointwise_generic` (its partials by nested forward-mode AD), and is
counted in :attr:`Ctx.fallbacks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

__all__ = ["Ctx", "Jet", "Lazy", "fallback", "has_jet", "linear", "no_curvature", "pair", "primal"]

aten = torch.ops.aten


@dataclass
class Ctx:
    """The direction layout shared by every jet of one evaluation."""

    K: int  # first-order directions
    G: int  # second-order groups (G divides K)
    fallbacks: dict[str, int] = field(default_factory=dict)  # op name → times nested AD was used
    skip_v1: bool = False  # the current op's first-order output is never used: rules may skip it
    # The current op's output has one consumer (collapsed.plan): rules may return its
    # first-order part as a :class:`Lazy` (computed a block of directions at a time, there).
    lazy_out: bool = False
    block: int = 8  # directions per block when a Lazy tangent is streamed (pair_lazy)
    # Values that do not depend on the directions (ops without jets, products' values), kept
    # across the passes over chunks of directions of one call, keyed (node index, tag): the
    # Ctx of those passes share the dict. None: one pass, nothing kept (a kept value would
    # outlive its last use).
    memo: dict[tuple[int, str], Any] | None = None
    # Values of this call already computed elsewhere (the recording's, when no derivative of
    # them can be asked for: secorder.pde._reusable_values), keyed as in ``memo``: taken by
    # :meth:`once` instead of computing them (each taken out once: a one-pass evaluation
    # drops it after its last use, a multi-pass one keeps it in ``memo``).
    seeded: dict[tuple[int, str], Any] | None = None
    node: int = -1  # the tape node being evaluated
    # The input tangent when the directions are unit vectors: rows s..s + K of the identity,
    # ``(K, 1, D)`` for points ``(N, D)`` (``unit_start`` = s). A matmul of a value whose tangent
    # is this very tensor picks rows of its right factor instead of multiplying (matmul_rule).
    unit: Tensor | None = None
    unit_start: int = 0

    def once(self, tag: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` for the current node, computed in the first pass only (or taken from
        :attr:`seeded`)."""
        if self.seeded is not None:
            got = self.seeded.pop((self.node, tag), None)  # not held past its last use
            if got is not None:
                if self.memo is not None:  # later passes over other directions take it there
                    self.memo[(self.node, tag)] = got
                return got
        if self.memo is None:
            return compute()
        key = (self.node, tag)
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    @property
    def m(self) -> int:
        return self.K // self.G


class Lazy:
    """K first-order directional derivatives not yet computed: ``block(s, e)`` computes those of
    directions s..e (``(e − s, *S)`` or broadcasting to it), a fresh tensor at every call that
    the caller may overwrite (:func:`pair_lazy` squares it in place when nothing records it).

    A rule returns one when its output has a single consumer (``Ctx.lazy_out``), so a chain such
    as tanh → linear → tanh never holds the ``(K, N, width)`` tangent of the hidden layer: the
    last op, which needs only the collapsed sum Σ_k u1_k², streams the blocks through
    (:func:`pair_lazy`); the same flops, a block of directions in memory. Any other use
    materializes it once (:attr:`Jet.d1`)."""

    __slots__ = ("K", "cheap", "fn")

    def __init__(self, K: int, fn: Callable[[int, int], Tensor], cheap: bool = False) -> None:
        self.K = K
        self.fn = fn
        # a block costs little next to a consumer's matmul (a product of a materialized tangent
        # with at most a quarter of the output's width as the contracted dimension, e.g. the
        # first layer from D-dimensional random probes): an elementwise consumer may compute
        # its blocks twice rather than hold them all
        self.cheap = cheap

    def block(self, s: int, e: int) -> Tensor:
        return self.fn(s, e)


def block(v1: Tensor | Lazy, s: int, e: int) -> Tensor:
    """Directions s..e of a first-order part (a tensor with a leading K, or of size 1 there)."""
    if isinstance(v1, Lazy):
        return v1.block(s, e)
    return v1.expand(e - s, *v1.shape[1:]) if v1.shape[0] == 1 else v1[s:e]


@dataclass
class Jet:
    """A value with K directional derivatives and G collapsed second-order sums."""

    v0: Tensor
    v1: Tensor | Lazy | None  # (K, *v0.shape), or any shape that broadcasts to it; None: never used
    v2: Tensor | None  # (G, *v0.shape) or broadcasting to it; None: zeros

    def full(self, ctx: Ctx) -> Jet:
        """The jet with ``v1`` and ``v2`` expanded to their full shapes (views, no copies)."""
        v2 = None if self.v2 is None else _full(_align(self.v2, self.v0.dim()), ctx.G, self.v0.shape)
        v1 = None if self.v1 is None else _full(_align(self.d1, self.v0.dim()), ctx.K, self.v0.shape)
        return Jet(self.v0, v1, v2)

    @property
    def d1(self) -> Tensor:
        """``v1``, for rules that need it (the analysis of :mod:`~secorder._engine.collapsed`
        keeps it for every input of an op that is not affine); a :class:`Lazy` one is computed
        here, once."""
        assert self.v1 is not None
        if isinstance(self.v1, Lazy):
            self.v1 = self.v1.block(0, self.v1.K)
        return self.v1


def primal(obj: Any) -> Any:
    """A nested args structure with every :class:`Jet` replaced by its value."""
    if isinstance(obj, Jet):
        return obj.v0
    if isinstance(obj, (list, tuple)):
        return type(obj)(primal(o) for o in obj)
    if isinstance(obj, dict):
        return {k: primal(v) for k, v in obj.items()}
    return obj


def has_jet(obj: Any) -> bool:
    if isinstance(obj, Jet):
        return True
    if isinstance(obj, (list, tuple)):
        return any(has_jet(o) for o in obj)
    if isinstance(obj, dict):
        return any(has_jet(v) for v in obj.values())
    return False


def _jet_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Jet]]:
    if isinstance(obj, Jet):
        return [(prefix, obj)]
    if isinstance(obj, (list, tuple)):
        return [p for i, o in enumerate(obj) for p in _jet_paths(o, (*prefix, i))]
    if isinstance(obj, dict):
        return [p for k, o in obj.items() for p in _jet_paths(o, (*prefix, k))]
    return []


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    if isinstance(obj, dict):
        return {**obj, path[0]: _replace(obj[path[0]], path[1:], value)}
    items = list(obj)
    items[path[0]] = _replace(items[path[0]], path[1:], value)
    return type(obj)(items)


def _zero_floats(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return torch.zeros_like(obj) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_zero_floats(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _zero_floats(v) for k, v in obj.items()}
    return obj


def _align(t: Tensor, ndim: int) -> Tensor:
    """A direction-batched ``(L, *s)`` tensor viewed to broadcast against ``(L, *S)``, len(S) = ndim."""
    extra = ndim - (t.dim() - 1)
    return t if extra <= 0 else t.reshape(t.shape[0], *([1] * extra), *t.shape[1:])


def _full(t: Tensor, lead: int, shape: torch.Size) -> Tensor:
    return t if t.shape == (lead, *shape) else t.expand(lead, *shape)


_PAIR_BLOCK = 8  # directions per block of the collapsed sum: the temporary is K / 8 of a tangent
_PAIR_SMALL = 1 << 16  # elements of a (K, *S) product small enough to form at once (e.g. tangents
# broadcast along the points: blocks would only add op calls)


def pair(ctx: Ctx, a: Tensor, b: Tensor) -> Tensor:
    """Σ_{k ∈ g} a_k ⊙ b_k per group: ``(K, *S)`` × ``(K, *S)`` → ``(G, *S)``."""
    k = max(a.shape[0], b.shape[0])
    sa, sb = a.shape[1:], b.shape[1:]
    shape = [max(i, j) for i, j in zip(sa, sb)] if len(sa) == len(sb) else torch.broadcast_shapes(sa, sb)
    big = k * math.prod(shape) > _PAIR_SMALL
    if ctx.G == 1 and k > 2 * _PAIR_BLOCK and big:  # no (K, *S) temporary
        total: Tensor | None = None
        for s in range(0, k, _PAIR_BLOCK):
            part = (a[s : s + _PAIR_BLOCK] * b[s : s + _PAIR_BLOCK]).sum(0, keepdim=True)
            total = part if total is None else total + part
        assert total is not None
        return total
    p = a * b
    if ctx.G == 1:
        return p.sum(0, keepdim=True)
    if ctx.G == ctx.K:
        return p
    return p.reshape(ctx.G, ctx.m, *p.shape[1:]).sum(1)


def _overwritable(t: Tensor) -> bool:
    """A fresh block (:meth:`Lazy.block`) may be overwritten: nothing records or differentiates
    it (no autograd history, no ``torch.func`` wrapper, no dispatch mode such as the tape
    recorder, which would refuse an in-place op on a value another recorded value aliases)."""
    return (
        not t.requires_grad
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
        and torch._C._len_torch_dispatch_stack() == 0
    )


def pair_lazy(ctx: Ctx, a: Lazy, nd: int) -> Tensor:
    """Σ_{k ∈ g} a_k ⊙ a_k per group, streaming the blocks of a :class:`Lazy` (each computed
    once; ``nd``: the value's dimensions)."""
    m = ctx.m
    step = ctx.block if ctx.G == 1 else max(m, ctx.block // m * m)  # whole groups per block
    parts: list[Tensor] = []
    total: Tensor | None = None
    for s in range(0, ctx.K, step):
        b = _align(a.block(s, min(s + step, ctx.K)), nd)
        p = b.mul_(b) if _overwritable(b) else b * b  # a block is fresh: squared in place
        if ctx.G == 1:
            part = p.sum(0, keepdim=True)
            total = part if total is None else total + part
        else:
            parts.append(p if m == 1 else p.reshape(p.shape[0] // m, m, *p.shape[1:]).sum(1))
        del b, p  # one block alive at a time
    if ctx.G == 1:
        assert total is not None
        return total
    return torch.cat(parts)


def _add2(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def make(ctx: Ctx, v0: Tensor, v1: Tensor | Lazy | None, v2: Tensor | None) -> Jet | Tensor:
    """A jet of value ``v0``, or ``v0`` itself when it carries no derivative that is used."""
    if v1 is None and v2 is None:
        return v0
    return Jet(v0, v1, v2)


# -- compositions used by the rules --------------------------------------------------------------
def unary(ctx: Ctx, x: Jet, y: Tensor, d1: Tensor, d2: Tensor | None) -> Jet | Tensor:
    """y = f(x) elementwise with f'(x) = d1 and f''(x) = d2 (None: zero)."""
    nd = y.dim()
    v2 = None if x.v2 is None else d1 * _align(x.v2, nd)
    if isinstance(x.v1, Lazy) and ctx.skip_v1:  # the one use of x's tangent: stream it
        return make(ctx, y, None, _add2(v2, None if d2 is None else d2 * pair_lazy(ctx, x.v1, nd)))
    if isinstance(x.v1, Lazy) and x.v1.cheap and ctx.lazy_out and not ctx.skip_v1:
        xl = x.v1  # streamed twice: here for Σ_k u1_k², by the consumer for our tangent
        curv = None if d2 is None else d2 * pair_lazy(ctx, xl, nd)
        lazy = Lazy(ctx.K, lambda s, e: d1 * _align(xl.block(s, e), nd))
        return make(ctx, y, lazy, _add2(v2, curv))
    curv = None if d2 is None else d2 * pair(ctx, x.d1, x.d1)  # before v1: one tangent less alive
    v1: Tensor | Lazy | None = None
    t1 = x.v1
    if ctx.lazy_out and not ctx.skip_v1 and isinstance(t1, Tensor) and t1.numel() < ctx.K * y.numel():
        # x's tangent is broadcast along the points (unit directions before the first
        # nonlinearity): the consumer computes ours a block at a time (a full-size x would
        # stay alive for it, no saving)
        v1 = Lazy(ctx.K, lambda s, e: d1 * _align(block(t1, s, e), nd))
    elif not ctx.skip_v1:
        v1 = d1 * _align(x.d1, nd)
    return make(ctx, y, v1, _add2(v2, curv))


def mul(ctx: Ctx, a: Any, b: Any) -> Jet | Tensor:
    """a ⊙ b (broadcasting) for jets, tensors or numbers."""
    a0, b0 = primal(a), primal(b)
    y = a0 * b0
    nd = y.dim() if isinstance(y, Tensor) else 0
    v1: Tensor | None = None
    v2: Tensor | None = None
    if isinstance(a, Jet) and a is b:  # a square: y1 = 2 a a1, y2 = 2 a a2 + 2 Σ_k a1_k²
        a1 = _align(a.d1, nd)
        two = 2 * a0
        v1 = None if ctx.skip_v1 else two * a1
        v2 = 2 * pair(ctx, a1, a1)
        return make(ctx, y, v1, v2 if a.v2 is None else v2 + two * _align(a.v2, nd))
    if isinstance(a, Jet):
        v1 = None if ctx.skip_v1 else _align(a.d1, nd) * b0
        v2 = None if a.v2 is None else _align(a.v2, nd) * b0
    if isinstance(b, Jet):
        v1 = None if ctx.skip_v1 else _add2(v1, a0 * _align(b.d1, nd))
        v2 = _add2(v2, None if b.v2 is None else a0 * _align(b.v2, nd))
    if isinstance(a, Jet) and isinstance(b, Jet):
        v2 = _add2(v2, 2 * pair(ctx, _align(a.d1, nd), _align(b.d1, nd)))
    return make(ctx, y, v1, v2)


def add(ctx: Ctx, a: Any, b: Any, alpha: Any = 1) -> Jet | Tensor:
    """a + alpha·b."""
    y = primal(a) + alpha * primal(b) if alpha != 1 else primal(a) + primal(b)
    nd = y.dim()
    v1 = v2 = None
    for x, c in ((a, 1), (b, alpha)):
        if isinstance(x, Jet):
            if not ctx.skip_v1:
                t1 = _align(x.d1, nd)
                v1 = _add2(v1, t1 if c == 1 else c * t1)
            if x.v2 is not None:
                t2 = _align(x.v2, nd)
                v2 = _add2(v2, t2 if c == 1 else c * t2)
    return make(ctx, y, v1, v2)


def reciprocal(ctx: Ctx, x: Jet) -> Jet | Tensor:
    r = x.v0.reciprocal()
    return unary(ctx, x, r, -r * r, 2 * r * r * r)


def _lin(f: Callable[..., Any], ts: list[Tensor]) -> Any:
    return vmap(f)(*ts)


def linear(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An op jointly linear in its floating arguments: derivatives pass through the op itself
    (floating arguments that carry no jet contribute zeros)."""
    base = _zero_floats(primal((args, kwargs)))
    found = [(p, j.full(ctx)) for p, j in _jet_paths((args, kwargs))]
    out0 = func(*primal(args), **primal(kwargs))

    def f(*ts: Tensor) -> Any:
        ak = base
        for (p, _), t in zip(found, ts):
            ak = _replace(ak, p, t)
        return func(*ak[0], **ak[1])

    v1 = None if ctx.skip_v1 else _lin(f, [j.d1 for _, j in found])
    v2 = None
    if any(j.v2 is not None for _, j in found):
        v2 = _lin(f, [j.v2 if j.v2 is not None else j.v0.new_zeros(ctx.G, *j.v0.shape) for _, j in found])
    return _outputs(ctx, out0, v1, v2)


def _outputs(ctx: Ctx, out0: Any, v1: Any, v2: Any) -> Any:
    if isinstance(out0, (tuple, list)):
        v1 = v1 if v1 is not None else [None] * len(out0)
        return type(out0)(
            make(ctx, o, a, None if v2 is None else b)
            if isinstance(o, Tensor) and o.is_floating_point()
            else o
            for o, a, b in zip(out0, v1, v2 if v2 is not None else [None] * len(out0))
        )
    return make(ctx, out0, v1, v2)


def _float_fn(func: Any, args: Any, kwargs: Any, found: list[Any]) -> tuple[Callable[..., Any], Any]:
    """The op as a function of its jet arguments, returning its floating outputs (a tuple)."""
    base = primal((args, kwargs))
    out0 = func(*base[0], **base[1])
    multi = isinstance(out0, (tuple, list))
    outs = list(out0) if multi else [out0]
    keep = [i for i, o in enumerate(outs) if isinstance(o, Tensor) and o.is_floating_point()]

    def f(*xs: Tensor) -> tuple[Tensor, ...]:
        ak = base
        for (p, _), x in zip(found, xs):
            ak = _replace(ak, p, x)
        out = func(*ak[0], **ak[1])
        o = list(out) if multi else [out]
        return tuple(o[i] for i in keep)

    return f, (out0, multi, keep)


def _assemble(ctx: Ctx, out0: Any, multi: bool, keep: list[int], v1s: Any, v2s: Any) -> Any:
    outs = list(out0) if multi else [out0]
    res: list[Any] = list(outs)
    for n, i in enumerate(keep):
        res[i] = make(ctx, outs[i], v1s[n], None if v2s is None else v2s[n])
    return type(out0)(res) if multi else res[0]


def no_curvature(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An op with no second derivative (affine or piecewise linear in its jet arguments):
    y1 = J u1, y2 = J u2 by forward-mode products."""
    found = [(p, j.full(ctx)) for p, j in _jet_paths((args, kwargs))]
    f, (out0, multi, keep) = _float_fn(func, args, kwargs, found)
    prims = tuple(j.v0 for _, j in found)

    def lin(*ts: Tensor) -> Any:
        return jvp(f, prims, ts)[1]

    v1s = vmap(lin)(*[j.d1 for _, j in found])
    v2s = None
    if any(j.v2 is not None for _, j in found):
        v2s = vmap(lin)(*[j.v2 if j.v2 is not None else j.v0.new_zeros(ctx.G, *j.v0.shape) for _, j in found])
    return _assemble(ctx, out0, multi, keep, v1s, v2s)


def fallback(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Any op, by nested forward-mode AD on the op alone: y1 = J u1,
    y2 = J u2 + Σ_k d²/dt² f(u + t u1_k) per group. Counted in ``ctx.fallbacks``."""
    name = str(func)
    ctx.fallbacks[name] = ctx.fallbacks.get(name, 0) + 1
    found = [(p, j.full(ctx)) for p, j in _jet_paths((args, kwargs))]
    f, (out0, multi, keep) = _float_fn(func, args, kwargs, found)
    prims = tuple(j.v0 for _, j in found)

    def lin(*ts: Tensor) -> Any:
        return jvp(f, prims, ts)[1]

    def second(*ts: Tensor) -> Any:
        return jvp(lambda *xs: jvp(f, xs, ts)[1], prims, ts)[1]

    v1s = vmap(lin)(*[j.d1 for _, j in found])
    sec = vmap(second)(*[j.d1 for _, j in found])
    v2s = []
    for s in sec:
        v2s.append(s.sum(0, keepdim=True) if ctx.G == 1 else s.reshape(ctx.G, ctx.m, *s.shape[1:]).sum(1))
    if any(j.v2 is not None for _, j in found):
        extra = vmap(lin)(
            *[j.v2 if j.v2 is not None else j.v0.new_zeros(ctx.G, *j.v0.shape) for _, j in found]
        )
        v2s = [a + b for a, b in zip(v2s, extra)]
    return _assemble(ctx, out0, multi, keep, v1s, v2s)


# -- rules ---------------------------------------------------------------------------------------
def _first_jet(args: tuple[Any, ...]) -> tuple[Jet, bool]:
    """args[0] as the only jet (else the caller takes the generic route)."""
    only = isinstance(args[0], Jet) and not has_jet(args[1:])
    return args[0], only


def pointwise_rule(derivs: Callable[..., tuple[Tensor, Tensor, Tensor | None]]) -> Callable[..., Any]:
    """A rule for an elementwise op of ``args[0]`` from ``derivs(x, y, *args[1:], **kwargs)``
    → (y, f'(x), f''(x)) (``y = f(x)`` is passed in precomputed as None and returned)."""

    def rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, only = _first_jet(args)
        if not only:
            return pointwise_generic(ctx, func, args, kwargs)
        y, d1, d2 = derivs(func, x.v0, *args[1:], **kwargs)
        return unary(ctx, x, y, d1, d2)

    return rule


def pointwise_generic(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An elementwise op of several jets: first and second partials at the point by nested
    forward-mode products with all-ones tangents (each output element depends on one element
    of each input), then y1 = Σ_i ∂_i f u1_i, y2 = Σ_i ∂_i f u2_i + Σ_ij ∂_i∂_j f Σ_k u1_ik u1_jk."""
    found = _jet_paths((args, kwargs))
    f, (out0, multi, keep) = _float_fn(func, args, kwargs, found)
    if multi or len(keep) != 1:  # pragma: no cover - no multi-output pointwise op has a rule
        return fallback(ctx, func, args, kwargs)
    name = str(func)
    ctx.fallbacks[name] = ctx.fallbacks.get(name, 0) + 1
    y = out0
    shape = y.shape
    xs = tuple(j.v0.expand(shape) for _, j in found)
    n = len(xs)

    def e(i: int) -> tuple[Tensor, ...]:
        return tuple(torch.ones_like(x) if k == i else torch.zeros_like(x) for k, x in enumerate(xs))

    def g(i: int) -> Callable[..., Tensor]:
        return lambda *zs: jvp(f, zs, e(i))[1][0]

    firsts = [g(i)(*xs) for i in range(n)]
    nd = y.dim()
    v1: Tensor | None = None
    v2: Tensor | None = None
    for (_, j), d in zip(found, firsts):
        v1 = _add2(v1, d * _align(j.d1, nd))
        if j.v2 is not None:
            v2 = _add2(v2, d * _align(j.v2, nd))
    for i in range(n):
        for k in range(i, n):
            d2 = jvp(g(i), xs, e(k))[1]
            a, b = _align(found[i][1].d1, nd), _align(found[k][1].d1, nd)
            term = d2 * pair(ctx, a, b)
            v2 = _add2(v2, term if i == k else 2 * term)
    return make(ctx, y, v1, v2)


def _tanh(func: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tanh(x)
    d1 = 1 - t * t
    return t, d1, -2 * t * d1


def _sigmoid(func: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(x)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s)


def _sin(func: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sin(x)
    return s, torch.cos(x), -s


def _cos(func: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    c = torch.cos(x)
    return c, -torch.sin(x), -c


def _exp(func: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    e = torch.exp(x)
    return e, e, e


def _log(func: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r = x.reciprocal()
    return torch.log(x), r, -r * r


def _sqrt(func: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sqrt(x)
    d1 = 0.5 / s
    return s, d1, -0.5 * d1 / x


def _rsqrt(func: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r = torch.rsqrt(x)
    d1 = -0.5 * r / x
    return r, d1, -1.5 * d1 / x


def _reciprocal(func: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r = x.reciprocal()
    return r, -r * r, 2 * r * r * r


def _pow_scalar(func: Any, x: Tensor, p: Any) -> tuple[Tensor, Tensor, Tensor]:
    if p == 2:
        return x * x, 2 * x, torch.full_like(x, 2.0)
    return x**p, p * x ** (p - 1), p * (p - 1) * x ** (p - 2)


def _relu(func: Any, x: Tensor) -> tuple[Tensor, Tensor, None]:
    return torch.relu(x), (x > 0).to(x.dtype), None


def _silu(func: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(x)
    d1 = s * (1 + x * (1 - s))
    return x * s, d1, s * (1 - s) * (2 + x * (1 - 2 * s))


def _softplus(func: Any, x: Tensor, beta: Any = 1, threshold: Any = 20) -> tuple[Tensor, Tensor, Tensor]:
    y = func(x, beta, threshold)
    s = torch.sigmoid(beta * x)
    linear_part = beta * x > threshold
    d1 = torch.where(linear_part, torch.ones_like(s), s)
    d2 = torch.where(linear_part, torch.zeros_like(s), beta * s * (1 - s))
    return y, d1, d2


def _gelu(func: Any, x: Tensor, approximate: str = "none") -> Any:
    if approximate != "none":
        return None
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return x * cdf, cdf + x * pdf, pdf * (2 - x * x)


def gelu_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, only = _first_jet(args)
    got = _gelu(func, x.v0, *args[1:], **kwargs) if only else None
    if got is None:  # the tanh approximation: partials by nested forward products
        return pointwise_generic(ctx, func, args, kwargs)
    return unary(ctx, x, *got)


def mul_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return mul(ctx, args[0], args[1])


def div_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a, b = args[0], args[1]
    if kwargs.get("rounding_mode") is not None:
        return no_curvature(ctx, func, args, kwargs)
    if not isinstance(b, Jet):
        return mul(ctx, a, 1 / b if not isinstance(b, Tensor) else b.reciprocal())
    return mul(ctx, a, reciprocal(ctx, b))


def add_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    name = func.__name__ if hasattr(func, "__name__") else str(func)
    sign = -1 if "sub" in name else 1
    if "rsub" in name:  # rsub(a, b) = b - alpha a
        return add(ctx, args[1], args[0], -alpha)
    return add(ctx, args[0], args[1], sign * alpha)


def scalar_affine_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """add.Scalar / sub.Scalar / rsub.Scalar / mul.Scalar / div.Scalar / neg on one jet."""
    x = args[0]
    y = func(x.v0, *args[1:], **kwargs)
    if func in (aten.add.Scalar, aten.sub.Scalar):
        return make(ctx, y, None if ctx.skip_v1 else x.v1, x.v2)
    if func is aten.rsub.Scalar:  # other − alpha·x
        c = -kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        return make(ctx, y, None if ctx.skip_v1 else c * x.d1, None if x.v2 is None else c * x.v2)
    v1 = None if ctx.skip_v1 else func(x.d1, *args[1:], **kwargs)
    return make(ctx, y, v1, None if x.v2 is None else func(x.v2, *args[1:], **kwargs))


def reduce_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """sum / mean over dimensions of one jet: the derivatives reduced over the same dimensions
    (shifted past their leading direction axis; no ``vmap`` of the op, as the generic linear
    route would use)."""
    x, only = _first_jet(args)
    if not only or kwargs.get("dtype") is not None or (len(args) > 3 and args[3] is not None):
        return linear(ctx, func, args, kwargs)
    nd = x.v0.dim()
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    if func in (aten.sum.default, aten.mean.default) or dims is None or len(dims) == 0:
        dims = list(range(nd))
    dims = [int(d) % max(1, nd) for d in ([dims] if isinstance(dims, int) else dims)]
    y = func(*primal(args), **kwargs)
    if nd == 0:  # a 0-d value: nothing to reduce
        return make(ctx, y, None if ctx.skip_v1 else x.v1, x.v2)
    mean = func in (aten.mean.default, aten.mean.dim)
    n = math.prod(x.v0.shape[d] for d in dims) if mean else 1

    def red(t: Tensor, lead: int) -> Tensor:
        t = _full(_align(t, nd), lead, x.v0.shape).sum([d + 1 for d in dims], keepdim=keep)
        return t / n if mean else t

    v1 = None if ctx.skip_v1 else red(x.d1, ctx.K)
    return make(ctx, y, v1, None if x.v2 is None else red(x.v2, ctx.G))


def view_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0].full(ctx)  # a view has one tensor argument
    shape = list(args[1])
    y = aten.reshape.default(x.v0, shape)
    v2 = None if x.v2 is None else x.v2.reshape(ctx.G, *y.shape)
    return make(ctx, y, None if ctx.skip_v1 else x.d1.reshape(ctx.K, *y.shape), v2)


def reshape_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """squeeze / unsqueeze of one jet: the op only reshapes, so the derivatives are reshaped to
    the value's shape (no ``vmap`` of the op, as the generic linear route would use)."""
    x, only = _first_jet(args)
    if not only:  # pragma: no cover - these ops have one tensor argument
        return linear(ctx, func, args, kwargs)
    y = func(x.v0, *args[1:], **kwargs)
    x = x.full(ctx)
    v2 = None if x.v2 is None else x.v2.reshape(ctx.G, *y.shape)
    return make(ctx, y, None if ctx.skip_v1 else x.d1.reshape(ctx.K, *y.shape), v2)


def _mm_pair(ctx: Ctx, a: Tensor, b: Tensor) -> Tensor:
    """Σ_{k ∈ g} a_k @ b_k per group."""
    if ctx.G == ctx.K:
        return torch.matmul(a, b)
    p = torch.matmul(a, b)
    return p.sum(0, keepdim=True) if ctx.G == 1 else p.reshape(ctx.G, ctx.m, *p.shape[1:]).sum(1)


def _unit_rows(ctx: Ctx, a: Any, b: Any, a0: Tensor, b0: Any) -> bool:
    """``a``'s tangent is the unit-direction seed (:attr:`Ctx.unit`, the same tensor object: the
    points themselves or a value whose rule passed their tangent through unchanged), ``a`` is
    ``(N, D)`` and ``b`` a ``(D, n)`` matrix without a jet."""
    u = ctx.unit
    return (
        u is not None
        and isinstance(a, Jet)
        and a.v1 is u
        and not isinstance(b, Jet)
        and isinstance(b0, Tensor)
        and a0.dim() == 2
        and b0.dim() == 2
        and u.shape == (ctx.K, 1, a0.shape[1])
    )


def matmul_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """mm / bmm / matmul / addmm / baddbmm: bilinear, y2 = a2 b + a b2 + 2 Σ_k a1_k b1_k."""
    addmm = func in (aten.addmm.default, aten.baddbmm.default)
    off = 1 if addmm else 0
    if kwargs or (addmm and len(args) > 3):
        beta = kwargs.get("beta", args[3] if len(args) > 3 else 1)
        alpha = kwargs.get("alpha", args[4] if len(args) > 4 else 1)
    else:
        beta = alpha = 1
    a, b = args[off], args[off + 1]
    a0, b0 = primal(a), primal(b)
    y = ctx.once("value", lambda: func(*primal(args), **kwargs))
    v1: Tensor | None = None
    v2: Tensor | None = None
    if _unit_rows(ctx, a, b, a0, b0) and not (addmm and isinstance(args[0], Jet)):
        # a's tangent is the identity's rows s..s+K: e_k @ b0 = b0[k], no product
        assert isinstance(a, Jet)
        # (K, 1, n), broadcast along the points; contiguous (a transposed weight's rows are
        # strided, and elementwise products with them would inherit that layout)
        rows = b0[ctx.unit_start : ctx.unit_start + ctx.K].unsqueeze(1).contiguous()
        v1 = None if ctx.skip_v1 else (rows if alpha == 1 else alpha * rows)
        v2 = None if a.v2 is None else torch.matmul(a.v2, b0)
        return make(ctx, y, v1, v2 if v2 is None or alpha == 1 else alpha * v2)
    lazy_ok = ctx.lazy_out and not ctx.skip_v1 and not isinstance(b, Jet)
    if lazy_ok and isinstance(a, Jet) and a.v1 is not None and not (addmm and isinstance(args[0], Jet)):
        t1 = a.v1  # a1 @ b0, computed by the consumer a block of directions at a time
        cheap = isinstance(t1, Tensor) and 4 * a.v0.numel() <= y.numel()
        lazy = Lazy(ctx.K, lambda s, e: torch.matmul(block(t1, s, e), b0), cheap)
        v2 = None if a.v2 is None else torch.matmul(a.v2, b0)
        if alpha != 1:
            lazy = Lazy(ctx.K, lambda s, e, f=lazy.fn: alpha * f(s, e), cheap)  # type: ignore[misc]
            v2 = None if v2 is None else alpha * v2
        return make(ctx, y, lazy, v2)
    if isinstance(a, Jet):
        v1 = None if ctx.skip_v1 else torch.matmul(a.d1, b0)
        v2 = None if a.v2 is None else torch.matmul(a.v2, b0)
    if isinstance(b, Jet):
        v1 = None if ctx.skip_v1 else _add2(v1, torch.matmul(a0, b.d1))
        v2 = _add2(v2, None if b.v2 is None else torch.matmul(a0, b.v2))
    if isinstance(a, Jet) and isinstance(b, Jet):
        v2 = _add2(v2, 2 * _mm_pair(ctx, a.d1, b.d1))
    if alpha != 1:
        v1 = None if v1 is None else alpha * v1
        v2 = None if v2 is None else alpha * v2
    if addmm and isinstance(args[0], Jet):
        c = args[0]
        nd = y.dim()
        if not ctx.skip_v1:
            v1 = _add2(v1, beta * _align(c.d1, nd))
        if c.v2 is not None:
            v2 = _add2(v2, beta * _align(c.v2, nd))
    return make(ctx, y, v1, v2)


def softmax_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """(log-)softmax along ``dim``: with s = softmax(u), m1_k = Σ s u1_k,
    (log s)1 = u1 − m1, (log s)2 = u2 − Σ s u2 − (Σ s Σ_k u1_k² − Σ_k m1_k²),
    s2 = s((log s)2 + Σ_k (log s)1_k²)."""
    x, only = _first_jet(args)
    if not only or (len(args) > 2 and args[2]):
        return fallback(ctx, func, args, kwargs)
    x = x.full(ctx)
    y = func(*primal(args), **kwargs)
    log = func is aten._log_softmax.default
    s = y.exp() if log else y
    d = args[1] % y.dim() + 1
    m1 = (s * x.d1).sum(d, keepdim=True)
    c = x.d1 - m1
    l2 = -((s * pair(ctx, x.d1, x.d1)).sum(d, keepdim=True) - pair(ctx, m1, m1))
    if x.v2 is not None:
        l2 = l2 + x.v2 - (s * x.v2).sum(d, keepdim=True)
    l2 = _full(l2, ctx.G, y.shape)
    if log:
        return make(ctx, y, c, l2)
    return make(ctx, y, s * c, s * (l2 + pair(ctx, c, c)))


def layer_norm_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """native_layer_norm(x, shape, w, b, eps) → (out, mean, rstd) composed from jet arithmetic."""
    x, only = _first_jet(args)
    if not only:
        return fallback(ctx, func, args, kwargs)
    shape, w, b, eps = args[1], args[2], args[3], args[4]
    dims = tuple(range(-len(shape), 0))
    n = math.prod(shape)

    def mean(j: Jet) -> Jet | Tensor:
        nd = j.v0.dim()

        def red(t: Tensor) -> Tensor:
            # expanded along the normalized dimensions only: a tangent broadcast along the
            # points (unit directions through a first linear layer) keeps its size-1 axes
            t = _align(t, nd)
            shape = list(t.shape)
            for d in dims:
                shape[d] = j.v0.shape[d]
            return t.expand(shape).sum(dims, keepdim=True) / n

        v0 = j.v0.mean(dims, keepdim=True)
        return make(ctx, v0, red(j.d1), None if j.v2 is None else red(j.v2))

    mu = mean(x)
    xc = add(ctx, x, mu, -1)
    assert isinstance(xc, Jet)
    sq = unary(ctx, xc, xc.v0 * xc.v0, 2 * xc.v0, torch.full_like(xc.v0, 2.0))
    assert isinstance(sq, Jet)
    var = mean(sq)
    assert isinstance(var, Jet)
    ve = var.v0 + eps
    r = torch.rsqrt(ve)
    d1 = -0.5 * r / ve
    rstd = unary(ctx, var, r, d1, -1.5 * d1 / ve)
    out = mul(ctx, xc, rstd)
    if w is not None:
        out = mul(ctx, out, w)
    if b is not None:
        out = add(ctx, out, b)
    return (out, mu, rstd)


def conv_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """convolution linear in its point-dependent input (weights and bias without jets): the K
    directions (and G channels) folded into the batch dimension of one dense convolution."""
    x, only = _first_jet(args)
    if not only:
        return fallback(ctx, func, args, kwargs)
    x = x.full(ctx)
    y = func(*primal(args), **kwargs)
    rest = list(args[1:])
    rest[1] = None  # bias: affine part, no derivative

    def conv(t: Tensor, lead: int) -> Tensor:
        out = func(t.reshape(lead * x.v0.shape[0], *x.v0.shape[1:]), *rest, **kwargs)
        return out.view(lead, *y.shape)

    return make(ctx, y, conv(x.d1, ctx.K), None if x.v2 is None else conv(x.v2, ctx.G))


def max_pool_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """max pooling with indices: derivatives gathered at the argmax (piecewise linear)."""
    x, only = _first_jet(args)
    if not only:
        return fallback(ctx, func, args, kwargs)
    x = x.full(ctx)
    y, idx = func(*primal(args), **kwargs)
    nsp = len(args[1])

    def gather(t: Tensor, lead: int) -> Tensor:
        flat = t.flatten(-nsp)
        i = idx.flatten(-nsp).unsqueeze(0).expand(lead, *idx.shape[: idx.dim() - nsp], -1)
        return flat.gather(-1, i).view(lead, *y.shape)

    return (make(ctx, y, gather(x.d1, ctx.K), None if x.v2 is None else gather(x.v2, ctx.G)), idx)


def constant_rule(ctx: Ctx, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """zeros_like / ones_like / full_like / empty_like: the result does not depend on the values."""
    return func(*primal(args), **primal(kwargs))


DERIVS: dict[str, Callable[..., Any]] = {
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "sin": _sin,
    "cos": _cos,
    "exp": _exp,
    "log": _log,
    "sqrt": _sqrt,
    "rsqrt": _rsqrt,
    "reciprocal": _reciprocal,
    "pow.Tensor_Scalar": _pow_scalar,
    "relu": _relu,
    "silu": _silu,
    "softplus": _softplus,
}

"""PDE operators of a network at a batch of points: :func:`laplacian` and :func:`biharmonic`.

Physics-informed networks, variational Monte Carlo and score matching need, at every point
x_n of a batch, the Laplacian Δu(x_n) = tr ∇²ₓu(x_n), a weighted trace tr(C ∇²ₓu), or the
biharmonic Δ²u, usually inside a training loss. Both transforms run by *collapsed Taylor mode*
(Dangel, Siebert, Zeinhofer, Walther 2025): one forward pass over the recorded ATen tape of
``u`` carries the value, K first-order directional derivatives per point and a single summed
second-order channel (:mod:`secorder._engine.collapsed`), with the points kept as a batch axis.
The result is built from differentiable torch ops: ``loss.backward()`` and
:func:`torch.func.grad` in the parameters work through it.

Contract: ``u(*args)`` maps a batch ``x = args[argnums]`` of shape ``(N, *E)`` to an output of
shape ``(N, *O)`` and treats the points independently (output n depends on x_n only: no
batch statistics across points), as :func:`torch.func.vmap` over points would. D = prod(E).
On the collapsed route this is proved on the recorded tape before any arithmetic (the per-sample
analysis of :mod:`secorder._engine.batch`, no check on values); a ``u`` that mixes the points
is refused with the op that mixes them.

Routes (reported in ``fn.method_info`` after each call, a :class:`PDEInfo`):

* ``"collapsed"``: the tape of ``u`` is recorded once per call (its Python control flow as
  taken) and pushed through by per-op rules from the one registry
  (:mod:`secorder._engine.rules`); an op without a rule is handled by nested forward-mode AD
  on that op alone, listed in ``method_info.fallbacks``;
* ``"nested"``: nested forward-mode AD on the whole function (``vmap`` over directions of
  ``jvp`` of ``jvp``), when the tape cannot be recorded faithfully, or under
  :func:`torch.func.vmap` (e.g. over stacked parameter ensembles); ``method_info.reason``
  says why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import jvp, vmap

from secorder import probes as _probes
from secorder._chunking import ROW_OVERHEAD, check_chunk_size, memory_budget
from secorder._engine import jet as _jet
from secorder._engine.batch import BatchAxisError, analyze
from secorder._engine.collapsed import Plan, evaluate, plan
from secorder._engine.plancache import PlanCache, fingerprint
from secorder._engine.rules import rule
from secorder._engine.tape import (
    _DATA_DEPENDENT,
    Ref,
    Tape,
    TapeNode,
    TapeUnsupportedError,
    record,
    replace_at,
)
from secorder._errors import error
from secorder._kernels import plain_kernels
from secorder._validate import (
    check_argnums,
    check_bool,
    check_callable,
    check_finite_result,
    check_finite_tree,
    check_grad_context,
    check_num_probes,
)

__all__ = ["PDEInfo", "biharmonic", "laplacian"]


@dataclass
class PDEInfo:
    """How the last call of a :func:`laplacian` or :func:`biharmonic` transform ran.

    Attributes:
        route: ``"collapsed"`` (collapsed Taylor mode over the tape) or ``"nested"``.
        reason: why the nested route was taken (``None`` for the collapsed route).
        fallbacks: ATen ops without a collapsed rule, each handled by nested forward-mode AD
            on that op alone, with how many times.
        replayed: the tape recorded by an earlier call was replayed (``static=True``).
    """

    route: str
    reason: str | None = None
    fallbacks: dict[str, int] = field(default_factory=dict)
    replayed: bool = False


# -- binding the call ------------------------------------------------------------------------------
def _bind(
    call: str, u: Callable[..., Any], args: tuple[Any, ...], argnums: int
) -> tuple[Callable[[list[Tensor], list[Tensor]], Tensor], list[Tensor], Tensor]:
    """``fn(leaves, [x])`` = ``u(*args)`` with the other arguments' tensors as tape leaves."""
    index = check_argnums(call, argnums, len(args))
    x = args[index]
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.is_complex():
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise error(
            call,
            f"args[{index}] must be a real floating tensor of points of shape (N, *E) (a batch "
            "of N points of D = prod(E) coordinates)",
            got,
            "Pass a batch of points, e.g. x of shape (N, D); for one point use x[None].",
        )
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise error(
            call,
            f"args[{index}] must hold at least one point of at least one coordinate",
            f"shape {tuple(x.shape)}",
            "Skip empty batches before the call (e.g. `if len(x):`).",
        )
    rest = list(args)
    rest[index] = None
    flat, spec = pytree.tree_flatten(rest)
    pos = [i for i, a in enumerate(flat) if isinstance(a, Tensor)]
    n = x.shape[0]
    # the shared input policies (secorder._validate): context, then finite values in eager mode
    check_grad_context(call, [x, *(flat[i] for i in pos)])
    for i, a in enumerate(args):
        check_finite_tree(call, f"args[{i}]", a, samples=i == index)

    def fn(leaves: list[Tensor], inputs: list[Tensor]) -> Tensor:
        new = list(flat)
        for i, leaf in zip(pos, leaves):
            new[i] = leaf
        new_args = pytree.tree_unflatten(new, spec)
        new_args[index] = inputs[0]
        out = u(*new_args)
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != inputs[0].shape[0]:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise error(
                call,
                f"u must return a tensor of shape (N, *O) for N = {n} points (one output per point)",
                got,
                "Return per-point values, e.g. model(x).squeeze(-1) of shape (N,), not their mean.",
            )
        return out

    return fn, [flat[i] for i in pos], x


def _plain(t: Tensor) -> Tensor | None:
    """``t`` without torch.func grad/jvp wrappers (None under vmap: its shape is not the batch's)."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        if f.is_batchedtensor(t):
            return None
        t = f.get_unwrapped(t)
    return t


def _record(
    fn: Callable[[list[Tensor], list[Tensor]], Tensor],
    leaves: list[Tensor],
    x: Tensor,
    call: str | None = None,
    structure: tuple[Any, ...] | None = None,
) -> tuple[Tape | None, str | None, dict[tuple[int, str], Tensor] | None, _Derived | None]:
    """The tape of ``fn`` at plain copies of the arguments, or ``(None, why not, None, None)``.
    With ``call``: the points are proved independent on the tape first (:func:`_check_independent`,
    raising in the name of ``call``). Third: the recorded values the collapsed pass may take
    instead of computing them again (:func:`_reusable_values`; ``None`` when a derivative of
    the result may be asked for). Fourth, with ``structure`` (hashable options): what is derived
    from the tape's structure (a :class:`_Derived` of :data:`_DERIVED`, keyed by the tape's
    :func:`~secorder._engine.plancache.fingerprint` with those options; ``None`` without, or
    where the structure has no key): a tape of a structure already proved is not proved again."""
    plain = [_plain(t) for t in [*leaves, x]]
    if any(p is None for p in plain):
        return None, "called under torch.func.vmap (the tape records one unbatched evaluation)", None, None
    try:
        with torch._C._DisableFuncTorch():  # record plain ops even inside torch.func.grad
            tape = record(fn, plain[:-1], plain[-1:])  # type: ignore[arg-type]
    except TapeUnsupportedError as exc:
        return None, f"the function cannot be recorded as a tape: {exc}", None, None
    if (call is not None or structure is not None) and tape.values is None:
        # an in-place op rewrote a recorded tensor: replay for the shapes
        with torch._C._DisableFuncTorch(), torch.no_grad():
            tape.values = tape.replay(plain[:-1], plain[-1:])  # type: ignore[arg-type]
    key = None if structure is None else fingerprint(tape, tape.values, (), x.shape[0], *structure)  # type: ignore[arg-type]
    derived = _DERIVED.get(key)
    if derived is None:
        if call is not None:
            _check_independent(call, tape, x)
        if key is not None:
            derived = _Derived(call is not None, key=key)
            _DERIVED.put(key, derived, len(tape.nodes) + tape.num_values)
    elif call is not None and not derived.proved:  # pragma: no cover - one call site per structure
        _check_independent(call, tape, x)
        derived.proved = True
    reuse = _reusable_values(tape, [*leaves, x])
    tape.values = None  # the collapsed evaluator recomputes the other values: kept ones only hold memory
    return tape, None, reuse, derived


def _tensors_in(obj: Any, out: list[Tensor]) -> None:
    """Append the tensors of a nested args structure to ``out``."""
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            if not isinstance(o, (int, float, bool, Ref)):
                _tensors_in(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors_in(o, out)


def _reusable_values(tape: Tape, args: list[Tensor]) -> dict[tuple[int, str], Tensor] | None:
    """The recorded values of the tape's matrix products, keyed as the collapsed pass keeps a
    node's value (:attr:`secorder._engine.jet.Ctx.seeded`): the pass then takes them instead of
    multiplying again (the recording already computed every value of this call). Only when no
    derivative of the result can be asked for: the recorded values are detached, so with an
    argument (or a tensor ``u`` reads from outside its arguments) that requires grad, carries
    a forward-mode tangent or is wrapped by a ``torch.func`` transform (``grad``, ``jvp``) the
    pass computes its own, differentiable values (``None``). Never kept across calls (a
    ``static=True`` replay computes them)."""
    values = tape.values
    if values is None:
        return None
    # the arguments, and tensors u reads from elsewhere (captured as the tape's constants)
    consts: list[Tensor] = []
    for n in tape.nodes:
        _tensors_in(n.args, consts)
        if n.kwargs:
            _tensors_in(n.kwargs, consts)
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in [*args, *consts]:
        if t.requires_grad or wrapped(t) or forward_ad.unpack_dual(t).tangent is not None:
            return None
    out: dict[tuple[int, str], Tensor] = {}
    for i, node in enumerate(tape.nodes):
        if node.multi or node.outputs[0] is None or rule(node.func).collapsed is not _jet.matmul_rule:
            continue
        v = values[node.outputs[0]]
        if isinstance(v, Tensor):
            out[(i, "value")] = v
    return out or None


# -- static=True: tapes kept across calls -------------------------------------------------------
_STATIC_ENTRIES = 8  # argument signatures kept per transform (the oldest is dropped beyond)


def _signature(args: tuple[Any, ...]) -> Any:
    """What a recorded tape may depend on besides values: the arguments' pytree structure, every
    tensor's shape, strides, dtype and device, and every other leaf's value (e.g. an int that
    selects a branch); ``None`` (not cached) for an unhashable leaf or a tensor under a
    ``torch.func`` transform that is not a plain wrapper (vmap)."""
    flat, spec = pytree.tree_flatten(list(args))
    key: list[Any] = [spec]
    for a in flat:
        if isinstance(a, Tensor):
            p = _plain(a)
            if p is None:
                return None
            key.append((tuple(p.shape), p.stride(), p.dtype, p.device))
        else:
            try:
                hash(a)
            except TypeError:
                return None
            key.append((type(a), a))
    return tuple(key)


def _replayable(tape: Tape) -> bool:
    """No op whose Python-visible result depends on values (``.item()``, ``nonzero``, …): its
    outcome is baked into the tape, so such a tape is recorded again at every call."""
    return not any(node.func in _DATA_DEPENDENT for node in tape.nodes)


class _Tapes:
    """The tapes of a ``static=True`` transform, by argument :func:`_signature`."""

    def __init__(self) -> None:
        self.entries: dict[Any, Any] = {}

    def get(self, key: Any) -> Any:
        return None if key is None else self.entries.get(key)

    def put(self, key: Any, entry: Any) -> None:
        if key is None:
            return
        if len(self.entries) >= _STATIC_ENTRIES:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = entry


# -- what is derived from the structure of u's tape ---------------------------------------------
# u's tape is recorded at every call (it may depend on values). What secorder derives from it
# reads its structure only, never values, so it is kept per structural fingerprint (with the
# options it depends on; secorder._engine.plancache, as the sweep keeps its plans): the points'
# independence proof (_check_independent: the per-sample analysis reads ops and shapes), the
# collapsed plans, and the biharmonic's outer tape. That tape, of u's collapsed Laplacian, is
# the op sequence secorder's own collapsed evaluator runs over u's tape: a function of that
# tape's structure, the inner directions' layout and the pass options (the rules read no value
# into Python; a tape that does is not kept, _replayable). It is recorded once per structure
# and kept as a template without tensors (_Level), filled at each call with this call's
# constants (u's captured tensors, the directions).


@dataclass
class _Derived:
    """What is derived from one structure of u's tape (an entry of ``_DERIVED``)."""

    proved: bool  # the points are independent (proved on a tape of this structure)
    plans: dict[Any, Plan] = field(default_factory=dict)  # u's tape's plans (_collapsed)
    level: Any = None  # the biharmonic's outer tape as a _Level (None: not derived yet)
    key: Any = None  # its key in _DERIVED (to count the template's weight once it is made)


_DERIVED = PlanCache(64, 200_000)


@dataclass
class _Level:
    """The outer tape of the biharmonic as a template: ``tape`` with every constant tensor
    replaced by ``None`` at the ``slots`` ``(node, path, source)``: source ``None`` for the
    inner directions, else every ``(node, path)`` of u's tape holding that constant (one
    object; a call whose tape holds different objects there is recorded afresh)."""

    tape: Tape
    slots: list[tuple[int, tuple[Any, ...], list[tuple[int, tuple[Any, ...]]] | None]]
    fallbacks: dict[str, int]  # the inner level's ops handled by nested AD
    plans: dict[Any, Plan]  # the outer tape's plans (filled by the first pass over it)


def _tensor_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Tensor]]:
    """Every tensor in a nested args structure with its path (the order of ``tape.paths``)."""
    if isinstance(obj, Tensor):
        return [(prefix, obj)]
    if isinstance(obj, (list, tuple)):
        return [p for i, o in enumerate(obj) for p in _tensor_paths(o, (*prefix, i))]
    if isinstance(obj, dict):
        return [p for k, o in obj.items() for p in _tensor_paths(o, (*prefix, k))]
    return []


def _at(node: TapeNode, path: tuple[Any, ...]) -> Any:
    obj: Any = (node.args, node.kwargs)
    for k in path:
        obj = obj[k]
    return obj


def _template(tape2: Tape, tape: Tape, dirs: Tensor, fallbacks: dict[str, int]) -> _Level | None:
    """``tape2`` (recorded over ``tape`` with directions ``dirs``) as a :class:`_Level`, or
    ``None`` when one of its constants is neither a constant of ``tape`` nor ``dirs``, or the
    output does not depend on the points."""
    if tape2.output is None or not _replayable(tape2):
        return None
    where: dict[int, list[tuple[int, tuple[Any, ...]]]] = {}
    for i, node in enumerate(tape.nodes):
        for path, t in _tensor_paths((node.args, node.kwargs)):
            where.setdefault(id(t), []).append((i, path))
    slots: list[tuple[int, tuple[Any, ...], list[tuple[int, tuple[Any, ...]]] | None]] = []
    nodes = list(tape2.nodes)
    for j, node in enumerate(tape2.nodes):
        found = _tensor_paths((node.args, node.kwargs))
        if not found:
            continue
        both: Any = (node.args, node.kwargs)
        for path, t in found:
            if t is dirs:
                slots.append((j, path, None))
            elif id(t) in where:
                slots.append((j, path, where[id(t)]))
            else:
                return None
            both = replace_at(both, path, None)
        nodes[j] = TapeNode(node.func, both[0], both[1], node.outputs, node.multi, node._paths)
    empty = tape2.result.new_empty(0)
    kept = Tape(
        tape2.num_leaves, nodes, tape2.output, empty, tape2.num_values, tape2.depends,
        tape2.num_inputs, None, tape2.widest, tape2.numels,
    )  # fmt: skip
    return _Level(kept, slots, dict(fallbacks), {})


def _instantiate(level: _Level, tape: Tape, dirs: Tensor) -> Tape | None:
    """The outer tape of this call: the template filled with ``tape``'s constants and ``dirs``
    (``None`` when a constant the template takes from several places of u's tape is not one
    object in this ``tape``)."""
    nodes = list(level.tape.nodes)
    for j, path, sources in level.slots:
        if sources is None:
            t = dirs
        else:
            t = _at(tape.nodes[sources[0][0]], sources[0][1])
            if any(_at(tape.nodes[i], p) is not t for i, p in sources[1:]):
                return None
        node = nodes[j]
        both = replace_at((node.args, node.kwargs), path, t)
        nodes[j] = TapeNode(node.func, both[0], both[1], node.outputs, node.multi, node._paths)
    kept = level.tape
    return Tape(
        kept.num_leaves, nodes, kept.output, kept.result, kept.num_values, kept.depends,
        kept.num_inputs, None, kept.widest, kept.numels,
    )  # fmt: skip


# -- directions ------------------------------------------------------------------------------------
def _check_weighting(call: str, weighting: Any, weighting_factor: Any) -> None:
    for name, w in (("weighting", weighting), ("weighting_factor", weighting_factor)):
        if w is not None and (not isinstance(w, Tensor) or w.dim() not in (2, 3)):
            got = f"shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
            raise error(
                call,
                f"{name} must be a tensor of shape (D, {'D' if name == 'weighting' else 'r'}) or "
                f"per point (N, D, {'D' if name == 'weighting' else 'r'})",
                got,
                "Pass C (or its factor S with C = S Sᵀ) as a tensor.",
                cls=TypeError,
            )
    if weighting is not None and weighting_factor is not None:
        raise error(
            call,
            "give the weighting C or its factor S, not both",
            "weighting and weighting_factor",
            "Drop one of them (the factor is cheaper: r directions instead of D).",
        )


def _factor(call: str, x: Tensor, weighting: Tensor | None, factor: Tensor | None) -> Tensor | None:
    """The factor S of C = S Sᵀ as ``(N or 1, D, r)`` in x's dtype and device."""
    d = x[0].numel()
    if weighting is None and factor is None:
        return None
    w = weighting if weighting is not None else factor
    assert w is not None
    w = w.to(dtype=x.dtype, device=x.device)
    s = w if w.dim() == 3 else w.unsqueeze(0)
    if s.shape[1] != d or s.shape[0] not in (1, x.shape[0]) or (weighting is not None and s.shape[2] != d):
        raise error(
            call,
            f"the weighting must act on the D = {d} coordinates of a point ((D, D) or (D, r), or "
            f"per point (N, D, ...) for N = {x.shape[0]})",
            f"shape {tuple(w.shape)}",
            "Build C of shape (D, D) (or S of shape (D, r)) for the flattened coordinates of a point.",
        )
    if weighting is None:
        return s
    if not torch.allclose(s, s.transpose(1, 2)):
        raise error(
            call,
            "weighting C must be symmetric (tr(C ∇²u) only sees its symmetric part)",
            "a non-symmetric matrix",
            "Pass (C + C.T) / 2.",
        )
    lam, q = torch.linalg.eigh(s)
    tol = 1e-6 * lam.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny)
    if bool((lam < -tol).any()):
        raise error(
            call,
            "weighting C must be positive semi-definite (C = S Sᵀ)",
            f"a smallest eigenvalue of {float(lam.min()):.3g}",
            "Split C = C₊ − C₋ into positive semi-definite parts and subtract the two results.",
        )
    return q * lam.clamp_min(0).sqrt().unsqueeze(1)


_Rows = Callable[[int, int], Tensor]  # (start, stop) → directions start..stop, (stop − start, N or 1, *E)


def _direction_rows(
    x: Tensor,
    s: Tensor | None,
    num_probes: int | None,
    distribution: str,
    generator: torch.Generator | None,
) -> tuple[_Rows, int, int]:
    """The K directions as ``rows(start, stop)``, K, and the divisor of their summed second
    derivatives. Random directions are drawn when asked for, one generator call per probe
    (:func:`secorder.probes.draw`), so asking in consecutive slices gives the numbers of one draw
    and a pass over a chunk of directions holds only its own probes."""
    n, e = x.shape[0], x.shape[1:]
    d = x[0].numel()
    if num_probes is None:
        if s is None:
            eye = torch.eye(d, dtype=x.dtype, device=x.device)
            dirs = eye.reshape(d, 1, *e)  # the same at every point: broadcast, not copied
        else:
            dirs = s.permute(2, 0, 1).reshape(s.shape[2], s.shape[0], *e)
        return (lambda start, stop: dirs[start:stop]), dirs.shape[0], 1
    r = d if s is None else s.shape[2]

    def rows(start: int, stop: int) -> Tensor:
        z = _probes.draw(stop - start, n * r, distribution, generator, x.dtype, x.device)
        if s is None:
            return z.reshape(stop - start, n, *e)
        z = torch.einsum("knr,ndr->knd", z.reshape(stop - start, n, r), s.expand(n, *s.shape[1:]))
        return z.reshape(stop - start, n, *e)

    return rows, num_probes, num_probes


def _directions(
    x: Tensor,
    s: Tensor | None,
    num_probes: int | None,
    distribution: str,
    generator: torch.Generator | None,
) -> tuple[Tensor, int]:
    """``(K, N or 1, *E)`` directions and the divisor of their summed second derivatives."""
    rows, k, scale = _direction_rows(x, s, num_probes, distribution, generator)
    return rows(0, k), scale


# -- the two routes --------------------------------------------------------------------------------
def _nested(
    fn: Callable[[list[Tensor], list[Tensor]], Tensor],
    leaves: list[Tensor],
    x: Tensor,
    dirs: Tensor,
    groups: int,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(value, K first derivatives, G summed second derivatives) by ``vmap`` of ``jvp`` of ``jvp``
    (``chunk_size`` directions at a time)."""

    def f(z: Tensor) -> Tensor:
        return fn(leaves, [z])

    def both(v: Tensor) -> tuple[Tensor, Tensor]:
        out = jvp(lambda z: jvp(f, (z,), (v,))[1], (x,), (v,))
        return out[0], out[1]

    firsts, seconds = vmap(both, chunk_size=chunk_size)(dirs.expand(dirs.shape[0], *x.shape))
    k = dirs.shape[0]
    v2 = seconds.reshape(groups, k // groups, *seconds.shape[1:]).sum(1)
    return f(x), firsts, v2


# Default directions per collapsed pass. A pass holds at its peak about two first-order tangents
# of K directions (a layer's input and output) that are not streamed (collapsed.Plan.held), as
# nested AD over the points does; K / 4 directions per pass bring that to about half (the value
# and the summed second-order channel are recomputed per pass, a cost that only pays off when
# the tangents are not small). Streamed tangents (jet.Lazy) hold STREAM_BLOCK directions at a
# time, fewer when those would exceed SMALL_TANGENTS. Measured in benchmarks/RESULTS.md
# (bench_laplacian).
PASSES = 4
STREAM_BLOCK = 8
SMALL_TANGENTS = 256 << 10  # bytes of all K tangents of the widest intermediate: one pass


def _direction_step(
    tape: Tape, x: Tensor, k: int, m: int, chunk_size: int | None, split: bool, held: int = -1
) -> int:
    """Directions per pass, a multiple of the group size ``m``: ``chunk_size``, or by default
    all K when their tangents are small or ``split`` is off, else K / ``PASSES``, within the
    memory budget. ``held``: the widest value whose K tangents a pass holds whole
    (:attr:`secorder._engine.collapsed.Plan.held`; streamed and broadcast ones are not; -1:
    the widest value computed from the points)."""
    if chunk_size is None:
        held_bytes = max(1, tape.widest if held < 0 else held) * x.element_size()
        chunk_size = k if not split or k * held_bytes <= SMALL_TANGENTS else -(-k // PASSES)
        per_direction = max(1, tape.widest) * x.element_size()  # the budget: every tangent whole
        chunk_size = max(1, min(chunk_size, memory_budget() // (per_direction * ROW_OVERHEAD)))
    return min(k, max(m, chunk_size // m * m))


def _collapsed(
    tape: Tape,
    leaves: list[Tensor],
    x: Tensor,
    dirs: Tensor | tuple[_Rows, int],
    groups: int,
    info: PDEInfo,
    first_order: bool = False,
    chunk_size: int | None = None,
    split: bool = True,
    broadcast: bool = False,
    unit: bool = False,
    plans: dict[Any, Plan] | None = None,
    values: dict[tuple[int, str], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(value, K first derivatives or None unless ``first_order``, G summed second derivatives).

    The K directions go through in chunks (:func:`_direction_step`; ``split=False``: by default
    only as the memory budget requires); each chunk's second-order sums are added (one group,
    G = 1) or concatenated (G groups of m = K / G directions). ``dirs``: a ``(K, N or 1, *E)``
    tensor, or ``(rows, K)`` from :func:`_direction_rows` (asked for in consecutive slices);
    ``broadcast``: the directions are the same at every point (size 1 along the points);
    ``unit``: they are the rows of the identity, in order (the exact Laplacian's): a first
    linear layer then takes its tangent from its weight's rows (:attr:`secorder._engine.jet.Ctx.unit`);
    ``plans``: the tape's plans kept across calls (``static=True``), filled here; ``values``:
    recorded values of this call the pass takes instead of computing them
    (:func:`_reusable_values`)."""
    if isinstance(dirs, Tensor):
        t = dirs
        rows, k = (lambda start, stop: t[start:stop]), t.shape[0]
    else:
        rows, k = dirs
    m = 1 if groups == 1 else k // groups  # a chunk holds whole groups
    prepared = None if plans is None else plans.get((first_order, broadcast))
    if prepared is None:
        # Plan.held only sizes the default split into passes (_direction_step)
        sizes = (tape.numels or None) if split and chunk_size is None else None
        prepared = plan(tape, [0], first_order=first_order, numels=sizes, broadcast=broadcast)
        if plans is not None:
            plans[(first_order, broadcast)] = prepared
    step = _direction_step(tape, x, k, m, chunk_size, split, prepared.held)
    # a streamed tangent (jet.Lazy) holds a block of directions of one intermediate at a time:
    # blocks within SMALL_TANGENTS (at most STREAM_BLOCK directions); half that with directions
    # that differ per point (random probes), whose own (K, N, D) tangent and first-layer blocks
    # (computed twice) are alive next to the streamed ones; or an eighth of the K directions
    # when that is more (many directions: fewer, larger blocks, each op's fixed cost paid fewer
    # times, the streamed memory still an eighth of the whole tangent's)
    room = SMALL_TANGENTS if broadcast else SMALL_TANGENTS // 2
    fit = room // (max(1, tape.widest) * x.element_size())
    block = max(1, min(STREAM_BLOCK, max(fit, k // STREAM_BLOCK)))
    if not split and chunk_size is None:  # the biharmonic's levels: one pass, no streaming
        block = k
    memo: dict[tuple[int, str], Any] | None = {} if step < k else None  # kept across passes
    v0: Tensor | None = None
    v1s: list[Tensor] = []
    v2s: list[Tensor] = []
    for s in range(0, k, step):
        part = rows(s, min(s + step, k))
        g = 1 if groups == 1 else part.shape[0] // m
        ctx = _jet.Ctx(part.shape[0], g, memo=memo, block=block, seeded=values)
        if unit:
            ctx.unit, ctx.unit_start = part, s
        jet = _jet.Jet(x, part, None)
        out = evaluate(tape, leaves, [jet], ctx, first_order=first_order, prepared=prepared)
        for name, c in ctx.fallbacks.items():
            info.fallbacks[name] = info.fallbacks.get(name, 0) + c
        if not isinstance(out, _jet.Jet):  # the output does not depend on x
            return out, out.new_zeros(k, *out.shape), out.new_zeros(groups, *out.shape)
        out = out.full(ctx)
        v0 = out.v0
        if out.v1 is not None:
            v1s.append(out.d1)
        v2s.append(out.v2 if out.v2 is not None else out.v0.new_zeros(g, *out.v0.shape))
    assert v0 is not None
    v1 = (v1s[0] if len(v1s) == 1 else torch.cat(v1s)) if v1s else None
    if len(v2s) == 1:
        v2 = v2s[0]
    elif groups == 1:
        v2 = functools.reduce(torch.add, v2s)
    else:
        v2 = torch.cat(v2s)
    return v0, v1, v2


def _common_checks(call: str, u: object, argnums: object, num_probes: object, distribution: object,
                   with_stderr: object, chunk_size: object, static: object) -> None:  # fmt: skip
    check_callable(call, "u", u)
    check_bool(call, "static", static)
    check_argnums(call, argnums)
    probes = check_num_probes(call, num_probes)
    _probes.check_distribution(call, distribution)
    check_bool(call, "with_stderr", with_stderr)
    check_chunk_size(call, chunk_size)
    if with_stderr and (probes is not None and probes < 2):
        raise error(
            call,
            "a standard error needs at least 2 probes",
            f"num_probes={num_probes}",
            "Use num_probes >= 2, or with_stderr=False.",
        )


def _check_independent(call: str, tape: Tape, x: Tensor) -> None:
    """Refuse ``u`` whose output at a point depends on the other points of the batch (batch
    statistics, attention or a mean across points): one pass over the batch would mix the
    points' derivatives. Proved on the tape, with no check on values: the per-sample analysis
    of :mod:`secorder._engine.batch` propagates the points' batch axis through every op that
    depends on them (each op's batch rule from the one registry) and names the first op that
    mixes them. Needs the recorded values (their shapes)."""
    if x.shape[0] < 2 or tape.output is None:
        return
    assert tape.values is not None
    try:
        analyze(tape, tape.values, (), x.shape[0], batched_output=True, inputs=True)
    except BatchAxisError as exc:
        raise error(
            call,
            "u must treat the points independently (output n depends on x[n] only), as "
            "torch.func.vmap over points would",
            f"a function that mixes the points: {exc.args[0]}",
            "Put the model in eval mode (no batch statistics), or compute per point: "
            "torch.func.vmap(lambda xn: u(params, xn[None])[0]) inside u.",
        ) from None


def _stderr(v2: Tensor, per_group: int) -> Tensor:
    """Standard error of the mean of the G per-group estimates ``v2 / per_group``."""
    g = v2.shape[0]
    return (v2 / per_group).std(0, correction=1) / g**0.5


def laplacian(
    u: Callable[..., Any],
    /,
    *,
    argnums: int = 1,
    num_probes: int | None = None,
    distribution: str = "rademacher",
    weighting: Tensor | None = None,
    weighting_factor: Tensor | None = None,
    with_stderr: bool = False,
    return_derivatives: bool = False,
    chunk_size: int | None = None,
    static: bool = False,
) -> Callable[..., Any]:
    """Transform ``u`` into a function returning the Laplacian Δu = tr ∇²ₓu at every point of a batch.

    ``x = args[argnums]`` holds N points, shape ``(N, *E)`` with D = prod(E) coordinates;
    ``u(*args)`` returns ``(N, *O)`` (one value, or one vector of values, per point). Then

    * exact (default): Δu(x_n) = Σ_d ∂²u/∂x_d² from D unit directions in one collapsed pass;
    * ``weighting=C`` (``(D, D)`` symmetric positive semi-definite, or per point ``(N, D, D)``)
      or ``weighting_factor=S`` (``(D, r)`` or ``(N, D, r)``, C = S Sᵀ): tr(C ∇²ₓu) =
      Σ_j s_jᵀ ∇²u s_j over the r columns of S (anisotropic diffusion);
    * ``num_probes=K``: Hutchinson per point, (1/K) Σ_k v_kᵀ ∇²u v_k with independent probes
      per point from ``generator`` (unbiased since E[v vᵀ] = I, or C with a weighting: v = S z).

    Cost: one forward pass carrying K (= D, r or ``num_probes``) directional derivatives per
    point and one summed second-order channel (``with_stderr=True``: one per probe).

    Args:
        u: a function of ``*args`` returning per-point outputs ``(N, *O)``.
        argnums: which positional argument of ``u`` holds the points (default 1, as in
            ``u(params, x)``).
        num_probes: ``None`` for the exact trace, or the number K of random probes per point.
        distribution: ``"rademacher"`` (default, lowest variance) or ``"gaussian"`` probes.
        weighting: the matrix C of tr(C ∇²u) (``None``: the identity, Δu).
        weighting_factor: a factor S of C = S Sᵀ instead of C (r columns: r directions).
        with_stderr: also return per-point standard errors of the estimate (zeros if exact).
        return_derivatives: also return the value u and the gradient ∇ₓu (shape ``(N, *O, *E)``),
            as PDE residuals need them.
        chunk_size: directions per collapsed pass (of the K above), their second-order sums
            added; bounds the first-order tangents to ``chunk_size`` per point and intermediate.
            ``None``: all K when the tangents a pass holds whole are small (256 KiB for the
            widest such intermediate; tangents with one consumer are streamed a block of
            directions at a time and not counted), else K / 4 per pass (about half the peak
            memory of one pass), within :func:`secorder.set_memory_budget`.
        static: opt in to keeping the recorded tape across calls (a training loop calls with
            the same shapes every step): the first call records ``u`` and proves the points
            independent as usual; later calls whose arguments match it in pytree structure,
            tensor shapes, strides, dtypes and devices and the values of non-tensor arguments
            replay that tape (the parameters' and points' current values flow through it;
            ``method_info.replayed``). Only for a ``u`` whose ops depend on nothing else:
            a tape with ops that read values into Python (``.item()``, ``bool(t)``,
            ``nonzero``, …) is recorded at every call, but values read around ATen (``.numpy()``)
            and state outside the arguments are not seen; tensors read from outside the
            arguments are captured by reference (in-place updates are seen, a rebound name is
            not). Saves the recording (about 0.3-0.5 ms per call on a small MLP; the proof and
            the plans, which read the tape's structure only, are kept per structure without it).

    Returns:
        ``lap_fn(*args, generator=None)`` returning Δu of shape ``(N, *O)``; with
        ``with_stderr`` ``(Δu, stderr)``; with ``return_derivatives`` ``(u, ∇ₓu, Δu)`` (and the
        stderr last). Differentiable in every other argument (``torch.func.grad``,
        ``backward``); composes with ``torch.func.vmap`` over parameters by the nested route.
        ``lap_fn.method_info`` (a :class:`PDEInfo`) says how the last call ran.

    Raises:
        ValueError, TypeError: invalid options (at construction) or arguments (at call); a
            ``u`` whose output at a point depends on the other points (proved on the tape:
            the message names the op that mixes them).

    Example:
        >>> import torch
        >>> u = lambda a, x: (a * x**2).sum(-1) + x[:, 0] * x[:, 1]   # Δu = 2 Σ a
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
        >>> laplacian(u)(torch.tensor([1.0, 2.0, 3.0]), x)
        tensor([12., 12.])
        >>> q = lambda a, x: (a * x**2).sum(-1)  # diagonal Hessian: Rademacher is exact
        >>> gen = torch.Generator().manual_seed(0)
        >>> laplacian(q, num_probes=3)(torch.ones(3), x, generator=gen)
        tensor([6., 6.])
        >>> laplacian(u, weighting=torch.diag(torch.tensor([1.0, 0.0, 0.0])))(torch.ones(3), x)
        tensor([2., 2.])

    See Also:
        :func:`biharmonic`, :func:`secorder.hessian_trace` (traces in the parameters).

    References:
        F. Dangel, T. Siebert, M. Zeinhofer, A. Walther (2025), *Collapsing Taylor Mode Automatic
        Differentiation*, NeurIPS. M. F. Hutchinson (1989).
    """
    call = "laplacian(u)(*args)"
    _common_checks(call, u, argnums, num_probes, distribution, with_stderr, chunk_size, static)
    check_bool(call, "return_derivatives", return_derivatives)
    tapes = _Tapes()
    _check_weighting(call, weighting, weighting_factor)

    @functools.wraps(u)
    def lap_fn(*args: Any, generator: torch.Generator | None = None) -> Any:
        fn, leaves, x = _bind(call, u, args, argnums)
        gen = _probes.check_generator(call, generator, x.device)
        s = _factor(call, x, weighting, weighting_factor)
        rows, k, scale = _direction_rows(x, s, num_probes, distribution, gen)
        groups = k if with_stderr and num_probes is not None else 1
        exact_unit = num_probes is None and s is None  # the first-order channel is ∇ₓu
        info = PDEInfo("collapsed")
        key = _signature(args) if static else None
        kept = tapes.get(key)  # (the tape, its plans)
        tape: Tape | None = None
        why: str | None = None
        plans: dict[Any, Plan] | None = None
        reuse: dict[tuple[int, str], Tensor] | None = None
        if kept is not None:
            tape, plans, info.replayed = kept[0], kept[1], True
        else:
            # the plans depend on the tape's structure and (split into passes) on chunk_size
            tape, why, reuse, derived = _record(fn, leaves, x, call, ("laplacian", chunk_size))
            plans = None if derived is None else derived.plans
            if tape is not None and _replayable(tape):
                plans = {} if plans is None else plans
                tapes.put(key, (tape, plans))
        v1: Tensor | None
        if tape is None:
            info = PDEInfo("nested", why)
            v0, v1, v2 = _nested(fn, leaves, x, rows(0, k), groups, chunk_size)
        else:
            want_v1 = return_derivatives and exact_unit
            same = num_probes is None and (s is None or s.shape[0] == 1)  # unit directions or one S
            v0, v1, v2 = _collapsed(
                tape, leaves, x, (rows, k), groups, info, want_v1, chunk_size, broadcast=same,
                unit=exact_unit, plans=plans, values=reuse,
            )  # fmt: skip
        lap = v2.sum(0) / scale
        check_finite_result(
            call,
            "Laplacian",
            lap,
            fix="The points and parameters were finite: u overflowed or has a singular point there "
            "(a log or division at 0); compute in float64, or check u.",
        )
        out: tuple[Tensor, ...] = (lap,)
        if return_derivatives:
            if exact_unit:
                assert v1 is not None
                grad = v1.movedim(0, -1).reshape(*v0.shape, *x.shape[1:])
            else:  # the directions are not the unit vectors: D forward-mode products
                eye, _ = _directions(x, None, None, distribution, None)
                eye = eye.expand(eye.shape[0], *x.shape)
                first = vmap(lambda v: jvp(lambda z: fn(leaves, [z]), (x,), (v,))[1], chunk_size=chunk_size)(
                    eye
                )
                grad = first.movedim(0, -1).reshape(*v0.shape, *x.shape[1:])
            out = (v0, grad, lap)
        if with_stderr:
            out = (*out, _stderr(v2, scale // groups) if groups > 1 else torch.zeros_like(lap))
        lap_fn.method_info = info  # type: ignore[attr-defined]
        return out[0] if len(out) == 1 else out

    lap_fn.method_info = None  # type: ignore[attr-defined]
    return lap_fn


def biharmonic(
    u: Callable[..., Any],
    /,
    *,
    argnums: int = 1,
    num_probes: int | None = None,
    distribution: str = "rademacher",
    with_stderr: bool = False,
    chunk_size: int | None = None,
    static: bool = False,
) -> Callable[..., Any]:
    """Transform ``u`` into a function returning the biharmonic Δ²u = Σ_{i,j} ∂⁴u/∂x_i²∂x_j² per point.

    Δ²u = Δ(Δu): the collapsed Laplacian of ``u`` is itself a composition of ATen ops, so it is
    a tape (recorded for the first tape of u of a structure, then filled in from a template with
    each call's constants: its ops depend on the structure of u's tape only) and collapsed Taylor
    mode runs over it again (D unit directions at each
    level, cost about D² of ``u``'s forward pass, against D⁴-ish nested AD).
    With ``num_probes=K``: E over independent probe sets v, w of (w·∇)²(v·∇)²u is Δ²u, estimated
    from K inner and K outer probes per point (all K² pairs); the standard error treats the
    row and column means of the K×K pair estimates as the two independent sources of noise.

    Args:
        u: a function of ``*args`` returning per-point outputs ``(N, *O)``.
        argnums: which positional argument of ``u`` holds the points ``(N, *E)``.
        num_probes: ``None`` for the exact value, or K probes per point at each level.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        with_stderr: also return per-point standard errors (zeros if exact).
        chunk_size: directions per collapsed pass at each level (``None``: all, within
            :func:`secorder.set_memory_budget`; passes at the inner level repeat at the outer).
        static: opt in to keeping the recorded tape across calls (a training loop calls with
            the same shapes every step): the first call records ``u`` and proves the points
            independent as usual; later calls whose arguments match it in pytree structure,
            tensor shapes, strides, dtypes and devices and the values of non-tensor arguments
            replay that tape (the parameters' and points' current values flow through it;
            ``method_info.replayed``). Only for a ``u`` whose ops depend on nothing else:
            a tape with ops that read values into Python (``.item()``, ``bool(t)``,
            ``nonzero``, …) is recorded at every call, but values read around ATen (``.numpy()``)
            and state outside the arguments are not seen; tensors read from outside the
            arguments are captured by reference (in-place updates are seen, a rebound name is
            not). Saves the recording of u (about 0.5 ms per call on a small MLP); here both
            levels' tapes when exact (random probes are constants of the Laplacian's tape: with
            probes only u's tape is kept; without ``static`` the outer tape is filled in from
            the template of u's tape's structure, not recorded again).

    Returns:
        ``bih_fn(*args, generator=None)`` returning Δ²u of shape ``(N, *O)`` (``(Δ²u, stderr)``
        with ``with_stderr``), differentiable in the other arguments; ``bih_fn.method_info``
        says how the last call ran.

    Raises:
        ValueError, TypeError: invalid options or arguments; a ``u`` that mixes the points.

    Example:
        >>> import torch
        >>> u = lambda c, x: c * (x**2).sum(-1) ** 2          # Δ²|x|⁴ = 8 D (D + 2)
        >>> biharmonic(u)(torch.tensor(1.0), torch.zeros(2, 3))
        tensor([120., 120.])

    See Also:
        :func:`laplacian`.
    """
    call = "biharmonic(u)(*args)"
    _common_checks(call, u, argnums, num_probes, distribution, with_stderr, chunk_size, static)
    tapes = _Tapes()

    @functools.wraps(u)
    def bih_fn(*args: Any, generator: torch.Generator | None = None) -> Any:
        fn, leaves, x = _bind(call, u, args, argnums)
        gen = _probes.check_generator(call, generator, x.device)
        inner, scale_in = _directions(x, None, num_probes, distribution, gen)
        outer, scale_out = _directions(x, None, num_probes, distribution, gen)
        stoch = with_stderr and num_probes is not None
        g_in = inner.shape[0] if stoch else 1
        g_out = outer.shape[0] if stoch else 1
        info = PDEInfo("collapsed")
        key = _signature(args) if static else None
        # (u's tape, the tape of its collapsed Laplacian (exact only), the inner level's
        # fallbacks, the plans of the two tapes)
        kept = tapes.get(key)
        # the options the outer tape depends on besides u's tape (see _DERIVED)
        structure = (
            "biharmonic", tuple(inner.shape), inner.stride(), inner.dtype, inner.device,
            num_probes is None, g_in, chunk_size, memory_budget(),
        )  # fmt: skip
        derived: _Derived | None = None
        if kept is not None:
            tape, why = kept[0], None
        else:
            tape, why, _, derived = _record(fn, leaves, x, call, structure)
        tape2: Tape | None = None
        plans: tuple[dict[Any, Plan], dict[Any, Plan]] = (
            kept[3] if kept else derived.plans if derived is not None else {},
            {},
        )
        info.replayed = kept is not None
        if kept is not None and kept[1] is not None:
            tape2, plans = kept[1], (kept[3], kept[4])  # the plans of this very tape2
            info.fallbacks.update(kept[2])

        def lap(ls: list[Tensor], ins: list[Tensor]) -> Tensor:
            if tape is None:
                return _nested(fn, ls, ins[0], inner, g_in, chunk_size)[2]
            # recorded as tape2: a walk of u's recorded ATen ops and jet arithmetic, nothing for
            # the recorder's kernel substitutions (decomposed_kernels) to intercept per torch call
            with plain_kernels():
                return _collapsed(
                    tape, ls, ins[0], inner, g_in, info, chunk_size=chunk_size, split=False,
                    broadcast=inner.shape[1] == 1, unit=num_probes is None, plans=plans[0],
                )[2]  # fmt: skip

        v2: Tensor | None = None
        reuse: dict[tuple[int, str], Tensor] | None = None
        if tape is not None:
            if tape2 is None:
                level = None if derived is None else derived.level
                if level is not None:  # u's tape has the structure of one seen before
                    tape2 = _instantiate(level, tape, inner)
                if level is not None and tape2 is not None:
                    plans = (plans[0], level.plans)
                    info.fallbacks.update(level.fallbacks)
                else:
                    # the recording runs the inner level (plain values: u's recorded values
                    # would be baked into this tape as constants); the outer level may take
                    # its values
                    tape2, why2, reuse, _ = _record(lap, leaves, x)
                    if tape2 is not None and derived is not None:
                        derived.level = level = _template(tape2, tape, inner, info.fallbacks)
                        if level is not None:
                            plans = (plans[0], level.plans)
                            weight = len(tape.nodes) + tape.num_values + len(tape2.nodes) + tape2.num_values
                            _DERIVED.put(derived.key, derived, weight)  # counted with its template
                if kept is None and _replayable(tape):
                    exact = tape2 is not None and num_probes is None and _replayable(tape2)
                    kept2 = tape2 if exact else None
                    tapes.put(key, (tape, kept2, dict(info.fallbacks), plans[0], plans[1] if exact else {}))
            if tape2 is not None:
                v2 = _collapsed(
                    tape2, leaves, x, outer, g_out, info, chunk_size=chunk_size, split=False,
                    broadcast=outer.shape[1] == 1, unit=num_probes is None, plans=plans[1],
                    values=reuse,
                )[2]  # fmt: skip
            else:
                why = why2
        if v2 is None:
            info = PDEInfo("nested", why)
            v2 = _nested(lap, leaves, x, outer, g_out, chunk_size)[2]
        # v2: (g_out, g_in, *O): sums over the directions of each group at both levels
        res = v2.sum((0, 1)) / (scale_out * scale_in)
        check_finite_result(
            call,
            "biharmonic",
            res,
            fix="The points and parameters were finite: u overflowed or has a singular point there; "
            "compute in float64, or check u.",
        )
        bih_fn.method_info = info  # type: ignore[attr-defined]
        if not with_stderr:
            return res
        if not stoch:
            return res, torch.zeros_like(res)
        rows, cols = v2.mean(1), v2.mean(0)
        return res, (rows.var(0) / rows.shape[0] + cols.var(0) / cols.shape[0]).sqrt()

    bih_fn.method_info = None  # type: ignore[attr-defined]
    return bih_fn

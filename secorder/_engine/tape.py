"""A tape of the ATen operations of one evaluation of a scalar function of parameter leaves.

:func:`record` runs ``fn(leaves)`` once under a ``TorchDispatchMode`` and keeps, in order,
every ATen operation it dispatched (after autograd's decompositions: ``F.linear`` arrives as
``t`` + ``addmm``, ``F.cross_entropy`` as ``_log_softmax`` + ``nll_loss_forward``), with its
tensor arguments replaced by references to earlier values: a parameter leaf, an earlier op's
output, or a constant tensor captured by reference. The tape is exact *for this evaluation*:
Python control flow and data-dependent branches are recorded as taken, which is all a
Hessian at this point needs.

A tape is refused (:class:`TapeUnsupportedError`) when replaying it could differ from the
function: random ops (their draws would change), ``out=`` ops, and in-place ops on a recorded
tensor whose storage another recorded tensor shares (a view would see the mutation). An
in-place op on an unaliased tensor is recorded as its out-of-place twin.

Per-sample data can be tape *inputs* too (``record(fn, leaves, inputs)`` calls
``fn(leaves, inputs)``): values indices are then leaves, inputs, op outputs, and the tape of one
sample replays for every sample (e.g. under ``torch.func.vmap``). Such a tape is refused when
its recorded Python control flow may depend on the data (``.item()``, ``bool(t)``,
``nonzero`` and other data-dependent scalars or shapes of a value computed from an input): the
replay would silently take the recorded sample's branch for every sample.

No ``torch.fx``/``make_fx`` on purpose: recording costs one forward pass and imports nothing
(``make_fx`` imports Dynamo on first use, about 1.5 s).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from secorder._kernels import decomposed_kernels, with_plain_kernels

__all__ = [
    "Ref",
    "Tape",
    "TapeNode",
    "TapeUnsupportedError",
    "paths",
    "record",
    "refs_in",
    "replace_at",
    "resolve",
]


class TapeUnsupportedError(Exception):
    """The function cannot be recorded faithfully (``args[0]`` says why)."""


@dataclass(frozen=True)
class Ref:
    """A reference to tape value ``index`` (leaves first, then op outputs in order)."""

    index: int


@dataclass
class TapeNode:
    func: Any  # an OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[int | None]  # value index of each output (None: not a tensor)
    multi: bool  # the op returned a tuple/list
    _paths: Any = field(default=None, repr=False, compare=False)

    def arg_paths(self) -> list[tuple[tuple[Any, ...], Ref]]:
        """``paths((args, kwargs))``, computed once per node (the walks ask for it per chunk)."""
        if self._paths is None:
            self._paths = paths((self.args, self.kwargs))
        return self._paths


@dataclass
class Tape:
    num_leaves: int
    nodes: list[TapeNode]
    output: Ref | None  # None: the result does not depend on the leaves' tape at all
    result: Tensor
    num_values: int
    depends: list[bool] = field(default_factory=list)  # per value: depends on a leaf
    num_inputs: int = 0  # data inputs, value indices num_leaves .. num_leaves + num_inputs - 1
    values: list[Any] | None = None  # the recorded values (None when an in-place op rewrote one)
    widest: int = 0  # the most elements of a floating value computed from the inputs (sizes tangents)
    numels: list[int] = field(default_factory=list)  # per value: elements if floating, else 0
    extra: Any = None  # what record(adjoints=...) returned (e.g. the adjoints of the recorded values)

    def replay(
        self,
        leaves: Sequence[Tensor],
        inputs: Sequence[Tensor] = (),
        perturb: dict[int, Tensor] | None = None,
    ) -> list[Any]:
        """Run the tape at ``leaves`` (and data ``inputs``); returns every value (leaves,
        inputs, then op outputs). ``perturb`` adds a tensor to the output values it names
        (a zero perturbation differentiated gives that value's adjoint)."""
        values: list[Any] = [None] * self.num_values
        values[: self.num_leaves] = list(leaves)
        values[self.num_leaves : self.num_leaves + self.num_inputs] = list(inputs)
        for node in self.nodes:
            out = node.func(*resolve(node.args, values), **resolve(node.kwargs, values))
            outs = list(out) if node.multi else [out]
            for idx, o in zip(node.outputs, outs):
                if idx is not None:
                    values[idx] = o + perturb[idx] if perturb and idx in perturb else o
        return values


def resolve(obj: Any, values: Sequence[Any]) -> Any:
    """Replace every :class:`Ref` in a nested args structure by ``values[ref.index]``."""
    if isinstance(obj, Ref):
        return values[obj.index]
    if isinstance(obj, (list, tuple)):
        return type(obj)(resolve(o, values) for o in obj)
    if isinstance(obj, dict):
        return {k: resolve(v, values) for k, v in obj.items()}
    return obj


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Ref]]:
    """Every :class:`Ref` in a nested args structure with its path (list indices, dict keys)."""
    if isinstance(obj, Ref):
        return [(prefix, obj)]
    if isinstance(obj, (list, tuple)):
        return [p for i, o in enumerate(obj) for p in paths(o, (*prefix, i))]
    if isinstance(obj, dict):
        return [p for k, o in obj.items() for p in paths(o, (*prefix, k))]
    return []


def replace_at(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of a nested args structure with the entry at ``path`` replaced by ``value``."""
    if not path:
        return value
    if isinstance(obj, dict):
        return {**obj, path[0]: replace_at(obj[path[0]], path[1:], value)}
    items = list(obj)
    items[path[0]] = replace_at(items[path[0]], path[1:], value)
    return type(obj)(items)


def refs_in(obj: Any) -> list[Ref]:
    """Every :class:`Ref` in a nested args structure, in order."""
    if isinstance(obj, Ref):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [r for o in obj for r in refs_in(o)]
    if isinstance(obj, dict):
        return [r for v in obj.values() for r in refs_in(v)]
    return []


def _functional_twin(func: Any) -> Any:
    """``aten.relu_.default`` → ``aten.relu.default`` (None if there is none)."""
    packet = func._schema.name.split("::")[-1]
    if not packet.endswith("_"):
        return None
    twin = getattr(torch.ops.aten, packet[:-1], None)
    overload = func._overloadname
    return None if twin is None else getattr(twin, overload, None)


_FLAGS: dict[Any, tuple[bool, bool, bool, bool]] = {}  # op overload → its flags, looked up once per op


def _flags(func: Any) -> tuple[bool, bool, bool, bool]:
    """(random, mutable, stops the derivative, data-dependent) of an op overload."""
    flags = _FLAGS.get(func)
    if flags is None:
        flags = _FLAGS[func] = (
            torch.Tag.nondeterministic_seeded in func.tags,
            bool(func._schema.is_mutable),
            func in _STOPS,
            func in _DATA_DEPENDENT,
        )
    return flags


class _Recorder(TorchDispatchMode):
    """Records every dispatched op as a :class:`TapeNode`, and per value (as it is created) whether
    it depends on a leaf (``depends``), is computed from the data inputs (``on_data``) and its
    element count if floating (``numels``): one pass, no post-pass over the tape.

    ``num_leaves``/``num_inputs``: the first values (leaves, then data inputs)."""

    def __init__(self, leaves: Sequence[Tensor], num_leaves: int | None = None) -> None:
        super().__init__()
        num_leaves = len(leaves) if num_leaves is None else num_leaves
        self.ids: dict[int, int] = {id(t): i for i, t in enumerate(leaves)}
        self.keep: list[Tensor] = list(leaves)  # keeps recorded tensors alive (stable ids)
        # storage pointer → number of recorded tensors on it; counted lazily (only an in-place op
        # on a recorded tensor asks), over ``keep[:counted]``
        self.storages: dict[int, int] = {}
        self.counted = 0
        self.nodes: list[TapeNode] = []
        self.num_values = len(leaves)
        self.problem: str | None = None
        self.data_problem: str | None = None  # a data-dependent op on a value computed from the inputs
        self.values: list[Any] = list(leaves)
        self.rewritten = False
        self.refs: dict[int, Ref] = {}  # value index → its Ref (one object per value)
        self.depends = [i < num_leaves for i in range(len(leaves))]
        self.on_data = [i >= num_leaves for i in range(len(leaves))]
        self.numels = [t.numel() if t.is_floating_point() else 0 for t in leaves]

    def _count_storage(self, t: Tensor) -> None:
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - storage-less tensors
            return
        self.storages[key] = self.storages.get(key, 0) + 1

    def _shared(self, t: Tensor) -> bool:
        """Whether another recorded tensor shares ``t``'s storage (a view would see a mutation)."""
        for u in self.keep[self.counted :]:
            self._count_storage(u)
        self.counted = len(self.keep)
        return self.storages.get(t.untyped_storage().data_ptr(), 0) > 1

    def _ref_of(self, t: Tensor, path: tuple[Any, ...], found: list[tuple[tuple[Any, ...], Ref]]) -> Any:
        idx = self.ids.get(id(t))
        if idx is None:
            return t  # a constant, captured by reference
        r = self.refs.get(idx)
        if r is None:
            r = self.refs[idx] = Ref(idx)
        found.append((path, r))
        return r

    def _ref(self, obj: Any, path: tuple[Any, ...], found: list[tuple[tuple[Any, ...], Ref]]) -> Any:
        """``obj`` with recorded tensors replaced by Refs; each Ref with its path into ``found``
        (the order of :func:`paths`)."""
        if isinstance(obj, Tensor):
            return self._ref_of(obj, path, found)
        if isinstance(obj, (list, tuple)):
            return type(obj)([self._ref(o, (*path, k), found) for k, o in enumerate(obj)])
        if isinstance(obj, dict):  # tensor keyword arguments are tape values too
            return {k: self._ref(v, (*path, k), found) for k, v in obj.items()}
        return obj

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.problem is not None:
            return out
        random, mutable, stop, data_dependent = _flags(func)
        if random:
            self.problem = f"the random op {func} (a replay would draw new numbers)"
            return out
        if "out" in kwargs:
            self.problem = f"{func} with out="
            return out
        found: list[tuple[tuple[Any, ...], Ref]] = []
        ref_of, ref = self._ref_of, self._ref
        rargs = tuple(
            [
                ref_of(a, (0, k), found)
                if isinstance(a, Tensor)
                else ref(a, (0, k), found)
                if isinstance(a, (list, tuple, dict))
                else a
                for k, a in enumerate(args)
            ]
        )
        rkwargs = {k: ref(v, (1, k), found) for k, v in kwargs.items()} if kwargs else {}
        depends, on_data = self.depends, self.on_data
        dep = data_dep = False
        for _, r in found:
            dep = dep or depends[r.index]
            data_dep = data_dep or on_data[r.index]
        dep = dep and not stop
        if data_dep and data_dependent and self.data_problem is None:
            self.data_problem = (
                f"{func} on a value computed from the per-sample data (Python control flow "
                "or a shape that depends on the data: replaying one sample's tape for every sample "
                "would take that sample's branch)"
            )
        if mutable:
            schema = func._schema
            mutated = [
                a
                for a, arg in zip(args, schema.arguments)
                if arg.alias_info is not None and arg.alias_info.is_write
            ]
            recorded = [t for t in mutated if isinstance(t, Tensor) and id(t) in self.ids]
            if not recorded:  # an in-place op on a fresh buffer or a constant: replay as is
                pass
            else:
                twin = _functional_twin(func)
                t = recorded[0]
                if twin is None or len(recorded) > 1 or mutated[0] is not args[0] or self._shared(t):
                    self.problem = f"the in-place op {func} on a tensor other recorded tensors may alias"
                    return out
                idx = self.num_values
                self.num_values += 1
                node = TapeNode(twin, rargs, rkwargs, [idx], False)
                node._paths = found
                self.nodes.append(node)
                self.ids[id(t)] = idx  # later uses of this tensor see the new value
                self.values.append(t)
                depends.append(dep)
                on_data.append(data_dep)
                self.numels.append(t.numel() if t.is_floating_point() else 0)
                self.rewritten = True  # the tensor of the earlier value now holds the new one
                return out
        multi = isinstance(out, (tuple, list))
        outs = out if multi else (out,)
        indices: list[int | None] = []
        for o in outs:
            if isinstance(o, Tensor):
                idx = self.num_values
                self.ids[id(o)] = idx
                self.keep.append(o)
                indices.append(idx)
                self.num_values += 1
                self.values.append(o)
                depends.append(dep)
                on_data.append(data_dep)
                self.numels.append(o.numel() if o.is_floating_point() else 0)
            else:
                indices.append(None)
        node = TapeNode(func, rargs, rkwargs, indices, multi)
        node._paths = found
        self.nodes.append(node)
        return out


_STOPS = frozenset({torch.ops.aten.detach.default})  # outputs carry no derivative


def _data_dependent_ops() -> frozenset[Any]:
    """Ops whose Python-visible result (a scalar, a bool or an output shape) depends on values."""
    names = [
        ("_local_scalar_dense", "default"), ("is_nonzero", "default"), ("equal", "default"),
        ("nonzero", "default"), ("masked_select", "default"), ("_unique2", "default"),
        ("unique_dim", "default"), ("unique_consecutive", "default"), ("bincount", "default"),
        ("repeat_interleave", "Tensor"), ("allclose", "default"),
    ]  # fmt: skip
    ops = []
    for packet, overload in names:
        op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
        if op is not None:
            ops.append(op)
    return frozenset(ops)


_DATA_DEPENDENT = _data_dependent_ops()


@with_plain_kernels  # the bookkeeping is secorder's own; the evaluation enters the kernels again
def record(
    fn: Callable[..., Tensor],
    leaves: Sequence[Tensor],
    inputs: Sequence[Tensor] | None = None,
    *,
    adjoints: Callable[[Tape], Any] | None = None,
) -> Tape:
    """Record one evaluation of ``fn(leaves)``, or ``fn(leaves, inputs)`` when data ``inputs``
    are given (no autograd graph is built, unless ``adjoints`` asks for one).

    Args:
        adjoints: evaluate with autograd on (leaves requiring grad) and call ``adjoints(tape)``
            while the recorded values still hold the graph (e.g. ``torch.autograd.grad`` of
            the result with respect to recorded values: every adjoint from this one forward
            pass, no replay); the recorded values are detached afterwards and the callback's
            return value is kept as ``tape.extra``. Not called when an in-place op rewrote a
            recorded value (``tape.values`` is None then).

    Raises:
        TapeUnsupportedError: the evaluation cannot be replayed faithfully (for a tape with
            inputs also: Python control flow or shapes that may depend on the inputs' values).
    """
    grad = adjoints is not None
    leaves = [leaf.detach().requires_grad_(grad) if grad else leaf.detach() for leaf in leaves]
    data = [] if inputs is None else [x.detach() for x in inputs]
    rec = _Recorder([*leaves, *data], len(leaves))
    try:
        with decomposed_kernels(), torch.set_grad_enabled(grad), rec:
            result = fn(leaves) if inputs is None else fn(leaves, data)
    except TapeUnsupportedError:  # pragma: no cover - not raised inside
        raise
    except Exception as exc:
        raise TapeUnsupportedError(f"recording failed: {type(exc).__name__}: {exc}") from exc
    if rec.problem is not None:
        raise TapeUnsupportedError(rec.problem)
    if not isinstance(result, Tensor):
        raise TapeUnsupportedError("the function did not return a tensor")
    idx = rec.ids.get(id(result))
    if rec.data_problem is not None:
        raise TapeUnsupportedError(rec.data_problem)
    numels = rec.numels
    on_data = rec.on_data
    widest = max((n for n, d in zip(numels, on_data) if d), default=0)
    tape = Tape(
        len(leaves),
        rec.nodes,
        None if idx is None else Ref(idx),
        result,
        rec.num_values,
        rec.depends,
        len(data),
        None if rec.rewritten else rec.values,
        widest,
        numels,
    )
    if grad:
        if tape.values is not None:
            tape.extra = adjoints(tape)  # type: ignore[misc]
            tape.values = [v.detach() if isinstance(v, Tensor) else v for v in tape.values]
        tape.result = result.detach()
    return tape

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


_FLAGS: dict[Any, tuple[bool, bool]] = {}  # op overload → (random, mutable), looked up once per op


def _flags(func: Any) -> tuple[bool, bool]:
    flags = _FLAGS.get(func)
    if flags is None:
        flags = _FLAGS[func] = (torch.Tag.nondeterministic_seeded in func.tags, bool(func._schema.is_mutable))
    return flags


class _Recorder(TorchDispatchMode):
    def __init__(self, leaves: Sequence[Tensor]) -> None:
        super().__init__()
        self.ids: dict[int, int] = {id(t): i for i, t in enumerate(leaves)}
        self.keep: list[Tensor] = list(leaves)  # keeps recorded tensors alive (stable ids)
        self.storages: dict[int, int] = {}  # storage pointer → number of recorded tensors on it
        for t in leaves:
            self._count_storage(t)
        self.nodes: list[TapeNode] = []
        self.num_values = len(leaves)
        self.problem: str | None = None
        self.values: list[Any] = list(leaves)
        self.rewritten = False

    def _count_storage(self, t: Tensor) -> None:
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - storage-less tensors
            return
        self.storages[key] = self.storages.get(key, 0) + 1

    def _ref(self, obj: Any) -> Any:
        if isinstance(obj, Tensor):
            idx = self.ids.get(id(obj))
            return obj if idx is None else Ref(idx)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._ref(o) for o in obj)
        if isinstance(obj, dict):  # tensor keyword arguments are tape values too
            return {k: self._ref(v) for k, v in obj.items()}
        return obj

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.problem is not None:
            return out
        random, mutable = _flags(func)
        if random:
            self.problem = f"the random op {func} (a replay would draw new numbers)"
            return out
        if "out" in kwargs:
            self.problem = f"{func} with out="
            return out
        rargs, rkwargs = self._ref(tuple(args)), self._ref(kwargs) if kwargs else {}
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
                shared = self.storages.get(t.untyped_storage().data_ptr(), 0) > 1
                if twin is None or len(recorded) > 1 or shared or mutated[0] is not args[0]:
                    self.problem = f"the in-place op {func} on a tensor other recorded tensors may alias"
                    return out
                idx = self.num_values
                self.num_values += 1
                self.nodes.append(TapeNode(twin, rargs, rkwargs, [idx], False))
                self.ids[id(t)] = idx  # later uses of this tensor see the new value
                self.values.append(t)
                self.rewritten = True  # the tensor of the earlier value now holds the new one
                return out
        multi = isinstance(out, (tuple, list))
        outs = list(out) if multi else [out]
        indices: list[int | None] = []
        for o in outs:
            if isinstance(o, Tensor):
                self.ids[id(o)] = self.num_values
                self.keep.append(o)
                self._count_storage(o)
                indices.append(self.num_values)
                self.num_values += 1
                self.values.append(o)
            else:
                indices.append(None)
        self.nodes.append(TapeNode(func, rargs, rkwargs, indices, multi))
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
    rec = _Recorder([*leaves, *data])
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
    depends = [False] * rec.num_values
    depends[: len(leaves)] = [True] * len(leaves)
    on_data = [False] * rec.num_values
    on_data[len(leaves) : len(leaves) + len(data)] = [True] * len(data)
    for node in rec.nodes:
        refs = [r for _, r in node.arg_paths()]
        dep = node.func not in _STOPS and any(depends[r.index] for r in refs)
        data_dep = any(on_data[r.index] for r in refs)
        if data_dep and node.func in _DATA_DEPENDENT:
            raise TapeUnsupportedError(
                f"{node.func} on a value computed from the per-sample data (Python control flow "
                "or a shape that depends on the data: replaying one sample's tape for every sample "
                "would take that sample's branch)"
            )
        for o in node.outputs:
            if o is not None:
                depends[o] = dep
                on_data[o] = data_dep
    sizes = {rec.ids[id(t)]: t.numel() for t in rec.keep if t.is_floating_point()}
    widest = max((n for i, n in sizes.items() if on_data[i]), default=0)
    numels = [0] * rec.num_values
    for i, n in sizes.items():
        numels[i] = n
    tape = Tape(
        len(leaves),
        rec.nodes,
        None if idx is None else Ref(idx),
        result,
        rec.num_values,
        depends,
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

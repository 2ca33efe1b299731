"""A bounded cache of analysis results keyed by a structural fingerprint of a tape.

The per-sample proof (:func:`secorder._engine.batch.analyze`) and the sweep's plan (interfaces,
fallback leaves) read a tape's *structure* only: the op overloads, their non-tensor arguments,
the graph of :class:`~secorder._engine.tape.Ref` s, the shapes, strides, dtypes and devices of
the values and constants they reach, which constant is which batched data argument, and which
values are leaves. :func:`fingerprint` collects all of that into one hashable key (never a
tensor's entries, never a tensor object: the cache holds no user tensor alive). Two
recordings with equal fingerprints are the same program on equally laid-out values, so an
analysis of one is the analysis of the other: a cache keyed on it is exact by construction. The
tape is still recorded on every call; only the work derived from its structure is reused.

A structure the fingerprint cannot describe (an argument of an unknown type) gets no key and
is analyzed afresh every time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from secorder._engine.tape import Ref, Tape

__all__ = ["PlanCache", "fingerprint"]

_SCALARS = (
    int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format,
)  # fmt: skip


class _NoKeyError(Exception):
    pass


def _meta(t: Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.layout)


def _key(obj: Any, data_pos: dict[int, int]) -> Any:
    """A hashable description of a node's argument: Refs as they are (value indices), constant
    tensors by their metadata and data position (-1: not a data argument), containers by type
    and items, scalars by type and value (``True``, ``1`` and ``1.0`` differ)."""
    if type(obj) is Ref:
        return obj
    if isinstance(obj, Tensor):
        return ("const", *_meta(obj), data_pos.get(id(obj), -1))
    if isinstance(obj, (list, tuple)):
        return (type(obj), *[_key(o, data_pos) for o in obj])
    if isinstance(obj, dict):
        return (dict, *[(k, _key(v, data_pos)) for k, v in obj.items()])
    if isinstance(obj, _SCALARS):
        return (type(obj), obj)
    raise _NoKeyError


def fingerprint(tape: Tape, values: Sequence[Any], data: Sequence[Tensor], *extra: Any) -> Any:
    """The structural key of ``tape`` evaluated at ``values`` with batched ``data`` constants
    (plus ``extra`` hashable options of the analysis), or None where an argument has no key."""
    data_pos = {id(t): k for k, t in enumerate(data)}
    try:
        nodes = tuple(
            (node.func, node.multi, tuple(node.outputs), _key((node.args, node.kwargs), data_pos))
            for node in tape.nodes
        )
    except _NoKeyError:
        return None
    metas = tuple(_meta(v) if isinstance(v, Tensor) else (type(v),) for v in values)
    output = None if tape.output is None else tape.output.index
    return (tape.num_leaves, tape.num_inputs, tape.num_values, output, nodes, metas, extra)


class PlanCache:
    """A least-recently-used map from fingerprints to analyses: at most ``size`` entries and at
    most ``max_weight`` in total (an entry's weight: its tape's nodes plus values, for which its
    key and analysis hold a few hundred bytes each), the least recently used evicted first. One
    lock: calls from several threads share it safely."""

    def __init__(self, size: int, max_weight: int = 200_000) -> None:
        self.size = size
        self.max_weight = max_weight
        self.entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.weight = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        """The entry of ``key`` (None: absent, or ``key`` is None)."""
        if key is None:
            return None
        with self._lock:
            found = self.entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self.entries.move_to_end(key)
            return found[0]

    def put(self, key: Any, entry: Any, weight: int = 1) -> None:
        """Keep ``entry`` under ``key`` (nothing for a None key, or one heavier than the bound)."""
        if key is None or weight > self.max_weight:
            return
        with self._lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.weight -= old[1]
            self.entries[key] = (entry, weight)
            self.weight += weight
            while len(self.entries) > self.size or self.weight > self.max_weight:
                _, (_, w) = self.entries.popitem(last=False)
                self.weight -= w

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.weight = self.hits = self.misses = 0

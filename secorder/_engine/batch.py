"""Proof of per-sample structure on a tape of the whole batch: a batch-axis tag per value.

For ``f(θ, *batch)`` recorded once on the whole batch (:func:`secorder._engine.tape.record`),
:func:`analyze` propagates through every op a tag per tape value, with no check on values:

* ``SAME`` (``None``): the same for every sample (parameters, constants, anything computed
  from them only);
* a :data:`SampleAxis` ``(dim, group)``: batched — along tensor dimension ``dim``, sample n
  owns the indices ``[n·group, (n+1)·group)`` (``x`` of shape (N, d): ``(0, 1)``; ``x``
  reshaped (N, T, d) → (N·T, d): ``(0, T)``), and slice n depends on θ only through sample
  n's own computation;
* ``SUMMED``: a sum over samples of per-sample values (the loss after its reduction); only
  linear ops may follow (a sum of such, scaling by constants, adding parameter-only terms).

Each op's batch rule (the ``batch`` field of its :class:`~secorder._engine.rules.OpRule`,
JAX's batching rule) maps input tags to output tags, or refuses when the op would mix samples
in a parameter-dependent value: train-mode BatchNorm, a reduction over the sample axis other
than a sum or mean (batch max, log-sum-exp), a matrix product contracting the sample axis (a
Gram matrix across samples, centering by a product with a constant matrix), a softmax over the
samples, a nonlinear op after the sum over samples (``log`` of the mean loss). The refusal
(:class:`BatchAxisError`) names the op, its position on the tape and why. Values that do not
depend on θ are constants for the Hessian: where a rule refuses them they become ``SAME``.

When the output is ``SUMMED`` (or ``SAME``), f(θ) = Σ_n l_n(θ) + r(θ) with l_n depending on
sample n's data only, whatever the weighting (class-weighted or per-sample-weighted means):
the engines take adjoints from the batch loss itself and never need the scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from secorder._engine.rules import rule
from secorder._engine.tape import _STOPS, Ref, Tape, TapeNode

__all__ = ["SAME", "SUMMED", "BatchAnalysis", "BatchAxisError", "SampleAxis", "Tag", "analyze"]

SampleAxis = tuple[int, int]
SAME = None
SUMMED = "summed"
Tag = Any  # None | SampleAxis | "summed"


class BatchAxisError(Exception):
    """The tape mixes samples in a parameter-dependent value (``args[0]`` names the op and why)."""


class _RefuseError(Exception):
    pass


@dataclass
class BatchAnalysis:
    """Tags of every tape value, and the sample axes of batched data constants per node."""

    tags: list[Tag]
    const_axes: dict[int, dict[tuple[Any, ...], SampleAxis]]  # node position → path → axis
    num_samples: int

    def arg_tags(self, i: int, node: TapeNode) -> dict[tuple[Any, ...], Tag]:
        """Tag of every tensor argument of node ``i`` by path (refs and batched constants)."""
        out: dict[tuple[Any, ...], Tag] = {p: self.tags[r.index] for p, r in node.arg_paths()}
        out.update(self.const_axes.get(i, {}))
        return out


def _const_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Tensor]]:
    if isinstance(obj, Tensor):
        return [(prefix, obj)]
    if isinstance(obj, (list, tuple)):
        return [p for i, o in enumerate(obj) for p in _const_paths(o, (*prefix, i))]
    if isinstance(obj, dict):
        return [p for k, o in obj.items() for p in _const_paths(o, (*prefix, k))]
    return []


def _arg(node: TapeNode, i: int, name: str, default: Any = None) -> Any:
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def _ndim(values: Sequence[Any], node: TapeNode, path: tuple[Any, ...]) -> int:
    obj: Any = (node.args, node.kwargs)
    for p in path:
        obj = obj[p]
    t = values[obj.index] if isinstance(obj, Ref) else obj
    return int(t.dim())


def _out_shape(values: Sequence[Any], node: TapeNode, k: int = 0) -> tuple[int, ...]:
    idx = node.outputs[k]
    return tuple(values[idx].shape) if idx is not None else ()


def _reshape_axis(shape: Sequence[int], axis: SampleAxis, new: Sequence[int], n: int) -> SampleAxis:
    """The sample axis after reshaping ``shape`` to ``new`` (refused when samples would interleave)."""
    d, g = axis
    prefix = math.prod(shape[:d])
    block = g * math.prod(shape[d + 1 :])
    for d2 in range(len(new)):
        if math.prod(new[:d2]) != prefix or new[d2] % n:
            continue
        g2 = new[d2] // n
        if g2 * math.prod(new[d2 + 1 :]) == block:
            return (d2, g2)
    raise _RefuseError(
        f"reshapes {tuple(shape)} (samples along dim {d}) to {tuple(new)}, which interleaves the "
        "samples with other indices"
    )


def _dims(value: Any, ndim: int) -> list[int]:
    if value is None:
        return list(range(ndim))
    if isinstance(value, int):
        value = [value]
    return [int(v) % max(1, ndim) for v in value] or list(range(ndim))


def _batch_rule(
    i: int, node: TapeNode, tags: dict[tuple[Any, ...], Tag], values: Sequence[Any], n: int
) -> list[Tag]:
    """Output tags of node ``i`` (raises :class:`_RefuseError` with the reason)."""
    func = node.func
    nout = len(node.outputs)
    live = {p: t for p, t in tags.items() if t is not SAME}
    if not live:
        return [SAME] * nout
    name = func._schema.name.split("::")[-1]
    kind = rule(func).batch or ("pointwise" if torch.Tag.pointwise in func.tags else None)
    if any(t == SUMMED for t in live.values()):
        if any(t != SUMMED for t in live.values()):
            raise _RefuseError("combines a sum over samples with a per-sample value")
        if rule(func).linear or kind in ("pointwise_linear", "same_shape"):
            return [SUMMED] * nout
        if kind == "scale":  # mul/div: linear when the other operands are constants
            others = [p for p in tags if p not in live]
            deps = [p for p in others if isinstance(_ref_at(node, p), Ref)]
            if not deps:
                return [SUMMED] * nout
        raise _RefuseError(
            "a nonlinear op after the sum over samples (only linear ops may follow it: the "
            "Hessian of a function of the summed loss is not a sum of per-sample Hessians)"
        )
    axes = list(live.items())
    if kind in ("pointwise", "pointwise_linear", "scale"):
        out_nd = len(_out_shape(values, node))
        found = set()
        for p, (d, g) in axes:
            found.add((d + out_nd - _ndim(values, node, p), g))
        if len(found) != 1:
            raise _RefuseError(
                "combines tensors batched along different dimensions (an outer product across samples)"
            )
        return [found.pop()] * nout
    if kind == "same_shape":
        ((_, ax),) = axes[:1]
        return [ax] * nout
    if kind == "reshape":
        ((p, ax),) = axes
        src = _in_shape(values, node, p)
        return [_reshape_axis(src, ax, _out_shape(values, node), n)]
    (p0, (d, g)) = axes[0]
    if len(axes) > 1 and kind not in ("matmul", "cat", "addmm") and any(a != (d, g) for _, a in axes):
        raise _RefuseError("combines tensors batched along different dimensions")
    nd = _ndim(values, node, p0)
    if kind == "permute":
        if name == "t":
            return [(1 - d if nd == 2 else d, g)]
        if name == "transpose":
            a, b = int(_arg(node, 1, "dim0")) % nd, int(_arg(node, 2, "dim1")) % nd
            return [(b if d == a else a if d == b else d, g)]
        perm = [int(x) % nd for x in _arg(node, 1, "dims")]
        return [(perm.index(d), g)]
    if kind == "unsqueeze":
        u = int(_arg(node, 1, "dim")) % (nd + 1)
        return [(d + (u <= d), g)]
    if kind == "squeeze":
        shape = _in_shape(values, node, p0)
        dims = _dims(_arg(node, 1, "dim"), nd)
        dropped = [k for k in dims if shape[k] == 1]
        if d in dropped:
            return [(0, g)] if n == 1 else [SAME]
        return [(d - sum(k < d for k in dropped), g)]
    if kind == "expand":
        out_nd = len(_out_shape(values, node))
        d2 = d + out_nd - nd
        if _out_shape(values, node)[d2] != _in_shape(values, node, p0)[d]:
            raise _RefuseError("expands the sample axis")
        return [(d2, g)]
    if kind == "index":  # select/slice/narrow/index_select/gather along a dim
        dim = int(_arg(node, 1, "dim", 0)) % nd
        if dim == d:
            if _out_shape(values, node) == _in_shape(values, node, p0):
                return [(d, g)]
            raise _RefuseError("indexes the sample axis (picks samples instead of acting on each)")
        if name == "select":
            return [(d - (dim < d), g)]
        return [(d, g)]
    if kind in ("reduce", "reduce_linear"):
        dims = _dims(_arg(node, 1, "dim"), nd)
        keep = bool(_arg(node, 2, "keepdim", False))
        if d in dims:
            if kind == "reduce_linear":
                return [SUMMED] * nout
            raise _RefuseError(
                "reduces over the sample axis nonlinearly (a batch max, variance or log-sum-exp)"
            )
        return [(d if keep else d - sum(k < d for k in dims), g)] * nout
    if kind == "norm":  # linalg_vector_norm(x, ord, dim, keepdim)
        dims = _dims(_arg(node, 2, "dim"), nd)
        keep = bool(_arg(node, 3, "keepdim", False))
        if d in dims:
            raise _RefuseError("takes a norm over the sample axis")
        return [(d if keep else d - sum(k < d for k in dims), g)]
    if kind == "softmax":
        if int(_arg(node, 1, "dim")) % nd == d:
            raise _RefuseError("normalizes over the sample axis")
        return [(d, g)]
    if kind == "scan":  # cumsum / cumprod / logcumsumexp along dim
        if int(_arg(node, 1, "dim")) % nd == d:
            raise _RefuseError("accumulates along the sample axis (a running sum across samples)")
        return [(d, g)]
    if kind == "mv":  # mv(A, v): the samples may only be A's rows
        if p0 != (0, 0) or len(axes) > 1 or d != 0:
            raise _RefuseError("contracts the sample axis in a matrix-vector product")
        return [(0, g)]
    if kind == "split":
        dim = int(_arg(node, 1, "dim", 0) if name == "unbind" else _arg(node, 2, "dim", 0)) % nd
        if dim == d:
            raise _RefuseError("splits the sample axis")
        if name == "unbind" and dim < d:  # unbind drops the dimension it splits
            d -= 1
        return [(d, g)] * nout
    if kind == "cat":
        dim = int(_arg(node, 1, "dim", 0))
        out_nd = len(_out_shape(values, node))
        dim %= out_nd
        found = {a for _, a in axes}
        if len(found) != 1 or {p[:1] for p, _ in axes} != {(0,)}:
            raise _RefuseError("concatenates tensors batched along different dimensions")
        (d, g) = found.pop()
        if name == "stack":
            if d >= dim:
                d += 1
            return [(d, g)]
        if dim == d:
            raise _RefuseError("concatenates along the sample axis")
        return [(d, g)]
    if kind in ("matmul", "addmm"):
        off = 1 if kind == "addmm" else 0
        out_nd = len(_out_shape(values, node))
        result = set()
        for p, (d, g) in axes:
            if p == (0, 0) and off:  # the added term: aligned by broadcasting
                result.add((d + out_nd - _ndim(values, node, p), g))
                continue
            k = _ndim(values, node, p)
            left = p == (0, off)
            contracted = k - 1 if left else k - 2
            if d == contracted:
                raise _RefuseError(
                    "contracts the sample axis in a matrix product (a Gram matrix or a mixing "
                    "matrix across samples)"
                )
            result.add((d, g))
        if len(result) != 1 or (len(axes) > 1 + off and any(a[0] >= out_nd - 2 for a in result)):
            raise _RefuseError("multiplies two tensors batched along different dimensions (mixes samples)")
        return [result.pop()]
    if kind == "batch_first":  # convolution, pooling, eval batch norm, nll_loss: samples on dim 0
        if any(p != (0, 0) for p, _ in axes) and name not in ("nll_loss_forward", "nll_loss2d_forward"):
            raise _RefuseError("a parameter-side argument varies with the samples")
        if d != 0:
            raise _RefuseError(f"expects the samples along dimension 0, got dimension {d}")
        if name == "_native_batch_norm_legit" or (name == "native_batch_norm" and _arg(node, 5, "training")):
            raise _RefuseError(
                "BatchNorm in training mode normalizes with batch statistics (couples the samples)"
            )
        if name in ("nll_loss_forward", "nll_loss2d_forward"):
            reduction = int(_arg(node, 3, "reduction", 1))
            return [(0, g) if reduction == 0 else SUMMED, SAME]
        first = _out_shape(values, node)
        rest = [
            (0, g) if o is not None and tuple(values[o].shape[:1]) == first[:1] else SAME
            for o in node.outputs[1:]
        ]
        return [(0, g), *rest]
    if kind == "layer_norm":
        k = len(_arg(node, 1, "normalized_shape"))
        if d >= nd - k:
            raise _RefuseError("normalizes over the sample axis")
        return [(d, g)] * nout
    if kind == "pad":
        if d >= nd - len(_arg(node, 1, "pad")) // 2:
            raise _RefuseError("pads the sample axis")
        return [(d, g)]
    if kind == "embedding":
        if p0 != (0, 1):
            raise _RefuseError("an embedding table that varies with the samples")
        return [(d, g)]
    if kind == "loss_reduce":  # mse_loss, binary_cross_entropy_with_logits
        reduction = int(_arg(node, 2 if name == "mse_loss" else 4, "reduction", 1))
        return [(d, g) if reduction == 0 else SUMMED]
    raise _RefuseError("the op has no batch rule")


def _ref_at(node: TapeNode, path: tuple[Any, ...]) -> Any:
    obj: Any = (node.args, node.kwargs)
    for p in path:
        obj = obj[p]
    return obj


def _in_shape(values: Sequence[Any], node: TapeNode, path: tuple[Any, ...]) -> tuple[int, ...]:
    obj = _ref_at(node, path)
    t = values[obj.index] if isinstance(obj, Ref) else obj
    return tuple(t.shape)


def analyze(
    tape: Tape,
    values: Sequence[Any],
    data: Sequence[Tensor],
    num_samples: int,
    *,
    batched_output: bool = False,
    inputs: bool = False,
) -> BatchAnalysis:
    """Tag every value of ``tape`` (recorded on the whole batch; ``data`` are the batched
    arguments, captured on the tape as constants, samples along dimension 0).

    With ``batched_output`` the output is a model's per-sample outputs (batched along
    dimension 0) instead of a loss. With ``inputs`` the batch is the tape's data inputs
    (``record(fn, leaves, inputs)``, samples along dimension 0) and the derivatives are taken
    in them: a value counts as dependent when it is computed from the inputs (not the leaves),
    so e.g. a mean over the points of a point-dependent value is refused even in a
    parameter-free function (:func:`secorder.laplacian`).

    Raises:
        BatchAxisError: an op mixes samples in a parameter-dependent value that reaches the
            output, or the output is not a sum over samples plus parameter-only terms (with
            ``batched_output``: not batched along dimension 0, one row per sample).
    """
    data_ids = {id(t) for t in data}
    tags: list[Tag] = [SAME] * tape.num_values
    depends = tape.depends
    if inputs:
        first = tape.num_leaves
        depends = [False] * tape.num_values
        for k in range(first, first + tape.num_inputs):
            depends[k] = True
            if values[k].dim() > 0 and values[k].shape[0] == num_samples:
                tags[k] = (0, 1)
        for node in tape.nodes:
            refs = node.arg_paths()
            dep = node.func not in _STOPS and any(depends[r.index] for _, r in refs)
            for o in node.outputs:
                if o is not None:
                    depends[o] = dep
    const_axes: dict[int, dict[tuple[Any, ...], SampleAxis]] = {}
    assert tape.output is not None
    reaches = [False] * tape.num_values
    reaches[tape.output.index] = True
    for node in reversed(tape.nodes):
        if any(o is not None and reaches[o] for o in node.outputs):
            for _, r in node.arg_paths():
                reaches[r.index] = True
    for i, node in enumerate(tape.nodes):
        batched = {
            p: (0, 1)
            for p, t in (_const_paths((node.args, node.kwargs)) if data_ids else ())
            if id(t) in data_ids and t.dim() > 0 and t.shape[0] == num_samples
        }
        if batched:
            const_axes[i] = batched
        arg_tags = {p: tags[r.index] for p, r in node.arg_paths()}
        arg_tags.update(batched)
        dependent = any(depends[o] for o in node.outputs if o is not None)
        try:
            out = _batch_rule(i, node, arg_tags, values, num_samples)
        except _RefuseError as exc:
            if not dependent or not any(o is not None and reaches[o] for o in node.outputs):
                out = [SAME] * len(node.outputs)
            else:
                where = (
                    "an output at one sample depends on the others there"
                    if inputs
                    else "the function is not a sum of per-sample terms there"
                )
                msg = f"the op {node.func} (tape position {i}) {exc.args[0]}; {where}"
                raise BatchAxisError(msg) from None
        for o, t in zip(node.outputs, out):
            if o is not None:
                tags[o] = t if (depends[o] or t != SUMMED) else SAME
    final = tags[tape.output.index]
    if batched_output:
        if final != (0, 1) and not (inputs and final is SAME):  # SAME: does not depend on them
            raise BatchAxisError(
                f"the model's outputs carry the samples as {final!r}, not along dimension 0 one row each"
            )
    elif final not in (SUMMED, SAME):
        if num_samples == 1:
            final = SUMMED
        else:
            raise BatchAxisError(
                f"the output is batched along dimension {final[0]} (not reduced over the samples)"
            )
    return BatchAnalysis(tags, const_axes, num_samples)

"""Exact Hessian diagonal of an ``nn.Module`` loss by structured second-order backpropagation.

For a loss built from operations v_k = f_k(u_k), with ḡ_k the adjoint of op k's output,
J_k the Jacobian of its input u_k with respect to the parameters θ, and
M_k = ∇²_u ⟨ḡ_k, f_k(u)⟩ the op's gradient-weighted local Hessian, the Hessian is exactly

    H = Σ_k J_kᵀ M_k J_k

(the second-order adjoint identity; Bishop 1992; Dangel, Harmeling and Hennig 2020 unroll it
along a chain). With M_k = Σ_c σ_c s_c s_cᵀ (signed columns),

    diag H = Σ_k Σ_c σ_c (J_kᵀ s_c)²,

and every J_kᵀ s_c is a vector-Jacobian product. Samples are independent, so the square is
taken per sample (of the gradient summed over every use of a shared weight, i.e. over
positions of a Linear over a sequence or of a convolution). Which ops contribute:

* the loss: M = ∇²_z L, the columns of :meth:`secorder._losses.LossSpec.factor` (the GGN; for
  cross-entropy on (N, C) logits C − 1 columns, its rank: see :func:`_loss_factor`);
* elementwise activations a = φ(u) (tanh, sigmoid, GELU, SiLU, softplus, ELU, ...):
  M = diag(ḡ ⊙ φ''(u)) per sample: one signed column e_j per unit, weight ḡ_j φ''(u_j);
* ops linear in their tensor inputs (adds, reshapes, concatenation, pooling, ReLU and other
  piecewise-linear maps, products with constants) and ``nn.Linear`` / ``nn.Conv2d`` /
  ``nn.Embedding`` (linear in the weight for a fixed input; x does not depend on its own
  layer's weight) contribute nothing.

Implementation: one forward pass with the layer hooks of :class:`secorder._layers.FastCapture`
(which records each layer's inputs and outputs) under a ``TorchFunctionMode`` that records the
activations and refuses every op it does not know to be covered by the rules above (attention
products of two parameter-dependent tensors, LayerNorm, train-mode BatchNorm, ...). One backward
pass gives the activation adjoints ḡ; the columns are then pulled back to the layer outputs by
batched backward passes (``is_grads_batched``, a chunk of columns at a time; on CPU one plain
pass per column when one column's gradients are large), and the layers' matrix-product rules
of :mod:`secorder._layers` square and sum the per-sample gradients. An activation's columns
e_j need no backward pass at the ``nn.Linear`` that produces its input (the layer's deferred
Σ_c w_c δ_c^⊙2 gains w itself) nor, through one more elementwise activation ψ of another
Linear's output u', at that layer (ψ'(u')^⊙2 ⊙ (w W^⊙2)); further up a chain of Linear layers
and elementwise activations the per-sample columns are carried by matrix products, and only
where the chain ends are they handed to backward passes (see :class:`_UnitPlan`).

Curvature propagation (Martens, Sutskever and Swersky 2012): with independent random signs
v_{n,c} per sample and column, the cotangents P = Σ_{σ_c>0} v_c s_c and Q = Σ_{σ_c<0} v_c s_c
(all ops at once) give E[(J_nᵀ P)² − (J_nᵀ Q)²] = diag H_n exactly: an unbiased estimate at
two backward passes per probe (done as one batched pass of two cotangents).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from secorder._chunking import memory_budget
from secorder._errors import error
from secorder._losses import CrossEntropyLoss, Factor, LossSpec

__all__ = ["ACTIVATIONS", "SweepTooCostlyError", "SweepUnsupportedError", "sweep_diagonal"]

# ----------------------------------------------------------------------------------------------
# The module-hook layer capture and its accumulator, formerly secorder/_layers.py and
# secorder/_persample.py: the Fisher transforms no longer use them (they take the structured
# engine); only this module-hook sweep does, and it goes with them.


class ColumnAccumulator:
    """Accumulates per-column contributions for each parameter leaf.

    Args:
        shapes: the leaf shapes.
        num_columns: R, the number of columns of the factor.
        trace: accumulate only the trace (scalars) instead of per-entry diagonals.
        per_column: keep what is needed for a mean and standard error over columns
            (per-entry Welford statistics for diagonals, the R per-column traces for traces).
        like: a tensor whose dtype and device the results take.
    """

    def __init__(
        self, shapes: Sequence[torch.Size], num_columns: int, *, trace: bool, per_column: bool, like: Tensor
    ) -> None:
        self.shapes = list(shapes)
        self.num_columns = num_columns
        self.trace = trace
        self.per_column = per_column
        self.like = like
        self.sums: list[Tensor | None] = [None] * len(self.shapes)
        self.total: Tensor | None = None
        self.columns: Tensor | None = None
        self.welford: list[tuple[int, Tensor, Tensor] | None] = [None] * len(self.shapes)

    def _zeros(self, shape: Sequence[int]) -> Tensor:
        return torch.zeros(tuple(shape), dtype=self.like.dtype, device=self.like.device)

    def add_trace_columns(self, start: int, values: Tensor) -> None:
        """Add per-column trace contributions ``values`` (``(k,)``) for columns start.. ."""
        if not self.per_column:
            self.total = values.sum() if self.total is None else self.total + values.sum()
            return
        if self.columns is None:
            self.columns = self._zeros((self.num_columns,))
        idx = torch.arange(start, start + values.shape[0], device=values.device)
        self.columns = self.columns.index_add(0, idx, values)

    def add(self, index: int, start: int, values: Tensor) -> None:
        """Add leaf ``index``'s contributions for columns ``start..start+k`` (``(k, *shape)``)."""
        assert not self.trace, "traces go through add_trace_columns"
        if not self.per_column:
            self.add_total(index, values.sum(0))
            return
        state = self.welford[index]
        k = values.shape[0]
        c_mean = values.mean(0)
        c_m2 = ((values - c_mean) ** 2).sum(0)
        if state is None:
            self.welford[index] = (k, c_mean, c_m2)
        else:  # Chan et al.'s parallel update: columns arrive in order, chunk by chunk
            count, mean, m2 = state
            total = count + k
            delta = c_mean - mean
            self.welford[index] = (
                total,
                mean + delta * (k / total),
                m2 + c_m2 + delta**2 * (count * k / total),
            )

    def add_total(self, index: int, total: Tensor) -> None:
        """Add leaf ``index``'s contribution summed over all columns (not with ``per_column``)."""
        if self.trace:
            s = total.sum()
            self.total = s if self.total is None else self.total + s
            return
        cur = self.sums[index]
        self.sums[index] = total if cur is None else cur + total

    def result(self, *, average: bool, scale: float) -> tuple[Tensor, Tensor]:
        """``(estimate, stderr)``: flat diagonals of length P or 0-dim traces, times ``scale``."""
        r = self.num_columns
        if self.trace:
            if self.per_column:
                cols = self.columns if self.columns is not None else self._zeros((r,))
                mean = cols.mean()
                err = cols.std(correction=1) / math.sqrt(r) if r > 1 else torch.full_like(mean, math.nan)
                return mean * scale, err * scale
            total = self.total if self.total is not None else self._zeros(())
            est = total / r if average else total
            return est * scale, torch.zeros_like(est)
        ests, errs = [], []
        for i, shape in enumerate(self.shapes):
            if self.per_column:
                state = self.welford[i]
                if state is None:
                    ests.append(self._zeros(shape))
                    errs.append(self._zeros(shape))
                    continue
                count, mean, m2 = state
                ests.append(mean)
                if count > 1:
                    errs.append((m2 / (count - 1)).sqrt() / math.sqrt(count))
                else:
                    errs.append(torch.full_like(mean, math.nan))
            else:
                s = self.sums[i]
                s = self._zeros(shape) if s is None else s
                ests.append(s / r if average else s)
                errs.append(torch.zeros_like(s))
        est = torch.cat([e.reshape(-1) for e in ests]) * scale
        err = torch.cat([e.reshape(-1) for e in errs]) * scale
        return est, err


_RMSNorm: type[nn.Module] | None = getattr(nn, "RMSNorm", None)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm) + (
    (_RMSNorm,) if _RMSNorm is not None else ()
)

# Functions that only read metadata: using a parameter in them is not a use of its values.
_TENSOR: Any = Tensor
_LAYER_METADATA: set[Any] = {
    _TENSOR.size,
    _TENSOR.dim,
    _TENSOR.numel,
    _TENSOR.is_floating_point,
    *(getattr(_TENSOR, name).__get__ for name in ("shape", "dtype", "device", "ndim", "requires_grad")),
}


def _eligible(module: nn.Module) -> bool:
    if type(module) not in SUPPORTED_LAYERS:  # exact type: subclasses may change forward
        return False
    if torch.nn.utils.parametrize.is_parametrized(module):
        return False
    if module._forward_hooks or module._forward_pre_hooks:  # user hooks may alter inputs/outputs
        return False
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return False
    return not (
        isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq)
    )


def _global_hooks() -> bool:
    mod = nn.modules.module
    return bool(
        getattr(mod, "_global_forward_hooks", None) or getattr(mod, "_global_forward_pre_hooks", None)
    )


class _Tracker(TorchFunctionMode):
    """Flags fast parameters used by any torch function outside their own layer's call."""

    def __init__(self, owners: dict[int, tuple[int, nn.Module]]) -> None:
        super().__init__()
        self.owners = owners
        self.stack: list[nn.Module] = []
        self.flagged: set[int] = set()

    def _check(self, a: object, current: nn.Module | None) -> None:
        if isinstance(a, Tensor):
            hit = self.owners.get(id(a))
            if hit is not None and hit[1] is not current:
                self.flagged.add(hit[0])

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _LAYER_METADATA:
            current = self.stack[-1] if self.stack else None
            for a in (*args, *kwargs.values()):
                if isinstance(a, (list, tuple)):
                    for b in a:
                        self._check(b, current)
                else:
                    self._check(a, current)
        return func(*args, **kwargs)


class _Record:
    __slots__ = ("identity", "input", "output", "version")

    def __init__(self, inp: Any, output: Any, identity: bool) -> None:
        self.input = inp
        self.output = output
        self.identity = identity
        self.version = output._version if isinstance(output, Tensor) else -1


def _emit(acc: ColumnAccumulator, index: int, column: int | None, value: Tensor) -> None:
    """Send one column's (or, with ``column=None``, all columns') contribution of a leaf."""
    if column is None:
        acc.add_total(index, value)
    elif acc.trace:
        acc.add_trace_columns(column, value.sum().reshape(1))
    else:
        acc.add(index, column, value.unsqueeze(0))


def _weighted_sum(x: Tensor, w: Tensor | None) -> Tensor:
    if w is not None:
        x = x * w.reshape(-1, *([1] * (x.dim() - 1)))
    return x.sum(0)


def _sample_chunk(per_sample_numel: int, itemsize: int) -> int:
    return max(1, memory_budget() // max(1, 4 * per_sample_numel * itemsize))


# Bytes of a chunk of samples whose unfolded inputs and per-sample gradients should stay in cache (CPU).
_CACHE_BYTES = 4 << 20


def _cat_positions(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _Layer:
    """One supported module with its recorded calls; subclasses implement the products."""

    def __init__(
        self, module: Any, attrs: dict[str, int], records: list[_Record], n: int, graph: bool
    ) -> None:
        self.module: Any = module
        self.attrs = attrs
        self.records = records
        self.n = n
        self.graph = graph

    def _in(self, x: Tensor) -> Tensor:
        return x if self.graph else x.detach()

    def column(
        self, deltas: list[Tensor | None], w: Tensor | None, r: int, acc: ColumnAccumulator, defer: bool
    ) -> None:
        raise NotImplementedError

    def finish(self, acc: ColumnAccumulator) -> None:
        """Emit contributions deferred over columns (only when ``defer`` was passed)."""

    def columns(self, deltas: list[Tensor | None], w: Tensor | None, acc: ColumnAccumulator) -> None:
        """Deferred contributions of k columns: ``deltas`` with a leading column dimension, ``w`` (k, N)."""
        k = next(d for d in deltas if d is not None).shape[0]
        for j in range(k):
            ds = [None if d is None else d[j] for d in deltas]
            self.column(ds, None if w is None else w[j], 0, acc, True)

    def _deltas(self, deltas: list[Tensor | None], shape: Callable[[Tensor], Tensor]) -> Tensor:
        parts = [
            shape(d if d is not None else torch.zeros_like(rec.output))
            for d, rec in zip(deltas, self.records)
        ]
        return _cat_positions(parts)

    def _per_sample_squares(
        self, grads_fn: Callable[[int, int], Tensor], numel: int, w: Tensor | None, itemsize: int
    ) -> Tensor:
        """Σ_n w_n g_n^⊙2 over chunks of samples, g_n = grads_fn(start, stop)."""
        step = _sample_chunk(numel, itemsize)
        total: Tensor | None = None
        for s0 in range(0, self.n, step):
            s1 = min(self.n, s0 + step)
            g = grads_fn(s0, s1)
            part = _weighted_sum(g * g, None if w is None else w[s0:s1])
            total = part if total is None else total + part
        assert total is not None
        return total


class _LinearLayer(_Layer):
    def __init__(
        self, module: Any, attrs: dict[str, int], records: list[_Record], n: int, graph: bool
    ) -> None:
        super().__init__(module, attrs, records, n, graph)
        d_in = module.in_features
        self.a = self._in(_cat_positions([r.input.reshape(n, -1, d_in) for r in records]))
        self.positions = self.a.shape[1]
        if self.positions == 1:
            self.a2 = self.a[:, 0] ** 2
        self.D2: Tensor | None = None

    def _emit_single(self, d2: Tensor, r: int | None, acc: ColumnAccumulator) -> None:
        if "weight" in self.attrs:
            value = (d2.sum(1) * self.a2.sum(1)).sum() if acc.trace else d2.T @ self.a2
            _emit(acc, self.attrs["weight"], r, value)
        if "bias" in self.attrs:
            _emit(acc, self.attrs["bias"], r, d2.sum(0))

    def column(
        self, deltas: list[Tensor | None], w: Tensor | None, r: int, acc: ColumnAccumulator, defer: bool
    ) -> None:
        d_out = self.module.out_features
        d = self._deltas(deltas, lambda x: x.reshape(self.n, -1, d_out))
        if self.positions == 1:
            d2 = d[:, 0] ** 2
            if w is not None:
                d2 = d2 * w[:, None]
            if defer:
                self.D2 = d2 if self.D2 is None else self.D2 + d2
            else:
                self._emit_single(d2, r, acc)
            return
        a = self.a
        if "weight" in self.attrs:
            d_in = a.shape[2]
            t = self.positions
            if acc.trace and t * (d_in + d_out) < d_in * d_out:
                gram = (a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))
                per = gram.flatten(1).sum(1)
                value = (per * w).sum() if w is not None else per.sum()
            else:
                value = self._per_sample_squares(
                    lambda s0, s1: d[s0:s1].transpose(1, 2) @ a[s0:s1], d_out * d_in, w, a.element_size()
                )
            _emit(acc, self.attrs["weight"], None if defer else r, value)
        if "bias" in self.attrs:
            gb = d.sum(1)
            _emit(acc, self.attrs["bias"], None if defer else r, _weighted_sum(gb * gb, w))

    def columns(self, deltas: list[Tensor | None], w: Tensor | None, acc: ColumnAccumulator) -> None:
        if self.positions != 1:
            super().columns(deltas, w, acc)
            return
        (d,) = deltas  # one position: a single call
        assert d is not None
        d2 = d.reshape(d.shape[0], self.n, -1) ** 2
        if w is not None:
            d2 = d2 * w[:, :, None]
        self.add_diagonal(d2.sum(0))

    def add_diagonal(self, d2: Tensor) -> None:
        """Add Σ_c w_c δ_c^⊙2 ``(N, out_features)`` of some columns (one position only)."""
        assert self.positions == 1
        self.D2 = d2 if self.D2 is None else self.D2 + d2

    def finish(self, acc: ColumnAccumulator) -> None:
        if self.D2 is not None:
            self._emit_single(self.D2, None, acc)


class _Conv2dLayer(_Layer):
    """Per-sample weight gradients Δ_n U_nᵀ of the unfolded input U_n, formed a chunk of samples at a time.

    The unfolded input (kernel-size times the input) is never stored whole: each chunk of
    samples is unfolded, multiplied with the pending columns' output gradients of the same
    samples and squared while it is still in cache.
    """

    def __init__(
        self, module: Any, attrs: dict[str, int], records: list[_Record], n: int, graph: bool
    ) -> None:
        super().__init__(module, attrs, records, n, graph)
        self.groups = module.groups
        self.inputs = [self._in(rec.input) for rec in records]
        self.pending: list[tuple[Tensor, Tensor | None]] = []  # ((k, N, g, o, L), (k, N) or None)
        self.unfolded: Tensor | None = None  # kept whole only when columns come one at a time

    def _unfold(self, x: Tensor) -> Tensor:
        conv: nn.Conv2d = self.module
        padding: Any = conv.padding
        if isinstance(padding, str):
            if padding == "same":
                pads = []
                for k, dil in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
                    total = dil * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            padding = 0
        u = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
        return u.reshape(x.shape[0], self.groups, -1, u.shape[-1])

    def _unfolded(self, s0: int, s1: int) -> Tensor:
        """The unfolded inputs of samples s0..s1, all calls' positions concatenated: (s, g, i, L)."""
        if self.unfolded is not None:
            return self.unfolded[s0:s1]
        units = [self._unfold(x[s0:s1]) for x in self.inputs]
        return units[0] if len(units) == 1 else torch.cat(units, dim=-1)

    def _deltas_k(self, deltas: list[Tensor | None], k: int) -> Tensor:
        """Output gradients of k columns, all calls' positions concatenated: (k, N, g, o, L)."""
        parts = []
        for dd, rec in zip(deltas, self.records):
            out = rec.output
            if dd is None:
                dd = torch.zeros((k, *out.shape), dtype=out.dtype, device=out.device)
            parts.append(dd.reshape(k, self.n, self.groups, -1, out[0, 0].numel()))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def column(
        self, deltas: list[Tensor | None], w: Tensor | None, r: int, acc: ColumnAccumulator, defer: bool
    ) -> None:
        d = self._deltas_k([None if x is None else x.unsqueeze(0) for x in deltas], 1)
        self._add(d, None if w is None else w.unsqueeze(0), acc, None if defer else r)

    def columns(self, deltas: list[Tensor | None], w: Tensor | None, acc: ColumnAccumulator) -> None:
        k = next(d for d in deltas if d is not None).shape[0]
        self._add(self._deltas_k(deltas, k), w, acc, None)

    def _add(self, d: Tensor, w: Tensor | None, acc: ColumnAccumulator, r: int | None) -> None:
        if "weight" in self.attrs:
            if r is None:  # batch several columns into one product (better matrix shapes)
                self.pending.append((d, w))
                if sum(p[0].numel() for p in self.pending) * d.element_size() * 8 > memory_budget():
                    self._flush(acc)
            else:  # one column at a time (per-column statistics): unfold once for all of them
                if self.unfolded is None:
                    self.unfolded = self._unfolded(0, self.n)
                self._weight_squares([(d, w)], acc, r)
        if "bias" in self.attrs:
            gb = d.sum(-1).reshape(d.shape[0], self.n, -1)
            sq = gb * gb
            if w is not None:
                sq = sq * w[:, :, None]
            _emit(acc, self.attrs["bias"], r, sq.sum((0, 1)))

    def _weight_squares(
        self, cols: list[tuple[Tensor, Tensor | None]], acc: ColumnAccumulator, r: int | None
    ) -> None:
        """Σ_n Σ_c w_{c,n} (Δ_{c,n} U_nᵀ)^⊙2 over the pending columns c, in chunks of samples."""
        g = self.groups
        o, positions = cols[0][0].shape[3], cols[0][0].shape[4]
        weight_shape = self.module.weight.shape
        i = math.prod(weight_shape[1:])
        k_all = sum(d.shape[0] for d, _ in cols)
        itemsize = cols[0][0].element_size()
        per_sample = (g * i * positions + k_all * o * (g * positions + g * i)) * itemsize
        budget = _CACHE_BYTES if cols[0][0].device.type == "cpu" else memory_budget() // 4
        step = max(1, budget // max(1, per_sample))
        weighted = any(w is not None for _, w in cols)
        total: Tensor | None = None
        for s0 in range(0, self.n, step):
            s = min(self.n, s0 + step) - s0
            u = self._unfolded(s0, s0 + s).transpose(-1, -2)  # (s, g, L, i)
            parts = [d[:, s0 : s0 + s].permute(1, 2, 0, 3, 4) for d, _ in cols]  # (s, g, k, o, L) each
            dd = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            gw = dd.reshape(s, g, k_all * o, positions) @ u  # (s, g, K·o, i): all K pending columns
            sq = (gw * gw).reshape(s, g, k_all, o, i)
            if weighted:
                ws = [
                    torch.ones_like(d[:, s0 : s0 + s, 0, 0, 0]) if w is None else w[:, s0 : s0 + s]
                    for d, w in cols
                ]
                sq = sq * torch.cat(ws).T.reshape(s, 1, k_all, 1, 1)
            part = sq.sum((0, 2))
            total = part if total is None else total + part
        assert total is not None
        _emit(acc, self.attrs["weight"], r, total.reshape(weight_shape))

    def add_units(self, w: Tensor, acc: ColumnAccumulator) -> None:
        """Columns e_(o,p) at the output of the single call, weights w ``(N, C_out, H', W')``.

        Column e_(o,p) gives the per-sample weight gradient e_o ⊗ U_n[:, p]: its square adds
        Σ_{n,p} w_{n,o,p} U_n[:, p]^⊙2 to row o, a batched product with no backward pass.
        """
        assert len(self.records) == 1
        g = self.groups
        wl = w.reshape(self.n, g, -1, w[0, 0].numel())  # (N, g, o, L)
        if "weight" in self.attrs:
            shape = self.module.weight.shape
            per_sample = (2 * g * math.prod(shape[1:]) + g * wl.shape[2]) * wl.shape[3] * wl.element_size()
            budget = _CACHE_BYTES if wl.device.type == "cpu" else memory_budget() // 4
            step = max(1, budget // max(1, per_sample))
            total: Tensor | None = None
            for s0 in range(0, self.n, step):
                u = self._unfolded(s0, min(self.n, s0 + step))  # (s, g, i, L)
                part = (wl[s0 : s0 + step] @ (u * u).transpose(-1, -2)).sum(0)  # (g, o, i)
                total = part if total is None else total + part
            assert total is not None
            _emit(acc, self.attrs["weight"], None, total.reshape(shape))
        if "bias" in self.attrs:
            _emit(acc, self.attrs["bias"], None, wl.sum((0, 3)).reshape(-1))

    def _flush(self, acc: ColumnAccumulator) -> None:
        if self.pending:
            self._weight_squares(self.pending, acc, None)
            self.pending = []

    def finish(self, acc: ColumnAccumulator) -> None:
        self._flush(acc)


class _EmbeddingLayer(_Layer):
    def __init__(
        self, module: Any, attrs: dict[str, int], records: list[_Record], n: int, graph: bool
    ) -> None:
        super().__init__(module, attrs, records, n, graph)
        emb: nn.Embedding = module
        idx = _cat_positions([rec.input.reshape(n, -1) for rec in records])
        vocab = emb.num_embeddings
        keys = torch.arange(n, device=idx.device).unsqueeze(1) * vocab + idx
        uniq, self.inverse = torch.unique(keys.reshape(-1), return_inverse=True)
        self.rows = uniq % vocab
        self.owner = uniq // vocab
        self.keep = None if emb.padding_idx is None else (self.rows != emb.padding_idx)

    def column(
        self, deltas: list[Tensor | None], w: Tensor | None, r: int, acc: ColumnAccumulator, defer: bool
    ) -> None:
        emb: nn.Embedding = self.module
        dim = emb.embedding_dim
        d = self._deltas(deltas, lambda x: x.reshape(self.n, -1, dim)).reshape(-1, dim)
        summed = torch.zeros(self.rows.shape[0], dim, dtype=d.dtype, device=d.device).index_add(
            0, self.inverse, d
        )
        sq = summed * summed
        if w is not None:
            sq = sq * w[self.owner].unsqueeze(1)
        if self.keep is not None:
            sq = sq * self.keep.unsqueeze(1).to(sq.dtype)
        if acc.trace:
            value = sq.sum()
        else:
            value = torch.zeros(emb.num_embeddings, dim, dtype=d.dtype, device=d.device).index_add(
                0, self.rows, sq
            )
        _emit(acc, self.attrs["weight"], None if defer else r, value)


class _NormLayer(_Layer):
    """``nn.LayerNorm`` and ``nn.RMSNorm``: y = x̂ ⊙ γ (+ β) over ``normalized_shape``."""

    def __init__(
        self, module: Any, attrs: dict[str, int], records: list[_Record], n: int, graph: bool
    ) -> None:
        super().__init__(module, attrs, records, n, graph)
        shape = tuple(module.normalized_shape)
        self.size = math.prod(shape)
        eps = module.eps
        parts = []
        for rec in records:
            x = self._in(rec.input)
            if isinstance(module, nn.LayerNorm):
                xhat = F.layer_norm(x, shape, None, None, eps)
            else:
                xhat = F.rms_norm(x, shape, None, eps)
            parts.append(xhat.reshape(n, -1, self.size))
        self.xhat = _cat_positions(parts)

    def column(
        self, deltas: list[Tensor | None], w: Tensor | None, r: int, acc: ColumnAccumulator, defer: bool
    ) -> None:
        d = self._deltas(deltas, lambda x: x.reshape(self.n, -1, self.size))
        col = None if defer else r
        shape = self.module.weight.shape
        if "weight" in self.attrs:
            gw = (d * self.xhat).sum(1)
            _emit(acc, self.attrs["weight"], col, _weighted_sum(gw * gw, w).reshape(shape))
        if "bias" in self.attrs:
            gb = d.sum(1)
            _emit(acc, self.attrs["bias"], col, _weighted_sum(gb * gb, w).reshape(shape))


def _layer_class(module: nn.Module) -> type[_Layer]:
    if isinstance(module, nn.Linear):
        return _LinearLayer
    if isinstance(module, nn.Conv2d):
        return _Conv2dLayer
    if isinstance(module, nn.Embedding):
        return _EmbeddingLayer
    return _NormLayer


def _valid_call(module: Any, rec: _Record, n: int) -> bool:
    x, out = rec.input, rec.output
    if not rec.identity or not isinstance(x, Tensor) or not isinstance(out, Tensor):
        return False
    if out.dim() == 0 or out.shape[0] != n or x.dim() == 0 or x.shape[0] != n:
        return False
    if isinstance(module, nn.Linear):
        return x.dim() >= 2
    if isinstance(module, nn.Conv2d):
        return x.dim() == 4
    if isinstance(module, nn.Embedding):
        return not x.is_floating_point() and not x.is_complex()
    shape = tuple(module.normalized_shape)
    return x.dim() > len(shape)


class FastCapture:
    """One forward pass with layer hooks, then backward passes per factor column.

    Args:
        model: the module (never mutated: hooks are removed after the forward pass).
        names: the parameter names of the leaves (keys of the params dict, flat order).
        leaves: the parameter leaves.
        create_graph: keep the computation differentiable (parameters require grad).

    After :meth:`forward`, ``fast_indices`` and ``generic_indices`` partition the leaves.
    """

    def __init__(
        self, model: nn.Module, names: Sequence[str], leaves: Sequence[Tensor], *, create_graph: bool
    ) -> None:
        self.model = model
        self.create_graph = create_graph
        self.leaves = [leaf if leaf.requires_grad else leaf.detach().requires_grad_(True) for leaf in leaves]
        self.layers_plan: dict[nn.Module, dict[str, int]] = {}
        count: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            count[id(p)] = count.get(id(p), 0) + 1
        if not _global_hooks():
            for i, name in enumerate(names):
                prefix, _, attr = name.rpartition(".")
                try:
                    module = model.get_submodule(prefix)
                except AttributeError:
                    continue
                own = module._parameters.get(attr)
                if attr not in ("weight", "bias") or own is None or count.get(id(own), 0) != 1:
                    continue
                if _eligible(module):
                    self.layers_plan.setdefault(module, {})[attr] = i
        self.fast_indices = sorted(i for attrs in self.layers_plan.values() for i in attrs.values())
        self.generic_indices = [i for i in range(len(self.leaves)) if i not in set(self.fast_indices)]
        self.layers: list[_Layer] = []
        self.outputs: Tensor | None = None

    def _run(self, fn: Callable[[list[Tensor]], Any], clone: set[nn.Module]) -> tuple[Any, dict, set[int]]:
        owners = {
            id(self.leaves[i]): (i, module)
            for module, attrs in self.layers_plan.items()
            for i in attrs.values()
        }
        tracker = _Tracker(owners)
        records: dict[nn.Module, list[_Record]] = {m: [] for m in self.layers_plan}
        handles = []

        def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            tracker.stack.append(module)

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            tracker.stack.pop()
            inp = args[0] if args else kwargs.get("input")
            attrs = self.layers_plan[module]
            identity = all(getattr(module, a) is self.leaves[i] for a, i in attrs.items())
            records[module].append(_Record(inp, output, identity))
            if module in clone and isinstance(output, Tensor):
                return output.clone()
            return None

        try:
            for module in self.layers_plan:
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            with torch.enable_grad(), tracker:
                z = fn(self.leaves)
        finally:
            for h in handles:
                h.remove()
        return z, records, tracker.flagged

    def forward(self, fn: Callable[[list[Tensor]], Any]) -> Any:
        """Run ``fn(leaves)`` (the model's forward) once with the hooks; return its outputs."""
        z, records, flagged = self._run(fn, set())
        modified = {
            m
            for m, recs in records.items()
            if any(isinstance(r.output, Tensor) and r.output._version != r.version for r in recs)
        }
        if modified:  # a later in-place op (e.g. ReLU(inplace=True)) overwrote a layer output
            z, records, flagged = self._run(fn, modified)
        if not isinstance(z, Tensor) or z.dim() == 0:
            return z  # the caller reports the error
        n = z.shape[0]
        fast: dict[nn.Module, dict[str, int]] = {}
        for module, attrs in self.layers_plan.items():
            recs = records[module]
            ok = all(_valid_call(module, r, n) for r in recs) and all(
                r.output._version == r.version for r in recs
            )
            kept = {a: i for a, i in attrs.items() if i not in flagged}  # only flagged weights leave
            if ok and kept:
                fast[module] = kept
        self.fast_indices = sorted(i for attrs in fast.values() for i in attrs.values())
        self.generic_indices = [i for i in range(len(self.leaves)) if i not in set(self.fast_indices)]
        self.layers = [
            _layer_class(m)(m, attrs, records[m], n, self.create_graph)
            for m, attrs in fast.items()
            if records[m]
        ]
        self.outputs = z
        return z

    def accumulate(
        self, z: Tensor, factor: Factor, acc: ColumnAccumulator, *, trace: bool, per_column: bool
    ) -> None:
        """Add Σ_n w_{n,r} (per-sample gradient for column r)^⊙2 of every fast leaf to ``acc``."""
        outs = [rec.output for layer in self.layers for rec in layer.records]
        if not outs or not z.requires_grad:
            return  # no recorded layer reaches the outputs: zero contributions
        defer = not per_column
        num = factor.num_columns
        for r in range(num):
            cot = factor.columns(r, r + 1)[0]
            w = factor.weights(r, r + 1)
            w0 = None if w is None else w[0]
            if not self.create_graph:
                cot = cot.detach()
                w0 = None if w0 is None else w0.detach()
            grads = torch.autograd.grad(
                z,
                outs,
                cot,
                retain_graph=self.create_graph or r < num - 1,
                create_graph=self.create_graph,
                allow_unused=True,
            )
            pos = 0
            for layer in self.layers:
                k = len(layer.records)
                layer.column(list(grads[pos : pos + k]), w0, r, acc, defer)
                pos += k
        for layer in self.layers:
            layer.finish(acc)


# ----------------------------------------------------------------------------------------------

# Elementwise ops with curvature: their second derivative is taken by autodiff.
ACTIVATIONS = frozenset(
    {"tanh", "sigmoid", "gelu", "silu", "softplus", "elu", "selu", "celu", "mish", "logsigmoid", "softsign"}
)
# Ops linear (or piecewise linear) in each tensor argument and jointly linear in all of them.
_LINEAR = frozenset(
    {
        "add", "sub", "rsub", "neg", "cat", "concat", "concatenate", "stack", "hstack", "vstack",
        "reshape", "view", "view_as", "flatten", "unflatten", "permute", "transpose", "t", "mT",
        "contiguous", "squeeze", "unsqueeze", "getitem", "sum", "mean", "clone", "expand",
        "expand_as", "repeat", "split", "chunk", "narrow", "select", "movedim", "moveaxis",
        "unbind", "pad", "relu", "relu6", "leaky_relu", "hardtanh", "max_pool1d", "max_pool2d",
        "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "avg_pool1d",
        "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
        "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices", "identity", "float", "double",
        "to", "type_as", "detach", "flip", "roll", "zero_pad2d", "constant_pad_nd",
    }
)  # fmt: skip
# Products: linear as long as at most one tensor argument depends on the parameters.
_PRODUCTS = frozenset({"mul", "rmul", "matmul", "mm", "bmm", "einsum", "outer", "linear", "conv1d", "conv2d"})
_DIVISIONS = frozenset({"div", "truediv", "true_divide"})
_METADATA = frozenset(
    {"size", "dim", "numel", "is_floating_point", "shape", "dtype", "device", "ndim", "requires_grad",
     "grad_fn", "is_leaf", "data_ptr", "stride", "storage_offset", "is_contiguous", "get_device",
     "element_size", "__get__", "_version", "grad", "names", "layout", "is_sparse", "is_cuda"}
)  # fmt: skip


class SweepUnsupportedError(Exception):
    """An op of the model is not covered by the sweep's rules (``reason`` says which)."""


class SweepTooCostlyError(SweepUnsupportedError):
    """More columns per sample than ``max_columns`` (``args[0]`` is the count R)."""


def _name(func: Any) -> str:
    name = getattr(func, "__name__", str(func))
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name.strip("_")


def _tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Tensor]:
    out: list[Tensor] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(b for b in a if isinstance(b, Tensor))
    return out


class _Activation:
    __slots__ = ("derivs", "func", "input", "kwargs", "output", "version")

    def __init__(self, func: Any, inp: Tensor, output: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.func = func
        self.input = inp
        self.output = output
        self.kwargs = (args, kwargs)
        self.version = (inp._version, output._version)
        self.derivs: tuple[Tensor, Tensor] | None = None

    def derivatives(self) -> tuple[Tensor, Tensor]:
        """φ'(u) and φ''(u) elementwise, by differentiating Σ φ(u) and Σ φ'(u) (φ acts elementwise)."""
        if self.derivs is not None:
            return self.derivs
        args, kwargs = self.kwargs
        with torch.enable_grad():
            x = self.input.detach().requires_grad_(True)
            y = self.func(x, *args, **kwargs)
            (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
            (h,) = torch.autograd.grad(g.sum(), x, allow_unused=True) if g.requires_grad else (None,)
        self.derivs = (g.detach(), torch.zeros_like(x) if h is None else h)
        return self.derivs


class _Recorder(TorchFunctionMode):
    """Records elementwise activations; raises :class:`SweepUnsupportedError` for unknown curvature."""

    def __init__(self, fast: set[int], n: int | None = None) -> None:
        super().__init__()
        self.fast = fast
        self.activations: list[_Activation] = []
        self.problem: str | None = None

    def _refuse(self, reason: str) -> None:
        if self.problem is None:
            self.problem = reason

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if name in _METADATA or self.problem is not None:
            return out
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, Tensor)]
        if not any(o.requires_grad for o in outs):
            return out
        tensors = _tensors(args, kwargs)
        dep = [t for t in tensors if t.requires_grad]
        if name in ACTIVATIONS:
            if (
                kwargs.get("inplace")
                or name.endswith("_")
                or len(dep) != 1
                or not args
                or dep[0] is not args[0]
                or not isinstance(out, Tensor)
            ):
                self._refuse(f"{name} in place or on several parameter-dependent tensors")
            else:
                self.activations.append(_Activation(func, args[0], out, tuple(args[1:]), kwargs))
        elif name in _LINEAR or name.rstrip("_") in _LINEAR:
            if name.endswith("_") or kwargs.get("inplace"):
                self._refuse(f"in-place {name}")
        elif name in ("linear", "conv1d", "conv2d", "embedding"):
            # weight and bias must be parameters of a recorded fast layer, or constants
            for t in tensors[1:]:
                if t.requires_grad and id(t) not in self.fast:
                    self._refuse(f"{name} with a weight that depends on the parameters in another way")
        elif name in _PRODUCTS:
            if len(dep) > 1:
                self._refuse(f"{name} of two parameter-dependent tensors (a bilinear op, e.g. attention)")
        elif name in _DIVISIONS:
            if len(tensors) > 1 and tensors[1].requires_grad:
                self._refuse(f"{name} by a parameter-dependent tensor")
        elif name == "dropout" or name.endswith("dropout"):
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if training and p > 0:
                self._refuse("dropout in train mode (a random function)")
        elif name == "batch_norm":
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            if training:
                raise error(
                    "module_hessian_diagonal(model, loss)",
                    "the structured sweep squares per-sample gradients, which needs a model that "
                    "treats the samples of a batch independently",
                    "BatchNorm normalizing with batch statistics (train mode or track_running_stats=False)",
                    "Call model.eval() to use the running statistics, or use method='hvp' (one-hot "
                    "Hessian-vector products of the whole batch loss).",
                )
            affine = [t for t in tensors[3:5] if t.requires_grad]
            if affine:
                self._refuse("BatchNorm with trainable affine parameters (no sweep rule yet)")
        else:
            self._refuse(f"the op '{name}' (no sweep rule)")
        return out


# Bytes of the largest layer-output gradient of the columns pulled back in one batched pass, when
# ``chunk_size`` is None: on CPU, 42 MB batches of a CNN's (k, N, C, H, W) gradients ran 2-3x slower
# than batches of 2-5 columns (blocks this large are freshly mapped, page-faulted memory).
_COLUMN_BYTES = 16 << 20
# From this size of one column's largest layer-output gradient (CPU, ``chunk_size`` None), columns
# go through plain backward passes one at a time: vmap runs a convolution's backward per column
# and concatenates, and its batched ReLU backward was slower too (benchmark CNN: 39 ms for 9
# columns one at a time against 54-68 ms in batches of 2-4, 1 thread).
_LOOP_BYTES = 1 << 20

_Pull = Callable[[list[tuple[Tensor, Tensor]], "Tensor | None", ColumnAccumulator, frozenset[int]], None]


class _UnitPlan:
    """The columns e_j (weights w_j) of a curved activation, in closed form along chains of layers.

    When the activation input u = W a (+ b) is the output of a ``nn.Linear`` called once on
    ``(N, in_features)``, column e_j gives that layer the per-sample weight gradient e_j a_nᵀ,
    i.e. Σ_n w_{n,j} a_n^⊙2 in row j: the layer's deferred Σ_c w_c δ_c^⊙2 gains w itself, with
    no backward pass. The column's pullback to a is the row W_j. When a = ψ(u') is an
    elementwise activation of the output u' of another such layer, the columns at u' are
    ψ'(u') ⊙ W_j, and Σ_j w_j (ψ'(u') ⊙ W_j)^⊙2 = ψ'(u')^⊙2 ⊙ (w W^⊙2): one matrix product.
    Further up such a chain the columns δ_j differ per sample; they are carried explicitly
    (δ ← ψ'(u'') ⊙ (δ W'), adding ψ'^⊙2 ⊙ Σ_j w_j (δ_j W')^⊙2 to each layer) and handed to a
    batched backward pass only where the chain ends in another kind of node. When u is the
    output of a ``nn.Conv2d`` called once, that layer's part is closed too (Σ_{n,p} w U_n^⊙2 per
    output channel) and only the layers upstream get one-hot columns. Any other graph (the
    activation input not a layer output, e.g. a residual add; a Linear over positions) uses
    one-hot columns at the activation input.
    """

    def __init__(self, capture: FastCapture, acts: Sequence[_Activation]) -> None:
        self.leaves = capture.leaves
        self.single: dict[int, _LinearLayer] = {
            id(layer.records[0].output): layer
            for layer in capture.layers
            if isinstance(layer, _LinearLayer) and len(layer.records) == 1 and layer.positions == 1
        }
        self.convs: dict[int, _Conv2dLayer] = {
            id(layer.records[0].output): layer
            for layer in capture.layers
            if isinstance(layer, _Conv2dLayer) and len(layer.records) == 1
        }
        self.acts = {id(a.output): a for a in acts}

    def _weight(self, layer: _LinearLayer) -> Tensor | None:
        idx = layer.attrs.get("weight")
        return None if idx is None else self.leaves[idx].detach()

    def _step(self, x: Tensor) -> tuple[_Activation, _LinearLayer] | None:
        """(ψ, layer) when x = ψ(u') is an elementwise activation of a one-position Linear's output u'."""
        prev = self.acts.get(id(x))
        layer = None if prev is None else self.single.get(id(prev.input))
        return None if prev is None or layer is None else (prev, layer)

    def unit_columns(
        self, act: _Activation, w: Tensor, chunk: int, pull: _Pull, acc: ColumnAccumulator
    ) -> None:
        """Add Σ_j w_j (J e_j)^⊙2 terms of the columns e_j at ``act.input`` to the layers."""
        n = w.shape[0]
        flat_w = w.reshape(n, -1)
        conv = self.convs.get(id(act.input))
        if conv is not None:  # the convolution producing u in closed form, one-hot columns upstream
            conv.add_units(w, acc)
            if conv.records[0].input.requires_grad:
                self._one_hot(act.input, flat_w, chunk, pull, acc, frozenset({id(conv)}))
            return
        layer = self.single.get(id(act.input))
        if layer is None:
            self._one_hot(act.input, flat_w, chunk, pull, acc, frozenset())
            return
        layer.add_diagonal(flat_w)
        x = layer.records[0].input
        weight = self._weight(layer)
        if not x.requires_grad:
            return
        if weight is None:  # a weight outside the params: one-hot columns for the layers upstream
            self._one_hot(act.input, flat_w, chunk, pull, acc, frozenset({id(layer)}))
            return
        step = self._step(x)
        if step is None:  # dense rows W_j at the layer input
            for j0, j1 in _ranges(flat_w.shape[1], chunk):
                rows = weight[j0:j1, None, :].expand(j1 - j0, n, weight.shape[1])
                pull([(x, rows.reshape(j1 - j0, *x.shape))], flat_w[:, j0:j1].T, acc, frozenset())
            return
        prev, inner = step
        d1 = prev.derivatives()[0].reshape(n, -1)
        inner.add_diagonal(d1 * d1 * (flat_w @ (weight * weight)))
        if not inner.records[0].input.requires_grad:
            return
        for j0, j1 in _ranges(flat_w.shape[1], chunk):
            self._walk(d1 * weight[j0:j1, None, :], flat_w[:, j0:j1].T, prev, inner, pull, acc)

    def _walk(
        self,
        delta: Tensor,
        wt: Tensor,
        act: _Activation,
        layer: _LinearLayer,
        pull: _Pull,
        acc: ColumnAccumulator,
    ) -> None:
        """Carry columns ``delta`` (k, N, d) at ``layer``'s output (already in its D2) upstream.

        ``layer``'s input requires grad (there are layers upstream).
        """
        k, n = delta.shape[:2]
        while True:
            x = layer.records[0].input
            weight = self._weight(layer)
            if weight is None:
                pull([(act.input, delta.reshape(k, *act.input.shape))], wt, acc, frozenset({id(layer)}))
                return
            cols = delta @ weight  # (k, N, d_in): the columns at x
            step = self._step(x)
            if step is None:
                pull([(x, cols.reshape(k, *x.shape))], wt, acc, frozenset())
                return
            act, layer = step
            d1 = act.derivatives()[0].reshape(n, -1)
            layer.add_diagonal(d1 * d1 * _weighted_squares(cols, wt))
            if not layer.records[0].input.requires_grad:
                return
            delta = cols * d1

    def _one_hot(
        self,
        node: Tensor,
        flat_w: Tensor,
        chunk: int,
        pull: _Pull,
        acc: ColumnAccumulator,
        skip: frozenset[int],
    ) -> None:
        n, units = flat_w.shape
        for s0, s1 in _ranges(units, chunk):
            eye = torch.zeros(s1 - s0, units, dtype=flat_w.dtype, device=flat_w.device)
            eye[torch.arange(s1 - s0), torch.arange(s0, s1)] = 1.0
            cot = eye[:, None, :].expand(s1 - s0, n, units).reshape(s1 - s0, *node.shape)
            pull([(node, cot)], flat_w[:, s0:s1].T, acc, skip)


def _loss_factor(loss: LossSpec, z: Tensor, targets: Any) -> Factor:
    """The loss Hessian's columns; for cross-entropy on ``(N, C)`` logits C − 1 of them (its rank).

    diag(p) − ppᵀ = Σ_{j<C} D_j l_j l_jᵀ (the LDLᵀ factorization of the multinomial
    covariance): with the classes sorted by probability, largest last, tail masses
    q_j = Σ_{i>j} p_i (q_{-1} = Σ p = 1), D_j = p_j q_j / q_{j-1}, (l_j)_j = 1 and (l_j)_i = −p_i / q_j
    for i > j. Every q_j ≥ max p ≥ 1/C, so no division is ill-conditioned.
    """
    if not isinstance(loss, CrossEntropyLoss) or z.dim() != 2 or z.shape[1] < 2:
        return loss.factor(z, targets)
    c = z.shape[1]
    p = torch.softmax(z, dim=1)
    order = p.argsort(dim=1)
    ps = p.gather(1, order)  # ascending: the largest probability last
    tail = ps.flip(1).cumsum(1).flip(1)  # tail[:, j] = Σ_{i≥j} ps_i
    q, q_prev = tail[:, 1:], tail[:, :-1]  # (N, C−1): q_j and q_{j−1}
    d = ps[:, :-1] * q / q_prev
    j = torch.arange(c - 1, device=z.device)[:, None]
    i = torch.arange(c, device=z.device)[None, :]
    low = (-ps[:, None, :] / q[:, :, None]) * (i > j)  # (N, C−1, C): −p_i / q_j below the diagonal
    cols_sorted = d.sqrt()[:, :, None] * (low + (i == j).to(z.dtype))
    cols = torch.zeros_like(cols_sorted).scatter(2, order[:, None, :].expand(-1, c - 1, -1), cols_sorted)
    return Factor.from_tensor(cols.transpose(0, 1).contiguous())


def _weighted_squares(cols: Tensor, wt: Tensor) -> Tensor:
    """Σ_j wt[j, n] cols[j, n, :]^⊙2 as an (N, d) tensor, by one batched product over the samples."""
    return torch.bmm(wt.T.unsqueeze(1), (cols * cols).transpose(0, 1)).squeeze(1)


def _ranges(total: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(total, s + step)) for s in range(0, total, step)]


def sweep_diagonal(
    call: str,
    model: nn.Module,
    names: Sequence[str],
    leaves: Sequence[Tensor],
    forward: Callable[[list[Tensor]], Any],
    loss: LossSpec,
    targets: Any,
    *,
    num_probes: int | None,
    generator: torch.Generator | None,
    chunk_size: int | None,
    max_columns: int | None = None,
) -> tuple[list[Tensor], list[Tensor] | None, int]:
    """The Hessian diagonal per leaf, and R.

    For curvature propagation also the per-entry stderr per leaf, followed by one more
    0-dim tensor: the standard error of the trace over the probes.

    Raises :class:`SweepUnsupportedError` when a parameter or op is not covered by the rules.
    """
    capture = FastCapture(model, names, leaves, create_graph=False)
    fast_ids = {id(capture.leaves[i]) for i in capture.fast_indices}
    recorder = _Recorder(fast_ids)

    def run(ls: list[Tensor]) -> Any:
        recorder.activations, recorder.problem = [], None  # FastCapture may rerun the forward
        with recorder:
            return forward(ls)

    with torch.enable_grad():
        z = capture.forward(run)
    if recorder.problem is not None:
        raise SweepUnsupportedError(recorder.problem)
    if capture.generic_indices:
        bad = ", ".join(names[i] for i in capture.generic_indices[:3])
        raise SweepUnsupportedError(f"parameters outside a supported Linear/Conv2d/Embedding call ({bad})")
    for layer in capture.layers:
        # A layer called again on something that depends on the parameters may see its own
        # weight in its input: a bilinear term (W applied to a function of W) with no rule yet.
        recs = layer.records
        if len(recs) > 1 and any(isinstance(r.input, Tensor) and r.input.requires_grad for r in recs):
            raise SweepUnsupportedError(
                f"a {type(layer.module).__name__} called {len(recs)} times on parameter-dependent inputs "
                "(a weight applied to something that may depend on it)"
            )
    if not isinstance(z, Tensor) or z.dim() == 0:
        raise SweepUnsupportedError("model outputs that are not a batched tensor")
    loss.check(call, z, targets)
    acts = [a for a in recorder.activations if a.output.requires_grad]
    for a in acts:
        if (a.input._version, a.output._version) != a.version:
            raise SweepUnsupportedError("an activation input or output modified in place")
    outs = [rec.output for layer in capture.layers for rec in layer.records]
    c = loss.scale(z)
    with torch.enable_grad():
        total = loss.total(z, targets)
    # Activation adjoints ḡ = ∂L/∂a and column weights ḡ φ''(u) / c (c is applied at the end).
    curved: list[tuple[_Activation, Tensor]] = []
    if acts:
        gbar = torch.autograd.grad(total, [a.output for a in acts], retain_graph=True, allow_unused=True)
        for a, g in zip(acts, gbar):
            if g is not None:
                curved.append((a, (g * a.derivatives()[1] / c).detach()))
    factor = _loss_factor(loss, z.detach(), targets)
    n = z.shape[0]
    shapes = [leaf.shape for leaf in capture.leaves]

    def pull(
        pairs: list[tuple[Tensor, Tensor]],
        weights: Tensor | None,
        acc: ColumnAccumulator,
        skip: frozenset[int] = frozenset(),
    ) -> None:
        """VJPs of k columns (cotangents ``(k, *node.shape)`` at the nodes) into ``acc``.

        One batched pass (``is_grads_batched``), or with ``chunk_size == 1`` one plain backward
        pass per column. Layers whose ids are in ``skip`` got these columns in closed form.
        """
        k = pairs[0][1].shape[0]
        if chunk_size == 1 or k == 1:
            for j in range(k):
                grads = torch.autograd.grad(
                    [nd for nd, _ in pairs],
                    outs,
                    [ct[j] for _, ct in pairs],
                    retain_graph=True,
                    allow_unused=True,
                )
                batch: list[Tensor | None] = [None if g is None else g.unsqueeze(0) for g in grads]
                feed(batch, None if weights is None else weights[j : j + 1], acc, skip)
            return
        grads = torch.autograd.grad(
            [nd for nd, _ in pairs],
            outs,
            [ct for _, ct in pairs],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        feed(grads, weights, acc, skip)

    def feed(
        grads: Sequence[Tensor | None], weights: Tensor | None, acc: ColumnAccumulator, skip: frozenset[int]
    ) -> None:
        pos = 0
        for layer in capture.layers:
            m = len(layer.records)
            deltas = list(grads[pos : pos + m])
            pos += m
            if id(layer) not in skip and any(d is not None for d in deltas):
                layer.columns(deltas, weights, acc)

    if not outs:
        zero = [torch.zeros(s, dtype=z.dtype, device=z.device) for s in shapes]
        return zero, (None if num_probes is None else [t.clone() for t in zero]), 0
    num_cols = factor.num_columns + sum(int(w[0].numel()) for _, w in curved)
    if max_columns is not None and num_cols > max_columns:
        raise SweepTooCostlyError(num_cols)
    if chunk_size is None:  # columns per batched pass; on CPU their output gradients should stay small
        col_bytes = max(int(o.numel()) for o in outs) * z.element_size() if z.device.type == "cpu" else 1
        chunk_size = 1 if col_bytes >= _LOOP_BYTES else max(1, min(64, _COLUMN_BYTES // max(1, col_bytes)))

    if num_probes is None:
        acc = ColumnAccumulator(shapes, 1, trace=False, per_column=False, like=z)
        for s0 in range(0, factor.num_columns, chunk_size):
            s1 = min(factor.num_columns, s0 + chunk_size)
            cols = factor.columns(s0, s1).detach()
            w = factor.weights(s0, s1)
            pull([(z, cols)], None if w is None else w.detach(), acc)
        plan = _UnitPlan(capture, acts)
        for a, w in curved:
            plan.unit_columns(a, w, chunk_size, pull, acc)
        for layer in capture.layers:
            layer.finish(acc)
        est, _ = acc.result(average=False, scale=c)
        return _split(est, shapes), None, num_cols

    # Curvature propagation: per probe, cotangents P (positive columns) and Q (negative ones).
    cols_all = factor.columns(0, factor.num_columns).detach()  # (R, N, *out)
    w_loss = factor.weights(0, factor.num_columns)
    w_loss = (
        torch.ones(cols_all.shape[:2], dtype=z.dtype, device=z.device) if w_loss is None else w_loss.detach()
    )
    wl = w_loss.reshape(*w_loss.shape, *([1] * (cols_all.dim() - 2)))
    samples: list[Tensor] = []
    for _ in range(num_probes):
        acc = ColumnAccumulator(shapes, 1, trace=False, per_column=False, like=z)
        v = _signs(w_loss.shape, generator, z)
        vv = v.reshape(wl.shape)
        root = wl.abs().sqrt() * vv
        p_z = (cols_all * root * (wl > 0)).sum(0)
        q_z = (cols_all * root * (wl < 0)).sum(0)
        cots_pq = [(z, torch.stack([p_z, q_z]))]
        for a, w in curved:
            r = w.abs().sqrt() * _signs(w.shape, generator, z)
            cots_pq.append((a.input, torch.stack([r * (w > 0), r * (w < 0)])))
        signs = torch.tensor([1.0, -1.0], dtype=z.dtype, device=z.device)[:, None].expand(2, n)
        pull(cots_pq, signs, acc)
        for layer in capture.layers:
            layer.finish(acc)
            if isinstance(layer, _LinearLayer):
                layer.D2 = None  # deferred column sums belong to this probe only
        est, _ = acc.result(average=False, scale=c)
        samples.append(est)
    stack = torch.stack(samples)
    mean = stack.mean(0)
    err = (
        stack.std(0, correction=1) / math.sqrt(num_probes)
        if num_probes > 1
        else torch.full_like(mean, math.nan)
    )
    traces = stack.sum(1)
    trace_err = (
        traces.std(correction=1) / math.sqrt(num_probes) if num_probes > 1 else traces.new_tensor(math.nan)
    )
    return _split(mean, shapes), [*_split(err, shapes), trace_err], num_cols


def _signs(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    bits = torch.randint(0, 2, tuple(shape), generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _split(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    out, pos = [], 0
    for s in shapes:
        k = math.prod(s)
        out.append(flat[pos : pos + k].reshape(s))
        pos += k
    return out

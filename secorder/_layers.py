"""Fast path for ``nn.Module`` models: squared per-sample gradients of common layers by matrix products.

For a layer with output o = W a (+ b) and output gradient δ_n = ∂(s_nᵀ z_n)/∂o_n for one
column s of the loss-Hessian factor, sample n's weight gradient is δ_n a_nᵀ (summed over
positions t when the layer sees a sequence or an image: Σ_t δ_{n,t} a_{n,t}ᵀ). So

* ``nn.Linear`` without extra dimensions: Σ_n (δ_n a_nᵀ)^⊙2 = (δ^⊙2)ᵀ (a^⊙2), one matrix
  product, and summed over the factor's columns *before* it (the inputs do not depend on
  the column);
* ``nn.Linear`` with extra leading dimensions and ``nn.Conv2d`` (on unfolded inputs): the
  per-sample gradients Δ_nᵀ A_n by a batched product, squared and summed over n, in
  chunks of samples; for traces ‖Δ_nᵀ A_n‖²_F = ⟨Δ_n Δ_nᵀ, A_n A_nᵀ⟩ when that is cheaper;
* ``nn.Embedding``: per-sample row sums of δ over repeated indices (``index_add``), squared;
* ``nn.LayerNorm`` / ``nn.RMSNorm``: Σ_t δ_{n,t} ⊙ x̂_{n,t} with the recomputed normalized
  input x̂;
* biases: Σ_t δ_{n,t}.

How it runs: :class:`FastCapture` makes the parameter leaves require grad, registers
forward hooks on the supported layers (removed afterwards: the model is left as it was),
and runs one forward pass under a ``TorchFunctionMode`` that flags any use of a fast
layer's parameter outside that layer's own call (tied weights, a weight read by another
module, parametrizations) — those parameters, layers called on inputs without the batch
in dimension 0, and layers of any other type go to the generic route. Output gradients
for every recorded layer output come from ``torch.autograd.grad`` (one backward pass per
factor column, no parameter gradients formed). Layer outputs later modified in place
(e.g. ``ReLU(inplace=True)``) are detected by their version counter and the forward is
rerun with those outputs cloned.

Assumption (documented, checked where possible): samples are independent and the batch
is dimension 0 of every captured layer input and output (checked by size).
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
from secorder._losses import Factor
from secorder._persample import ColumnAccumulator

__all__ = ["SUPPORTED_LAYERS", "FastCapture"]

_RMSNorm: type[nn.Module] | None = getattr(nn, "RMSNorm", None)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm) + (
    (_RMSNorm,) if _RMSNorm is not None else ()
)

# Functions that only read metadata: using a parameter in them is not a use of its values.
_TENSOR: Any = Tensor
_METADATA: set[Any] = {
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
        if func not in _METADATA:
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

"""The generic exact route: per-sample vector-Jacobian products with ``torch.func``, and the accumulator.

For a factorization ∇²_{z_n} l_n = Σ_r w_{n,r} s_{n,r} s_{n,r}ᵀ (see :mod:`secorder._losses`),

    diag(Jᵀ M J) = c Σ_n Σ_r w_{n,r} (J_nᵀ s_{n,r})²,

where J_n is the Jacobian of sample n's outputs. :func:`per_sample_columns` forms the
J_nᵀ s_{n,r} by running the model on one sample at a time under ``vmap`` (one forward
and one linearization per sample, then ``vmap`` over a chunk of columns), so it works
for any function of the parameters that treats samples independently. Every (sample,
column) pair yields one P-vector; at most ``chunk_size`` of them exist at once.

:class:`ColumnAccumulator` gathers the per-column contributions from this route and from
the fast layer route (:mod:`secorder._layers`) into a sum (GGN, empirical Fisher) or a
mean with per-entry standard errors over columns (MC Fisher, one column per sample draw).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from secorder._chunking import default_chunk_size
from secorder._errors import error
from secorder._losses import Factor
from secorder._pytree import flatten, unflatten

__all__ = ["ColumnAccumulator", "check_same_outputs", "input_dims", "per_sample_columns"]


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


def input_dims(inputs: Any, batch: int) -> tuple[list[Any], Any, list[int | None]]:
    """Flatten ``inputs``; tensor leaves whose first dimension is the batch are per-sample (dim 0)."""
    leaves, spec = flatten(inputs)
    dims: list[int | None] = [
        0 if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch else None for a in leaves
    ]
    return leaves, spec, dims


def check_same_outputs(call: str, alone: Tensor, batched: Tensor, what: str) -> None:
    """Raise if outputs computed per sample (or on a sub-batch) differ from the batch outputs."""
    tol = math.sqrt(torch.finfo(batched.dtype).eps) * 10
    scale = 1.0 + float(batched.detach().abs().max()) if batched.numel() else 1.0
    if alone.shape != batched.shape or not torch.allclose(
        alone.detach(), batched.detach(), rtol=tol, atol=tol * scale
    ):
        diff = (
            float((alone.detach() - batched.detach()).abs().max())
            if alone.shape == batched.shape
            else f"shape {tuple(alone.shape)} vs {tuple(batched.shape)}"
        )
        raise error(
            call,
            "per-sample quantities (kind='empirical', kind='mc' and the exact GGN) need a model "
            "that treats the samples of a batch independently",
            f"outputs that change when {what} (max difference {diff}): the model couples samples "
            "(e.g. BatchNorm in train mode) or is random (e.g. dropout in train mode)",
            "Call model.eval() (or freeze the batch statistics), or use kind='ggn' with num_probes "
            "(Hutchinson), which is defined through the whole batch's Jacobian.",
        )


def per_sample_columns(
    call: str,
    fn: Callable[[list[Tensor], Any], Tensor],
    leaves: Sequence[Tensor],
    indices: Sequence[int],
    inputs: Any,
    outputs: Tensor,
    factor: Factor,
    acc: ColumnAccumulator,
    *,
    chunk_size: int | None,
    check_independence: bool,
) -> None:
    """Add c-less contributions Σ_n w_{n,r} (J_nᵀ s_{n,r})² for the leaves ``indices`` to ``acc``.

    Args:
        call: the public call form, for errors.
        fn: ``fn(leaves, inputs) -> outputs`` (batch first).
        leaves: all parameter leaves; only ``indices`` are differentiated.
        indices: the leaves to compute.
        inputs: the model inputs (a pytree; see :func:`input_dims`).
        outputs: ``fn(leaves, inputs)``, for the batch size and the independence check.
        factor: the columns s and weights w.
        acc: the accumulator.
        chunk_size: (sample, column) pairs formed at once (``None``: from the memory budget).
        check_independence: compare each sample's outputs computed alone with the batch's.
    """
    n = outputs.shape[0]
    r = factor.num_columns
    sub = [leaves[i] for i in indices]
    size = sum(int(t.numel()) for t in sub)
    x_leaves, x_spec, dims = input_dims(inputs, n)
    rows = chunk_size if chunk_size is not None else default_chunk_size(n * r, size, sub[0].dtype.itemsize)
    k_cols = max(1, min(r, rows))
    n_chunk = max(1, rows // k_cols)
    trace = acc.trace

    def f_sub(s: list[Tensor], x: Any) -> Tensor:
        full = list(leaves)
        for i, t in zip(indices, s):
            full[i] = t
        return fn(full, x)

    def single(s: list[Tensor], x_parts: list[Any], cols: Tensor, w: Tensor | None) -> tuple[Any, Tensor]:
        x = unflatten(x_spec, [a.unsqueeze(0) if d == 0 else a for a, d in zip(x_parts, dims)])
        zn, vjp_fn = vjp(lambda ss: f_sub(ss, x)[0], s)[:2]
        grads = vmap(vjp_fn)(cols)[0]
        squares = []
        for g in grads:
            sq = g * g
            if w is not None:
                sq = sq * w.reshape(-1, *([1] * (sq.dim() - 1)))
            squares.append(sq)
        if trace:
            return sum(sq.flatten(1).sum(1) for sq in squares), zn
        return squares, zn

    for c0 in range(0, r, k_cols):
        c1 = min(r, c0 + k_cols)
        cols = factor.columns(c0, c1)
        w = factor.weights(c0, c1)
        totals: Any = None
        for n0 in range(0, n, n_chunk):
            n1 = min(n, n0 + n_chunk)
            x_chunk = [a[n0:n1] if d == 0 else a for a, d in zip(x_leaves, dims)]
            w_chunk = None if w is None else w[:, n0:n1]
            out, zn = vmap(single, in_dims=(None, dims, 1, None if w is None else 1))(
                sub, x_chunk, cols[:, n0:n1], w_chunk
            )
            if check_independence and c0 == 0:
                check_same_outputs(call, zn, outputs[n0:n1], "each sample is run alone")
            if trace:
                part = out.sum(0)
                totals = part if totals is None else totals + part
            else:
                parts = [o.sum(0) for o in out]
                totals = parts if totals is None else [t + p for t, p in zip(totals, parts)]
        if trace:
            acc.add_trace_columns(c0, totals)
        else:
            for i, t in zip(indices, totals):
                acc.add(i, c0, t)

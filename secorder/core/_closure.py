"""The Hessian of a closure ``func()`` over user tensors, as batched operators.

The eager API takes a closure ``func`` and a list of tensors that ``func`` captures.
The closure cannot be re-evaluated at other parameter values, and ``torch.func``
transforms cannot see the captured tensors, so the operators here work on the
autograd graph of one call of ``func()``: the gradient g = ∇L is formed once with
``create_graph=True``, and H v = ∇(gᵀ v) is a backward pass through that retained graph.

Batching: a chunk of rows is pushed through :func:`torch.func.vmap` over
:func:`torch.autograd.grad` on the retained graph. This was measured faster than
autograd's own ``is_grads_batched=True`` (which runs on the legacy vmap prototype and
loops over the rows for ``tanh_backward``, ``_log_softmax_backward_data`` and other
ops without a legacy batching rule) and than a Python loop of backward passes; see
``benchmarks/bench_eager.py``. Where ``vmap`` fails for an op, the chunk falls back to
that loop (same numbers, slower).

Block structure: for the diagonal, only the diagonal blocks H_jj matter, one per
tensor p_j, and H_jj v_j = ∇_{p_j}(g_jᵀ v_j) needs a backward pass from g_j to p_j
only, instead of pushing zero tangents through every other gradient and computing
cross terms that are thrown away. :meth:`ClosureGraph.operator` builds the operator
of any principal sub-block (one tensor for the diagonal, all tensors for products
and Hutchinson); the estimators of :mod:`secorder.estimators` consume it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from secorder._chunking import default_chunk_size
from secorder._errors import error
from secorder._kernels import decomposed_kernels
from secorder._pytree import accumulating, accumulation_dtype, numel, ravel, unravel
from secorder._validate import (
    check_finite_result,
    check_finite_tree,
    check_grad_context,
    check_same_dtype_device,
)

__all__ = [
    "MAX_CHUNK_ROWS",
    "ClosureGraph",
    "ClosureHessianOperator",
    "SparseProbeOperator",
    "check_params",
    "check_vectors",
    "chunk_rows",
]

# Rows per batched backward pass. The memory budget alone would put whole blocks of
# thousands of one-hot rows through one pass; measured on the MLP of
# benchmarks/bench_eager.py, chunks of 128-256 rows ran 1.3-2x faster than whole
# blocks of 512-1024 (the per-row activations of a chunk stay in cache), and 256
# is as fast as one chunk on the 256-dimensional Laplacian.
MAX_CHUNK_ROWS = 256


def check_params(call: str, params: object) -> list[Tensor]:
    """Check that ``params`` is a list (or tuple, or iterable) of real floating tensors."""
    if isinstance(params, (Tensor, dict)) or not hasattr(params, "__iter__"):
        raise error(
            call,
            "params must be a list of tensors",
            f"a {type(params).__name__}",
            "Wrap a single tensor in a list, e.g. params=[x], or pass list(model.parameters()).",
            cls=TypeError,
        )
    out = list(params)
    if not out:
        raise error(
            call,
            "params must contain at least one tensor",
            "an empty list",
            "Pass the tensors to differentiate, e.g. list(model.parameters()).",
        )
    for i, p in enumerate(out):
        if not isinstance(p, Tensor):
            raise error(
                call,
                "every entry of params must be a torch.Tensor",
                f"{type(p).__name__} at params[{i}]",
                "Pass tensors only, e.g. list(model.parameters()).",
                cls=TypeError,
            )
        if not p.is_floating_point():
            raise error(
                call,
                "every entry of params must be a real floating-point tensor",
                f"dtype {p.dtype} at params[{i}]",
                "Second-order quantities of integer or complex tensors are not defined; cast with .double().",
                cls=TypeError,
            )
    return out


def check_vectors(call: str, name: str, v: object, params: Sequence[Tensor]) -> list[Tensor]:
    """Check that ``v`` is a tensor (one parameter) or a list of tensors shaped like ``params``.

    Entries are cast to their parameter's dtype and device.
    """
    vs = [v] if isinstance(v, Tensor) else v
    shapes = [tuple(p.shape) for p in params]
    if not isinstance(vs, (list, tuple)) or any(not isinstance(a, Tensor) for a in vs):
        raise error(
            call,
            f"{name} must be a tensor or a list of tensors shaped like params {shapes}",
            f"a {type(v).__name__}",
            "Build it as [torch.randn_like(p) for p in params].",
            cls=TypeError,
        )
    got = [tuple(a.shape) for a in vs]
    if got != shapes:
        raise error(
            call,
            f"{name} must have one tensor per entry of params, with the same shapes {shapes}",
            f"shapes {got}",
            "Build it as [torch.randn_like(p) for p in params].",
        )
    return [a.to(dtype=p.dtype, device=p.device) for a, p in zip(vs, params)]


def chunk_rows(op: ClosureHessianOperator) -> int:
    """Rows per batched product for ``op``: the memory-budget rule, capped at :data:`MAX_CHUNK_ROWS`."""
    return min(MAX_CHUNK_ROWS, default_chunk_size(op.size, op.size, op.dtype.itemsize))


def _check_loss(call: str, what: str, out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise error(
            call,
            f"{what} must return a scalar (0-dim) tensor",
            f"a {type(out).__name__}",
            "Return the loss itself as a tensor, e.g. torch.nn.functional.mse_loss(model(x), y).",
            cls=TypeError,
        )
    if out.dim() != 0 or not out.is_floating_point():
        raise error(
            call,
            f"{what} must return a scalar (0-dim) real floating-point tensor",
            f"a tensor of shape {tuple(out.shape)} and dtype {out.dtype}",
            "Reduce it with .sum() or .mean() and compute it in floating point.",
        )
    return out


def _batched_grad(
    outputs: list[Tensor], inputs: list[Tensor], rows: list[Tensor], create_graph: bool
) -> list[Tensor]:
    """``rows[j][i] ↦ ∇_inputs Σ_j ⟨outputs[j], rows[j][i]⟩`` for every row i, batched."""

    def one(*vs: Tensor) -> tuple[Tensor, ...]:
        res = torch.autograd.grad(
            outputs, inputs, vs, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        return tuple(r if r is not None else torch.zeros_like(x) for r, x in zip(res, inputs))

    with torch.enable_grad():
        try:
            return list(vmap(one)(*rows))
        except (RuntimeError, NotImplementedError):
            # An op of the user's graph has no batching rule that works here: the
            # same products, one backward pass per row.
            per_row = [one(*[r[i] for r in rows]) for i in range(rows[0].shape[0])]
            return [torch.stack([res[j] for res in per_row]) for j in range(len(inputs))]


class ClosureGraph:
    """The retained first-derivative graph of one call of ``func()``.

    Args:
        call: the public call form, for error messages.
        func: a closure returning a scalar tensor that depends on ``params``.
        params: the tensors to differentiate with respect to (validated by the caller).
        create_graph: whether products built from this graph stay differentiable.
        strict: raise when a tensor that requires grad receives no gradient.
        what: how error messages name the function (``"func()"`` or a loss expression).

    Attributes:
        grads: per entry of ``params``: ∂L/∂p with its graph, or ``None`` when that
            row of the Hessian is identically zero (the tensor does not require grad,
            ``func`` does not use it, or the gradient does not depend on any tensor).
    """

    def __init__(
        self,
        call: str,
        func: Callable[[], Any],
        params: Sequence[Tensor],
        *,
        create_graph: bool,
        strict: bool,
        what: str = "func()",
    ) -> None:
        self.call = call
        self.params = list(params)
        self.create_graph = create_graph
        active = [i for i, p in enumerate(self.params) if p.requires_grad]
        check_grad_context(call, self.params)
        check_finite_tree(call, "params", self.params)
        with torch.enable_grad(), decomposed_kernels():  # the graph is differentiated twice
            loss = _check_loss(call, what, func())
            check_finite_result(
                call,
                f"loss {what}",
                loss,
                fix="Check the inputs and the parameters for NaN/Inf, "
                "or compute in float64 if the loss overflows.",
            )
            first: Sequence[Tensor | None] = [None] * len(active)
            if active and loss.requires_grad:
                first = torch.autograd.grad(
                    loss, [self.params[i] for i in active], create_graph=True, allow_unused=True
                )
        self.loss = loss
        self.grads: list[Tensor | None] = [None] * len(self.params)
        for i, g in zip(active, first):
            if g is None:
                if strict:
                    p = self.params[i]
                    raise error(
                        call,
                        "with strict=True every tensor in params that requires grad must receive a "
                        f"gradient from {what}",
                        f"params[{i}] (shape {tuple(p.shape)}) with no gradient: {what} does not use it",
                        "Pass strict=False to get zeros for it, or leave it out of params.",
                    )
                continue
            if g.requires_grad:  # else the gradient is constant: zero Hessian rows
                self.grads[i] = g

    # -- operators ----------------------------------------------------------------
    def trainable(self) -> list[int]:
        """Indices of the entries of ``params`` that require grad."""
        return [i for i, p in enumerate(self.params) if p.requires_grad]

    def live(self) -> list[int]:
        """Indices whose Hessian rows are not identically zero."""
        return [i for i, g in enumerate(self.grads) if g is not None]

    def operator(self, indices: Sequence[int]) -> ClosureHessianOperator:
        """The principal sub-block of H over ``params[i]`` for ``i`` in ``indices``."""
        return ClosureHessianOperator(self, indices)

    def zeros(self, i: int) -> Tensor:
        return torch.zeros_like(self.params[i])

    def scalar_zero(self) -> Tensor:
        p = self.params[0]
        return torch.zeros((), dtype=p.dtype, device=p.device)


class ClosureHessianOperator:
    """A principal sub-block of the Hessian of ``func()``, as a batched operator.

    Implements the protocol of :class:`secorder.operators.LinearOperator` over the
    flattened tensors ``params[i]``, ``i`` in ``indices`` (in that order):
    ``matmat(V)`` returns the rows H v_i, differentiable with respect to the tensors
    when the graph was built with ``create_graph=True``.
    """

    def __init__(self, graph: ClosureGraph, indices: Sequence[int]) -> None:
        self.graph = graph
        self.indices = list(indices)
        self.inputs = [graph.params[i] for i in self.indices]
        self.shapes = [p.shape for p in self.inputs]
        check_same_dtype_device(graph.call, "params", self.inputs)

    @property
    def size(self) -> int:
        return numel(self.inputs)

    @property
    def dtype(self) -> torch.dtype:
        """Rows and results: float32 for half-precision tensors (``_pytree.accumulation_dtype``)."""
        return accumulation_dtype(self.inputs[0].dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The tensors' dtype, in which the products are formed."""
        return self.inputs[0].dtype

    @property
    def device(self) -> torch.device:
        return self.inputs[0].device

    @accumulating
    def matmat(self, V: Tensor) -> Tensor:
        """Rows ``H v_i`` for the rows ``v_i`` of the ``(k, P)`` tensor ``V``."""
        rows = unravel(V, self.shapes)
        live = [j for j, i in enumerate(self.indices) if self.graph.grads[i] is not None]
        if not live:
            return torch.zeros_like(V)
        outputs = [self.graph.grads[self.indices[j]] for j in live]
        out = _batched_grad(
            [g for g in outputs if g is not None],
            self.inputs,
            [rows[j] for j in live],
            self.graph.create_graph,
        )
        return ravel(out, batch_dims=1)

    @accumulating
    def quadform(self, V: Tensor) -> Tensor:
        """The ``k`` values ``v_iᵀ H v_i`` for the rows of ``V``."""
        return (self.matmat(V) * V).sum(-1)


class SparseProbeOperator:
    """Hutchinson with sparse probes, expressed as Rademacher probes on a masked operator.

    A sparse probe is s = m ⊙ r / √q with r Rademacher and m_i ~ Bernoulli(q)
    independent, so E[s sᵀ] = I and sᵀ A s = rᵀ (D_m A D_m / q) r. Each row ``V[i]``
    handed to :meth:`quadform` (a Rademacher probe r) gets its own mask m drawn from
    ``generator``; the estimator stays :func:`secorder.estimators.hutchinson_trace`,
    unbiased for tr(A), with a variance larger than plain Rademacher probes.
    """

    def __init__(self, op: ClosureHessianOperator, density: float, generator: torch.Generator | None):
        self.op = op
        self.density = density
        self.generator = generator

    @property
    def size(self) -> int:
        return self.op.size

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    def _mask(self, V: Tensor) -> Tensor:
        """A 0/1 mask shaped like ``V``, entries 1 with probability ``density``."""
        u = torch.rand(V.shape, generator=self.generator, dtype=V.dtype, device=V.device)
        return (u < self.density).to(V.dtype)

    def matmat(self, V: Tensor) -> Tensor:
        """Rows D_m A D_m v_i / q, with a fresh mask m for each row."""
        M = self._mask(V)
        return self.op.matmat(V * M) * M / self.density

    def quadform(self, V: Tensor) -> Tensor:
        """Values sᵀ A s for the sparse probes s = m ⊙ v / √q (fresh mask per row)."""
        return self.op.quadform(V * self._mask(V)) / self.density

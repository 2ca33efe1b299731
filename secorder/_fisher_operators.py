"""Batched operators for the GGN, the empirical Fisher and the Monte-Carlo Fisher.

All three are Jᵀ M J over the flattened parameters, where J = ∂z/∂θ is the Jacobian of
the batch outputs and M is block diagonal over samples:

* GGN: M = ∇²_z L (the loss Hessian in output space, reduction included);
* empirical Fisher: M_n = c g_n g_nᵀ with g_n = ∇_{z_n} l_n;
* MC Fisher: M_n = (c/K) Σ_k g_{n,k} g_{n,k}ᵀ with sampled gradients g_{n,k}.

So a quadratic form needs one forward-mode Jacobian-vector product u = J v and an
output-space form uᵀ M u — much cheaper than a Hessian-vector product — and a product
A v adds one vector-Jacobian product Jᵀ(M u). Rows are batched with ``vmap``; the
estimators (:mod:`secorder.estimators`) decide how many rows go in at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from secorder._errors import error
from secorder._kernels import with_decomposed_kernels
from secorder._losses import LossSpec
from secorder._pytree import accumulating, accumulation_dtype, numel, ravel, unravel

__all__ = ["EmpiricalFisherOperator", "GGNOperator", "MCFisherOperator"]


def _product_failure(call: str, exc: Exception) -> Exception:
    return error(
        call,
        "forming Jacobian-vector products of the model failed (forward-mode derivatives are "
        "needed for Hutchinson estimates of the Fisher)",
        f"{type(exc).__name__}: {exc}",
        "Use the exact method (num_probes=None), which needs only reverse mode, or replace the "
        "operator that lacks a forward-mode derivative.",
        cls=RuntimeError,
    )


class _OutputSpaceOperator:
    """Jᵀ M J for ``fn(leaves) -> outputs``; subclasses define the output-space M."""

    def __init__(
        self,
        fn: Callable[[list[Tensor]], Tensor],
        leaves: Sequence[Tensor],
        outputs: Tensor,
        call: str = "fisher operator",
    ) -> None:
        self.fn = fn
        self.leaves = list(leaves)
        self.shapes = [leaf.shape for leaf in self.leaves]
        self.outputs = outputs
        self.call = call
        self._vjp_fn: Callable[[Tensor], Any] | None = None

    @property
    def size(self) -> int:
        return numel(self.leaves)

    @property
    def dtype(self) -> torch.dtype:
        """Rows and results: float32 for half-precision parameters (``_pytree.accumulation_dtype``)."""
        return accumulation_dtype(self.leaves[0].dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The parameters' dtype, in which the products are formed."""
        return self.leaves[0].dtype

    @property
    def device(self) -> torch.device:
        return self.leaves[0].device

    @with_decomposed_kernels
    def jvp(self, V: Tensor) -> Tensor:
        """Rows J v_i as a ``(k, N, *out)`` tensor."""
        fn, leaves = self.fn, self.leaves
        try:
            return vmap(lambda v: jvp(fn, (leaves,), (v,))[1])(unravel(V, self.shapes))
        except (RuntimeError, NotImplementedError) as exc:
            raise _product_failure(self.call, exc) from exc

    @with_decomposed_kernels
    def vjp(self, W: Tensor) -> Tensor:
        """Rows Jᵀ w_i for ``(k, N, *out)`` cotangents, as a ``(k, P)`` tensor."""
        if self._vjp_fn is None:
            self._vjp_fn = vjp(self.fn, self.leaves)[1]
        out = vmap(self._vjp_fn)(W)[0]
        return ravel(list(out), batch_dims=1)

    def _output_quadform(self, U: Tensor) -> Tensor:
        raise NotImplementedError

    def _output_matvec(self, U: Tensor) -> Tensor:
        raise NotImplementedError

    @accumulating
    def quadform(self, V: Tensor) -> Tensor:
        """The ``k`` values v_iᵀ A v_i = (J v_i)ᵀ M (J v_i): one JVP per row, no backward pass."""
        return self._output_quadform(self.jvp(V))

    @accumulating
    def matmat(self, V: Tensor) -> Tensor:
        """Rows A v_i = Jᵀ M J v_i (one JVP and one VJP per row)."""
        return self.vjp(self._output_matvec(self.jvp(V)))


class GGNOperator(_OutputSpaceOperator):
    """The generalized Gauss-Newton matrix G = Jᵀ (∇²_z L) J.

    Args:
        fn: ``fn(leaves) -> outputs`` of shape ``(N, *out)``.
        leaves: the parameters (flattened pytree).
        loss: the loss (:mod:`secorder._losses`), which supplies ∇²_z L products.
        outputs: ``fn(leaves)``.
        targets: the targets.
        call: the public call form, for error messages.

    Example:
        >>> import torch
        >>> from secorder._losses import resolve_loss
        >>> X = torch.eye(2)
        >>> fn = lambda leaves: X @ leaves[0]                 # z = X w, so J = X = I
        >>> w = torch.zeros(2, 1)
        >>> op = GGNOperator(fn, [w], resolve_loss("", "mse", "sum", "ggn"), fn([w]), torch.zeros(2, 1))
        >>> op.quadform(torch.tensor([[1.0, 1.0]]))           # vᵀ (2 I) v
        tensor([4.])
    """

    def __init__(
        self,
        fn: Callable[[list[Tensor]], Tensor],
        leaves: Sequence[Tensor],
        loss: LossSpec,
        outputs: Tensor,
        targets: Any,
        call: str = "GGNOperator",
    ) -> None:
        super().__init__(fn, leaves, outputs, call)
        self.loss = loss
        self.targets = targets

    def _output_quadform(self, U: Tensor) -> Tensor:
        return self.loss.hessian_quadform(self.outputs, self.targets, U)

    def _output_matvec(self, U: Tensor) -> Tensor:
        return self.loss.hessian_matvec(self.outputs, self.targets, U)


class EmpiricalFisherOperator(_OutputSpaceOperator):
    """The empirical Fisher E = c Σ_n ∇l_n ∇l_nᵀ = Jᵀ M J with M_n = c g_n g_nᵀ.

    More generally ``columns`` of shape ``(R, N, *out)`` give M_n = (c/R) Σ_r g_{n,r} g_{n,r}ᵀ
    when ``average=True`` (the MC Fisher) and c Σ_r … when ``average=False``.

    Args:
        fn: ``fn(leaves) -> outputs``.
        leaves: the parameters.
        columns: ``(R, N, *out)`` output-space gradients (R = 1: g_n = ∇_{z_n} l_n).
        scale: c (1/N for ``"mean"``, 1 for ``"sum"``).
        outputs: ``fn(leaves)``.
        average: divide by R.
        call: the public call form.
    """

    def __init__(
        self,
        fn: Callable[[list[Tensor]], Tensor],
        leaves: Sequence[Tensor],
        columns: Tensor,
        scale: float,
        outputs: Tensor,
        average: bool = False,
        call: str = "EmpiricalFisherOperator",
    ) -> None:
        super().__init__(fn, leaves, outputs, call)
        self.columns = columns
        self.weight = scale / columns.shape[0] if average else scale

    def _projections(self, U: Tensor) -> Tensor:
        # a[k, r, n] = u_{k,n} · g_{r,n}
        return (U.unsqueeze(1) * self.columns.unsqueeze(0)).flatten(3).sum(-1)

    def _output_quadform(self, U: Tensor) -> Tensor:
        return (self._projections(U) ** 2).flatten(1).sum(1) * self.weight

    def _output_matvec(self, U: Tensor) -> Tensor:
        a = self._projections(U)  # (k, R, N)
        extra = [1] * (self.columns.dim() - 2)
        return (a.reshape(*a.shape, *extra) * self.columns.unsqueeze(0)).sum(1) * self.weight


class MCFisherOperator(EmpiricalFisherOperator):
    """The Monte-Carlo Fisher (c/K) Σ_n Σ_k g_{n,k} g_{n,k}ᵀ for K sampled targets per datum.

    g_{n,k} are drawn once at construction (``loss.sample_columns``), so the operator is
    one fixed random matrix whose expectation is the GGN.
    """

    def __init__(
        self,
        fn: Callable[[list[Tensor]], Tensor],
        leaves: Sequence[Tensor],
        loss: LossSpec,
        outputs: Tensor,
        num_samples: int,
        generator: torch.Generator | None,
        call: str = "MCFisherOperator",
    ) -> None:
        cols = loss.sample_columns(outputs, num_samples, generator)
        super().__init__(fn, leaves, cols, loss.scale(outputs), outputs, average=True, call=call)

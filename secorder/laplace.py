"""Curvature backends for laplace-torch: :class:`SecorderGGN`, :class:`SecorderEF`, :class:`SecorderHessian`.

laplace-torch (``pip install secorder[laplace]``) fits Laplace approximations from a
*curvature backend*, a subclass of ``laplace.curvature.CurvatureInterface`` whose
``diag(x, y)`` and ``full(x, y)`` return ``(loss, curvature)`` for one batch. These
backends take the curvature from secorder:

* ``diag``: :func:`secorder.fisher_diagonal` (GGN, MC Fisher, empirical Fisher: per-layer
  matrix products, no N × C × P Jacobian) and :func:`secorder.module_hessian_diagonal`
  (the exact Hessian diagonal);
* ``full``: the dense P × P matrix from P batched operator products
  (:func:`secorder.fisher_operator`, :func:`secorder.hessian_operator`), for small or
  last-layer models;
* ``kron``: not available (secorder has no Kronecker factors yet): a clear
  ``NotImplementedError``.

Conventions are laplace-torch's, so a fit equals the fit with its own backends: the loss
is ``factor · lossfunc(f, y)`` with a sum over the batch (cross-entropy, factor 1, for
``"classification"``; MSE, factor 1/2, for ``"regression"``), the GGN is that of the
negative log-likelihood (Σ_n J_nᵀ ∇²l_n J_n, i.e. Σ_n J_nᵀ J_n for regression) and the
empirical Fisher is ``factor · Σ_n g_n g_nᵀ`` with g_n the gradient of sample n's
``lossfunc`` term, exactly as laplace-torch's ``EFInterface``.

Last-layer Laplace (``LLLaplace``, ``last_layer=True``): the curvature is that of the last
layer applied to the detached features, so its cost is that of the last layer alone.
``subnetwork_indices`` (``SubnetLaplace``) index the full diagonal or matrix.

Negative Hessian-diagonal entries: the Hessian of a non-convex loss has negative diagonal
entries away from an exact minimum, and a diagonal posterior precision ``H + prior`` must
be positive. :class:`SecorderHessian` therefore takes ``negative=``: ``"clip"`` (the
default) sets the batch's negative entries to zero and warns (a
:class:`NegativeCurvatureWarning` naming how many entries and the most negative value),
``"raise"`` refuses with an error, ``"keep"`` returns the exact values (then the posterior
precision may be non-positive; use it to inspect the diagonal). Clipping is per batch
(laplace-torch sums the batches), so the clipped precision is ≥ the clipped sum: a
slightly more confident posterior than clipping the whole-dataset diagonal would give;
fit with one batch (or use a GGN backend, positive semi-definite by construction) when
that matters.

Randomness: the MC Fisher (``SecorderGGN(stochastic=True)``) draws targets only from the
``generator`` passed in ``backend_kwargs`` (required there), never from the global RNG.

Example (needs laplace-torch)::

    from laplace import Laplace
    from secorder.laplace import SecorderGGN
    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure="diag", backend=SecorderGGN)
    la.fit(train_loader)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from secorder._errors import error

try:
    from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
except ImportError as _exc:  # pragma: no cover - exercised only without laplace-torch
    raise ImportError(
        "secorder.laplace: the laplace-torch backends need laplace-torch, but importing it failed "
        f"({type(_exc).__name__}: {_exc}). Install it with `pip install secorder[laplace]`."
    ) from _exc

from secorder.fisher import fisher_diagonal, fisher_operator
from secorder.hessian import hessian_operator
from secorder.module_hessian import module_hessian_diagonal
from secorder.modules import module_loss

__all__ = ["NEGATIVE", "NegativeCurvatureWarning", "SecorderEF", "SecorderGGN", "SecorderHessian"]

NEGATIVE = ("clip", "raise", "keep")


class NegativeCurvatureWarning(UserWarning):
    """A Hessian diagonal had negative entries, which were set to zero (``negative="clip"``)."""


class _SecorderCurvature:
    """The shared machinery: the module the curvature is taken of, its inputs, the loss name."""

    _kind: str = "ggn"  # "ggn", "empirical" or "hessian"
    _name: str = "SecorderGGN"
    model: nn.Module
    likelihood: Any
    last_layer: bool
    subnetwork_indices: Tensor | None
    factor: float
    lossfunc: Callable[[Tensor, Tensor], Tensor]
    _fisher_diag = False  # diag() through fisher_diagonal, which returns the outputs it evaluated

    def _setup(self, chunk_size: int | None) -> None:
        self.chunk_size = chunk_size
        self._loss_name = "mse" if self.likelihood == "regression" else "cross_entropy"

    def _call(self, method: str) -> str:
        return f"{self._name}.{method}(x, y)"

    def _module_inputs(self, call: str, x: Any) -> tuple[nn.Module, Any, Tensor]:
        """The module whose parameters the curvature is over, its inputs, and the model outputs."""
        self._check_inputs(call, x)
        if self.last_layer:
            f, phi = self.model.forward_with_features(x)  # type: ignore[operator]
            return self.model.last_layer, phi.detach(), f.detach()  # type: ignore[return-value]
        with torch.no_grad():
            f = self.model(x)
        return self.model, x, f

    @staticmethod
    def _check_inputs(call: str, x: Any) -> None:
        if isinstance(x, MutableMapping):
            raise error(
                call,
                "inputs must be a tensor (or a tuple of positional inputs) of the model",
                "a dict-like batch",
                "Use laplace-torch's CurvlinopsGGN for Hugging Face style dict inputs, or wrap the "
                "model to take a tensor.",
                cls=NotImplementedError,
            )

    def _target_module(self) -> nn.Module:
        return self.model.last_layer if self.last_layer else self.model  # type: ignore[return-value]

    def _params(self, module: nn.Module) -> dict[str, Tensor]:
        return {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}

    def _check_outputs(self, call: str, f: Tensor) -> None:
        if self._loss_name == "cross_entropy" and f.dim() != 2:
            raise error(
                call,
                "classification needs model outputs of shape (batch, classes)",
                f"outputs of shape {tuple(f.shape)}",
                "Flatten sequence outputs into the batch dimension (and the targets alike).",
            )

    def _loss(self, f: Tensor, y: Tensor) -> Tensor:
        return (self.factor * self.lossfunc(f, y)).detach()

    def _subnet(self, H: Tensor) -> Tensor:
        idx = self.subnetwork_indices
        if idx is None:
            return H
        return H[idx] if H.dim() == 1 else H[idx][:, idx]

    def _check_diag(self, call: str, H: Tensor) -> Tensor:
        return H

    def _diag_fn(self, module: nn.Module) -> Callable[..., Any]:
        raise NotImplementedError

    def diag(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(loss, diagonal)`` of the batch: the loss and the curvature diagonal in laplace-torch's
        convention (``factor`` applied), in ``named_parameters()`` order."""
        call = self._call("diag")
        if self._fisher_diag and not self.last_layer:
            # the Fisher transforms hand back the outputs of their own evaluation: no extra forward
            self._check_inputs(call, x)
            module, inputs, params = self.model, x, self._params(self.model)
            got: list[Tensor] = []
            try:
                d = self._diag_fn(module)(params, inputs, y, _outputs=got)
            except Exception:
                # the backend's own contract first (it names this call), then the Fisher's error
                if got:
                    self._check_outputs(call, got[0])
                raise
            f = got[0]
            self._check_outputs(call, f)
        else:
            module, inputs, f = self._module_inputs(call, x)
            self._check_outputs(call, f)
            params = self._params(module)
            d = self._diag_fn(module)(params, inputs, y)
        H = self.factor * torch.cat([d[k].reshape(-1) for k in params]).detach()
        return self._loss(f, y), self._subnet(self._check_diag(call, H))

    def _operator(self, module: nn.Module, params: dict[str, Tensor], inputs: Any, y: Tensor) -> Any:
        raise NotImplementedError

    def full(self, x: Any, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(loss, H)`` with the dense P × P curvature (P operator products: small or last-layer
        models)."""
        call = self._call("full")
        module, inputs, f = self._module_inputs(call, x)
        self._check_outputs(call, f)
        params = self._params(module)
        op = self._operator(module, params, inputs, y)
        size = sum(p.numel() for p in params.values())
        like = next(iter(params.values()))
        chunk = self.chunk_size or 256
        blocks = []
        for start in range(0, size, chunk):
            rows = torch.eye(size, dtype=like.dtype, device=like.device)[start : start + chunk]
            blocks.append(op.matmat(rows).detach())
        H = self.factor * torch.cat(blocks)
        H = (H + H.T) / 2  # exact symmetry (products round differently per row)
        return self._loss(f, y), self._subnet(self._reorder(params, H))

    @staticmethod
    def _reorder(params: dict[str, Tensor], H: Tensor) -> Tensor:
        """Operators use secorder's flat order (dict keys sorted); laplace-torch uses
        ``named_parameters()`` order."""
        sizes = {k: p.numel() for k, p in params.items()}
        offsets, pos = {}, 0
        for k in sorted(params):
            offsets[k] = pos
            pos += sizes[k]
        perm = torch.cat([torch.arange(offsets[k], offsets[k] + sizes[k]) for k in params]).to(H.device)
        return H[perm][:, perm]

    def kron(self, x: Any, y: Tensor, N: int, **kwargs: Any) -> Any:
        raise error(
            self._call("kron"),
            "Kronecker-factored curvature is not available from secorder yet",
            "hessian_structure='kron'",
            "Use hessian_structure='diag' (fast, through secorder) or 'full' for small and "
            "last-layer models, or laplace-torch's CurvlinopsGGN/BackPackGGN for 'kron'.",
            cls=NotImplementedError,
        )


class SecorderGGN(_SecorderCurvature, GGNInterface):  # type: ignore[misc]
    """The GGN (= Fisher for these likelihoods) through secorder; ``stochastic=True`` for the MC Fisher.

    laplace-torch passes the first six arguments; the others go in ``backend_kwargs``.

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y: as for
            laplace-torch's ``GGNInterface``.
        stochastic: the Monte-Carlo Fisher with ``num_samples`` sampled targets per datum
            instead of the exact GGN.
        num_samples: sampled targets per datum (``stochastic=True``).
        generator: the ``torch.Generator`` of the sampled targets (required when
            ``stochastic=True``).
        chunk_size: rows formed at once (per-sample gradients on the generic route; operator
            rows in ``full``), ``None`` from secorder's memory budget.
    """

    _fisher_diag = True

    _name = "SecorderGGN"

    def __init__(
        self,
        model: nn.Module,
        likelihood: Any,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if stochastic and not isinstance(generator, torch.Generator):
            raise error(
                "SecorderGGN(model, likelihood, stochastic=True)",
                "the MC Fisher draws its targets from an explicit torch.Generator",
                f"generator={generator!r}",
                "Pass backend_kwargs={'stochastic': True, 'generator': torch.Generator().manual_seed(0)}.",
                cls=TypeError,
            )
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            stochastic=stochastic,
            num_samples=num_samples,
        )
        self.generator = generator
        self._setup(chunk_size)

    def _diag_fn(self, module: nn.Module) -> Callable[..., Any]:
        if self.stochastic:
            fn = fisher_diagonal(
                module,
                self._loss_name,
                kind="mc",
                num_probes=self.num_samples,
                reduction="sum",
                chunk_size=self.chunk_size,
            )
            return lambda p, x, y, **kw: fn(p, x, y, generator=self.generator, **kw)
        return fisher_diagonal(module, self._loss_name, reduction="sum", chunk_size=self.chunk_size)

    def _operator(self, module: nn.Module, params: dict[str, Tensor], inputs: Any, y: Tensor) -> Any:
        kind = "mc" if self.stochastic else "ggn"
        op_fn = fisher_operator(
            module, self._loss_name, kind=kind, reduction="sum", num_samples=self.num_samples
        )
        return op_fn(params, inputs, y, generator=self.generator)[0]


class SecorderEF(_SecorderCurvature, EFInterface):  # type: ignore[misc]
    """The empirical Fisher factor · Σ_n g_n g_nᵀ through secorder (laplace-torch's ``EFInterface``
    convention). Options as :class:`SecorderGGN` (without the sampling ones)."""

    _fisher_diag = True

    _kind = "empirical"
    _name = "SecorderEF"

    def __init__(
        self,
        model: nn.Module,
        likelihood: Any,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self._setup(chunk_size)

    def _diag_fn(self, module: nn.Module) -> Callable[..., Any]:
        return fisher_diagonal(
            module, self._loss_name, kind="empirical", reduction="sum", chunk_size=self.chunk_size
        )

    def _operator(self, module: nn.Module, params: dict[str, Tensor], inputs: Any, y: Tensor) -> Any:
        op_fn = fisher_operator(module, self._loss_name, kind="empirical", reduction="sum")
        return op_fn(params, inputs, y)[0]


class SecorderHessian(_SecorderCurvature, CurvatureInterface):  # type: ignore[misc]
    """The exact Hessian of factor · lossfunc through secorder (diagonal by
    :func:`secorder.module_hessian_diagonal`).

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y: as for
            laplace-torch's ``CurvatureInterface``.
        negative: what ``diag`` does with negative entries: ``"clip"`` (to zero, with a
            :class:`NegativeCurvatureWarning`), ``"raise"`` or ``"keep"`` (see
            :mod:`secorder.laplace`). ``full`` returns the exact matrix.
        method: the :func:`secorder.module_hessian_diagonal` method (exact ones only:
            ``"auto"``, ``"sweep"``, ``"hvp"``).
        chunk_size: columns per batched backward pass, ``None`` from the memory budget.
    """

    _kind = "hessian"
    _name = "SecorderHessian"

    def __init__(
        self,
        model: nn.Module,
        likelihood: Any,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        negative: str = "clip",
        method: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        call = "SecorderHessian(model, likelihood)"
        if negative not in NEGATIVE:
            raise error(
                call,
                f"negative must be one of {', '.join(repr(n) for n in NEGATIVE)}",
                f"{negative!r}",
                "Use 'clip' (zero them, with a warning), 'raise' or 'keep'.",
            )
        if method not in ("auto", "sweep", "hvp"):
            raise error(
                call,
                "method must be an exact method of module_hessian_diagonal: 'auto', 'sweep' or 'hvp'",
                f"{method!r}",
                "Use method='auto'.",
            )
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self.negative = negative
        self.method = method
        self._setup(chunk_size)

    def _diag_fn(self, module: nn.Module) -> Callable[..., Any]:
        return module_hessian_diagonal(
            module, self._loss_name, method=self.method, reduction="sum", chunk_size=self.chunk_size
        )

    def _check_diag(self, call: str, H: Tensor) -> Tensor:
        negative = H < 0
        count = int(negative.sum())
        if count == 0 or self.negative == "keep":
            return H
        what = f"{count} of {H.numel()} entries below zero (the smallest {float(H.min()):.3g})"
        if self.negative == "raise":
            raise error(
                call,
                "a diagonal posterior precision needs a non-negative Hessian diagonal",
                what,
                "Use SecorderGGN (positive semi-definite), or backend_kwargs={'negative': 'clip'} to "
                "set them to zero.",
            )
        warnings.warn(
            f"{call}: the Hessian diagonal has {what}; they were set to zero (negative='clip'). "
            "Use SecorderGGN for a positive semi-definite curvature, or negative='keep' for the "
            "exact values.",
            NegativeCurvatureWarning,
            stacklevel=3,
        )
        return H.clamp_min(0)

    def _operator(self, module: nn.Module, params: dict[str, Tensor], inputs: Any, y: Tensor) -> Any:
        f, _ = module_loss(module, self.lossfunc)
        return hessian_operator(f, params, inputs, y)[0]

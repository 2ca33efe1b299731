"""Losses for the Fisher transforms: names, target checks, output-space curvature, MC sampling.

Notation (see :mod:`secorder.fisher`): the model returns outputs ``z`` of shape
``(N, *out)`` with the batch first; ``l_n(z_n, y_n)`` is the loss of sample ``n``
alone and the batch loss is L = c Σ_n l_n with c = 1/N (``"mean"``) or 1 (``"sum"``).
``m`` is the number of entries ``l_n`` averages over (positions for cross-entropy,
elements for MSE/BCE) under ``"mean"``, and 1 under ``"sum"``:

* ``"cross_entropy"``: z is ``(N, C)`` or ``(N, C, d1, ...)``, targets integer class
  indices ``(N,)`` or ``(N, d1, ...)``; l_n = (1/m) Σ_t ce(z_{n,:,t}, y_{n,t}) with
  m = d1·d2·… (``"mean"``, exactly how ``F.cross_entropy`` averages) or the sum over
  positions (``"sum"``).
* ``"mse"``: targets shaped like z; l_n = (1/m) Σ_d (z_nd − y_nd)², m = D = |out|.
* ``"bce_with_logits"``: targets shaped like z with values in [0, 1]; l_n = (1/m) Σ_d
  bce(z_nd, y_nd).
* a callable ``loss(outputs, targets) -> scalar``: l_n = loss(z[n:n+1], y[n:n+1]);
  it must be the mean (``"mean"``) or the sum (``"sum"``) of those per-sample values,
  which is checked on the values in eager mode.

Each loss provides

* ``hessian_quadform(z, y, U)`` = uᵀ ∇²_z L u and ``hessian_matvec`` = ∇²_z L u for the
  rows u of ``U`` (``(k, N, *out)``), with the reduction's scale included;
* ``factor(z, y)``: columns s_{n,r} (and optional weights w_{n,r}) with
  ∇²_{z_n} l_n = Σ_r w_{n,r} s_{n,r} s_{n,r}ᵀ (c not included);
* ``per_sample_grads(z, y)``: the rows g_n = ∇_{z_n} l_n;
* ``sample_columns(z, K, generator)``: K Monte-Carlo columns per sample with
  E[g gᵀ] = ∇²_{z_n} l_n exactly (targets drawn from the model's predictive
  distribution; see :meth:`_BuiltinLoss.sample_columns`).

Cross-entropy curvature is never formed: diag(p) − ppᵀ is applied in closed form, a group of
samples at a time (``hessian_quadform``/``hessian_matvec``), and :func:`closed_form_losses`
gives Hessian-vector products through a user's own ``F.cross_entropy`` the same closed form
(a few copies of the logits at the peak instead of the double backward of ``log_softmax``;
``benchmarks/bench_memory.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import Tensor
from torch.func import grad, hessian, jvp, vmap
from torch.overrides import TorchFunctionMode

from secorder._errors import error
from secorder._pytree import flatten, unflatten

__all__ = [
    "KINDS",
    "LOSSES",
    "REDUCTIONS",
    "CallableLoss",
    "Factor",
    "LossSpec",
    "closed_form_cross_entropy",
    "closed_form_losses",
    "resolve_loss",
]

KINDS = ("ggn", "empirical", "mc")
LOSSES = ("cross_entropy", "mse", "bce_with_logits")
REDUCTIONS = ("mean", "sum")


def _is_wrapped(x: object) -> bool:
    """Whether ``x`` is a tensor seen through a torch.func transform (no data-dependent checks)."""
    try:
        return isinstance(x, Tensor) and bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except AttributeError:  # pragma: no cover - very old torch
        return False


class Factor:
    """Columns of a per-sample factorization ∇²_{z_n} l_n = Σ_r w_{n,r} s_{n,r} s_{n,r}ᵀ.

    ``columns(start, stop)`` returns the ``(k, N, *out)`` tensor whose row ``r - start``
    holds s_{n,r} for every sample n (the cotangent of one backward pass);
    ``weights(start, stop)`` the ``(k, N)`` real weights w (``None`` when all are 1):
    square-root-free scales for diagonal Hessians (MSE, BCE), eigenvalue signs for
    callable losses.
    """

    def __init__(
        self,
        num_columns: int,
        columns: Callable[[int, int], Tensor],
        weights: Callable[[int, int], Tensor] | None = None,
    ) -> None:
        self.num_columns = num_columns
        self._columns = columns
        self._weights = weights

    @classmethod
    def from_tensor(cls, cols: Tensor, weights: Tensor | None = None) -> Factor:
        """A factor from precomputed ``(R, N, *out)`` columns (and ``(R, N)`` weights)."""
        w = weights
        return cls(
            int(cols.shape[0]),
            lambda a, b: cols[a:b],
            None if w is None else (lambda a, b: w[a:b]),
        )

    def columns(self, start: int, stop: int) -> Tensor:
        return self._columns(start, stop)

    def weights(self, start: int, stop: int) -> Tensor | None:
        return None if self._weights is None else self._weights(start, stop)


class LossSpec:
    """Common interface; see the module docstring. ``name`` is the public loss name."""

    name: str = ""

    def __init__(self, reduction: str) -> None:
        self.reduction = reduction

    # -- conventions -------------------------------------------------------------
    def scale(self, z: Tensor) -> float:
        """c: L = c Σ_n l_n."""
        return 1.0 / z.shape[0] if self.reduction == "mean" else 1.0

    def count(self, z: Tensor) -> int:
        """m: how many entries l_n averages over (1 for ``"sum"``)."""
        return 1

    def total(self, z: Tensor, y: Any) -> Tensor:
        """L(z, y), the batch loss with the reduction."""
        raise NotImplementedError

    # -- checks ------------------------------------------------------------------
    def check(self, call: str, z: Tensor, y: Any) -> None:
        """Raise a clear error if the targets do not fit the loss (data checks only when eager)."""
        raise NotImplementedError

    # -- output-space curvature ------------------------------------------------------
    def per_sample_grads(self, z: Tensor, y: Any) -> Tensor:
        """Rows g_n = ∇_{z_n} l_n as a ``(N, *out)`` tensor."""
        per = z.shape[0] if self.reduction == "mean" else 1
        return grad(lambda zz: self.total(zz, y))(z) * per

    def hessian_quadform(self, z: Tensor, y: Any, U: Tensor) -> Tensor:
        """uᵀ ∇²_z L u for each row u of ``U`` (``(k, N, *out)``) → ``(k,)``."""
        raise NotImplementedError

    def hessian_matvec(self, z: Tensor, y: Any, U: Tensor) -> Tensor:
        """∇²_z L u for each row u of ``U`` → ``(k, N, *out)``."""
        raise NotImplementedError

    def factor(self, z: Tensor, y: Any) -> Factor:
        raise NotImplementedError

    def sample_columns(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError


def _check_tensor_target(call: str, name: str, y: object) -> Tensor:
    if not isinstance(y, Tensor):
        raise error(
            call,
            f'targets for loss="{name}" must be a torch.Tensor',
            f"a {type(y).__name__}",
            "Pass the targets as a tensor whose first dimension is the batch.",
            cls=TypeError,
        )
    return y


def _check_same_shape(call: str, name: str, z: Tensor, y: Tensor) -> None:
    if y.shape != z.shape:
        hint = ""
        if y.dim() > 0 and z.dim() > 0 and y.shape[0] != z.shape[0]:
            hint = f" (batch size {y.shape[0]} vs {z.shape[0]} outputs)"
        raise error(
            call,
            f'targets for loss="{name}" must have the shape of the model outputs {tuple(z.shape)}',
            f"targets of shape {tuple(y.shape)}{hint}",
            "Reshape the targets (e.g. targets.view_as(outputs) or targets.unsqueeze(-1)); secorder "
            "does not broadcast targets, since broadcasting silently changes the loss.",
        )


def _check_float_target(call: str, name: str, z: Tensor, y: Tensor) -> None:
    if not y.is_floating_point() or y.dtype != z.dtype:
        raise error(
            call,
            f'targets for loss="{name}" must be floating point with the outputs\' dtype {z.dtype}',
            f"targets of dtype {y.dtype}",
            "Convert them with targets.to(outputs.dtype)"
            + (
                "; for class indices use loss='cross_entropy'."
                if not y.is_floating_point() and name != "cross_entropy"
                else "."
            ),
            cls=TypeError,
        )


def _unit_columns(z: Tensor, n: int, d: int) -> Callable[[int, int], Tensor]:
    """Columns e_d (the same for every sample) for output entries ``start..stop``."""

    def columns(start: int, stop: int) -> Tensor:
        e = F.one_hot(torch.arange(start, stop, device=z.device), d).to(z.dtype)
        return e.unsqueeze(1).expand(stop - start, n, d).reshape(stop - start, *z.shape)

    return columns


class _BuiltinLoss(LossSpec):
    def count(self, z: Tensor) -> int:
        return self._positions(z) if self.reduction == "mean" else 1

    def _positions(self, z: Tensor) -> int:
        return math.prod(z.shape[1:])

    def _total_scale(self, z: Tensor) -> float:
        """c / m: the weight of one element's loss in L."""
        return self.scale(z) / self.count(z)

    def _sample_targets(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def sample_columns(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """K Monte-Carlo columns g_{n,k} = √m ∇_{z_n} l_n(z_n, ŷ_{n,k}) with E[g gᵀ] = ∇²_{z_n} l_n.

        ŷ is drawn from the model's predictive distribution: categorical over softmax(z)
        at every position (cross-entropy), Bernoulli(σ(z)) (BCE), N(z, I/2) — the
        Gaussian whose negative log-likelihood is the squared error up to a constant —
        (MSE). The factor √m turns the gradient of the per-sample *average* l_n into that
        of its log-likelihood sum rescaled to l_n's scale; for MSE this is the same as
        drawing ŷ ~ N(z, (m/2) I) with no rescaling. Either way E[g gᵀ] = ∇²_{z_n} l_n
        exactly (the Fisher identity of each exponential-family factor).
        """
        targets = self._sample_targets(z.detach(), num_samples, generator)
        cols = vmap(self.per_sample_grads, in_dims=(None, 0))(z, targets)
        return cols * math.sqrt(self.count(z))


class CrossEntropyLoss(_BuiltinLoss):
    name = "cross_entropy"

    def _positions(self, z: Tensor) -> int:
        return math.prod(z.shape[2:])

    def total(self, z: Tensor, y: Any) -> Tensor:
        return F.cross_entropy(z, y, reduction=self.reduction)

    def check(self, call: str, z: Tensor, y: Any) -> None:
        if z.dim() < 2:
            raise error(
                call,
                'loss="cross_entropy" needs model outputs (logits) of shape (N, C) or (N, C, d1, ...)',
                f"outputs of shape {tuple(z.shape)}",
                "Return unnormalized class scores with the classes in dimension 1; for a single "
                "logit per sample use loss='bce_with_logits'.",
            )
        y = _check_tensor_target(call, self.name, y)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise error(
                call,
                'targets for loss="cross_entropy" must be integer class indices (torch.long)',
                f"targets of dtype {y.dtype}",
                "Pass class indices, e.g. targets.long() or probs.argmax(1); soft (probability) "
                "targets are not supported by the built-in loss: pass a callable loss instead.",
                cls=TypeError,
            )
        expected = (z.shape[0], *z.shape[2:])
        if tuple(y.shape) != expected:
            raise error(
                call,
                f'targets for loss="cross_entropy" must have shape (N, d1, ...) = {expected} '
                f"for outputs of shape {tuple(z.shape)}",
                f"targets of shape {tuple(y.shape)}",
                "Pass one class index per sample (and position); the batch size must match the "
                "model outputs and classes go in dimension 1 of the outputs.",
            )
        if not _is_wrapped(y) and y.numel() > 0:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= z.shape[1]:
                raise error(
                    call,
                    f'targets for loss="cross_entropy" must lie in [0, C) = [0, {z.shape[1]})',
                    f"class indices from {lo} to {hi}",
                    "Check the labels and the number of model outputs; ignore_index is not "
                    "supported (drop those samples or positions instead).",
                )

    def _probs(self, z: Tensor) -> Tensor:
        return torch.softmax(z, dim=1)

    def per_sample_grads(self, z: Tensor, y: Any) -> Tensor:
        """∇_{z_n} l_n = (softmax(z_n) − onehot(y_n)) / m at every position (closed form)."""
        m = self.count(z)
        plain = not (_is_wrapped(z) or _is_wrapped(y) or (torch.is_grad_enabled() and z.requires_grad))
        if z.dim() == 2 and isinstance(y, Tensor) and y.dim() == 1 and plain:
            g = self._probs(z)  # a fresh tensor: the targets' entries lowered in place (the same values)
            g[torch.arange(z.shape[0], device=z.device), y] -= 1
            return g if m == 1 else g / m
        onehot = F.one_hot(y, z.shape[1]).movedim(-1, 1).to(z.dtype)
        return (self._probs(z) - onehot) / m

    # The softmax curvature diag(p) − p pᵀ is applied without forming it, a group of samples at a
    # time (≤ 1/8 of the batch), so that the temporaries are a fraction of one copy of the logits
    # (a 50,257-entry vocabulary makes every copy large; ``benchmarks/bench_memory.py``).
    _GROUPS = 8

    def _groups(self, z: Tensor) -> list[tuple[int, int]]:
        n = z.shape[0]
        step = max(1, -(-n // self._GROUPS))
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    def hessian_quadform(self, z: Tensor, y: Any, U: Tensor) -> Tensor:
        total = None
        for a, b in self._groups(z):
            u = U[:, a:b]
            pu = self._probs(z[a:b]) * u
            per = (_vecdot(pu, u, 2) - pu.sum(2) ** 2).flatten(1).sum(1)
            total = per if total is None else total + per
        assert total is not None
        return total * self._total_scale(z)

    def hessian_matvec(self, z: Tensor, y: Any, U: Tensor) -> Tensor:
        scale = self._total_scale(z)
        plain = not (_is_wrapped(U) or _is_wrapped(z)) and not (
            torch.is_grad_enabled() and (U.requires_grad or z.requires_grad)
        )
        out = torch.empty_like(U) if plain else None  # U's layout: no copy for the model's backward
        parts = []
        for a, b in self._groups(z):
            p = self._probs(z[a:b])
            if out is None:  # under torch.func transforms or recorded by autograd: out of place
                pu = p * U[:, a:b]
                parts.append((pu - p * pu.sum(2, keepdim=True)) * scale)
            else:  # written into its slice of the result: p is the only temporary
                pu = torch.mul(p, U[:, a:b], out=out[:, a:b])
                pu.addcmul_(p, pu.sum(2, keepdim=True), value=-1).mul_(scale)
        return torch.cat(parts, 1) if out is None else out

    def factor(self, z: Tensor, y: Any) -> Factor:
        # Per position t: diag(p) − p pᵀ = S Sᵀ with S = diag(√p) − p √pᵀ (uses Σ p = 1);
        # column c' of S is √p_c' (e_c' − p). Column r = t·C + c' lives at position t only.
        n, c = z.shape[0], z.shape[1]
        pos = self._positions(z)
        p = self._probs(z).reshape(n, c, pos)
        sqrt_p = p.sqrt().reshape(n, c * pos)
        inv_sqrt_m = 1.0 / math.sqrt(self.count(z))

        if pos == 1:  # one position per sample: (k, N, C) by broadcasting, no index arithmetic
            p2, sqrt_t = p[..., 0], sqrt_p.T  # (N, C), (C, N)
            eye = torch.eye(c, dtype=z.dtype, device=z.device)

            def one_position(start: int, stop: int) -> Tensor:
                col = ((eye[start:stop, None, :] - p2) * sqrt_t[start:stop, :, None]).reshape(
                    stop - start, *z.shape
                )
                return col if inv_sqrt_m == 1.0 else col * inv_sqrt_m

            return Factor(c, one_position)

        def columns(start: int, stop: int) -> Tensor:
            r = torch.arange(start, stop, device=z.device)
            cls_idx, pos_idx = r % c, r // c
            p_at = p.index_select(2, pos_idx).permute(2, 0, 1)  # (k, N, C)
            s = sqrt_p.index_select(1, cls_idx * pos + pos_idx).T  # (k, N)
            e = F.one_hot(cls_idx, c).to(z.dtype)  # (k, C)
            col = s.unsqueeze(-1) * (e.unsqueeze(1) - p_at)  # (k, N, C)
            place = F.one_hot(pos_idx, pos).to(z.dtype)  # (k, pos)
            out = col.unsqueeze(-1) * place[:, None, None, :]  # (k, N, C, pos)
            return out.reshape(stop - start, *z.shape) * inv_sqrt_m

        return Factor(c * pos, columns)

    def _sample_targets(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        cdf = self._probs(z).movedim(1, -1).cumsum(-1)  # (N, *pos, C)
        u = torch.rand((num_samples, *cdf.shape[:-1], 1), generator=generator, dtype=z.dtype, device=z.device)
        return (cdf < u).sum(-1).clamp_max(z.shape[1] - 1)


class MSELoss(_BuiltinLoss):
    name = "mse"

    def total(self, z: Tensor, y: Any) -> Tensor:
        return F.mse_loss(z, y, reduction=self.reduction)

    def check(self, call: str, z: Tensor, y: Any) -> None:
        y = _check_tensor_target(call, self.name, y)
        _check_float_target(call, self.name, z, y)
        _check_same_shape(call, self.name, z, y)

    def per_sample_grads(self, z: Tensor, y: Any) -> Tensor:
        """∇_{z_n} l_n = 2 (z_n − y_n) / m (closed form)."""
        return (z - y) * (2.0 / self.count(z))

    def hessian_quadform(self, z: Tensor, y: Any, U: Tensor) -> Tensor:
        return 2.0 * (U * U).flatten(1).sum(1) * self._total_scale(z)

    def hessian_matvec(self, z: Tensor, y: Any, U: Tensor) -> Tensor:
        return 2.0 * self._total_scale(z) * U

    def factor(self, z: Tensor, y: Any) -> Factor:
        # ∇²_{z_n} l_n = (2/m) I: unit columns e_d with weight 2/m (no square roots, exact).
        n, d = z.shape[0], self._positions(z)
        weight = 2.0 / self.count(z)
        return Factor(
            d,
            _unit_columns(z, n, d),
            lambda a, b: torch.full((b - a, n), weight, dtype=z.dtype, device=z.device),
        )

    def _sample_targets(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn((num_samples, *z.shape), generator=generator, dtype=z.dtype, device=z.device)
        return z + noise * math.sqrt(0.5)


class BCEWithLogitsLoss(_BuiltinLoss):
    name = "bce_with_logits"

    def total(self, z: Tensor, y: Any) -> Tensor:
        return F.binary_cross_entropy_with_logits(z, y, reduction=self.reduction)

    def check(self, call: str, z: Tensor, y: Any) -> None:
        y = _check_tensor_target(call, self.name, y)
        _check_float_target(call, self.name, z, y)
        _check_same_shape(call, self.name, z, y)
        if not _is_wrapped(y) and y.numel() > 0:
            lo, hi = float(y.detach().min()), float(y.detach().max())
            if not (lo >= 0.0 and hi <= 1.0):
                raise error(
                    call,
                    'targets for loss="bce_with_logits" must be probabilities in [0, 1]',
                    f"targets from {lo} to {hi}",
                    "Pass 0/1 labels (or soft labels) as floats; for class indices use loss='cross_entropy'.",
                )

    def _var(self, z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s)

    def per_sample_grads(self, z: Tensor, y: Any) -> Tensor:
        """∇_{z_n} l_n = (σ(z_n) − y_n) / m (closed form)."""
        return (torch.sigmoid(z) - y) / self.count(z)

    def hessian_quadform(self, z: Tensor, y: Any, U: Tensor) -> Tensor:
        return (self._var(z) * U * U).flatten(1).sum(1) * self._total_scale(z)

    def hessian_matvec(self, z: Tensor, y: Any, U: Tensor) -> Tensor:
        return self._var(z) * U * self._total_scale(z)

    def factor(self, z: Tensor, y: Any) -> Factor:
        # ∇²_{z_n} l_n = diag(σ(1−σ))/m: unit columns e_d weighted by σ_d(1−σ_d)/m.
        n, d = z.shape[0], self._positions(z)
        var = (self._var(z) / self.count(z)).reshape(n, d)
        return Factor(d, _unit_columns(z, n, d), lambda a, b: var[:, a:b].T)

    def _sample_targets(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        u = torch.rand((num_samples, *z.shape), generator=generator, dtype=z.dtype, device=z.device)
        return (u < torch.sigmoid(z)).to(z.dtype)


class CallableLoss(LossSpec):
    """A user loss ``loss(outputs, targets) -> scalar``; its output Hessian comes from autodiff."""

    name = "callable"

    def __init__(self, fn: Callable[[Tensor, Any], Tensor], reduction: str) -> None:
        super().__init__(reduction)
        self.fn = fn

    def total(self, z: Tensor, y: Any) -> Tensor:
        return self.fn(z, y)

    def _per_sample(self, zn: Tensor, yn_leaves: list[Any], spec: Any, dims: list[int | None]) -> Tensor:
        yn = unflatten(spec, [a.unsqueeze(0) if d == 0 else a for a, d in zip(yn_leaves, dims)])
        return self.fn(zn.unsqueeze(0), yn)

    def _split_targets(self, y: Any) -> tuple[list[Any], Any, list[int | None]]:
        leaves, spec = flatten(y)
        dims: list[int | None] = [0 if isinstance(a, Tensor) and a.dim() > 0 else None for a in leaves]
        return leaves, spec, dims

    def _vmap_samples(self, call: str, fn: Callable[..., Tensor], z: Tensor, y: Any) -> Tensor:
        leaves, spec, dims = self._split_targets(y)
        try:
            return vmap(lambda zn, yl: fn(zn, yl, spec, dims), in_dims=(0, dims))(z, leaves)
        except (RuntimeError, ValueError) as exc:
            raise error(
                call,
                "a callable loss must be applicable to one sample at a time under torch.func.vmap "
                "(loss(outputs[n:n+1], targets[n:n+1]) defines the per-sample loss l_n)",
                f"{type(exc).__name__}: {exc}",
                "Avoid .item(), in-place updates and data-dependent Python control flow in the "
                "loss, or use a built-in loss name.",
            ) from exc

    def check(self, call: str, z: Tensor, y: Any) -> None:
        n = z.shape[0]
        leaves, _, _ = self._split_targets(y)
        for a in leaves:
            if isinstance(a, Tensor) and (a.dim() == 0 or a.shape[0] != n):
                raise error(
                    call,
                    f"every tensor in targets must have the batch size N={n} as its first dimension",
                    f"a target tensor of shape {tuple(a.shape)}",
                    "Pass per-sample targets; constants belong inside the loss function.",
                )
        out = self.fn(z, y)
        if not isinstance(out, Tensor) or out.dim() != 0 or not out.is_floating_point():
            got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise error(
                call,
                "a callable loss must return a real floating scalar (0-dim) tensor",
                got,
                "Reduce it with reduction='mean' or 'sum' inside the loss.",
                cls=TypeError,
            )
        if _is_wrapped(out) or _is_wrapped(z):
            return
        with torch.no_grad():
            per = self._vmap_samples(call, self._per_sample, z.detach(), y)
        combined = per.mean() if self.reduction == "mean" else per.sum()
        out = out.detach()
        tol = math.sqrt(torch.finfo(z.dtype).eps) * 10
        if not torch.allclose(combined, out, rtol=tol, atol=tol * (1 + float(out.detach().abs()))):
            other = "sum" if self.reduction == "mean" else "mean"
            raise error(
                call,
                f"with reduction='{self.reduction}' a callable loss must equal the {self.reduction} "
                "of its per-sample values loss(outputs[n:n+1], targets[n:n+1])",
                f"loss(outputs, targets) = {float(out):.6g} but the {self.reduction} of the per-sample "
                f"losses is {float(combined):.6g}",
                f"Pass reduction='{other}' if that is how your loss combines samples; losses that "
                "couple samples (e.g. contrastive ones) have no per-sample decomposition.",
            )

    def per_sample_grads(self, z: Tensor, y: Any) -> Tensor:
        call = "fisher (callable loss)"
        return self._vmap_samples(call, grad(self._per_sample), z, y)

    def hessian_quadform(self, z: Tensor, y: Any, U: Tensor) -> Tensor:
        def second(u: Tensor) -> Tensor:
            first = lambda zz: jvp(lambda z3: self.fn(z3, y), (zz,), (u,))[1]  # noqa: E731
            return jvp(first, (z,), (u,))[1]

        return vmap(second)(U)

    def hessian_matvec(self, z: Tensor, y: Any, U: Tensor) -> Tensor:
        g = grad(lambda zz: self.fn(zz, y))
        return vmap(lambda u: jvp(g, (z,), (u,))[1])(U)

    def factor(self, z: Tensor, y: Any) -> Factor:
        # Per-sample Hessians by autodiff, then H_n = V diag(λ) Vᵀ = Σ_r sign(λ_r) s_r s_rᵀ with
        # s_r = √|λ_r| v_r: a real factor even for losses that are not convex in the outputs.
        n = z.shape[0]
        d = math.prod(z.shape[1:])
        out_shape = z.shape[1:]

        def flat_loss(zn: Tensor, yl: list[Any], spec: Any, dims: list[int | None]) -> Tensor:
            return self._per_sample(zn.reshape(out_shape), yl, spec, dims)

        hess = self._vmap_samples(
            "fisher (callable loss)",
            lambda zn, yl, spec, dims: hessian(flat_loss)(zn, yl, spec, dims),
            z.reshape(n, d),
            y,
        )
        hess = (hess + hess.transpose(1, 2)) / 2
        evals, evecs = torch.linalg.eigh(hess)
        cols = (evecs * evals.abs().sqrt().unsqueeze(1)).permute(2, 0, 1).reshape(d, *z.shape)
        return Factor.from_tensor(cols, torch.sign(evals).T)


_BUILTINS: dict[str, type[_BuiltinLoss]] = {
    "cross_entropy": CrossEntropyLoss,
    "mse": MSELoss,
    "bce_with_logits": BCEWithLogitsLoss,
}


def resolve_loss(call: str, loss: object, reduction: object, kind: str) -> LossSpec:
    """Validate ``loss``/``reduction`` (at construction) and return the loss object."""
    if reduction not in REDUCTIONS:
        raise error(
            call,
            f"reduction must be one of {', '.join(repr(r) for r in REDUCTIONS)}",
            f"{reduction!r}",
            "Use the reduction your training loss uses (torch.nn.functional's default is 'mean').",
        )
    red = str(reduction)
    if isinstance(loss, str):
        if loss not in _BUILTINS:
            raise error(
                call,
                f"loss must be one of {', '.join(repr(n) for n in LOSSES)} or a callable "
                "loss(outputs, targets) -> scalar",
                f"{loss!r}",
                "Use a built-in name (e.g. 'cross_entropy' for class indices) or pass the loss "
                "function itself.",
            )
        return _BUILTINS[loss](red)
    if callable(loss):
        if kind == "mc":
            raise error(
                call,
                'kind="mc" samples targets from the model\'s predictive distribution, which is '
                "only known for the built-in losses",
                f"a callable loss ({getattr(loss, '__name__', type(loss).__name__)})",
                "Use loss='cross_entropy', 'mse' or 'bce_with_logits', or kind='ggn' (exact "
                "or Hutchinson), which works for any callable loss.",
            )
        return CallableLoss(loss, red)
    raise error(
        call,
        f"loss must be one of {', '.join(repr(n) for n in LOSSES)} or a callable",
        f"a {type(loss).__name__}",
        "Pass e.g. loss='cross_entropy' or loss=torch.nn.functional.cross_entropy.",
        cls=TypeError,
    )


# -- closed-form cross-entropy for Hessian-vector products -------------------------------------
def _inplace(op: Callable[..., Tensor], out: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``out.<op>_(*args)`` on a fresh tensor ``out``, or the out-of-place op where torch.func
    refuses the in-place one (``out`` not batched while an argument is); same values."""
    try:
        return getattr(out, op.__name__ + "_")(*args, **kwargs)
    except RuntimeError:
        return op(out, *args, **kwargs)


def _softmax_like(z: Tensor, dim: int) -> Tensor:
    """``softmax(z, dim)`` laid out in memory like ``z`` when ``dim`` is ``z``'s innermost
    dimension in memory (logits transposed to put the classes in dimension 1): products with it
    keep that layout, so no contiguous copy of the logits is made for the model's backward."""
    if z.dim() > 1 and z.stride(dim) == 1 and dim != z.dim() - 1:
        return torch.softmax(z.movedim(dim, -1), -1).movedim(-1, dim)
    return torch.softmax(z, dim)


def _vecdot(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Σ_c a_c b_c over ``dim`` as a batched matrix product (no ``a * b`` tensor is formed)."""
    a, b = a.movedim(dim, -1), b.movedim(dim, -1)
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


class _SoftmaxMinusTarget(torch.autograd.Function):
    """``out = g ⊙ (softmax(z) − onehot(y))``: the gradient of Σ_t g_t ce(z_t, y_t) in z.

    Its backward applies the softmax curvature g (diag(p) − p pᵀ) in closed form,
    g p ⊙ (w − ⟨p, w⟩) with g p = out + g onehot(y), from ``out`` itself: nothing but the
    output is saved (and the model's own backward usually keeps that output anyway, e.g. a
    final linear layer's double backward), one logit-sized temporary, and no double backward
    of ``log_softmax``. The logits ``z`` are saved only when ``g`` needs a gradient (a loss
    weight that depends on the parameters): then ⟨w, p − onehot⟩ is needed where g = 0 too.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, y: Tensor, g: Tensor, dim: int) -> Tensor:
        gd = g.unsqueeze(dim).to(z.dtype)
        out = _inplace(torch.mul, _softmax_like(z, dim), gd)
        return _inplace(torch.scatter_add, out, dim, y.unsqueeze(dim), -gd)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, y, g, dim = inputs
        ctx.z_saved = bool(ctx.needs_input_grad[2])
        ctx.save_for_backward(output, y, g, *((z,) if ctx.z_saved else ()))
        ctx.save_for_forward(output, y, g, *((z,) if ctx.z_saved else ()))
        ctx.dim = dim

    @staticmethod
    def backward(ctx: Any, out_bar: Tensor) -> tuple[Any, ...]:
        out, y, g, *z = ctx.saved_tensors
        dim = ctx.dim
        idx = y.unsqueeze(dim)
        gd = g.unsqueeze(dim)
        grad_g = None
        if z:  # ⟨w, p − onehot⟩, also where g = 0
            grad_g = _vecdot(out_bar, _softmax_like(z[0], dim), dim) - out_bar.gather(dim, idx).squeeze(dim)
        # s = ⟨p, w⟩ = ⟨out, w⟩ / g + w_y (where g = 0, out = 0 and s is not used)
        safe = torch.where(g != 0, g, torch.ones((), dtype=g.dtype, device=g.device))
        s = _vecdot(out, out_bar, dim) / safe + out_bar.gather(dim, idx).squeeze(dim)
        r = out_bar - s.unsqueeze(dim)  # the one logit-sized temporary
        r_y = r.gather(dim, idx)
        # (out + g onehot) ⊙ r = g p ⊙ (w − ⟨p, w⟩); in place unless this backward is itself
        # recorded (third derivatives), where autograd needs r unmodified
        t = r * out if torch.is_grad_enabled() else _inplace(torch.mul, r, out)
        return _inplace(torch.scatter_add, t, dim, idx, r_y * gd), None, grad_g, None

    @staticmethod
    def jvp(ctx: Any, z_t: Tensor, y_t: Any, g_t: Tensor | None, dim_t: Any) -> Tensor:
        out, y, g, *z = ctx.saved_tensors
        dim = ctx.dim
        idx = y.unsqueeze(dim)
        gd = g.unsqueeze(dim)
        safe = torch.where(g != 0, g, torch.ones((), dtype=g.dtype, device=g.device))
        # g p ⊙ (ż − ⟨p, ż⟩) with g p = out + g onehot
        s = _vecdot(out, z_t, dim) / safe + z_t.gather(dim, idx).squeeze(dim)
        r = z_t - s.unsqueeze(dim)
        r_y = r.gather(dim, idx)
        out_t = torch.scatter_add(r * out, dim, idx, r_y * gd)
        if g_t is not None and z:  # ġ (p − onehot)
            minus_one = torch.full_like(out, -1.0).gather(dim, idx)
            p_minus = _inplace(torch.scatter_add, _softmax_like(z[0], dim), dim, idx, minus_one)
            out_t = out_t + p_minus * g_t.unsqueeze(dim)
        elif g_t is not None:  # ġ out / g; p is not known where g = 0: NaN, not a guess
            unknown = (g == 0) & (g_t != 0)
            ratio = torch.where(unknown, torch.full_like(g_t, float("nan")), g_t / safe)
            out_t = out_t + out * ratio.unsqueeze(dim)
        return out_t


class _CrossEntropyPositions(torch.autograd.Function):
    """ce(z_t, y_t) at every position (``F.cross_entropy(..., reduction="none")``) whose
    gradient is :class:`_SoftmaxMinusTarget`, so that a Hessian-vector product through it uses
    the closed-form softmax curvature."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, y: Tensor, dim: int) -> Tensor:
        lse = torch.logsumexp(z, dim)
        return lse - z.gather(dim, y.unsqueeze(dim)).squeeze(dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, y, dim = inputs
        ctx.save_for_backward(z, y)
        ctx.save_for_forward(z, y)
        ctx.dim = dim

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        z, y = ctx.saved_tensors
        return _SoftmaxMinusTarget.apply(z, y, g, ctx.dim), None, None

    @staticmethod
    def jvp(ctx: Any, z_t: Tensor, y_t: Any, dim_t: Any) -> Tensor:
        z, y = ctx.saved_tensors
        dim = ctx.dim
        p = torch.softmax(z, dim)
        return (p * z_t).sum(dim) - z_t.gather(dim, y.unsqueeze(dim)).squeeze(dim)


def closed_form_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: Any = None,
    ignore_index: int = -100,
    reduce: Any = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor | None:
    """``F.cross_entropy`` with the closed-form softmax curvature in its derivatives, or
    ``None`` for the cases it does not cover (class weights, label smoothing, probability
    targets, the legacy ``size_average``/``reduce``): the same value, and the same first and
    second derivatives as the ATen kernels (to rounding). One case is reported rather than
    computed: forward mode over the gradient (``strategy="fwd_rev"``) of a loss whose weight
    depends on the parameters and is exactly 0 at the point (then the probabilities are not
    recoverable from the gradient) gives NaN, which the finite checks report; reverse mode
    (the default) is exact there."""
    if (
        weight is not None
        or size_average is not None
        or reduce is not None
        or label_smoothing != 0.0
        or reduction not in ("mean", "sum", "none")
        or not isinstance(input, Tensor)
        or not isinstance(target, Tensor)
        or not input.is_floating_point()
        or target.is_floating_point()
        or target.dtype == torch.bool
        or input.dim() == 0
    ):
        return None
    dim = 1 if input.dim() >= 2 else 0
    if target.shape != input.shape[:dim] + input.shape[dim + 1 :]:
        return None
    valid = target != ignore_index
    per = _CrossEntropyPositions.apply(input, torch.where(valid, target, 0), dim)
    per = torch.where(valid, per, torch.zeros((), dtype=per.dtype, device=per.device))
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / valid.sum().to(per.dtype)


class _ClosedFormLosses(TorchFunctionMode):
    """Routes ``F.cross_entropy`` through :func:`closed_form_cross_entropy` (see
    :func:`closed_form_losses`)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.cross_entropy:
            out = closed_form_cross_entropy(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def closed_form_losses() -> TorchFunctionMode:
    """A context in which ``F.cross_entropy`` (and ``nn.CrossEntropyLoss``) differentiates with
    the closed-form softmax curvature: its gradient g (p − onehot(y)) is one op whose backward is
    p ⊙ (w − ⟨p, w⟩), so a Hessian-vector product never runs the double backward of
    ``log_softmax`` over the logits (which held ~8 logit-sized tensors at its peak on a
    50,257-entry vocabulary, ``benchmarks/bench_memory.py``). Entered by the autograd strategies
    of :class:`secorder.operators.HessianOperator`; recorded tapes keep the ATen kernels."""
    return _ClosedFormLosses()

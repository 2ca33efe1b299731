"""XTrace and XNysTrace: exchangeable trace estimators that use every product twice.

XTrace (symmetric A, budget m, k = ⌊m/2⌋ probes ω_1..ω_k, Y = AΩ). For each i, let
P_i be the orthogonal projector onto span{Aω_j : j ≠ i} (the sketch without probe i)
and form the Hutch++-type estimate

    t_i = tr(P_i A P_i) + ω_iᵀ (I − P_i) A (I − P_i) ω_i.

P_i does not depend on ω_i, so each t_i is unbiased; XTrace returns their mean and,
as its error estimate, their standard deviation over √k (Epperly, Tropp, Webber
2024). That error estimate is a heuristic, not a calibrated standard error: the t_i
share most of their probes, and at small budgets it tends to understate the error (in
our tests, n = 100, m = 12 to 60, 200 seeds, ±1.96 of it covered the trace in 67–97%
of seeds for XTrace and 50–80% for XNysTrace, less once the error reaches rounding
level). All P_i lie inside the span of Y = QR, so one more set of k products Z = AQ gives
every t_i from k×k matrices: in the coordinates of Q, P_i = Q Π_i Qᵀ with
Π_i = B − x_i x_iᵀ, where B projects onto span(R) and x_i is the unit vector of span(R)
orthogonal to the columns R e_j, j ≠ i (the normalized column i of R⁺ᵀ; zero when probe
i is redundant, i.e. when the sketch already has rank < k without it). With H = QᵀAQ,
w_i = Qᵀω_i, c_i = Π_i w_i and r_i = Re_i = QᵀAω_i:

    t_i = tr(BH) − x_iᵀHx_i + ω_iᵀAω_i − 2 r_iᵀc_i + c_iᵀHc_i.

This form (via the SVD of R) also covers a rank-deficient sketch: XTrace is exact once
k exceeds rank(A). With ``distribution="sphere"`` the residual term of each t_i is
rescaled so that the part of ω_i outside range(P_i) has squared norm n − rank(P_i)
(the paper's "improved" XTrace; unbiased for rotation-invariant probes).

XNysTrace (positive semi-definite A, budget m = k probes, one product each). The
Nyström approximation Â = Y (ΩᵀY)⁻¹ Yᵀ from all probes but i, Â_(i), gives

    t_i = tr(Â_(i)) + ω_iᵀ (A − Â_(i)) ω_i = ‖B‖²_F − ‖B C⁻ᵀe_i‖² / h_i + 1 / h_i,

with Y = QR, ΩᵀY = CᵀC (Cholesky), B = RC⁻¹ and h_i = (ΩᵀY)⁻¹_ii, because
Â − Â_(i) has rank one and Nyström interpolates ω_iᵀÂω_i = ω_iᵀAω_i. As in the paper, A
is shifted by ν = ε‖Y‖_F/√n for stability and νn subtracted; when rounding leaves the sketch of
a rank-deficient PSD operator (a GGN) indefinite, ν is raised until it factors (negative
eigenvalues of ΩᵀAΩ below √ε·‖ΩᵀAΩ‖ count as rounding). It fails with a clear
error when ΩᵀAΩ is not positive definite (A not PSD); on an indefinite A whose sketch
happens to be positive definite its result is meaningless: use XTrace there.

Per-block traces: t_i splits over a partition of the coordinates (selectors E_b) as
tr(E_b A P_i) + u_iᵀE_bAu_i with u_i = (I − P_i)ω_i (XTrace) or
tr(E_b Â_(i)) + ω_iᵀE_b(A − Â_(i))ω_i (XNysTrace); each piece is unbiased for
tr(E_b A) and the pieces sum to t_i.

Cost: m products (XTrace uses 2⌊m/2⌋), plus O(P k²) arithmetic; memory: about 4kP
entries.

References:
    E. N. Epperly, J. A. Tropp, R. J. Webber, "XTrace: Making the most of every sample
    in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024.
    arXiv:2301.07825.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from secorder._errors import error
from secorder.estimators import _products
from secorder.estimators.hutchinson import mean_and_stderr
from secorder.operators import LinearOperator, in_functorch_transform

__all__ = [
    "MIN_PROBES_XNYSTRACE",
    "MIN_PROBES_XTRACE",
    "Sketch",
    "check_sketch_size",
    "exchangeable_sketch",
    "xnystrace",
    "xnystrace_block_traces",
    "xtrace",
    "xtrace_block_traces",
]

MIN_PROBES_XTRACE = 2
MIN_PROBES_XNYSTRACE = 1


class Sketch(NamedTuple):
    """The quantities shared by XTrace and XDiag (row layout: Q = ``Qt``ᵀ is P×k)."""

    Om: Tensor  # (k, P) probes ω_i
    Y: Tensor  # (k, P) rows Aω_i
    Qt: Tensor  # (k, P) orthonormal rows, Yᵀ = Q R
    R: Tensor  # (k, k)
    Z: Tensor  # (k, P) rows A q_j
    B: Tensor  # (k, k) projector onto span(R), i.e. onto span(Y) in Q's coordinates
    X: Tensor  # (k, k) columns x_i: unit, or zero for a redundant probe
    rank: Tensor  # (k,) rank of Π_i = B − x_i x_iᵀ


def check_sketch_size(call: str, k: int, size: int) -> int:
    """Check that the sketch has at most P columns (a larger budget cannot help)."""
    if k > size:
        raise error(
            call,
            f"the sketch size (probes) must not exceed the dimension P = {size}",
            f"{k} probes",
            "Use a smaller num_probes; with P products the exact trace or diagonal "
            "(num_probes=None on the transforms) is cheaper.",
        )
    return k


def exchangeable_sketch(
    op: LinearOperator,
    k: int,
    distribution: str,
    generator: torch.Generator | None,
    chunk_size: int | None,
) -> Sketch:
    """Draw k probes, form Y = AΩ, Y = QR, Z = AQ (2k products) and the leave-one-out data."""
    Om = _products.draw(op, k, distribution, generator)
    Y = _products.matmat(op, Om, chunk_size)
    Q, R = torch.linalg.qr(Y.T)
    Qt = Q.T
    Z = _products.matmat(op, Qt, chunk_size)
    U, sig, Vh = torch.linalg.svd(R)
    eps = torch.finfo(R.dtype).eps
    keep = sig > sig[0] * (k * eps)
    Ur = U * keep
    B = Ur @ Ur.T
    inv = torch.where(keep, 1 / sig.clamp_min(torch.finfo(R.dtype).tiny), torch.zeros_like(sig))
    # Leverage of probe i in the row space of R: 1 when removing it lowers the rank.
    leverage = ((Vh * keep.unsqueeze(1)) ** 2).sum(0)
    essential = leverage > 1 - eps**0.5
    X = (U * inv) @ Vh  # (R⁺)ᵀ
    norms = torch.linalg.vector_norm(X, dim=0).clamp_min(torch.finfo(R.dtype).tiny)
    X = X / norms * essential
    rank = keep.sum() - essential.to(keep.sum().dtype)
    return Sketch(Om, Y, Qt, R, Z, B, X, rank)


def _xtrace_parts(sk: Sketch, scaled: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Leave-one-out quantities: H, C (columns c_i = Π_i w_i) and the residual scale per probe."""
    H = sk.Qt @ sk.Z.T
    H = (H + H.T) / 2
    W = sk.Qt @ sk.Om.T
    C = sk.B @ W - sk.X * (sk.X * W).sum(0)
    if scaled:
        size = sk.Om.shape[1]
        outside = (sk.Om**2).sum(1) - 2 * (W * C).sum(0) + (C**2).sum(0)  # ‖(I − P_i)ω_i‖²
        scale = (size - sk.rank) / outside.clamp_min(torch.finfo(H.dtype).tiny)
    else:
        scale = torch.ones(W.shape[1], dtype=W.dtype, device=W.device)
    return H, C, scale


def xtrace(
    op: LinearOperator,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """XTrace estimate of tr(A) from ``num_probes`` products, with the paper's error estimate.

    Args:
        op: a symmetric operator (:mod:`secorder.operators`).
        num_probes: m >= 2, the budget; ⌊m/2⌋ probes, each used in two products.
        distribution: probe distribution; ``"sphere"`` gives the paper's improved
            variant (see the module docstring).
        generator: the source of all randomness (``None``: the global generator).
        chunk_size: rows per operator call (``None``: from the memory budget).

    Returns:
        ``(estimate, stderr)``, both 0-dim: the mean of the k exchangeable estimates t_i
        and their standard deviation over √k (NaN for k = 1).

    Raises:
        ValueError: ``num_probes < 2``.

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.0, 0.0]).double()))
        >>> gen = torch.Generator().manual_seed(0)
        >>> est, err = xtrace(A, 8, distribution="gaussian", generator=gen)
        >>> round(est.item(), 8), round(err.item(), 8)   # 4 probes > rank 3: exact
        (7.0, 0.0)
    """
    call = "xtrace(op, num_probes)"
    _products.check_budget(call, num_probes, MIN_PROBES_XTRACE, "XTrace")
    k = check_sketch_size(call, num_probes // 2, op.size)
    sk = exchangeable_sketch(op, k, distribution, generator, chunk_size)
    H, C, scale = _xtrace_parts(sk, distribution == "sphere")
    low_rank = (sk.B * H).sum() - (sk.X * (H @ sk.X)).sum(0)
    residual = (sk.Om * sk.Y).sum(1) - 2 * (sk.R * C).sum(0) + (C * (H @ C)).sum(0)
    return mean_and_stderr(low_rank + scale * residual)


def xtrace_block_traces(
    op: LinearOperator,
    num_probes: int,
    block_sizes: Sequence[int],
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """XTrace estimates of the traces of the diagonal blocks of A from the same products.

    The block values of each exchangeable estimate t_i sum to t_i, so the block traces
    sum to :func:`xtrace`'s estimate (same probes, up to rounding).

    Args:
        op: a symmetric operator.
        num_probes: m >= 2, the budget.
        block_sizes: sizes of consecutive coordinate blocks, summing to ``op.size``.
        distribution, generator, chunk_size: as in :func:`xtrace`.

    Returns:
        ``(traces, stderr)``, tensors of length ``len(block_sizes)``.
    """
    call = "xtrace_block_traces(op, num_probes, block_sizes)"
    _products.check_budget(call, num_probes, MIN_PROBES_XTRACE, "XTrace")
    block_sizes = _products.check_block_sizes(call, block_sizes, op.size)
    k = check_sketch_size(call, num_probes // 2, op.size)
    sk = exchangeable_sketch(op, k, distribution, generator, chunk_size)
    _, C, scale = _xtrace_parts(sk, distribution == "sphere")
    QX, ZX = sk.X.T @ sk.Qt, sk.X.T @ sk.Z  # rows Q x_i and A Q x_i
    low_rank = _products.block_sums(((sk.B @ sk.Qt) * sk.Z).sum(0), block_sizes) - _products.block_sums(
        QX * ZX, block_sizes
    )
    U = sk.Om - C.T @ sk.Qt  # rows u_i = (I − P_i) ω_i
    AU = sk.Y - C.T @ sk.Z
    residual = _products.block_sums(U * AU, block_sizes)
    return mean_and_stderr(low_rank + scale.unsqueeze(1) * residual)


class _Nystrom(NamedTuple):
    Om: Tensor  # (m, P)
    Qt: Tensor  # (m, P)
    B: Tensor  # (m, m), Â + νI-part = Q B Bᵀ Qᵀ
    BLinv: Tensor  # (m, m), B C⁻ᵀ
    h: Tensor  # (m,), diag((ΩᵀY)⁻¹)
    shift: Tensor  # ν
    scale: Tensor  # (m,), residual rescaling (ones unless distribution="sphere")
    ok: Tensor  # whether ΩᵀY was positive definite


def _nystrom(
    call: str,
    op: LinearOperator,
    m: int,
    distribution: str,
    generator: torch.Generator | None,
    chunk_size: int | None,
) -> _Nystrom:
    size = op.size
    check_sketch_size(call, m, size)
    Om = _products.draw(op, m, distribution, generator)
    Y = _products.matmat(op, Om, chunk_size)
    eps = torch.finfo(Y.dtype).eps
    base = eps * torch.linalg.vector_norm(Y) / size**0.5
    shift, Y0 = base, Y
    Y = Y0 + shift * Om
    G = Om @ Y.T
    L, info = torch.linalg.cholesky_ex((G + G.T) / 2)
    ok = info == 0
    if not in_functorch_transform([Y]) and not bool(ok):
        # A rank-deficient PSD operator (a GGN) makes ΩᵀAΩ singular, and rounding in the
        # products can leave it slightly indefinite, beyond the paper's shift. Negative
        # eigenvalues of ΩᵀAΩ at the level of rounding (below √ε‖ΩᵀAΩ‖) are rounding, not
        # curvature: raise the shift until the Cholesky factorization succeeds (any ν gives
        # an unbiased estimate, since νn is subtracted; a larger one only costs accuracy on
        # eigenvalues below ν, which is still tiny). Larger negative eigenvalues are refused.
        G0 = Om @ Y0.T
        lam = torch.linalg.eigvalsh((G0 + G0.T) / 2)
        tol = eps**0.5 * lam.abs().max()
        if bool(lam[0] >= -tol):
            for _ in range(12):
                shift = shift * 4
                Y = Y0 + shift * Om
                G = Om @ Y.T
                L, info = torch.linalg.cholesky_ex((G + G.T) / 2)
                ok = info == 0
                if bool(ok):
                    break
        if not bool(ok):
            raise error(
                call,
                "XNysTrace needs a positive semi-definite operator (its sketch ΩᵀAΩ must be "
                "positive semi-definite up to rounding)",
                f"a sketch with eigenvalue {float(lam[0]):.3g} against a largest magnitude of "
                f"{float(lam.abs().max()):.3g} (the operator has negative curvature)",
                'Use method="xtrace" or "hutch++" for indefinite operators (e.g. a Hessian away '
                "from a minimum).",
            )
    Q, R = torch.linalg.qr(Y.T)
    eye = torch.eye(m, dtype=Y.dtype, device=Y.device)
    B = torch.linalg.solve_triangular(L, R.T, upper=False).T  # R L⁻ᵀ
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    h = (Linv**2).sum(0)
    if distribution == "sphere":
        # Rescale ω_i's component outside span{ω_j : j ≠ i} to squared norm n − m + 1.
        Qo, Ro = torch.linalg.qr(Om.T)
        Wo = Qo.T @ Om.T
        So = torch.linalg.inv(Ro).T
        So = So / torch.linalg.vector_norm(So, dim=0)
        outside = (Om**2).sum(1) - (Wo**2).sum(0) + (So * Wo).sum(0) ** 2
        scale = (size - m + 1) / outside
    else:
        scale = torch.ones(m, dtype=Y.dtype, device=Y.device)
    return _Nystrom(Om, Q.T, B, B @ Linv, h, shift, scale, ok)


def xnystrace(
    op: LinearOperator,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """XNysTrace estimate of tr(A) for positive semi-definite A, with the paper's error estimate.

    Args:
        op: a symmetric positive semi-definite operator (GGN, Fisher, empirical Fisher).
        num_probes: m >= 1, the budget: m probes, one product each.
        distribution: probe distribution; ``"sphere"`` gives the paper's improved variant.
        generator: the source of all randomness (``None``: the global generator).
        chunk_size: rows per operator call (``None``: from the memory budget).

    Returns:
        ``(estimate, stderr)``, both 0-dim (stderr NaN for m = 1). Inside ``torch.func``
        transforms a non-PSD sketch gives NaN instead of an error.

    Raises:
        ValueError: ``num_probes < 1``, or the operator is not positive semi-definite
            (detected when the sketch's Cholesky factorization fails).

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.0, 0.0]).double()))
        >>> gen = torch.Generator().manual_seed(0)
        >>> est, err = xnystrace(A, 4, distribution="gaussian", generator=gen)
        >>> round(est.item(), 6), round(err.item(), 6)   # 4 probes > rank 3: exact
        (7.0, 0.0)
    """
    call = "xnystrace(op, num_probes)"
    _products.check_budget(call, num_probes, MIN_PROBES_XNYSTRACE, "XNysTrace")
    ny = _nystrom(call, op, num_probes, distribution, generator, chunk_size)
    total = (ny.B**2).sum()
    ests = total - (ny.BLinv**2).sum(0) / ny.h + ny.scale / ny.h - ny.shift * op.size
    est, err = mean_and_stderr(ests)
    nan = torch.full_like(est, float("nan"))
    return torch.where(ny.ok, est, nan), torch.where(ny.ok, err, nan)


def xnystrace_block_traces(
    op: LinearOperator,
    num_probes: int,
    block_sizes: Sequence[int],
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """XNysTrace estimates of the traces of the diagonal blocks of a PSD A from the same products.

    Args:
        op: a symmetric positive semi-definite operator.
        num_probes: m >= 1, the budget.
        block_sizes: sizes of consecutive coordinate blocks, summing to ``op.size``.
        distribution, generator, chunk_size: as in :func:`xnystrace`.

    Returns:
        ``(traces, stderr)``, tensors of length ``len(block_sizes)``; they sum to
        :func:`xnystrace`'s estimate (same probes, up to rounding).
    """
    call = "xnystrace_block_traces(op, num_probes, block_sizes)"
    _products.check_budget(call, num_probes, MIN_PROBES_XNYSTRACE, "XNysTrace")
    block_sizes = _products.check_block_sizes(call, block_sizes, op.size)
    ny = _nystrom(call, op, num_probes, distribution, generator, chunk_size)
    diag_nys = _products.block_sums(((ny.B.T @ ny.Qt) ** 2).sum(0), block_sizes)
    Zr = (ny.BLinv / ny.h.sqrt()).T @ ny.Qt  # rows z_i: Â − Â_(i) = z_i z_iᵀ
    residual = _products.block_sums(ny.Om * Zr, block_sizes) / ny.h.sqrt().unsqueeze(1)
    shift = ny.shift * torch.tensor(list(block_sizes), dtype=Zr.dtype, device=Zr.device)
    samples = diag_nys - _products.block_sums(Zr**2, block_sizes) + ny.scale.unsqueeze(1) * residual - shift
    est, err = mean_and_stderr(samples)
    nan = torch.full_like(est, float("nan"))
    return torch.where(ny.ok, est, nan), torch.where(ny.ok, err, nan)

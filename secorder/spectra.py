"""Spectra of curvature operators: extreme eigenvalues by Lanczos, densities by stochastic Lanczos quadrature.

Both work on any :class:`~secorder.operators.LinearOperator` (Hessian, GGN, Fisher,
empirical Fisher, or a :class:`~secorder.operators.DenseOperator`) and only call its
``matmat``.

Lanczos (Lanczos 1950) builds an orthonormal basis V_m of the Krylov space
span{v, Av, ..., A^{m−1}v} in which A is tridiagonal, T_m = V_mᵀAV_m. Eigenpairs
(θ, s) of T_m give Ritz pairs (θ, V_m s) whose residual is
‖A V_m s − θ V_m s‖ = abs(β_m s_m), and for a symmetric A some eigenvalue lies within that
residual of θ. In floating point the basis loses orthogonality as Ritz values converge
(Paige 1971); here every new vector is re-orthogonalized against the whole basis
("full reorthogonalization": classical Gram–Schmidt, repeated when a pass shrinks the
norm below 1/√2 -- "twice is enough"), which keeps V_m orthonormal to working
precision at O(m²P) arithmetic and m·P memory. When the Krylov space is
exhausted (β_m ≈ 0) the iteration continues from a fresh random vector orthogonal to
the basis, so eigenvalues from other invariant subspaces are still found.

Stochastic Lanczos quadrature (Lin, Saad, Yang 2016; Ubaru, Chen, Saad 2017): for a
unit start vector v, vᵀ g(A) v ≈ Σ_j τ_j g(θ_j) with θ_j the eigenvalues of T_m and τ_j
the squared first components of its eigenvectors (Gauss quadrature, exact for
polynomials of degree < 2m). With v = z/‖z‖ for a Rademacher z, E[vᵀ g(A) v] =
tr g(A)/n, so averaging over runs and taking g = a Gaussian of width σ gives the
broadened spectral density φ_σ(t) = (1/n) Σ_i N(t; λ_i, σ²), which integrates to 1.

References:
    C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators", J. Res. Nat. Bur. Standards 45 (1950).
    C. C. Paige, "The computation of eigenvalues and eigenvectors of very large sparse
    matrices", PhD thesis, University of London (1971).
    L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large matrices",
    SIAM Review 58(1) (2016).
    S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
    quadrature", SIAM J. Matrix Anal. Appl. 38(4) (2017).
    B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation into neural net optimization
    via Hessian eigenvalue density", ICML 2019.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import torch
from torch import Tensor

from secorder import probes as _probes
from secorder._chunking import memory_budget
from secorder._errors import error
from secorder._validate import check_bool, check_finite_result
from secorder.estimators.stopping import check_eager
from secorder.operators import LinearOperator

__all__ = [
    "LanczosResult",
    "check_lanczos_options",
    "lanczos_eigenvalues",
    "plot_spectral_density",
    "slq_nodes_weights",
    "spectral_density",
]

_WHICH = ("largest", "smallest")
_DGKS = 2**-0.5  # reorthogonalize again when a pass shrinks the norm below this factor
_FIX = "Call it outside torch.func transforms (it is an eager, data-dependent iteration)."


class LanczosResult(NamedTuple):
    """Extreme eigenpairs of a symmetric operator found by Lanczos."""

    eigenvalues: Tensor
    """(k,) eigenvalues: descending for ``which="largest"``, ascending for ``"smallest"``."""
    eigenvectors: Tensor | None
    """(k, P) unit eigenvectors as rows (``None`` unless requested)."""
    residuals: Tensor
    """(k,) residual norms ‖Ax − θx‖; an eigenvalue of A lies within each of θ."""
    num_products: int
    """Operator products spent (one per Lanczos step, over all runs)."""
    converged: bool
    """Whether every residual is ≤ tol · max abs(θ)."""


def _check_int(call: str, name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(call, f"{name} must be an int >= {minimum}", f"{value!r}", f"Pass e.g. {name}={minimum}.")
    return value


def _check_positive(call: str, name: str, value: object, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise error(call, f"{name} must be a positive finite number", f"{value!r}", f"Pass e.g. {name}=1e-6.")
    return float(value)


def check_lanczos_options(call: str, k: object, which: object, tol: object, max_steps: object) -> None:
    """Validate the options of :func:`lanczos_eigenvalues` (shared with the transforms)."""
    kk = _check_int(call, "k", k)
    if which not in _WHICH:
        raise error(call, 'which must be "largest" or "smallest"', f"{which!r}", 'Pass which="largest".')
    _check_positive(call, "tol", tol)
    if max_steps is not None:
        _check_int(call, "max_steps", max_steps, kk)


class _Lanczos:
    """``b`` independent Lanczos runs advanced together, one step (one batched product) at a time.

    With ``reorthogonalize=True`` the basis is stored (``V``, b × max_steps × P) and every
    new vector is reorthogonalized against it; otherwise only the last two vectors are
    kept (plain three-term recurrence, memory 3 × b × P).
    """

    def __init__(
        self,
        op: LinearOperator,
        start: Tensor,
        max_steps: int,
        generator: torch.Generator | None,
        reorthogonalize: bool = True,
    ) -> None:
        self.op = op
        self.generator = generator
        self.max_steps = max_steps
        self.reorthogonalize = reorthogonalize
        b, size = start.shape
        first = start / torch.linalg.vector_norm(start, dim=-1, keepdim=True)
        # uninitialized: only rows already written are read, and a run that converges in m steps
        # never touches the pages of the other max_steps - m rows (zero-filling the whole m × P
        # basis cost more than the products on small models)
        self.V = torch.empty(b, max_steps if reorthogonalize else 0, size, dtype=op.dtype, device=op.device)
        if reorthogonalize:
            self.V[:, 0] = first
        self.cur, self.prev = first, torch.zeros_like(first)
        # the diagonal and off-diagonals of T (beta 0 after a restart), written in place: no list
        # of per-step scalars to stack into T at every convergence check
        self.alpha = torch.empty(b, max_steps, dtype=op.dtype, device=op.device)
        self.beta = torch.empty(b, max(max_steps - 1, 0), dtype=op.dtype, device=op.device)
        self.residual_beta = torch.zeros(b, dtype=op.dtype, device=op.device)  # ‖w‖ at the last step
        self.anorm = torch.zeros(b, dtype=op.dtype, device=op.device)
        self.exhausted = torch.zeros(b, dtype=torch.bool, device=op.device)
        self.block_start = torch.zeros(b, dtype=torch.long, device=op.device)  # first step after a restart
        self.steps = 0
        self.avoid: Tensor | None = None

    def _orthogonalize(self, w: Tensor, j: int) -> tuple[Tensor, Tensor]:
        """Classical Gram–Schmidt against the basis, with a second pass only where it is needed.

        The second pass (Kahan–Parlett "twice is enough") runs when a pass shrank the norm
        below 1/√2 of its value (the Daniel–Gragg–Kaufman–Stewart criterion), i.e. when
        orthogonality was at risk; after the explicit three-term recurrence a full pass
        usually removes only rounding. Without a stored basis, only against the last two
        vectors. Returns ``w`` and its norms (computed by the test anyway).
        """
        if not self.reorthogonalize:
            for u in (self.cur, self.prev):
                w = w - (w * u).sum(-1, keepdim=True) * u
            return w, torch.linalg.vector_norm(w, dim=-1)
        basis = self.V[:, : j + 1]
        norm = torch.linalg.vector_norm(w, dim=-1)
        for _ in range(2):
            before = norm
            # two batched matrix products (b × (j+1) × P): less dispatch than einsum per step
            w = w - (torch.matmul(basis, w.unsqueeze(-1)).transpose(-1, -2) @ basis).squeeze(-2)
            norm = torch.linalg.vector_norm(w, dim=-1)
            if not bool((norm < _DGKS * before).any()):
                break
        return w, norm

    def step(self) -> None:
        j = self.steps
        v = self.cur
        w = self.op.matmat(v)
        alpha = (w * v).sum(-1)
        w = w - alpha.unsqueeze(1) * v  # the three-term recurrence
        if j > 0:
            w = w - self.beta[:, j - 1].unsqueeze(1) * self.prev
        if self.reorthogonalize:
            w, beta = self._orthogonalize(w, j)
        else:
            beta = torch.linalg.vector_norm(w, dim=-1)
        self.alpha[:, j] = alpha
        self.residual_beta = beta
        bound = alpha.abs() + beta
        if j > 0:
            bound = bound + self.beta[:, j - 1]
        self.anorm = torch.maximum(self.anorm, bound)
        self.steps = j + 1
        eps = torch.finfo(w.dtype).eps
        broken = beta <= eps**0.75 * self.anorm.clamp_min(torch.finfo(w.dtype).tiny)
        self.exhausted = broken  # the Krylov space of the current block is invariant
        if self.steps == self.max_steps:
            return
        if bool(broken.any()):
            fresh = _probes.draw(w.shape[0], w.shape[1], "gaussian", self.generator, w.dtype, w.device)
            if self.avoid is not None:  # a deflated run stays orthogonal to the deflated vectors
                fresh = fresh - (fresh @ self.avoid.T) @ self.avoid
            fresh, norm = self._orthogonalize(fresh, j)
            fresh = fresh / norm.unsqueeze(1)
            safe = beta.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(1)
            nxt = torch.where(broken.unsqueeze(1), fresh, w / safe)
            beta = torch.where(broken, torch.zeros_like(beta), beta)
            self.block_start = torch.where(broken, j + 1, self.block_start)
        else:
            nxt = w / beta.unsqueeze(1)
        self.beta[:, j] = beta
        self.prev, self.cur = v, nxt
        if self.reorthogonalize:
            self.V[:, j + 1] = nxt

    def tridiagonal(self) -> Tensor:
        """The ``(b, m, m)`` tridiagonal matrices T_m."""
        m = self.steps
        T = torch.diag_embed(self.alpha[:, :m])
        if m > 1:
            beta = self.beta[:, : m - 1]
            T = T + torch.diag_embed(beta, offset=1) + torch.diag_embed(beta, offset=-1)
        return T


_NONFINITE_OP = (
    "The operator's products op.matmat(V) hold NaN/Inf: check the matrix (or the parameters and "
    "data it was built from) for non-finite entries."
)


def check_operator(call: str, op: object) -> int:
    """Check that ``op`` is a :class:`~secorder.operators.LinearOperator`; return its size."""
    missing = [a for a in ("size", "dtype", "device", "matmat") if not hasattr(op, a)]
    size = getattr(op, "size", None)
    if missing or not isinstance(size, int) or isinstance(size, bool):
        got = f"a {type(op).__name__}" + (
            f" without {', '.join(missing)}" if missing else f" with size {size!r}"
        )
        raise error(
            call,
            "op must be a linear operator (int size, dtype, device, matmat(V) for (k, P) rows V)",
            got,
            "Wrap an explicit matrix as secorder.operators.DenseOperator(matrix), or pass "
            "hessian_operator(f, *args)[0] / fisher_operator(...)(...)[0].",
            cls=TypeError,
        )
    return size


def lanczos_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    which: str = "largest",
    tol: float | None = None,
    max_steps: int | None = None,
    return_eigenvectors: bool = False,
    certify: bool = True,
    generator: torch.Generator | None = None,
) -> LanczosResult:
    """The k largest (or smallest, i.e. most negative) eigenvalues of ``op`` by Lanczos.

    Runs Lanczos with full reorthogonalization from a Gaussian start vector until the k
    wanted Ritz pairs have residuals ‖Ax − θx‖ ≤ ``tol`` · max abs(θ) (so each returned θ
    is within that distance of an eigenvalue of A, and typically much closer: the
    eigenvalue error is bounded by residual²/gap), or ``max_steps`` products are spent.

    ``tol`` is thus a bound on the *residual*, a stricter test than a relative change of the
    eigenvalue estimate between iterations (the stopping rule of power iteration, e.g.
    PyHessian's ``tol``): with ``tol=1e-3`` the returned top Hessian eigenvalues of the models of
    ``benchmarks/bench_models.py`` are within ~1e-6 (relative) of a float64 reference.

    Multiplicities: a single-vector Krylov space holds one copy of each eigenvalue. So once
    the k Ritz pairs have converged, their vectors X are deflated and Lanczos runs again on
    (I − XXᵀ)A(I − XXᵀ) from a start orthogonal to X for the extreme remaining eigenvalue;
    while that value belongs in the top k (a further copy of a repeated eigenvalue, or one the
    first run missed) it is taken in and the search repeats. The returned top k are the
    full multiset: ``converged=True`` only once a deflated run has certified that nothing
    beyond the tolerance is missing (or the whole space is spanned). That run costs about as
    many products as the first (most of the time of a k = 1 call); ``certify=False`` skips it
    and returns the first run's Ritz values, whose residuals still meet ``tol`` but which may
    hold one copy of a repeated eigenvalue only, or miss an eigenvalue that the start vector
    barely touches (``converged`` then means the residual test only).

    Args:
        op: a symmetric operator.
        k: how many eigenvalues (1 <= k <= P).
        which: ``"largest"`` (algebraically largest) or ``"smallest"`` (most negative).
        tol: relative residual tolerance; ``None``: √ε of the dtype (1.5e-8 in float64,
            3.5e-4 in float32), and for products formed in float16/bfloat16 (an operator whose
            ``compute_dtype`` differs from its ``dtype``) ε of that format (9.8e-4, 7.8e-3).
        max_steps: the most products of each Lanczos run (the first and each deflated
            one; each step stores one basis vector of length P); ``None``: max(300, 20k),
            fewer if the basis would exceed the memory budget
            (:func:`secorder.set_memory_budget`), and at most P.
        return_eigenvectors: also return the Ritz vectors.
        certify: run the deflated runs that certify the top-k multiset (default); ``False``
            halves the products of a typical call at the risks named above.
        generator: the source of the start vector (``None``: the global generator).

    Returns:
        :class:`LanczosResult`; check ``converged``.

    Raises:
        ValueError: invalid options.
        RuntimeError: called inside a ``torch.func`` transform.

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = lanczos_eigenvalues(A, 2, generator=torch.Generator().manual_seed(0))
        >>> [round(x, 8) for x in res.eigenvalues.tolist()], res.converged
        ([10.0, 9.0], True)
    """
    call = "lanczos_eigenvalues(op, k)"
    size = check_operator(call, op)
    check_lanczos_options(call, k, which, tol, max_steps)
    check_bool(call, "certify", certify)
    if k > size:
        raise error(call, f"k must not exceed the operator size {size}", f"k={k}", f"Pass k <= {size}.")
    if max_steps is None:
        fits = memory_budget() // (size * op.dtype.itemsize)  # the basis is max_steps × P
        max_steps = min(max(300, 20 * k), max(2 * k + 10, fits))
    max_steps = min(size, max_steps)
    # products formed in float16/bfloat16 (``compute_dtype``; rows come back in float32) carry
    # relative errors of about that format's eps: converge to it (residuals below it buy nothing,
    # and √eps of bfloat16, 9%, would leave eigenvalues off by percents)
    compute = getattr(op, "compute_dtype", op.dtype)
    default = torch.finfo(compute).eps if compute != op.dtype else torch.finfo(op.dtype).eps ** 0.5
    rel = float(default) if tol is None else float(tol)
    check_eager(call, [], what="Lanczos", fix=_FIX)
    vals, vecs, res, used, converged = _lanczos_run(call, op, k, which, rel, max_steps, generator, None)
    # Certify the multiset: a single-vector Krylov space holds one copy of each eigenvalue, so
    # a copy of a wanted eigenvalue may be missing. Deflate the converged Ritz vectors and run
    # Lanczos again for the extreme eigenvalue of the rest; while it belongs in the top k, take
    # it in and repeat. Stop when it does not (the top k are then certified) or the budget or
    # the dimension runs out.
    found_vals, found_vecs, found_res = vals, vecs, res
    while certify and converged and found_vecs.shape[0] < size:
        budget = min(max_steps, size - found_vecs.shape[0])
        defl = _Deflated(op, found_vecs)
        v2, x2, r2, used2, ok2 = _lanczos_run(call, defl, 1, which, rel, budget, generator, found_vecs)
        used += used2
        if not ok2:
            converged = False
            break
        bound = rel * float(torch.cat([found_vals, v2]).abs().max())
        kth = found_vals[:k][-1] if found_vals.shape[0] >= k else None
        better = kth is None or (
            float(v2[0]) > float(kth) + bound if which == "largest" else float(v2[0]) < float(kth) - bound
        )
        found_vals = torch.cat([found_vals, v2])
        found_vecs = torch.cat([found_vecs, x2])
        found_res = torch.cat([found_res, r2])
        order = torch.argsort(found_vals, descending=which == "largest", stable=True)
        found_vals, found_vecs, found_res = found_vals[order], found_vecs[order], found_res[order]
        if not better:
            break
    vectors = found_vecs[:k] if return_eigenvectors else None
    return LanczosResult(found_vals[:k], vectors, found_res[:k], used, converged)


class _Deflated:
    """``(I − XᵀX) A (I − XᵀX)`` for orthonormal rows X: A with the found eigenvectors removed."""

    def __init__(self, op: LinearOperator, X: Tensor) -> None:
        self.op, self.X = op, X
        self.size, self.dtype, self.device = op.size, op.dtype, op.device

    def _project(self, V: Tensor) -> Tensor:
        return V - (V @ self.X.T) @ self.X

    def matmat(self, V: Tensor) -> Tensor:
        return self._project(self.op.matmat(self._project(V)))

    def quadform(self, V: Tensor) -> Tensor:
        return (self.matmat(V) * V).sum(-1)


def _lanczos_run(
    call: str,
    op: Any,
    k: int,
    which: str,
    rel: float,
    max_steps: int,
    generator: torch.Generator | None,
    avoid: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    """One Lanczos run: ``(eigenvalues, eigenvectors, residuals, steps, converged)`` of the k
    wanted Ritz pairs (start vector orthogonal to the rows of ``avoid``)."""
    start = _probes.draw(1, op.size, "gaussian", generator, op.dtype, op.device)
    if avoid is not None:
        for _ in range(2):
            start = start - (start @ avoid.T) @ avoid
    lz = _Lanczos(op, start, max_steps, generator)
    lz.avoid = avoid
    while True:
        lz.step()
        m = lz.steps
        final = m == max_steps
        if m < k or not (m <= 32 or m % 4 == 0 or final):
            continue
        if bool(lz.exhausted[0]) and not final:
            continue  # an invariant subspace: the next block may hold further copies of eigenvalues
        T = lz.tridiagonal()[0]
        if not bool(torch.isfinite(T.sum())):  # one reduction per check; the full check reports
            check_finite_result(call, "Lanczos tridiagonal matrix (products of op)", T, fix=_NONFINITE_OP)
        theta, S = torch.linalg.eigh(T)
        idx = torch.arange(m - 1, m - 1 - k, -1) if which == "largest" else torch.arange(k)
        residuals = (lz.residual_beta[0] * S[-1, idx]).abs()
        bound = rel * theta.abs().max().clamp_min(torch.finfo(theta.dtype).tiny)
        converged = bool((residuals <= bound).all())
        start_block = int(lz.block_start[0])
        if converged and start_block > 0:
            # After a restart, the new block's extreme Ritz value must have converged too, or an
            # eigenvalue from the complement of the first invariant subspace could be missing.
            _, Sb = torch.linalg.eigh(T[start_block:, start_block:])
            edge = -1 if which == "largest" else 0
            converged = bool((lz.residual_beta[0] * Sb[-1, edge]).abs() <= bound)
        if converged or final:
            vectors = S[:, idx].T @ lz.V[0, :m]
            return theta[idx], vectors, residuals, m, converged


def slq_nodes_weights(
    op: LinearOperator,
    *,
    num_runs: int = 10,
    num_steps: int = 80,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of stochastic Lanczos quadrature.

    For each of ``num_runs`` random unit start vectors, ``num_steps`` Lanczos steps with
    full reorthogonalization give T_m = S diag(θ) Sᵀ; the nodes are θ and the weights
    the squared first row of S (they sum to 1 per run). Then for any function g,
    (n/runs) Σ_runs Σ_j τ_j g(θ_j) estimates tr g(A).

    Args:
        op: a symmetric operator.
        num_runs: independent start vectors.
        num_steps: Lanczos steps per run (capped at P).
        distribution: of the start vectors before normalization (``"rademacher"``:
            every normalized start vector has E[vvᵀ] = I/n and no norm fluctuation).
        generator: the source of all randomness (``None``: the global generator).
        chunk_size: runs advanced together (one batched product per step); ``None``:
            as many as fit the memory budget (each run stores its basis, steps × P).
        reorthogonalize: full reorthogonalization (default). ``False`` runs the plain
            three-term recurrence: no stored basis and no O(m²P) work, so it costs
            little more than the products, but once Ritz values converge, copies
            ("ghosts") of them appear that share their quadrature weight; densities and
            spectral sums stay accurate in practice (Ubaru, Chen, Saad 2017 analyse SLQ
            in finite precision), eigenvalue counts per node do not.

    Returns:
        ``(nodes, weights)``, both ``(num_runs, m)``.

    Raises:
        RuntimeError: called inside a ``torch.func`` transform.
    """
    call = "slq_nodes_weights(op)"
    check_operator(call, op)
    num_runs = _check_int(call, "num_runs", num_runs)
    steps = min(_check_int(call, "num_steps", num_steps), op.size)
    _probes.check_distribution(call, distribution)
    check_bool(call, "reorthogonalize", reorthogonalize)
    if chunk_size is None:
        per_run = op.size * op.dtype.itemsize * ((steps if reorthogonalize else 3) + 8)
        chunk_size = max(1, min(num_runs, memory_budget() // per_run))
    check_eager(call, [], what="Stochastic Lanczos quadrature", fix=_FIX)
    nodes, weights = [], []
    for a, b in _probes.chunks(num_runs, chunk_size):
        start = _probes.draw(b - a, op.size, distribution, generator, op.dtype, op.device)
        lz = _Lanczos(op, start, steps, generator, reorthogonalize)
        for _ in range(steps):
            lz.step()
        T = lz.tridiagonal()
        check_finite_result(call, "Lanczos tridiagonal matrices (products of op)", T, fix=_NONFINITE_OP)
        theta, S = torch.linalg.eigh(T)
        nodes.append(theta)
        weights.append(S[:, 0, :] ** 2)
    return torch.cat(nodes), torch.cat(weights)


def spectral_density(
    op: LinearOperator,
    *,
    num_runs: int = 10,
    num_steps: int = 80,
    num_points: int = 1024,
    sigma: float | None = None,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """The Gaussian-broadened spectral density of ``op`` by stochastic Lanczos quadrature.

    φ(t) = (1/runs) Σ_runs Σ_j τ_j N(t; θ_j, σ²) estimates (1/n) Σ_i N(t; λ_i, σ²)
    (see :func:`slq_nodes_weights`). The grid spans the extreme nodes ± 6σ, so φ
    integrates to 1 over it (up to the grid spacing).

    Args:
        op: a symmetric operator.
        num_runs: independent Lanczos runs (more: less noise in the weights).
        num_steps: Lanczos steps per run (more: finer resolution of the bulk).
        num_points: grid points.
        sigma: Gaussian width; ``None``: 1% of the spread of the nodes (or of their
            magnitude if all coincide).
        distribution, generator, chunk_size, reorthogonalize: as in
            :func:`slq_nodes_weights`.

    Returns:
        ``(grid, density)``, two tensors of length ``num_points``.

    Example:
        >>> import torch
        >>> from secorder.operators import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([0.0, 0.0, 1.0, 1.0]).double()))
        >>> t, phi = spectral_density(A, sigma=0.05, generator=torch.Generator().manual_seed(0))
        >>> round(float(torch.trapezoid(phi, t)), 6)
        1.0
    """
    call = "spectral_density(op)"
    check_operator(call, op)
    _check_int(call, "num_points", num_points, 2)
    width = _check_positive(call, "sigma", sigma)
    nodes, weights = slq_nodes_weights(
        op,
        num_runs=num_runs,
        num_steps=num_steps,
        distribution=distribution,
        generator=generator,
        chunk_size=chunk_size,
        reorthogonalize=reorthogonalize,
    )
    lo, hi = float(nodes.min()), float(nodes.max())
    if width is None:
        spread = hi - lo
        width = 0.01 * (spread if spread > 0 else max(abs(hi), 1.0))
    grid = torch.linspace(lo - 6 * width, hi + 6 * width, num_points, dtype=nodes.dtype, device=nodes.device)
    density = torch.zeros_like(grid)
    norm = 1 / (width * math.sqrt(2 * math.pi) * nodes.shape[0])
    for theta, tau in zip(nodes, weights):  # one run at a time: memory num_points × steps
        gauss = torch.exp(-0.5 * ((grid.unsqueeze(1) - theta) / width) ** 2)
        density = density + gauss @ tau * norm
    return grid, density


def plot_spectral_density(
    grid: Tensor,
    density: Tensor,
    path: str | os.PathLike[str] | None = None,
    *,
    log_scale: bool = True,
    eigenvalues: Tensor | None = None,
    title: str | None = None,
    ax: Any = None,
) -> Any:
    """Plot a spectral density (needs matplotlib, an optional extra), optionally to a PNG.

    Args:
        grid: the evaluation points, as returned by :func:`spectral_density`.
        density: the density on ``grid``.
        path: where to write the PNG (``None``: write nothing).
        log_scale: logarithmic density axis (Hessian spectra span many decades).
        eigenvalues: optional eigenvalues to mark (e.g. from :func:`lanczos_eigenvalues`).
        title: optional plot title.
        ax: a matplotlib ``Axes`` to draw into (e.g. from ``plt.subplots()``); by default a
            new figure, independent of pyplot's state.

    Returns:
        The matplotlib ``Figure`` drawn into.

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise error(
            "plot_spectral_density(grid, density, path)",
            "plotting needs matplotlib, an optional dependency",
            "no importable matplotlib",
            'Install it with pip install "secorder[plot]" (or pip install matplotlib).',
            cls=ImportError,
        ) from exc
    shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (grid, density)]
    if not all(isinstance(t, Tensor) and t.dim() == 1 for t in (grid, density)) or shapes[0] != shapes[1]:
        raise error(
            "plot_spectral_density(grid, density, path)",
            "grid and density must be 1-d tensors of the same length",
            f"grid {shapes[0]} and density {shapes[1]}",
            "Pass the (grid, density) pair returned by spectral_density / hessian_spectral_density.",
        )
    if ax is None:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    x = grid.detach().cpu().double().numpy()
    y = density.detach().cpu().double().numpy()
    if log_scale:
        floor = max(float(y.max()) * 1e-12, 1e-300)
        ax.semilogy(x, y.clip(min=floor))
    else:
        ax.plot(x, y)
    if eigenvalues is not None:
        for lam in eigenvalues.detach().cpu().double().tolist():
            ax.axvline(lam, color="tab:red", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), format="png", dpi=120)
    return fig

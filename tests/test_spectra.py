"""Tests of secorder.spectra: Lanczos eigenvalues against eigvalsh, SLQ densities, plotting."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

import secorder
from secorder.operators import DenseOperator
from secorder.spectra import lanczos_eigenvalues, plot_spectral_density, slq_nodes_weights, spectral_density
from secorder.testing import dense_hessian


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def matrix(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    n = eigenvalues.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen(100 + seed)))
    A = (Q * eigenvalues.double()) @ Q.T
    return (A + A.T) / 2


def indefinite(n: int = 120) -> Tensor:
    """Distinct eigenvalues of both signs, a few outliers and a bulk (like a Hessian)."""
    bulk = torch.randn(n - 4, dtype=torch.float64, generator=gen(1)) * 0.3
    return torch.cat([torch.tensor([25.0, 12.0, -6.0, 8.0], dtype=torch.float64), bulk])


# -- Lanczos eigenvalues --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "spectrum"),
    [
        ("largest", "indefinite"),
        ("smallest", "indefinite"),  # the most negative: directions of negative curvature
        ("largest", "polynomial"),
        ("largest", "exponential"),
    ],
)
def test_lanczos_matches_eigvalsh(which: str, spectrum: str) -> None:
    n = 120
    i = torch.arange(n, dtype=torch.float64)
    lam = {"indefinite": indefinite(n), "polynomial": (i + 1) ** -1.5, "exponential": 0.9**i}[spectrum]
    A = matrix(lam)
    ref = torch.linalg.eigvalsh(A)
    ref = ref.flip(0)[:4] if which == "largest" else ref[:4]
    res = lanczos_eigenvalues(DenseOperator(A), 4, which=which, generator=gen(0), return_eigenvectors=True)
    assert res.converged and res.num_products <= n
    scale = float(ref.abs().max()) if which == "largest" else float(torch.linalg.eigvalsh(A).abs().max())
    torch.testing.assert_close(res.eigenvalues, ref, rtol=0, atol=1e-7 * scale)
    X = res.eigenvectors
    assert X is not None and X.shape == (4, n)
    torch.testing.assert_close(X @ X.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    actual = torch.linalg.vector_norm(X @ A - res.eigenvalues[:, None] * X, dim=1)
    torch.testing.assert_close(actual, res.residuals, rtol=1e-3, atol=1e-12)  # the residual bound is exact
    assert bool((res.residuals <= 1.5e-8 * float(res.eigenvalues.abs().max())).all())


def test_lanczos_float32() -> None:
    A = matrix(indefinite())
    ref = torch.linalg.eigvalsh(A).flip(0)[:3]
    res = lanczos_eigenvalues(DenseOperator(A.float()), 3, generator=gen(0))
    assert res.eigenvalues.dtype == torch.float32 and res.converged
    torch.testing.assert_close(res.eigenvalues.double(), ref, rtol=1e-4, atol=1e-4)


def test_lanczos_recovers_repeated_eigenvalues_of_invariant_subspaces() -> None:
    D = torch.diag(torch.tensor([3.0, 3, 3, 2, 2, 1, 1, 1, 0.5, 0.5], dtype=torch.float64))
    res = lanczos_eigenvalues(DenseOperator(D), 4, generator=gen(3))
    torch.testing.assert_close(res.eigenvalues, torch.tensor([3.0, 3, 3, 2], dtype=torch.float64))
    res = lanczos_eigenvalues(DenseOperator(D), 3, which="smallest", generator=gen(3))
    torch.testing.assert_close(res.eigenvalues, torch.tensor([0.5, 0.5, 1], dtype=torch.float64))


@pytest.mark.parametrize("restart", [False, True], ids=["one-block", "restarted"])
def test_lanczos_tridiagonal_is_the_projection_of_the_operator(restart: bool) -> None:
    """T_m (its entries stored step by step) equals Vᵀ A V on the stored basis, also after a
    restart from an invariant subspace (there the off-diagonal entry is 0 and A maps no block
    into another)."""
    from secorder.spectra import _Lanczos

    n = 12
    if restart:  # 3 distinct eigenvalues: the Krylov space is invariant after 3 steps
        A = torch.diag(torch.tensor([3.0, 3, 3, 2, 2, 2, 1, 1, 1, 1, 0.5, 0.5], dtype=torch.float64))
    else:
        A = matrix(torch.linspace(-1, 2, n, dtype=torch.float64))
    start = torch.randn(1, n, dtype=torch.float64, generator=gen(4))
    lz = _Lanczos(DenseOperator(A), start, 8, gen(5))
    restarted = []
    for _ in range(8):
        lz.step()
        restarted.append(bool(lz.block_start[0] > 0))
    assert any(restarted) == restart
    V = lz.V[0, :8]
    torch.testing.assert_close(V @ V.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(lz.tridiagonal()[0], V @ A @ V.T, rtol=0, atol=1e-12)


def test_lanczos_reports_non_convergence() -> None:
    A = matrix(torch.linspace(1, 2, 200, dtype=torch.float64))  # tiny gaps: slow convergence
    res = lanczos_eigenvalues(DenseOperator(A), 2, max_steps=6, generator=gen(0))
    assert not res.converged and res.num_products == 6
    assert float(res.residuals.max()) > 1.5e-8 * 2


def test_lanczos_same_generator_same_result() -> None:
    op = DenseOperator(matrix(indefinite()))
    a = lanczos_eigenvalues(op, 2, generator=gen(5), return_eigenvectors=True)
    b = lanczos_eigenvalues(op, 2, generator=gen(5), return_eigenvectors=True)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.eigenvectors is not None
    assert b.eigenvectors is not None and torch.equal(a.eigenvectors, b.eigenvectors)


@pytest.mark.parametrize("certify", [True, False], ids=["certified", "uncertified"])
@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-8])
@pytest.mark.parametrize("k", [1, 3])
def test_lanczos_tol_bounds_the_residual(k: int, tol: float, certify: bool) -> None:
    """The documented guarantee of tol: ‖Ax − θx‖ ≤ tol · max abs(θ) for every returned pair,
    measured against the dense matrix, so each θ lies within it of an eigenvalue (eigvalsh)."""
    A = matrix(indefinite())
    res = lanczos_eigenvalues(
        DenseOperator(A), k, tol=tol, certify=certify, generator=gen(0), return_eigenvectors=True
    )
    assert res.converged and res.eigenvectors is not None
    X, theta = res.eigenvectors, res.eigenvalues
    actual = torch.linalg.vector_norm(X @ A - theta[:, None] * X, dim=1)
    assert bool((actual <= tol * float(theta.abs().max()) * (1 + 1e-6)).all())
    ref = torch.linalg.eigvalsh(A)
    nearest = (theta[:, None] - ref[None, :]).abs().min(1).values
    assert bool((nearest <= actual + 1e-12).all())
    # the spectrum's top is well separated: these are its k largest, to within the residuals
    assert bool(((theta - ref.flip(0)[:k]).abs() <= actual + 1e-12).all())


def test_lanczos_uncertified_is_the_first_run_of_the_certified_one() -> None:
    """certify=False returns the first Lanczos run as it is: for k = 1 the same eigenvalue, bit
    for bit, as the certified call (whose deflated run finds nothing larger), in fewer products."""
    op = DenseOperator(matrix(indefinite()))
    full = lanczos_eigenvalues(op, 1, tol=1e-4, generator=gen(4))
    first = lanczos_eigenvalues(op, 1, tol=1e-4, certify=False, generator=gen(4))
    again = lanczos_eigenvalues(op, 1, tol=1e-4, certify=False, generator=gen(4))
    assert torch.equal(full.eigenvalues, first.eigenvalues) and torch.equal(
        first.eigenvalues, again.eigenvalues
    )
    assert first.converged and full.converged
    assert first.num_products == again.num_products < full.num_products


def test_lanczos_certification_recovers_a_copy_the_first_run_cannot_hold() -> None:
    """A single-vector Krylov space holds one copy of a repeated eigenvalue; with the top two
    distinct eigenvalues far from a bulk of 196, the first run converges long before the space is
    exhausted (no restart), so only the certifying deflated runs find the other copies of 10."""
    lam = torch.cat([torch.full((3,), 10.0), torch.tensor([7.0]), torch.linspace(0.0, 1.0, 196)]).double()
    op = DenseOperator(matrix(lam, seed=3))
    certified = lanczos_eigenvalues(op, 2, generator=gen(0))
    torch.testing.assert_close(certified.eigenvalues, torch.full((2,), 10.0, dtype=torch.float64))
    uncertified = lanczos_eigenvalues(op, 2, certify=False, generator=gen(0))
    assert uncertified.converged and uncertified.num_products < certified.num_products
    torch.testing.assert_close(uncertified.eigenvalues, torch.tensor([10.0, 7.0], dtype=torch.float64))


def test_lanczos_errors() -> None:
    op = DenseOperator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"lanczos_eigenvalues\(op, k\): k must not exceed the operator size 5"
    ):
        lanczos_eigenvalues(op, 6)
    with pytest.raises(ValueError, match=r'which must be "largest" or "smallest", but received \'top\''):
        lanczos_eigenvalues(op, 1, which="top")
    with pytest.raises(ValueError, match=r"k must be an int >= 1"):
        lanczos_eigenvalues(op, 0)
    with pytest.raises(ValueError, match=r"tol must be a positive finite number"):
        lanczos_eigenvalues(op, 1, tol=-1.0)
    with pytest.raises(ValueError, match=r"max_steps must be an int >= 2"):
        lanczos_eigenvalues(op, 2, max_steps=1)
    with pytest.raises(TypeError, match=r"certify must be True or False, but received 1"):
        lanczos_eigenvalues(op, 1, certify=1)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"Lanczos is a data-dependent loop and runs only eagerly"):
        torch.func.vmap(lambda x: lanczos_eigenvalues(op, 1).eigenvalues + x)(
            torch.zeros(2, dtype=torch.float64)
        )


# -- Hessian transforms ---------------------------------------------------------------------------


def _mlp() -> tuple[object, dict[str, Tensor], Tensor, Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    f, params = secorder.module_loss(model, torch.nn.functional.cross_entropy)
    X = torch.randn(10, 4, dtype=torch.float64, generator=gen(1))
    y = torch.randint(0, 3, (10,), generator=gen(2))
    return f, params, X, y


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_hessian_eigenvalues_match_dense(which: str) -> None:
    f, params, X, y = _mlp()
    H = dense_hessian(f, params, X, y)
    ref = torch.linalg.eigvalsh(H)
    ref = ref.flip(0)[:3] if which == "largest" else ref[:3]
    fn = secorder.hessian_eigenvalues(f, k=3, which=which, return_eigenvectors=True)
    vals, vecs = fn(params, X, y, generator=gen(0))
    torch.testing.assert_close(vals, ref, rtol=1e-6, atol=1e-8)
    assert list(vecs) == list(params)
    flat = torch.cat([vecs[k].reshape(3, -1) for k in sorted(vecs)], dim=1)  # secorder's flat order
    assert all(vecs[k].shape == (3, *params[k].shape) for k in params)
    torch.testing.assert_close(flat @ H @ flat.T, torch.diag(vals), rtol=1e-6, atol=1e-8)


def test_hessian_eigenvalues_warns_without_convergence() -> None:
    f, params, X, y = _mlp()
    fn = secorder.hessian_eigenvalues(f, k=2, max_steps=3)
    with pytest.warns(RuntimeWarning, match=r"hessian_eigenvalues\(f\)\(\*args\): Lanczos did not reach"):
        fn(params, X, y, generator=gen(0))


@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_hessian_top_eigenvalue_certified_or_not(tol: float) -> None:
    """Both modes meet the residual guarantee against the dense Hessian; same generator, same
    numbers (here the deflated run finds nothing larger, so both return the same value)."""
    f, params, X, y = _mlp()
    H = dense_hessian(f, params, X, y)
    top = float(torch.linalg.eigvalsh(H).max())
    got = {}
    for certify in (True, False):
        fn = secorder.hessian_eigenvalues(f, k=1, tol=tol, certify=certify, return_eigenvectors=True)
        val, vec = fn(params, X, y, generator=gen(0))
        again, _ = fn(params, X, y, generator=gen(0))
        assert torch.equal(val, again)
        x = torch.cat([vec[k].reshape(1, -1) for k in sorted(vec)], dim=1)[0]  # secorder's flat order
        residual = float(torch.linalg.vector_norm(H @ x - val[0] * x))
        assert residual <= tol * abs(float(val[0])) * (1 + 1e-6)
        assert abs(float(val[0]) - top) <= residual + 1e-12
        got[certify] = val
    assert torch.equal(got[True], got[False])


def test_hessian_eigenvalues_errors() -> None:
    f, params, X, y = _mlp()
    with pytest.raises(ValueError, match=r"hessian_eigenvalues\(f\)\(\*args\): which must be"):
        secorder.hessian_eigenvalues(f, which="biggest")
    with pytest.raises(TypeError, match=r"hessian_eigenvalues\(f\)\(\*args\): certify must be True or False"):
        secorder.hessian_eigenvalues(f, certify="yes")  # type: ignore[arg-type]
    size = sum(p.numel() for p in params.values())
    with pytest.raises(ValueError, match=rf"k must not exceed the number of parameters {size}"):
        secorder.hessian_eigenvalues(f, k=size + 1)(params, X, y)
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}
    with pytest.raises(
        RuntimeError, match=r"hessian_eigenvalues\(f\)\(\*args\): Lanczos is a data-dependent"
    ):
        torch.func.vmap(lambda p: secorder.hessian_eigenvalues(f)(p, X, y))(stacked)


# -- stochastic Lanczos quadrature ------------------------------------------------------------------


def _broadened(eigenvalues: Tensor, grid: Tensor, sigma: float) -> Tensor:
    z = (grid[:, None] - eigenvalues) / sigma
    return torch.exp(-0.5 * z**2).sum(1) / (eigenvalues.numel() * sigma * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("reorthogonalize", [True, False])
@pytest.mark.parametrize("spectrum", ["indefinite", "exponential", "clusters"])
def test_density_integrates_to_one(spectrum: str, reorthogonalize: bool) -> None:
    n = 100
    lam = {
        "indefinite": indefinite(n),
        "exponential": 0.8 ** torch.arange(n, dtype=torch.float64),
        "clusters": torch.cat([torch.zeros(90), torch.full((10,), 5.0)]).double(),
    }[spectrum]
    grid, density = spectral_density(
        DenseOperator(matrix(lam)),
        num_runs=4,
        num_steps=30,
        generator=gen(0),
        reorthogonalize=reorthogonalize,
    )
    assert grid.shape == density.shape == (1024,)
    assert bool((density >= 0).all())
    assert abs(float(torch.trapezoid(density, grid)) - 1) < 1e-6
    # The density's mean is exactly the mean over runs of vᵀAv/‖v‖² (the first Lanczos
    # coefficient, with or without reorthogonalization), Hutchinson's estimate of tr(A)/n:
    # for 4 Rademacher runs its standard deviation is √(2(‖A‖²_F − Σ A_ii²)/4) / n.
    A = matrix(lam)
    sd = math.sqrt(2 * float((A**2).sum() - (A.diagonal() ** 2).sum()) / 4) / n
    mean = float(torch.trapezoid(grid * density, grid))
    assert abs(mean - float(lam.mean())) < 5 * sd + 1e-9, (mean, float(lam.mean()), sd)


def test_slq_weights_are_exact_quadrature_with_full_steps() -> None:
    """With m = n steps, Σ τ_j g(θ_j) = vᵀ g(A) v exactly; the mass of a cluster is unbiased over runs."""
    lam = torch.cat([torch.linspace(-1, 1, 45), torch.linspace(9, 11, 15)]).double()
    A = matrix(lam)
    nodes, weights = slq_nodes_weights(DenseOperator(A), num_runs=40, num_steps=60, generator=gen(1))
    assert nodes.shape == weights.shape == (40, 60)
    torch.testing.assert_close(weights.sum(1), torch.ones(40, dtype=torch.float64))
    mass = (weights * (nodes > 5)).sum(1)  # per-run estimate of the fraction of eigenvalues above 5
    se = float(mass.std() / math.sqrt(40))
    assert abs(float(mass.mean()) - 15 / 60) <= 4 * se + 1e-12
    # n Σ τ θ² = n vᵀA²v is Hutchinson's estimate of ‖A‖²_F for each run.
    frob = (weights * nodes**2).sum(1) * 60
    assert abs(float(frob.mean() - (A**2).sum())) <= 4 * float(frob.std() / math.sqrt(40))


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_density_puts_mass_where_the_eigenvalues_are(reorthogonalize: bool) -> None:
    lam = indefinite(150)
    A = matrix(lam)
    sigma = 0.5
    grid, density = spectral_density(
        DenseOperator(A),
        num_runs=30,
        num_steps=60,
        sigma=sigma,
        generator=gen(2),
        reorthogonalize=reorthogonalize,
    )
    exact = _broadened(lam, grid, sigma)
    l1 = float(torch.trapezoid((density - exact).abs(), grid))
    assert l1 < 0.15  # measured about 0.05; a density in the wrong place has L1 distance near 2
    # The outliers carry 1/150 of the mass each: the density there is about that much.
    for outlier in (25.0, 12.0, 8.0, -6.0):
        window = (grid - outlier).abs() < 3 * sigma
        mass = float(torch.trapezoid(density[window], grid[window]))
        assert 0.1 / 150 < mass < 3 / 150, (outlier, mass)
    empty = (grid > 14) & (grid < 23)
    assert float(density[empty].max()) < 1e-3


def test_density_errors_and_eager_only() -> None:
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"spectral_density\(op\): sigma must be a positive finite number"):
        spectral_density(op, sigma=0.0)
    with pytest.raises(ValueError, match=r"slq_nodes_weights\(op\): num_runs must be an int >= 1"):
        spectral_density(op, num_runs=0)
    with pytest.raises(TypeError, match=r"reorthogonalize must be True or False"):
        spectral_density(op, reorthogonalize=1)
    with pytest.raises(RuntimeError, match=r"Stochastic Lanczos quadrature is a data-dependent loop"):
        torch.func.vmap(lambda x: spectral_density(op)[1].sum() + x)(torch.zeros(2, dtype=torch.float64))


def test_hessian_spectral_density_on_mlp() -> None:
    f, params, X, y = _mlp()
    lam = torch.linalg.eigvalsh(dense_hessian(f, params, X, y))
    size = lam.numel()
    grid, density = secorder.hessian_spectral_density(f, num_runs=20, num_steps=size, sigma=0.01)(
        params, X, y, generator=gen(0)
    )
    assert abs(float(torch.trapezoid(density, grid)) - 1) < 1e-6
    # P steps on a P-dimensional Hessian: every run's quadrature is exact, so the
    # density is a random reweighting of the exact eigenvalues; its mean is the exact density.
    assert float(grid[0]) <= float(lam.min()) and float(grid[-1]) >= float(lam.max())
    exact = _broadened(lam, grid, 0.01)
    assert float(torch.trapezoid((density - exact).abs(), grid)) < 0.3


# -- plotting -----------------------------------------------------------------------------------------


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    grid = torch.linspace(-1, 1, 50, dtype=torch.float64)
    density = torch.exp(-((grid - 0.3) ** 2))  # not symmetric: a reversed axis would show
    path = tmp_path / "density.png"
    fig = plot_spectral_density(grid, density, path, eigenvalues=torch.tensor([0.5]), title="test")
    ax = fig.axes[0]
    curve, marker = ax.lines
    torch.testing.assert_close(torch.as_tensor(curve.get_xydata()), torch.stack([grid, density], 1))
    assert list(marker.get_xdata()) == [0.5, 0.5] and ax.get_title() == "test"
    assert ax.get_yscale() == "log"
    from matplotlib.image import imread

    image = imread(path)  # the PNG holds the drawing: 6×4 inches at 120 dpi, not blank
    assert image.shape[:2] == (480, 720) and float(image[..., :3].std()) > 0.05
    # drawing into a given Axes (e.g. a gallery figure) writes nothing and returns its figure
    import matplotlib.figure

    own = matplotlib.figure.Figure()
    target = own.add_subplot()
    assert plot_spectral_density(grid, density, ax=target, log_scale=False) is own
    torch.testing.assert_close(torch.as_tensor(target.lines[0].get_ydata()), density)


def test_plot_without_matplotlib_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    grid = torch.linspace(0, 1, 5)
    with pytest.raises(ImportError, match=r"plotting needs matplotlib.*pip install \"secorder\[plot\]\""):
        plot_spectral_density(grid, grid, "unused.png")

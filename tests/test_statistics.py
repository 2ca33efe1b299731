"""Hutchinson's estimators are unbiased and their stderr is calibrated (over many seeds)."""

from __future__ import annotations

import math

import pytest
import torch

import secorder
from secorder.estimators import hutchinson_diagonal, hutchinson_trace
from secorder.operators import DenseOperator

SEEDS = 400


def _quadratic(P: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=torch.float64)
    A = A + A.T + torch.diag(torch.linspace(-2, 5, P, dtype=torch.float64))
    return A


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_trace_unbiased_and_calibrated(distribution: str) -> None:
    A = _quadratic()
    exact = A.trace()
    f = lambda x: 0.5 * x @ A @ x
    fn = secorder.hessian_trace(f, num_probes=40, distribution=distribution, with_stderr=True)
    x = torch.zeros(A.shape[0], dtype=torch.float64)
    ests, errs = zip(*(fn(x, generator=torch.Generator().manual_seed(s)) for s in range(SEEDS)))
    ests_t, errs_t = torch.stack(ests), torch.stack(errs)
    # Unbiased: the mean over seeds is within 4 standard errors (of that mean) of the truth.
    sem = ests_t.std() / math.sqrt(SEEDS)
    assert abs(ests_t.mean() - exact) < 4 * sem
    # The reported stderr matches the spread of the estimates across seeds ...
    ratio = errs_t.mean() / ests_t.std()
    assert 0.85 < ratio < 1.15
    # ... and a 95% interval covers the truth in ~95% of seeds (binomial sd 1.1% at 400 seeds).
    coverage = ((ests_t - exact).abs() <= 1.96 * errs_t).double().mean()
    assert 0.90 <= coverage <= 0.99


def test_hutchinson_variance_matches_theory_for_rademacher() -> None:
    """Var[vᵀAv] = 2(‖A‖²_F − Σ A_ii²) for Rademacher probes."""
    A = _quadratic(seed=1)
    op = DenseOperator(A)
    ests = torch.stack(
        [hutchinson_trace(op, 1, generator=torch.Generator().manual_seed(s))[0] for s in range(2000)]
    )
    theory = 2 * ((A**2).sum() - (A.diagonal() ** 2).sum())
    # Sample variance of 2000 draws: relative sd about sqrt(2/2000)·(kurtosis factor) < 10%.
    assert 0.8 < ests.var() / theory < 1.2


def test_hutchinson_diagonal_unbiased_per_entry() -> None:
    A = _quadratic(P=6, seed=2)
    op = DenseOperator(A)
    draws = torch.stack(
        [hutchinson_diagonal(op, 10, generator=torch.Generator().manual_seed(s))[0] for s in range(SEEDS)]
    )
    sem = draws.std(0) / math.sqrt(SEEDS)
    assert ((draws.mean(0) - A.diagonal()).abs() < 4 * sem).all()


def test_hutchinson_diagonal_stderr_calibrated() -> None:
    A = _quadratic(P=6, seed=3)
    op = DenseOperator(A)
    est, err = zip(
        *(hutchinson_diagonal(op, 40, generator=torch.Generator().manual_seed(s)) for s in range(SEEDS))
    )
    est_t, err_t = torch.stack(est), torch.stack(err)
    coverage = ((est_t - A.diagonal()).abs() <= 1.96 * err_t).double().mean(0)
    assert ((coverage > 0.88) & (coverage < 0.995)).all()


def test_hutchinson_diagonal_chunked_moments_equal_unchunked() -> None:
    A = _quadratic(P=5, seed=4)
    op = DenseOperator(A)
    a = hutchinson_diagonal(op, 9, generator=torch.Generator().manual_seed(0), chunk_size=2)
    b = hutchinson_diagonal(op, 9, generator=torch.Generator().manual_seed(0), chunk_size=9)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])

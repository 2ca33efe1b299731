"""Curvature propagation on the structured sweep: ``hessian_diagonal`` / ``hessian_trace`` with
``method="curvature_propagation"`` for plain functions, against dense float64 Hessians.

The estimator is tested statistically: over many seeds the mean is within a few standard errors
of the exact diagonal, and the reported standard errors are calibrated; columns that do not
overlap give the exact value with zero standard error; the same generator state gives the same
result for any ``chunk_size``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

import secorder
from secorder.testing import dense_hessian

F64 = torch.float64


def _problem(n: int = 6) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    params = {
        "W1": torch.randn(4, 5, dtype=F64, generator=g),
        "b": torch.randn(5, dtype=F64, generator=g),
        "W2": torch.randn(5, 3, dtype=F64, generator=g),
    }
    x = torch.randn(n, 4, dtype=F64, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    w = torch.rand(n, dtype=F64, generator=g) + 0.5
    return params, x, y, w


def f(p: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """A per-sample-weighted cross-entropy of a tanh network, plus parameter-only terms: one on
    a leaf itself (exact columns) and one through a non-leaf value (mixed columns)."""
    h = torch.tanh(x @ p["W1"] + p["b"])
    ce = F.cross_entropy(h @ p["W2"], y, reduction="none")
    return (w * ce).mean() + 0.1 * (p["b"] ** 4).sum() + 0.01 * p["W2"].sum() ** 2


def _flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([d[k].reshape(-1) for k in sorted(d)])  # dense order: sorted keys


def test_unbiased_and_stderr_calibrated() -> None:
    """150 seeds of K=6 probes: every entry's mean within 4 standard errors of the exact diagonal;
    the reported standard errors cover the exact value in ~95% of the (entry, seed) pairs (a
    t-statistic with 5 degrees of freedom at 1.96: about 0.89 expected), and likewise the trace."""
    params, x, y, w = _problem()
    exact = dense_hessian(f, params, x, y, w).diagonal()
    diag_fn = secorder.hessian_diagonal(f, num_probes=6, method="curvature_propagation", with_stderr=True)
    trace_fn = secorder.hessian_trace(f, num_probes=6, method="curvature_propagation", with_stderr=True)
    seeds = 150
    ests, errs, traces, trace_errs = [], [], [], []
    for s in range(seeds):
        d, e = diag_fn(params, x, y, w, generator=torch.Generator().manual_seed(s))
        t, te = trace_fn(params, x, y, w, generator=torch.Generator().manual_seed(s))
        ests.append(_flat(d))
        errs.append(_flat(e))
        traces.append(t)
        trace_errs.append(te)
    est, err = torch.stack(ests), torch.stack(errs)
    torch.testing.assert_close(torch.stack(traces), est.sum(1))  # the same probes
    spread = est.std(0) / math.sqrt(seeds)
    random = spread > 1e-12
    assert int(random.sum()) > exact.numel() // 2  # genuinely random
    assert bool(((est.mean(0) - exact).abs() <= 4 * spread + 1e-10).all())
    # entries with no spread over the seeds must be exact
    torch.testing.assert_close(est[:, ~random], exact[~random].expand(seeds, -1), rtol=1e-9, atol=1e-11)
    covered = ((est - exact).abs() <= 1.96 * err)[:, random].double().mean()
    assert 0.84 <= float(covered) <= 0.98, float(covered)
    tr, tr_err = torch.stack(traces), torch.stack(trace_errs)
    assert float((tr.mean() - exact.sum()).abs()) <= 4 * float(tr.std()) / math.sqrt(seeds)
    t_cov = float(((tr - exact.sum()).abs() <= 1.96 * tr_err).double().mean())
    assert 0.82 <= t_cov <= 0.99, t_cov
    info = diag_fn.method_info
    assert info.method == "curvature_propagation" and "K=6" in info.reason and info.num_columns > 0


def test_same_generator_state_same_result_any_chunk_size() -> None:
    params, x, y, w = _problem()
    out = []
    for chunk in (1, 3, None, None):
        fn = secorder.hessian_diagonal(
            f, num_probes=4, method="curvature_propagation", chunk_size=chunk, with_stderr=True
        )
        d, e = fn(params, x, y, w, generator=torch.Generator().manual_seed(3))
        out.append((_flat(d), _flat(e)))
    assert all(torch.equal(a, b) for a, b in zip(out[2], out[3]))  # bitwise: same state, same call
    for other in out[:2]:  # other chunk sizes: the same signs, summed in another order
        for a, b in zip(out[2], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    fn = secorder.hessian_diagonal(f, num_probes=4, method="curvature_propagation")
    assert not torch.equal(_flat(fn(params, x, y, w, generator=torch.Generator().manual_seed(4))), out[2][0])


def test_exact_when_columns_do_not_overlap() -> None:
    """One pointwise op on disjoint parameter entries: every column reaches its own entry, so
    every probe is exact and the standard errors vanish."""
    g = torch.Generator().manual_seed(1)
    p, x = torch.randn(3, dtype=F64, generator=g), torch.randn(5, 3, dtype=F64, generator=g)
    h = lambda p, x: torch.sin(p * x).mean()
    d, e = secorder.hessian_diagonal(h, num_probes=3, method="curvature_propagation", with_stderr=True)(
        p, x, generator=g
    )
    torch.testing.assert_close(d, dense_hessian(h, p, x).diagonal(), rtol=1e-12, atol=1e-14)
    assert float(e.abs().max()) < 1e-12


def test_per_block_trace_and_one_probe() -> None:
    params, x, y, w = _problem()
    gen = lambda: torch.Generator().manual_seed(5)
    d = secorder.hessian_diagonal(f, num_probes=5, method="curvature_propagation")(
        params, x, y, w, generator=gen()
    )
    blocks, block_err = secorder.hessian_trace(
        f, num_probes=5, method="curvature_propagation", per_block=True, with_stderr=True
    )(params, x, y, w, generator=gen())
    assert list(blocks) == list(params)
    for k in params:
        torch.testing.assert_close(blocks[k], d[k].sum())
        assert block_err[k] > 0
    _, one = secorder.hessian_trace(f, num_probes=1, method="curvature_propagation", with_stderr=True)(
        params, x, y, w, generator=gen()
    )
    assert torch.isnan(one)  # one probe: no spread to estimate the error from


def test_option_and_call_errors() -> None:
    params, x, y, w = _problem()
    with pytest.raises(
        secorder.SecorderError, match=r"method='curvature_propagation' is an estimator and needs num_probes"
    ):
        secorder.hessian_diagonal(f, method="curvature_propagation")
    with pytest.raises(
        secorder.SecorderError, match=r"Rademacher signs, but received distribution='gaussian'"
    ):
        secorder.hessian_trace(f, num_probes=3, method="curvature_propagation", distribution="gaussian")
    with pytest.raises(secorder.SecorderError, match=r"per_sample=True is exact"):
        secorder.hessian_diagonal(f, num_probes=3, method="curvature_propagation", per_sample=True)

    def coupled(p: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        h = x @ p["W1"]
        return (torch.tanh(h - h.mean(0)) ** 2).sum() + 0 * f(p, x, y, w)  # centering over the batch

    fn = secorder.hessian_diagonal(coupled, num_probes=3, method="curvature_propagation")
    with pytest.raises(secorder.SecorderError, match=r"structured sweep refused: .*method='hutchinson'"):
        fn(params, x, y, w)
    grad_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    with pytest.raises(
        secorder.SecorderError, match=r"method='curvature_propagation' returns values without a gradient"
    ):
        secorder.hessian_diagonal(f, num_probes=3, method="curvature_propagation")(grad_params, x, y, w)
    with pytest.raises(RuntimeError, match=r"method='curvature_propagation'.*torch.func transform"):
        torch.func.vmap(
            secorder.hessian_trace(
                lambda v, x: (torch.tanh(x @ v) ** 2).mean(), num_probes=2, method="curvature_propagation"
            ),
            in_dims=(0, None),
        )(torch.randn(2, 4, dtype=F64), x)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, but received int"):
        secorder.hessian_diagonal(f, num_probes=3, method="curvature_propagation")(
            params, x, y, w, generator=0
        )


def test_tied_weights_unbiased() -> None:
    """Parameters served by per-leaf VJPs (a weight tied between an embedding and the output
    head, a position table added to the tokens) and the tied head's cross columns: each probe's
    squares are kept per probe, and the mean over 400 probes is within 5 standard errors of the
    exact diagonal at every entry."""
    g = torch.Generator().manual_seed(3)
    params = {
        "emb": torch.randn(6, 3, dtype=F64, generator=g),
        "pos": torch.randn(4, 3, dtype=F64, generator=g),
        "w1": torch.randn(3, 3, dtype=F64, generator=g),
    }

    def lm(q: dict[str, Tensor], ids: Tensor, y: Tensor) -> Tensor:
        h = torch.tanh((F.embedding(ids, q["emb"]) + q["pos"]) @ q["w1"])
        return F.cross_entropy(F.linear(h, q["emb"]).transpose(1, 2), y)

    ids, y = torch.randint(0, 6, (3, 4), generator=g), torch.randint(0, 6, (3, 4), generator=g)
    exact = dense_hessian(lm, params, ids, y).diagonal()
    fn = secorder.hessian_diagonal(lm, num_probes=400, method="curvature_propagation", with_stderr=True)
    mean, err = fn(params, ids, y, generator=torch.Generator().manual_seed(4))
    mean, err = _flat(mean), _flat(err)
    assert bool(((mean - exact).abs() <= 5 * err + 1e-12).all())
    assert float(err.max()) < 0.5 * float(exact.abs().max())  # an informative estimate, not noise

"""Whole-dataset quantities (secorder.data): equal to the full-batch quantities on the concatenated data."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import secorder
import secorder._progress
import secorder.data
from secorder._pytree import flatten, ravel

torch.manual_seed(0)
X = torch.randn(11, 3, dtype=torch.float64)
Y = torch.randn(11, dtype=torch.float64)
P = {"w": torch.randn(3, 2, dtype=torch.float64), "v": torch.randn(2, dtype=torch.float64)}
SIZES = [4, 4, 3]  # uneven last batch


def f_mean(p, x, y):
    return ((torch.tanh(x @ p["w"]) @ p["v"] - y) ** 2).mean()


def f_sum(p, x, y):
    return ((torch.tanh(x @ p["w"]) @ p["v"] - y) ** 2).sum()


def batches(x=X, y=Y, sizes=SIZES):
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def flat(tree):
    return ravel(flatten(tree)[0])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("f,reduction", [(f_mean, "mean"), (f_sum, "sum")])
def test_hessian_exact_equals_full_batch(f, reduction) -> None:
    data = batches()
    tr = secorder.dataset_hessian_trace(f, P, data, reduction=reduction)
    torch.testing.assert_close(tr, secorder.hessian_trace(f)(P, X, Y), rtol=1e-10, atol=1e-12)
    diag = secorder.dataset_hessian_diagonal(f, P, data, reduction=reduction, chunk_size=3)
    assert list(diag) == ["w", "v"]
    torch.testing.assert_close(
        flat(diag), flat(secorder.hessian_diagonal(f)(P, X, Y)), rtol=1e-10, atol=1e-12
    )


def test_hessian_exact_against_dense_reference() -> None:
    def g(w):
        return f_mean({"w": w[:6].reshape(3, 2), "v": w[6:]}, X, Y)

    H = torch.autograd.functional.hessian(g, torch.cat([P["w"].reshape(-1), P["v"]]))
    diag = secorder.dataset_hessian_diagonal(f_mean, P, batches())
    torch.testing.assert_close(
        torch.cat([diag["w"].reshape(-1), diag["v"]]), torch.diagonal(H), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_hutchinson_same_probes_equals_full_batch(chunk_size) -> None:
    data = batches()
    est, err = secorder.dataset_hessian_trace(
        f_mean, P, data, num_probes=5, generator=gen(3), chunk_size=chunk_size, with_stderr=True
    )
    ref, ref_err = secorder.hessian_trace(f_mean, num_probes=5, with_stderr=True)(P, X, Y, generator=gen(3))
    torch.testing.assert_close(est, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(err, ref_err, rtol=1e-8, atol=1e-12)
    d = secorder.dataset_hessian_diagonal(
        f_mean, P, data, num_probes=4, generator=gen(1), chunk_size=chunk_size
    )
    dref = secorder.hessian_diagonal(f_mean, num_probes=4)(P, X, Y, generator=gen(1))
    torch.testing.assert_close(flat(d), flat(dref), rtol=1e-10, atol=1e-12)


def test_dataloader_with_uneven_last_batch() -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=4, shuffle=False)
    tr = secorder.dataset_hessian_trace(f_mean, P, loader, num_probes=3, generator=gen(), chunk_size=1)
    ref = secorder.hessian_trace(f_mean, num_probes=3)(P, X, Y, generator=gen())
    torch.testing.assert_close(tr, ref, rtol=1e-10, atol=1e-12)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fisher_exact_equals_full_batch(kind, reduction) -> None:
    model = _mlp()
    params = {k: p.detach() for k, p in model.named_parameters()}
    y = torch.randint(0, 3, (11,))
    data = batches(X, y)
    tr = secorder.dataset_fisher_trace(model, "cross_entropy", params, data, kind=kind, reduction=reduction)
    ref = secorder.fisher_trace(model, "cross_entropy", kind=kind, reduction=reduction)(params, X, y)
    torch.testing.assert_close(tr, ref, rtol=1e-10, atol=1e-12)
    d = secorder.dataset_fisher_diagonal(model, "cross_entropy", params, data, kind=kind, reduction=reduction)
    dref = secorder.fisher_diagonal(model, "cross_entropy", kind=kind, reduction=reduction)(params, X, y)
    torch.testing.assert_close(flat(d), flat(dref), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_fisher_hutchinson_equals_full_batch(kind) -> None:
    model = _mlp()
    params = {k: p.detach() for k, p in model.named_parameters()}
    y = torch.randint(0, 3, (11,))
    data = batches(X, y)
    tr = secorder.dataset_fisher_trace(
        model, "cross_entropy", params, data, kind=kind, num_probes=4, generator=gen(2), chunk_size=2
    )
    ref = secorder.fisher_trace(model, "cross_entropy", kind=kind, num_probes=4)(
        params, X, y, generator=gen(2)
    )
    torch.testing.assert_close(tr, ref, rtol=1e-10, atol=1e-12)
    d = secorder.dataset_fisher_diagonal(
        model, "cross_entropy", params, data, kind=kind, num_probes=3, generator=gen(2)
    )
    dref = secorder.fisher_diagonal(model, "cross_entropy", kind=kind, num_probes=3)(
        params, X, y, generator=gen(2)
    )
    torch.testing.assert_close(flat(d), flat(dref), rtol=1e-10, atol=1e-12)


def test_dataset_operator_works_with_any_estimator() -> None:
    """A DatasetOperator is an ordinary operator: its dense matrix is the full-batch Hessian."""
    from secorder.estimators import exact_diagonal

    passes = secorder.data._Pass(
        "test", batches(), "mean", True, True, False, lambda x, y: "", list(P.values())
    )
    op = secorder.data.DatasetOperator(
        lambda x, y: secorder.hessian_operator(f_mean, P, x, y)[0],
        passes,
        8,
        torch.float64,
        torch.device("cpu"),
    )
    full, _ = secorder.hessian_operator(f_mean, P, X, Y)
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(eye), full.matmat(eye), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exact_diagonal(op, chunk_size=3), exact_diagonal(full), rtol=1e-10, atol=1e-12)
    assert passes.passes == 4  # one pass per product call


# -- determinism check ---------------------------------------------------------------
def test_shuffling_loader_is_detected() -> None:
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, Y), batch_size=4, shuffle=True, generator=gen(5)
    )
    with pytest.raises(
        ValueError,
        match=r"must yield the same batches on every pass.*different contents at batch 0 on pass 2.*shuffle=False",
    ):
        secorder.dataset_hessian_trace(f_mean, P, loader, num_probes=4, chunk_size=1, generator=gen())
    # opting out runs (and a single pass never compares)
    secorder.dataset_hessian_trace(f_mean, P, loader, num_probes=4, chunk_size=1, check_determinism=False)


def test_changing_batch_count_is_detected() -> None:
    class Growing:
        def __init__(self) -> None:
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter(batches(sizes=[4, 4, 3] if self.calls == 1 else [4, 7]))

    with pytest.raises(ValueError, match=r"different contents at batch 1 on pass 2"):
        secorder.dataset_hessian_trace(f_mean, P, Growing(), num_probes=2, chunk_size=1)


@pytest.mark.parametrize(
    "layer,name",
    [(nn.Dropout(0.5), r"Dropout\(p=0.5\) in train mode"), (nn.BatchNorm1d(4), "BatchNorm1d in train mode")],
)
def test_train_mode_model_is_refused(layer, name) -> None:
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 1)).double()
    f, params = secorder.module_loss(model, lambda z, y: ((z.squeeze(-1) - y) ** 2).mean())
    with pytest.raises(ValueError, match=name + r".*Call model.eval\(\) first"):
        secorder.dataset_hessian_trace(f, params, batches(), num_probes=2)
    with pytest.raises(ValueError, match=name):
        secorder.dataset_fisher_trace(model, "mse", params, batches(X, Y.unsqueeze(-1)), num_probes=2)
    assert model.training  # never mutated
    model.eval()
    tr = secorder.dataset_hessian_trace(f, params, batches())
    torch.testing.assert_close(tr, secorder.hessian_trace(f)(params, X, Y), rtol=1e-10, atol=1e-12)


def test_bad_data_errors() -> None:
    with pytest.raises(TypeError, match=r"data must be re-iterable.*one-shot iterator"):
        secorder.dataset_hessian_trace(f_mean, P, iter(batches()))
    with pytest.raises(ValueError, match=r"data must yield at least one batch"):
        secorder.dataset_hessian_trace(f_mean, P, [])
    with pytest.raises(TypeError, match=r"data must yield \(inputs, targets\) pairs.*a Tensor at batch 0"):
        secorder.dataset_hessian_trace(f_mean, P, [X])
    with pytest.raises(ValueError, match=r"reduction must be 'mean' or 'sum'"):
        secorder.dataset_hessian_trace(f_mean, P, batches(), reduction="none")
    with pytest.raises(ValueError, match=r"with_stderr=True is not available over a dataset for kind='mc'"):
        model = _mlp()
        params = dict(model.named_parameters())
        secorder.dataset_fisher_trace(
            model, "cross_entropy", params, [], kind="mc", num_probes=1, with_stderr=True
        )


# -- non-finite values -------------------------------------------------------------------
def test_nonfinite_loss_names_batch() -> None:
    x = X.clone()
    x[9, 0] = float("nan")
    with pytest.raises(ValueError, match=r"the inputs of batch 2 must be finite.*in samples \[1\]"):
        secorder.dataset_hessian_trace(f_mean, P, batches(x))
    x_big = X.clone()
    x_big[9, 0] = 100.0  # finite inputs, a loss that is NaN on batch 2

    def f_nan(p, x, y):
        return f_mean(p, x, y) * torch.where((x[:, 0] > 50).any(), float("nan"), 1.0)

    with pytest.raises(
        ValueError, match=r"must be finite.*a non-finite loss \(nan\) at batch 2 \(of 3 samples\)"
    ):
        secorder.dataset_hessian_trace(f_nan, P, batches(x_big))
    with pytest.raises(ValueError, match=r"products of every batch must be finite.*at batch 2"):
        secorder.dataset_hessian_trace(f_nan, P, batches(x_big), num_probes=2)


def test_nonfinite_gradient_is_diagnosed() -> None:
    def f(p, x, y):  # sqrt(|0|): finite loss, NaN gradient at w = 0
        return (x @ p).abs().sqrt().mean()

    with pytest.raises(
        ValueError, match=r"a finite loss but a non-finite gradient \(in parameter leaves \[0\]\) at batch 0"
    ):
        secorder.dataset_hessian_diagonal(f, torch.zeros(3, dtype=torch.float64), batches())
    out = secorder.dataset_hessian_diagonal(
        f, torch.zeros(3, dtype=torch.float64), batches(), check_finite=False
    )
    assert not bool(torch.isfinite(out).all())


# -- progress ------------------------------------------------------------------------------
def test_progress_bar(capsys) -> None:
    tr = secorder.dataset_hessian_trace(f_mean, P, batches(), progress=True)
    torch.testing.assert_close(tr, secorder.hessian_trace(f_mean)(P, X, Y), rtol=1e-10, atol=1e-12)
    assert "trace (pass 1)" in capsys.readouterr().err


def test_progress_without_tqdm(monkeypatch) -> None:
    real = importlib.import_module

    def fake(name, *args):
        if name == "tqdm":
            raise ImportError("No module named 'tqdm'")
        return real(name, *args)

    monkeypatch.setattr(secorder._progress.importlib, "import_module", fake)
    with pytest.raises(
        ImportError, match=r"progress=True needs the optional dependency tqdm.*pip install tqdm"
    ):
        secorder.dataset_hessian_trace(f_mean, P, batches(), progress=True)


def test_progress_bar_over_exact_diagonal_chunks(capsys) -> None:
    from secorder.estimators import exact_diagonal

    op, _ = secorder.hessian_operator(f_mean, P, X, Y)
    d = exact_diagonal(op, chunk_size=3, progress=True)
    torch.testing.assert_close(d, exact_diagonal(op), rtol=1e-12, atol=1e-12)
    assert "exact diagonal (chunks)" in capsys.readouterr().err


def test_under_vmap_over_stacked_parameters() -> None:
    """Under vmap the per-batch products are batched; non-finite checks are skipped (NaN propagates)."""
    stacked = {k: torch.stack([v, 2 * v]) for k, v in P.items()}
    got = torch.func.vmap(lambda p: secorder.dataset_hessian_trace(f_mean, p, batches()))(stacked)
    want = torch.stack(
        [secorder.hessian_trace(f_mean)({k: v[i] for k, v in stacked.items()}, X, Y) for i in range(2)]
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    x = X.clone()
    x[9, 0] = float("nan")
    out = torch.func.vmap(lambda p: secorder.dataset_hessian_trace(f_mean, p, batches(x)))(stacked)
    assert bool(torch.isnan(out).all())


def test_per_batch_errors_name_the_batch() -> None:
    model = _mlp()
    params = {k: p.detach() for k, p in model.named_parameters()}
    y = torch.randint(0, 3, (11,))
    x = X.clone()
    x[10, 1] = float("nan")
    with pytest.raises(ValueError, match=r"the inputs of batch 2 must be finite.*in samples \[2\]"):
        secorder.dataset_fisher_trace(model, "cross_entropy", params, batches(x, y))
    # check_finite=False turns every check off (inputs, outputs, results)
    out = secorder.dataset_fisher_trace(model, "cross_entropy", params, batches(x, y), check_finite=False)
    assert torch.isnan(out)
    x[10, 1] = float("inf")  # tanh saturates: finite outputs, but the layer input enters the gradients
    with pytest.raises(ValueError, match=r"the inputs of batch 2 must be finite.*1 infinite"):
        secorder.dataset_fisher_trace(model, "cross_entropy", params, batches(x, y))
    y_bad = y.clone()
    y_bad[5] = 7  # class index out of range in batch 1
    with pytest.raises(ValueError, match=r"in batch 1 of the data"):
        secorder.dataset_fisher_diagonal(model, "cross_entropy", params, batches(X, y_bad))


def test_mc_fisher_is_the_weighted_sum_of_batch_draws() -> None:
    """kind='mc' draws targets batch by batch from one generator: the weighted sum of per-batch MC traces."""
    model = _mlp()
    params = {k: p.detach() for k, p in model.named_parameters()}
    y = torch.randint(0, 3, (11,))
    got = secorder.dataset_fisher_trace(
        model, "cross_entropy", params, batches(X, y), kind="mc", num_probes=2, generator=gen(4)
    )
    g = gen(4)
    per = secorder.fisher_trace(model, "cross_entropy", kind="mc", num_probes=2)
    want = sum(n * per(params, xb, yb, generator=g) for n, (xb, yb) in zip(SIZES, batches(X, y))) / 11
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_progress_bar_on_the_exact_transforms(capsys) -> None:
    """hessian_diagonal / hessian_trace (exact, one-hot products) show a bar over their chunks."""
    d = secorder.hessian_diagonal(f_mean, chunk_size=2, progress=True)(P, X, Y)
    assert "exact diagonal (chunks)" in capsys.readouterr().err
    torch.testing.assert_close(d, secorder.hessian_diagonal(f_mean)(P, X, Y))
    blocks = secorder.hessian_trace(f_mean, per_block=True, chunk_size=3, progress=True)(P, X, Y)
    assert "exact diagonal (chunks)" in capsys.readouterr().err
    total = secorder.hessian_trace(f_mean, progress=True)(P, X, Y)
    torch.testing.assert_close(sum(flatten(blocks)[0]), total)
    with pytest.raises(TypeError, match=r"progress must be True or False, but received 1"):
        secorder.hessian_diagonal(f_mean, progress=1)

"""select=: parameter subsets by name on every transform that takes a module or a params dict."""

from __future__ import annotations

import random
import re

import pytest
import torch
from torch import nn

import secorder
from secorder.testing import dense_hessian


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    f, params = secorder.module_loss(model, nn.functional.cross_entropy)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)
    return model, f, params, x, y


SELECTIONS = {
    "glob": ("2.*", ["2.weight", "2.bias"]),
    "globs": (["0.bias", "2.weight"], ["0.bias", "2.weight"]),
    "regex": (re.compile(r"\.bias$"), ["0.bias", "2.bias"]),
    "predicate": (lambda name: name.startswith("0."), ["0.weight", "0.bias"]),
}


def dense_diag_of_subset(f, params, names, x, y):
    """The Hessian diagonal of f over the named parameters only, the others fixed (dense, float64)."""
    fixed = {k: v for k, v in params.items() if k not in names}
    sub = {k: params[k] for k in names}
    H = dense_hessian(lambda p: f({**fixed, **p}, x, y), sub)
    sizes = [sub[k].numel() for k in sorted(sub)]
    parts = dict(zip(sorted(sub), torch.diagonal(H).split(sizes)))
    return {k: parts[k].reshape(sub[k].shape) for k in names}


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_hessian_diagonal_and_trace_of_a_subset(name: str) -> None:
    _, f, params, x, y = setup()
    select, names = SELECTIONS[name]
    ref = dense_diag_of_subset(f, params, names, x, y)
    for exact in ("hvp", "sweep"):
        out = secorder.hessian_diagonal(f, select=select, exact=exact)(params, x, y)
        assert list(out) == names
        assert all(torch.allclose(out[k], ref[k]) for k in names)
    trace = secorder.hessian_trace(f, select=select)(params, x, y)
    assert torch.allclose(trace, sum(r.sum() for r in ref.values()))


@pytest.mark.parametrize("name", list(SELECTIONS))
def test_fisher_and_module_hessian_of_a_subset_equal_the_full_entries(name: str) -> None:
    model, f, params, x, y = setup()
    select, names = SELECTIONS[name]
    functional = lambda p, inp: torch.func.functional_call(model, p, (inp,))
    for model_fn in (model, functional):
        for kind in ("ggn", "empirical"):
            full = secorder.fisher_diagonal(model_fn, "cross_entropy", kind=kind)(params, x, y)
            fn = secorder.fisher_diagonal(model_fn, "cross_entropy", kind=kind, select=select)
            sub = fn(params, x, y)
            assert list(sub) == names and all(torch.allclose(sub[k], full[k]) for k in names)
            tr = secorder.fisher_trace(model_fn, "cross_entropy", kind=kind, select=select)(params, x, y)
            assert torch.allclose(tr, sum(full[k].sum() for k in names))
    ref = dense_diag_of_subset(f, params, names, x, y)
    for method in ("sweep", "hvp"):
        sub = secorder.module_hessian_diagonal(model, "cross_entropy", method=method, select=select)(
            params, x, y
        )
        assert list(sub) == names and all(torch.allclose(sub[k], ref[k]) for k in names)


def test_fast_path_covers_only_the_selection() -> None:
    model, _, params, x, y = setup()
    fn = secorder.fisher_diagonal(model, "cross_entropy", select="2.*")
    fn(params, x, y)
    assert fn.path_info.path == "fast" and set(fn.path_info.fast) == {"2.weight", "2.bias"}


def test_hvp_operator_and_module_loss_with_select() -> None:
    model, f, params, x, y = setup()
    names = ["2.weight", "2.bias"]
    fixed = {k: v for k, v in params.items() if k not in names}
    sub = {k: params[k] for k in names}
    v = {k: torch.randn_like(p) for k, p in sub.items()}
    ref = torch.func.jvp(torch.func.grad(lambda p: f({**fixed, **p}, x, y)), (sub,), (v,))[1]
    out = secorder.hvp(f, select="2.*")(v, params, x, y)
    assert list(out) == names and all(torch.allclose(out[k], ref[k]) for k in names)
    op, _ = secorder.hessian_operator(f, params, x, y, select="2.*")
    assert op.size == sum(p.numel() for p in sub.values())
    f2, p2 = secorder.module_loss(model, nn.functional.cross_entropy, select="2.*")
    assert list(p2) == names
    assert torch.allclose(f2(p2, x, y), f(params, x, y))
    assert torch.allclose(
        secorder.hessian_trace(f2)(p2, x, y), secorder.hessian_trace(f, select="2.*")(params, x, y)
    )


def test_select_is_invariant_to_dict_key_order() -> None:
    _, f, params, x, y = setup()
    keys = list(params)
    random.Random(0).shuffle(keys)
    shuffled = {k: params[k] for k in keys}
    a = secorder.hessian_diagonal(f, select="*.weight")(params, x, y)
    b = secorder.hessian_diagonal(f, select="*.weight")(shuffled, x, y)
    assert list(b) == [k for k in keys if k.endswith("weight")]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_select_errors() -> None:
    model, f, params, x, y = setup()
    with pytest.raises(
        TypeError, match=r"hessian_trace\(f\)\(\*args\): select must be a glob pattern, .* but received 3"
    ):
        secorder.hessian_trace(f, select=3)
    with pytest.raises(TypeError, match=r"select must be .* but received \[\]"):
        secorder.fisher_diagonal(model, "cross_entropy", select=[])
    with pytest.raises(
        ValueError,
        match=r"select= must match at least one parameter name, but received a selection matching none of the 4 names \['0.weight'.*use 'fc2.\*', not 'fc2'",
    ):
        secorder.hessian_diagonal(f, select="fc2")(params, x, y)
    with pytest.raises(
        ValueError, match=r"fisher_diagonal\(model_fn, loss\)\(params, inputs, targets\): select= must match"
    ):
        secorder.fisher_diagonal(model, "cross_entropy", select="nothing*")(params, x, y)
    with pytest.raises(
        TypeError,
        match=r"select= picks parameters by name, so params must be a dict keyed by parameter names, but received params of type list",
    ):
        secorder.hessian_diagonal(lambda ws, x: sum((w * x).sum() ** 2 for w in ws), select="*")(
            [torch.ones(2)], torch.ones(2)
        )
    with pytest.raises(ValueError, match=r"module_forward\(model, select=...\): select= must match"):
        secorder.module_loss(model, nn.functional.cross_entropy, select="fc.*")

    def boom(name: str) -> bool:
        raise KeyError("user predicate failed")

    with pytest.raises(KeyError, match="user predicate failed"):  # the user's own exception passes through
        secorder.hessian_trace(f, select=boom)(params, x, y)


def test_dataset_functions_with_select() -> None:
    model, f, params, x, y = setup()
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    names = ["2.weight", "2.bias"]
    ref = dense_diag_of_subset(f, params, names, x, y)  # the full batch = the dataset (mean)
    out = secorder.dataset_hessian_diagonal(f, params, data, select="2.*")
    assert list(out) == names and all(torch.allclose(out[k], ref[k]) for k in names)
    tr = secorder.dataset_hessian_trace(f, params, data, select="2.*")
    assert torch.allclose(tr, sum(r.sum() for r in ref.values()))
    functional = lambda p, inp: torch.func.functional_call(model, p, (inp,))
    for model_fn in (model, functional):
        full = secorder.fisher_diagonal(model_fn, "cross_entropy")(params, x, y)
        sub = secorder.dataset_fisher_diagonal(model_fn, "cross_entropy", params, data, select=names)
        assert list(sub) == names and all(torch.allclose(sub[k], full[k]) for k in names)
        tr = secorder.dataset_fisher_trace(model_fn, "cross_entropy", params, data, select=names)
        assert torch.allclose(tr, sum(full[k].sum() for k in names))
    with pytest.raises(
        ValueError, match=r"dataset_fisher_trace\(model_fn, loss, params, data\): select= must match"
    ):
        secorder.dataset_fisher_trace(model, "cross_entropy", params, data, select="x*")


def test_operators_and_spectra_with_select() -> None:
    model, f, params, x, y = setup()
    names = ["2.weight", "2.bias"]
    fixed = {k: v for k, v in params.items() if k not in names}
    sub = {k: params[k] for k in names}
    H = dense_hessian(lambda p: f({**fixed, **p}, x, y), sub)
    top = secorder.hessian_eigenvalues(f, select="2.*", k=2)(params, x, y)
    assert torch.allclose(top, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-6)
    from secorder.estimators import exact_diagonal

    op, _ = secorder.fisher_operator(model, "cross_entropy", select="2.*")(params, x, y)
    full = secorder.fisher_diagonal(model, "cross_entropy")(params, x, y)
    ref = torch.cat([full[k].reshape(-1) for k in sorted(names)])  # operators: keys sorted
    assert op.size == ref.numel() and torch.allclose(exact_diagonal(op), ref)

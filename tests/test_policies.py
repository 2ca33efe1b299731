"""The input policies of issue 12: every formerly silent wrong number, fixed at its root.

Each class has a test that the bad input is refused with a message naming what is wrong
(matched by its words), and where the fix is a correct computation, a comparison with a
dense float64 reference (:func:`secorder.testing.dense_hessian`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812  # the conventional alias
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import secorder
from secorder.operators import DenseOperator
from secorder.testing import dense_hessian

F64 = torch.float64


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _data(n: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, dtype=F64, generator=g), torch.randint(0, 3, (n,), generator=g)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def problem():
    model = _model()
    f, params = secorder.module_loss(model, F.cross_entropy)
    x, y = _data()
    return model, f, params, x, y


def _dense_trace(f, params, x, y) -> Tensor:
    return torch.trace(dense_hessian(f, params, x, y))


# -- 1. parameter names ------------------------------------------------------------------------
def _module_entry_points(model, f):
    return {
        "hessian_trace": lambda p, x, y: secorder.hessian_trace(f)(p, x, y),
        "hutchinson": lambda p, x, y: secorder.hessian_trace(f, num_probes=4)(p, x, y, generator=_gen()),
        "hessian_diagonal": lambda p, x, y: secorder.hessian_diagonal(f)(p, x, y),
        "hessian_eigenvalues": lambda p, x, y: secorder.hessian_eigenvalues(f)(p, x, y, generator=_gen()),
        "fisher_trace": lambda p, x, y: secorder.fisher_trace(model, "cross_entropy")(p, x, y),
        "fisher_diagonal_empirical": lambda p, x, y: secorder.fisher_diagonal(
            model, "cross_entropy", kind="empirical"
        )(p, x, y),
        "fisher_operator": lambda p, x, y: secorder.fisher_operator(model, "cross_entropy")(p, x, y),
        "module_hessian_trace": lambda p, x, y: secorder.module_hessian_trace(model, "cross_entropy")(
            p, x, y
        ),
        "module_hessian_diagonal": lambda p, x, y: secorder.module_hessian_diagonal(
            model, "cross_entropy", method="sweep"
        )(p, x, y),
        "dataset_hessian_trace": lambda p, x, y: secorder.dataset_hessian_trace(f, p, [(x, y)]),
        "dataset_fisher_trace": lambda p, x, y: secorder.dataset_fisher_trace(
            model, "cross_entropy", p, [(x, y)]
        ),
    }


ENTRY_NAMES = list(_module_entry_points(None, None))


@pytest.mark.parametrize("entry", ENTRY_NAMES)
def test_misspelled_and_missing_parameter_names_raise(problem, entry) -> None:
    model, f, params, x, y = problem
    fn = _module_entry_points(model, f)[entry]
    typo = {("0.weights" if k == "0.weight" else k): v for k, v in params.items()}
    with pytest.raises(
        ValueError,
        match=r"unknown keys '0\.weights' \(did you mean '0\.weight'\?\); missing keys \['0\.weight'\]",
    ):
        fn(typo, x, y)
    partial = {k: v for k, v in params.items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['2\.bias'\].*freeze the other parameters"):
        fn(partial, x, y)


def test_ddp_prefix_names_the_fix(problem) -> None:
    _, f, params, x, y = problem
    ddp = {"module." + k: v for k, v in params.items()}
    with pytest.raises(ValueError, match=r"did you mean '0\.bias'\?.*Strip the wrapper prefix.*ddp\.module"):
        secorder.hessian_trace(f)(ddp, x, y)


def test_shuffled_correct_keys_give_the_dense_trace(problem) -> None:
    _, f, params, x, y = problem
    shuffled = dict(reversed(list(params.items())))
    torch.testing.assert_close(secorder.hessian_trace(f)(shuffled, x, y), _dense_trace(f, params, x, y))


def test_compiled_module_is_unwrapped(problem) -> None:
    model, f, params, x, y = problem
    compiled = torch.compile(model)
    d = secorder.module_hessian_diagonal(compiled, "cross_entropy", method="sweep")(params, x, y)
    ref = torch.diagonal(dense_hessian(f, params, x, y))
    got = torch.cat([d[k].reshape(-1) for k in sorted(d)])
    torch.testing.assert_close(got, ref)


# -- 2. inference mode ---------------------------------------------------------------------------
def test_inference_mode_is_refused_and_outside_is_exact(problem) -> None:
    _, f, params, x, y = problem
    with torch.inference_mode():
        for fn in (
            lambda: secorder.hessian_trace(f, num_probes=4)(params, x, y, generator=_gen()),
            lambda: secorder.hessian_trace_adaptive(f)(params, x, y, generator=_gen()),
            lambda: secorder.fisher_trace(_model(), "cross_entropy")(params, x, y),
        ):
            with pytest.raises(
                RuntimeError, match=r"records nothing under torch\.inference_mode\(\).*outside"
            ):
                fn()
        frozen = {k: v.clone() for k, v in params.items()}
    with pytest.raises(RuntimeError, match=r"must not be inference tensors.*leaves \[0, 1, 2, 3\]"):
        secorder.hessian_trace(f, num_probes=4)(frozen, x, y, generator=_gen())
    # the quadratic f(x) = Σ c_i x_i², H = diag(2c): Hutchinson with Rademacher probes is exact
    c = torch.arange(1.0, 13.0, dtype=F64)
    q = lambda w: (c * w**2).sum()
    expected = 2 * c.sum()  # 156
    got = secorder.hessian_trace(q, num_probes=3)(torch.ones(12, dtype=F64), generator=_gen())
    torch.testing.assert_close(got, expected)
    res = secorder.hessian_trace_adaptive(q)(torch.ones(12, dtype=F64), generator=_gen())
    torch.testing.assert_close(res.estimate, expected)


# -- 3. curvature regularizers -------------------------------------------------------------------
def test_detached_routes_refuse_parameters_that_require_grad(problem) -> None:
    model, f, _, x, y = problem
    live = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"exact='sweep' returns values without a gradient.*exact='hvp'"):
        secorder.hessian_trace(f, exact="sweep")(live, x, y)
    with pytest.raises(ValueError, match=r"exact='sweep' returns values without a gradient"):
        secorder.hessian_diagonal(f, exact="sweep")(live, x, y)
    with pytest.raises(ValueError, match=r"method='auto'.*without a gradient.*use method='hvp'"):
        secorder.module_hessian_trace(model, "cross_entropy")(live, x, y)
    with torch.no_grad():  # no gradient wanted: fine
        secorder.hessian_trace(f, exact="sweep")(live, x, y)


def test_differentiable_routes_carry_the_dense_gradient(problem) -> None:
    model, f, params, x, y = problem
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    flat_keys = sorted(params)

    def dense_trace_of(flat: Tensor) -> Tensor:
        shapes = [params[k].shape for k in flat_keys]
        parts = torch.split(flat, [int(torch.Size(s).numel()) for s in shapes])
        p = {k: t.reshape(s) for k, t, s in zip(flat_keys, parts, shapes)}
        return torch.trace(
            torch.func.hessian(
                lambda z: f(
                    {
                        k: t.reshape(s)
                        for k, t, s in zip(
                            flat_keys, torch.split(z, [int(torch.Size(s).numel()) for s in shapes]), shapes
                        )
                    },
                    x,
                    y,
                )
            )(torch.cat([p[k].reshape(-1) for k in flat_keys]))
        )

    flat = torch.cat([params[k].reshape(-1) for k in flat_keys])
    ref = torch.func.grad(dense_trace_of)(flat)
    for value in (
        secorder.hessian_trace(f)(live, x, y),
        secorder.module_hessian_trace(model, "cross_entropy", method="hvp")(live, x, y),
    ):
        grads = torch.autograd.grad(value, [live[k] for k in flat_keys])
        torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]), ref)


# -- 4. NaN and Inf ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("entry", ENTRY_NAMES)
def test_nonfinite_parameters_are_reported_with_their_leaf(problem, entry, value) -> None:
    model, f, params, x, y = problem
    bad = {k: v.clone() for k, v in params.items()}
    bad["2.weight"][1, 2] = value
    kind = "1 NaN and 0 infinite" if math.isnan(value) else "0 NaN and 1 infinite"
    with pytest.raises(
        ValueError,
        match=rf"must be finite.*{kind} entries \(of 12\), first at index \(1, 2\).*\['2\.weight'\]",
    ):
        _module_entry_points(model, f)[entry](bad, x, y)


def test_nonfinite_result_is_diagnosed_and_the_switch_turns_it_off() -> None:
    f = lambda w: (w.abs() ** 1.5).sum()  # finite loss and gradient, H = ∞ at 0
    w = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(
        ValueError, match=r"Hessian-vector products must be finite.*from a finite loss and gradient"
    ):
        secorder.hessian_trace(f)(w)
    with pytest.raises(
        ValueError, match=r"quadratic forms vᵀHv must be finite|Hessian-vector products must be finite"
    ):
        secorder.hessian_trace(f, num_probes=2)(w, generator=_gen())
    g = lambda w: w.abs().sqrt().sum()  # finite loss, infinite gradient at 0
    with pytest.raises(
        ValueError, match=r"from a finite loss but a non-finite gradient \(at parameter leaves \[0\]\)"
    ):
        secorder.hessian_diagonal(g)(w)
    secorder.set_check_finite(False)
    try:
        assert not bool(torch.isfinite(secorder.hessian_trace(f)(w)))
        assert secorder.check_finite_enabled() is False
    finally:
        secorder.set_check_finite(True)
    with pytest.raises(TypeError, match=r"enabled must be True or False"):
        secorder.set_check_finite("no")


def test_nonfinite_inputs_name_the_samples(problem) -> None:
    _, f, params, x, y = problem
    x = x.clone()
    x[4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"args\[1\] must be finite.*in samples \[4\]"):
        secorder.hessian_trace(f, num_probes=2)(params, x, y, generator=_gen())


def test_nonfinite_operator_in_lanczos_is_reported() -> None:
    A = torch.eye(4, dtype=F64)
    A[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"Lanczos tridiagonal matrix.*must be finite.*op\.matmat"):
        secorder.lanczos_eigenvalues(DenseOperator(A), 1, generator=_gen())
    with pytest.raises(ValueError, match=r"Lanczos tridiagonal matrices.*must be finite"):
        secorder.spectral_density(DenseOperator(A), num_runs=1, num_steps=3, generator=_gen())


# -- 5. empty batches ----------------------------------------------------------------------------
def test_empty_batches_are_refused(problem) -> None:
    model, f, params, x, y = problem
    e = (x[:0], y[:0])
    for fn in (
        lambda: secorder.hessian_trace(f)(params, *e),
        lambda: secorder.fisher_trace(model, "cross_entropy")(params, *e),
        lambda: secorder.module_hessian_trace(model, "cross_entropy")(params, *e),
    ):
        with pytest.raises(ValueError, match=r"at least one sample.*shape \(0, 3\).*Skip empty batches"):
            fn()
    with pytest.raises(ValueError, match=r"at least one sample.*an empty batch at batch 1"):
        secorder.dataset_hessian_trace(f, params, [(x, y), e], check_finite=True)


# -- 6. randomness inside f ----------------------------------------------------------------------
def test_random_f_is_refused_and_eval_mode_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 3)).double()
    f, params = secorder.module_loss(model, F.cross_entropy)
    x, y = _data()
    msg = r"deterministic function.*global random generator.*model\.eval\(\)"
    for fn in (
        lambda: secorder.hessian_trace(f)(params, x, y),
        lambda: secorder.hessian_trace(f, num_probes=3)(params, x, y, generator=_gen()),
        lambda: secorder.hessian_diagonal(f, num_probes=3)(params, x, y, generator=_gen()),
        lambda: secorder.hessian_eigenvalues(f)(params, x, y, generator=_gen()),
        lambda: secorder.hessian_trace(f, num_probes=3, strategy="fwd_rev")(params, x, y, generator=_gen()),
        lambda: secorder.fisher_trace(lambda p, x: F.dropout(x @ p, 0.5), "mse")(
            torch.randn(3, 2, dtype=F64), x, torch.randn(6, 2, dtype=F64)
        ),
    ):
        with pytest.raises(ValueError, match=msg):
            fn()
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=msg):
        secorder.hessian_trace(f)(params, x, y)
    assert torch.equal(torch.get_rng_state(), state)  # the refused call consumed nothing
    model.eval()
    torch.testing.assert_close(secorder.hessian_trace(f)(params, x, y), _dense_trace(f, params, x, y))


# -- 7. the determinism check of datasets --------------------------------------------------------
class _Flipping:
    """Re-iterable data with a random horizontal flip (a different function every pass)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y, self.gen = x, y, torch.Generator().manual_seed(3)

    def __iter__(self):
        for i in range(0, len(self.x), 4):
            xb = self.x[i : i + 4]
            flip = torch.rand(len(xb), generator=self.gen) < 0.5
            yield torch.where(flip[:, None], xb.flip(-1), xb), self.y[i : i + 4]


class _Reordering:
    """Re-iterable data whose samples are permuted within each batch on every pass."""

    def __init__(self, x: Tensor, y: Tensor, pair: bool = True) -> None:
        self.x, self.y, self.pair, self.gen = x, y, pair, torch.Generator().manual_seed(4)

    def __iter__(self):
        for i in range(0, len(self.x), 4):
            xb, yb = self.x[i : i + 4], self.y[i : i + 4]
            perm = torch.randperm(len(xb), generator=self.gen)
            yield xb[perm], (yb[perm] if self.pair else yb)


def test_fingerprint_is_exact_per_sample_and_order_insensitive() -> None:
    x = torch.randn(12, 3, dtype=F64)
    w = torch.randn(3, dtype=F64)
    y = torch.randn(12, dtype=F64)

    def f(p, x, y):
        return ((torch.tanh(x @ p) - y) ** 2).mean()

    kw = dict(num_probes=6, chunk_size=2, generator=_gen())  # 3 passes over the data
    with pytest.raises(ValueError, match=r"same batches on every pass.*different contents at batch"):
        secorder.dataset_hessian_trace(f, w, _Flipping(x, y), **kw)
    with pytest.raises(ValueError, match=r"different contents at batch"):
        secorder.dataset_hessian_trace(f, w, _Reordering(x, y, pair=False), **kw)
    # a harmless reordering of (input, target) pairs inside a batch passes, with the same value
    ref = secorder.dataset_hessian_trace(
        f, w, [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)], **{**kw, "generator": _gen()}
    )
    got = secorder.dataset_hessian_trace(f, w, _Reordering(x, y), **{**kw, "generator": _gen()})
    torch.testing.assert_close(got, ref)
    # one ulp in one sample is seen
    batches = [(x[i : i + 4].clone(), y[i : i + 4]) for i in range(0, 12, 4)]

    class _Nudged:
        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            for b, (xb, yb) in enumerate(batches):
                if b == 2 and self.passes == 2:
                    xb = xb.clone()
                    xb[1, 1] = torch.nextafter(xb[1, 1], torch.tensor(math.inf, dtype=F64))
                yield xb, yb

    with pytest.raises(ValueError, match=r"different contents at batch 2 on pass 2"):
        secorder.dataset_hessian_trace(f, w, _Nudged(), **kw)


def test_dataset_batch_size_mismatch_names_the_batch() -> None:
    x, y = _data()
    f, params = secorder.module_loss(_model(), F.cross_entropy)
    with pytest.raises(
        ValueError, match=r"same number of samples.*6 input samples and targets with \[5\] samples at batch 1"
    ):
        secorder.dataset_hessian_trace(f, params, [(x, y), (x, y[:5])])


# -- 8. autocast ---------------------------------------------------------------------------------
def test_autocast_is_refused(problem) -> None:
    model, f, params, x, y = problem
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in (
            lambda: secorder.hessian_trace(f, num_probes=3)(params, x, y, generator=_gen()),
            lambda: secorder.module_hessian_trace(model, "cross_entropy")(params, x, y),
            lambda: secorder.fisher_trace(model, "cross_entropy")(params, x, y),
        ):
            with pytest.raises(
                RuntimeError, match=r"not under torch\.autocast.*torch\.bfloat16.*enabled=False"
            ):
                fn()
        with torch.autocast("cpu", enabled=False):  # the documented way out, inside the block
            got = secorder.module_hessian_trace(model, "cross_entropy")(params, x, y)
    assert got.dtype == F64
    torch.testing.assert_close(got, _dense_trace(f, params, x, y))


# -- 9. the user's own exceptions ----------------------------------------------------------------
class MyBugError(RuntimeError):
    pass


@pytest.mark.parametrize("strategy", ["auto", "taylor", "rev_rev", "fwd_rev", "autograd", "autograd_batched"])
def test_user_exception_passes_through(strategy) -> None:
    calls = []

    def f(w):
        calls.append(1)
        if len(calls) >= 1:
            raise MyBugError("my own bug in f")
        return (w**2).sum()

    with pytest.raises(MyBugError, match="my own bug in f"):
        secorder.hessian_trace(f, num_probes=2, strategy=strategy)(torch.ones(3), generator=_gen())
    calls.clear()
    with pytest.raises(MyBugError, match="my own bug in f"):
        secorder.hessian_trace(f, strategy=strategy)(torch.ones(3))


def test_user_exception_on_the_first_call_only_is_not_swallowed() -> None:
    calls = []

    def f(w):
        calls.append(1)
        if len(calls) == 1:  # the first call of f is the "taylor" recording
            raise KeyError("lazy initialization failed")
        return (w**2).sum()

    with pytest.raises(KeyError, match="lazy initialization failed"):
        secorder.hessian_trace(f, num_probes=2)(torch.ones(3), generator=_gen())


def test_detached_output_is_reported_not_blamed_on_a_strategy() -> None:
    f = lambda w: (w**2).sum().detach()
    for fn in (
        secorder.hessian_trace(f),
        secorder.hessian_trace(f, num_probes=2),
        secorder.hessian_trace(f, num_probes=2, strategy="autograd"),
    ):
        with pytest.raises(
            ValueError, match=r"output must depend on the differentiated argument through autograd"
        ):
            fn(torch.ones(3), generator=_gen())


def test_constant_gradient_claims_are_verified() -> None:
    c = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    f = lambda p: (c * p["lin"]).sum() + (p["sq"] ** 3).sum()  # "lin": constant gradient
    p = {"lin": torch.ones(3, dtype=F64), "sq": torch.tensor([1.0, 2.0], dtype=F64)}
    d = secorder.hessian_diagonal(f, strategy="autograd")(p)
    torch.testing.assert_close(d["lin"], torch.zeros(3, dtype=F64))
    torch.testing.assert_close(d["sq"], torch.tensor([6.0, 12.0], dtype=F64))


def test_missing_derivative_still_names_the_strategy() -> None:
    class NoDouble(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * 3 * x**2

    f = lambda w: NoDouble.apply(w).sum()
    # autograd records no second derivative through @once_differentiable: the gradient looks
    # constant (H = 0) but changes with θ, so the strategy is named instead of returning 0
    with pytest.raises(
        RuntimeError, match=r'strategy="autograd" failed.*recorded the gradient.*once_differentiable'
    ):
        secorder.hessian_trace(f, strategy="autograd")(torch.ones(3, dtype=F64))
    # f evaluates and differentiates once; the failure is the strategy's, so it is named
    with pytest.raises(
        RuntimeError, match=r'strategy="fwd_rev" failed.*Pass another strategy.*finite_difference'
    ):
        secorder.hessian_trace(f, strategy="fwd_rev")(torch.ones(3, dtype=F64))
    got = secorder.hessian_trace(f, strategy="finite_difference")(torch.ones(3, dtype=F64))
    torch.testing.assert_close(got, torch.tensor(18.0, dtype=F64), rtol=1e-6, atol=1e-6)


# -- 10. complex tangents ------------------------------------------------------------------------
def test_hvp_with_a_complex_tangent_keeps_the_imaginary_part() -> None:
    f = lambda w: (w**3).sum() + w[0] * w[1]
    w = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
    v = torch.tensor([1 + 2j, -1j, 0.5 + 0j], dtype=torch.complex128)
    H = dense_hessian(f, w).to(torch.complex128)
    torch.testing.assert_close(secorder.hvp(f)(v, w), H @ v)


# -- misleading errors ---------------------------------------------------------------------------
def test_raw_pytorch_errors_are_explained(problem, tmp_path) -> None:
    model, f, params, x, y = problem
    with pytest.raises(ValueError, match=r"at least one parameter entry.*only empty tensors"):
        secorder.hessian_trace(lambda w: w.sum())(torch.zeros(0))
    with pytest.raises(ValueError, match=r"must hold values.*meta device.*to_empty"):
        secorder.hessian_trace(lambda w: (w**2).sum())(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match=r"chunk_size must be None \(automatic\) or an int >= 1"):
        secorder.module_hessian_diagonal(model, "cross_entropy", chunk_size=0)
    with pytest.raises(
        TypeError, match=r"module_hessian_trace\(model, loss\): .*unknown keyword arguments \['bogus'\]"
    ):
        secorder.module_hessian_trace(model, "cross_entropy", bogus=1)
    with pytest.raises(TypeError, match=r"with_stderr must be True or False, but received 'yes'"):
        secorder.module_hessian_trace(model, "cross_entropy", with_stderr="yes")
    with pytest.raises(ValueError, match=r"max_hvp_params must be an int >= 0.*received -1"):
        secorder.module_hessian_diagonal(model, "cross_entropy", max_hvp_params=-1)
    with pytest.raises(TypeError, match=r"op must be a linear operator.*Tensor.*DenseOperator\(matrix\)"):
        secorder.lanczos_eigenvalues(torch.eye(3), 1)
    with pytest.raises(TypeError, match=r"op must be a linear operator"):
        secorder.spectral_density(torch.eye(3))
    with pytest.raises(
        ValueError, match=r"grid and density must be 1-d tensors of the same length.*\(10,\).*\(5,\)"
    ):
        secorder.plot_spectral_density(torch.linspace(0, 1, 10), torch.ones(5), tmp_path / "p.png")
    op, _ = secorder.hessian_operator(f, params, x, y)
    with pytest.raises(ValueError, match=r"matmat\(V\).*V must be a \(k, P\) tensor.*P=31.*received \(3,\)"):
        op.matmat(torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"at least one sample.*in inputs"):
        secorder.fisher_trace(model, "cross_entropy")(params, x[:0], y[:0])


# -- XNysTrace on rank-deficient PSD operators -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("m", [30, 48, 60, 73])
def test_xnystrace_is_exact_on_rank_deficient_psd_operators(m, dtype) -> None:
    from secorder.estimators import xnystrace

    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        B = torch.randn(73, 14, dtype=dtype, generator=g)
        A = B @ B.T  # PSD of rank 14 in 73 dimensions: m > 14 probes recover it exactly
        est, _ = xnystrace(DenseOperator(A), m, generator=torch.Generator().manual_seed(seed))
        rtol = 1e-3 if dtype == torch.float32 else 1e-8
        torch.testing.assert_close(est, torch.trace(A), rtol=rtol, atol=0)


def test_xnystrace_on_a_ggn_and_still_refuses_negative_curvature() -> None:
    from secorder.estimators import xnystrace

    model = _model()
    x, y = _data(n=4)
    params = {k: v.detach() for k, v in model.named_parameters()}
    op, _ = secorder.fisher_operator(model, "cross_entropy")(params, x, y)  # rank <= 4·2 of P = 31
    exact = secorder.fisher_trace(model, "cross_entropy")(params, x, y)
    est, _ = xnystrace(op, 28, generator=_gen())
    torch.testing.assert_close(est, exact, rtol=1e-8, atol=0)
    indefinite = DenseOperator(torch.diag(torch.linspace(-1.0, 1.0, 20, dtype=F64)))
    with pytest.raises(
        ValueError, match=r"XNysTrace needs a positive semi-definite operator.*negative curvature"
    ):
        xnystrace(indefinite, 10, generator=_gen())


# -- Lanczos: the full multiset of the top k ---------------------------------------------------------
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_returns_every_copy_of_repeated_eigenvalues(which) -> None:
    n = 200
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    lam = torch.cat(
        [torch.tensor([5.0, 5.0, 5.0, 4.0], dtype=F64), 3.0 * 0.97 ** torch.arange(n - 4, dtype=F64)]
    )
    if which == "smallest":
        lam = -lam
    A = (Q * lam) @ Q.T
    ref = torch.linalg.eigvalsh(A)
    ref = ref.flip(0)[:4] if which == "largest" else ref[:4]
    res = secorder.lanczos_eigenvalues(
        DenseOperator(A), 4, which=which, generator=_gen(), return_eigenvectors=True
    )
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, ref, rtol=0, atol=1e-7)
    X = res.eigenvectors
    assert X is not None
    torch.testing.assert_close(X @ X.T, torch.eye(4, dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(
        torch.linalg.vector_norm(X @ A - res.eigenvalues[:, None] * X, dim=1),
        res.residuals,
        rtol=1e-2,
        atol=1e-9,
    )


def test_hessian_eigenvalues_with_a_repeated_top_eigenvalue() -> None:
    c = torch.cat([torch.tensor([7.0, 7.0], dtype=F64), torch.linspace(0.1, 6.0, 60, dtype=F64)])
    f = lambda w: 0.5 * (c * w**2).sum() + 0.1 * (w**4).sum()
    w = torch.full((62,), 0.0, dtype=F64)
    got = secorder.hessian_eigenvalues(f, k=3)(w, generator=_gen())
    torch.testing.assert_close(got, torch.tensor([7.0, 7.0, 6.0], dtype=F64), rtol=0, atol=1e-7)


def test_frozen_parameters_may_be_passed_too() -> None:
    model = _model()
    model[0].weight.requires_grad_(False)
    f, params = secorder.module_loss(model, F.cross_entropy)
    assert "0.weight" not in params
    x, y = _data()
    full = {k: v.detach() for k, v in model.named_parameters()}  # the frozen one included: θ grows
    torch.testing.assert_close(secorder.hessian_trace(f)(full, x, y), _dense_trace(f, full, x, y))
    torch.testing.assert_close(secorder.hessian_trace(f)(params, x, y), _dense_trace(f, params, x, y))
    with pytest.raises(ValueError, match=r"missing keys \['2\.bias'\]"):
        secorder.hessian_trace(f)({k: v for k, v in full.items() if k != "2.bias"}, x, y)


def test_finite_check_survives_an_overflowing_sum() -> None:
    """The one-reduction fast path of the finite check: a sum that overflows although every
    entry is finite must not be reported; NaN and Inf entries always are."""
    from secorder._validate import nonfinite_report

    big = torch.tensor([3e38, 3e38, -1.0])  # float32: the sum is inf, the entries are finite
    assert not bool(torch.isfinite(big.sum()))
    assert nonfinite_report(big) is None
    assert nonfinite_report(torch.tensor([1.0, float("inf"), float("-inf")])) is not None  # sum is NaN
    assert "1 NaN" in str(nonfinite_report(torch.tensor([1.0, float("nan")])))

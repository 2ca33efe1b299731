"""Hessian transforms: :func:`hvp`, :func:`hessian_trace`, :func:`hessian_diagonal` and friends.

Also :func:`hessian_trace_adaptive` (stop on the standard error),
:func:`hessian_frobenius_norm_sq`, and the spectral transforms
:func:`hessian_eigenvalues` and :func:`hessian_spectral_density` (eager only).

Each takes a function and returns a new function of the same arguments, like
:func:`torch.func.grad`. Let ``f(*args)`` return a scalar tensor and let θ = ``args[argnums]``
(any pytree of real floating tensors: a tensor, a dict such as
``dict(model.named_parameters())``, a list, nested). H = ∇²_θ f.

The transformed functions compose with :func:`torch.func.vmap` (over parameters
stacked by :func:`torch.func.stack_module_state`, ``randomness="different"`` for the
randomized estimators) and :func:`torch.func.grad` (curvature regularizers), and keep
the device and dtype of their inputs; float16/bfloat16 parameters are accepted, their products
formed in that dtype and everything summed (and returned) in float32 (``docs/transforms.rst``,
"Precision").
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from secorder import probes as _probes
from secorder._chunking import check_chunk_size
from secorder._errors import error
from secorder._pytree import TreeSpec, check_floating_tree, flatten, ravel, unflatten, unravel
from secorder._select import Selector, check_select, split
from secorder._validate import (
    call_deterministic,
    check_argnums,
    check_bool,
    check_call_inputs,
    check_callable,
    check_finite_result,
    check_finite_tree,
    check_method,
    check_num_probes,
    check_requires_no_grad,
    check_same_dtype_device,
    check_scalar_output,
    diagnose_nonfinite,
    half_precision_refusal,
    inspectable,
)
from secorder.estimators import (
    BLOCK_TRACE_ESTIMATORS,
    DIAGONAL_ESTIMATORS,
    TRACE_ESTIMATORS,
    AdaptiveResult,
    adaptive_trace,
    check_min_probes,
    exact_block_traces,
    exact_diagonal,
    exact_frobenius_norm_sq,
    frobenius_norm_sq,
)
from secorder.estimators.stopping import check_adaptive_options, check_eager
from secorder.operators import HessianOperator, check_strategy, in_functorch_transform, resolve_strategy
from secorder.spectra import check_lanczos_options, lanczos_eigenvalues, spectral_density

__all__ = [
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_frobenius_norm_sq",
    "hessian_operator",
    "hessian_spectral_density",
    "hessian_trace",
    "hessian_trace_adaptive",
    "hvp",
]


def _bind(
    call: str, f: Callable[..., Any], args: tuple[Any, ...], argnums: int
) -> tuple[Callable[[list[Tensor]], Tensor], list[Tensor], TreeSpec, int]:
    """Check the call's arguments and return ``g(leaves) = f(*args with args[argnums] from leaves)``."""
    index = check_argnums(call, argnums, len(args))
    leaves, spec = check_floating_tree(call, f"args[{index}]", args[index])
    check_same_dtype_device(call, f"args[{index}]", leaves)
    check_call_inputs(call, args, index, leaves)

    def g(new_leaves: list[Tensor]) -> Tensor:
        new_args = list(args)
        new_args[index] = unflatten(spec, new_leaves)
        return check_scalar_output(call, call_deterministic(call, f, new_leaves, *new_args))

    return g, leaves, spec, index


def _select_args(
    call: str, selector: Selector | None, f: Callable[..., Any], args: tuple[Any, ...], argnums: int
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """``select=``: θ = the selected entries of ``args[argnums]``, ``f`` sees the others fixed."""
    if selector is None:
        return f, args
    index = check_argnums(call, argnums, len(args))
    chosen, restore = split(call, selector, args[index])

    def f_selected(*a: Any) -> Any:
        return f(*a[:index], restore(a[index]), *a[index + 1 :])

    return f_selected, (*args[:index], chosen, *args[index + 1 :])


def _bound_operator(
    call: str, f: Callable[..., Any], args: tuple[Any, ...], argnums: int, strategy: str, generator: object
) -> tuple[HessianOperator, TreeSpec, torch.Generator | None]:
    """The call-time steps every transform shares: bind the arguments, check the generator,
    build the Hessian operator (strategy resolved, ``"auto"`` settled at the first product)."""
    g, leaves, spec, _ = _bind(call, f, args, argnums)
    gen = _probes.check_generator(call, generator, leaves[0].device)
    return HessianOperator(g, leaves, resolve_strategy(call, strategy, leaves), call), spec, gen


def hessian_operator(
    f: Callable[..., Any], *args: Any, argnums: int = 0, select: Any = None, strategy: str = "auto"
) -> tuple[HessianOperator, TreeSpec]:
    """The Hessian of ``f`` at ``args`` as a batched operator over the flattened θ.

    Lower-level than the transforms: use it to feed your own estimator (any function
    of :class:`~secorder.operators.LinearOperator`).

    Returns:
        ``(operator, spec)``; ``secorder._pytree.unflatten(spec, ...)`` of per-leaf
        pieces rebuilds θ's structure.
    """
    call = "hessian_operator(f, *args)"
    g, leaves, spec, _ = _bind(
        call, *_select_args(call, check_select(call, select), f, args, argnums), argnums
    )
    concrete = resolve_strategy(call, strategy, leaves)
    return HessianOperator(g, leaves, concrete, call), spec


def _check_common(call: str, f: object, argnums: object, chunk_size: object, strategy: object) -> None:
    """Construction-time checks shared by the transforms."""
    check_callable(call, "f", f)
    check_argnums(call, argnums)
    check_chunk_size(call, chunk_size)
    check_strategy(call, strategy)


EXACT_METHODS = ("auto", "hvp", "sweep")


def _check_exact(call: str, exact: object, num_probes: object) -> None:
    if exact not in EXACT_METHODS:
        raise error(
            call,
            f"exact must be one of {', '.join(repr(m) for m in EXACT_METHODS)}",
            f"{exact!r}",
            "Use exact='auto' (the structured sweep when it applies, else one-hot HVPs), "
            "exact='hvp' (one-hot Hessian-vector products, any function) or exact='sweep' "
            "(the second-order sweep over the samples of the batched arguments).",
        )
    if exact == "sweep" and num_probes is not None:
        raise error(
            call,
            "exact='sweep' computes the exact diagonal and takes no probes",
            f"num_probes={num_probes}",
            "Drop num_probes, or keep num_probes and exact='hvp' for a randomized estimate.",
        )


def _report(fn: Any, info: Any) -> None:
    """Set ``fn.method_info``; not while Dynamo traces (``torch.compile``), where a setattr on a
    function breaks the graph."""
    if not torch.compiler.is_compiling():
        fn.method_info = info


def _check_per_sample(call: str, per_sample: object, num_probes: object, exact: object) -> None:
    check_bool(call, "per_sample", per_sample)
    if per_sample and (num_probes is not None or exact == "hvp"):
        got = f"num_probes={num_probes}" if num_probes is not None else "exact='hvp'"
        raise error(
            call,
            "per_sample=True is exact and comes from the structured sweep (squares per sample "
            "before the sum over samples); it takes no probes and no one-hot HVPs",
            f"per_sample=True with {got}",
            "Drop num_probes and keep exact='auto' (or 'sweep') for per-sample rows, or drop per_sample.",
        )


def _sweep_refusal(call: str, args: tuple[Any, ...], argnums: int, leaves: list[Tensor]) -> str | None:
    """Why the structured sweep cannot run at this call (None: it may)."""
    half = half_precision_refusal(leaves, "the structured sweep")
    if half is not None:
        return half
    if in_functorch_transform(leaves):
        return "inside a torch.func transform (the sweep records the function eagerly as a tape)"
    if torch.is_grad_enabled() and any(leaf.requires_grad for leaf in leaves):
        return (
            "the parameters require grad (the sweep's result would be detached from them; one-hot "
            "HVPs keep the graph)"
        )
    index = check_argnums(call, argnums, len(args))
    data = [a for i, a in enumerate(args) if i != index]
    sizes = {int(a.shape[0]) if isinstance(a, Tensor) and a.dim() > 0 else None for a in data}
    if not data or None in sizes or len(sizes) != 1:
        got = ", ".join(
            f"args[{i}]: " + (f"shape {tuple(a.shape)}" if isinstance(a, Tensor) else type(a).__name__)
            for i, a in enumerate(args)
            if i != index
        )
        return (
            "the sweep needs every argument but args[argnums] to be a tensor batched along dimension "
            f"0, all with the same number of samples; got {got or 'no data arguments'}"
        )
    return None


def _exact_diagonal_leaves(
    call: str,
    fn: Any,
    f: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: int,
    chunk_size: int | None,
    exact: str,
    per_sample: bool = False,
) -> tuple[list[Tensor], TreeSpec] | None:
    """The exact diagonal per leaf by the structured sweep of :mod:`secorder._engine.sweep`, or
    None when ``exact="auto"`` (or ``"hvp"``) takes one-hot HVPs; sets ``fn.method_info``
    (method, R, P and the reason for the choice) either way. ``per_sample``: rows (N, *leaf.shape)
    from the structured sweep, or an error naming why it cannot run (no other route)."""
    from secorder._engine.sweep import EngineTooCostlyError, EngineUnsupportedError, engine_diagonal
    from secorder.module_hessian import SweepInfo

    g, leaves, spec, index = _bind(call, f, args, argnums)
    p_count = sum(leaf.numel() for leaf in leaves)
    if exact == "hvp":
        _report(fn, SweepInfo("hvp", 0, p_count, "exact='hvp' requested"))
        return None
    if exact == "sweep" and not per_sample:  # forced: the shared policies' refusals, in their words
        check_eager(
            call,
            leaves,
            what="exact='sweep' (it records the function as a tape of ATen ops)",
            fix="Inside torch.func transforms use exact='hvp'.",
        )
    if (exact == "sweep" or per_sample) and not in_functorch_transform(leaves):
        check_requires_no_grad(  # the input policy of secorder._validate for non-differentiable routes
            call,
            leaves,
            "per_sample=True" if per_sample else "exact='sweep'",
            "Per-sample rows come from the structured sweep, which is not differentiable."
            if per_sample
            else "For a differentiable exact value use exact='auto' or exact='hvp' (one-hot HVPs keep "
            "the graph).",
        )
    why = _sweep_refusal(call, args, argnums, leaves)
    if why is None:
        data = [a for i, a in enumerate(args) if i != index]
        try:
            with torch.no_grad():
                diag, r = engine_diagonal(
                    g,
                    leaves,
                    data,
                    chunk_size=chunk_size,
                    max_columns=p_count if exact == "auto" and not per_sample else None,
                    per_sample=per_sample,
                )
        except EngineTooCostlyError as exc:
            why = f"the sweep needs R={exc.args[0]} columns per sample, more than P={p_count} one-hot HVPs"
        except EngineUnsupportedError as exc:
            why = f"the structured sweep refused: {exc.args[0]}"
        else:
            check_finite_result(call, "Hessian diagonal", ravel(diag), lambda: diagnose_nonfinite(g, leaves))
            _report(
                fn,
                SweepInfo("sweep", r, p_count, f"structured sweep over the batch tape; R={r}, P={p_count}"),
            )
            return diag, spec
    if per_sample:
        raise error(
            call,
            "per_sample=True needs the structured sweep: an eager call on a sum over the samples "
            "of the batched arguments (plus terms linear in the parameters), every op covered by a rule",
            why,
            "Compute each sample's value alone (e.g. hessian_diagonal(f) on each sample), or drop "
            "per_sample; a parameter-only term such as λ‖θ‖² has the known diagonal 2λ: leave it out "
            "of f and add it to the batch total.",
            cls=RuntimeError if "torch.func" in why or "require grad" in why else ValueError,
        )
    if exact == "sweep":
        if why.startswith("the structured sweep refused"):  # the op-level per-sample sweep covers more ops
            return _graph_sweep_diagonal(call, fn, f, args, argnums, chunk_size, why)
        raise error(
            call,
            "exact='sweep' needs an eager call on a sum over the samples of the batched arguments "
            "with every op covered by a rule",
            why,
            "Use exact='auto' or exact='hvp' (one-hot Hessian-vector products), which work for any function.",
            cls=RuntimeError if "torch.func" in why or "require grad" in why else ValueError,
        )
    _report(fn, SweepInfo("hvp", 0, p_count, f"one-hot HVPs: {why}"))
    return None


def _graph_sweep_diagonal(
    call: str,
    fn: Any,
    f: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: int,
    chunk_size: int | None,
    why: str,
) -> tuple[list[Tensor], TreeSpec]:
    """The exact diagonal by the op-level per-sample sweep (:mod:`secorder._graph_sweep`), for
    ``exact="sweep"`` where the structured sweep has no rule yet; sets ``fn.method_info``."""
    from secorder._graph_sweep import GraphSweepUnsupportedError, graph_sweep_diagonal
    from secorder.module_hessian import SweepInfo

    g, leaves, spec, index = _bind(call, f, args, argnums)
    data = [a for i, a in enumerate(args) if i != index]
    positions = [i for i in range(len(args)) if i != index]

    def loss_fn(ls: list[Tensor], sample: list[Tensor]) -> Tensor:
        new_args = list(args)
        new_args[index] = unflatten(spec, ls)
        for i, x in zip(positions, sample):
            new_args[i] = x
        return check_scalar_output(call, f(*new_args))

    with torch.no_grad():
        batch_loss = g(leaves)
    try:
        diag, r = graph_sweep_diagonal(
            loss_fn, leaves, data, scale=None, batch_loss=batch_loss, chunk_size=chunk_size or 64
        )
    except GraphSweepUnsupportedError as exc:
        raise error(
            call,
            "exact='sweep' needs f to be the mean or the sum over samples of a per-sample loss, "
            "recordable as ATen ops (see secorder._graph_sweep)",
            f"{why}; the op-level sweep: {exc}",
            "Use exact='hvp' (one-hot Hessian-vector products), which works for any function.",
        ) from exc
    check_finite_result(call, "Hessian diagonal", ravel(diag), lambda: diagnose_nonfinite(g, leaves))
    p_count = sum(leaf.numel() for leaf in leaves)
    _report(fn, SweepInfo("sweep", r, p_count, f"op-level graph sweep ({why}); R={r}, P={p_count}"))
    return diag, spec


def hvp(
    f: Callable[..., Any], /, *, argnums: int = 0, select: Any = None, strategy: str = "auto"
) -> Callable[..., Any]:
    """Transform ``f`` into a function computing Hessian-vector products H·v.

    ``hvp(f)(v, *args)`` returns H v, where H = ∇²_θ ``f(*args)`` with θ = ``args[argnums]``
    and ``v`` a pytree with θ's structure (dict key order may differ). The tangent
    comes first so that ``torch.func.vmap(hvp(f), in_dims=(0, None, ...))`` maps over a
    batch of tangents. Cost: about two gradient evaluations.

    Args:
        f: a function returning a scalar tensor.
        argnums: which positional argument of ``f`` is θ.
        select: compute over a subset of the parameters ``args[argnums]`` (a dict keyed
            by name): a glob, a list of globs, a compiled regex or a predicate on names; the
            others are held fixed and results hold only the selected entries
            (:mod:`secorder._select`).
        strategy: how to form the product (see :mod:`secorder.operators`); ``"auto"``
            uses reverse-over-reverse (``"rev_rev"``) under ``torch.func`` transforms and
            when the result must stay differentiable, and otherwise decides at the first
            product: one retained double-backward graph (``"autograd"``) for functions
            with convolutions, ``"rev_rev"`` for the rest
            (:func:`secorder.operators.resolve_strategy`).

    Returns:
        ``hvp_fn(v, *args)`` returning a pytree shaped like θ.

    Raises:
        ValueError: the tangent's structure or shapes differ from θ's.

    Example:
        >>> import torch
        >>> f = lambda x: (x**3).sum()
        >>> v, x = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([1.0, 2.0, 3.0])
        >>> hvp(f)(v, x)                                         # H v = diag(6 x) v
        tensor([  6.,   0., -18.])
    """
    call = "hvp(f)(v, *args)"
    _check_common(call, f, argnums, None, strategy)
    selector = check_select(call, select)

    @functools.wraps(f)
    def hvp_fn(v: Any, *args: Any) -> Any:
        g, leaves, spec, index = _bind(call, *_select_args(call, selector, f, args, argnums), argnums)
        v_leaves, v_spec = flatten(v)
        if v_spec != spec or any(
            not isinstance(a, Tensor) or a.shape != b.shape for a, b in zip(v_leaves, leaves)
        ):
            received = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in v_leaves]
            raise error(
                call,
                f"v must have the structure and shapes of args[{index}] ({spec}, shapes "
                f"{[tuple(leaf.shape) for leaf in leaves]})",
                f"{v_spec} with shapes {received}",
                "Build v with the same keys and shapes, e.g. "
                "{k: torch.randn_like(p) for k, p in params.items()}.",
            )
        if any(inspectable(a) for a in v_leaves):
            check_finite_tree(call, "v", v)
        op = HessianOperator(g, leaves, resolve_strategy(call, strategy, leaves), call)
        flat_v = ravel(list(v_leaves))
        if flat_v.is_complex():  # H is real: H(a + ib) = Ha + i·Hb, both parts in one batch
            both = op.matmat(torch.stack([flat_v.real, flat_v.imag]).to(leaves[0].dtype))
            out = torch.complex(both[0], both[1])
        else:
            out = op.matmat(flat_v.to(leaves[0].dtype).unsqueeze(0))[0]
        return unflatten(spec, unravel(out, [leaf.shape for leaf in leaves]))

    return hvp_fn


def hessian_trace(
    f: Callable[..., Any],
    /,
    *,
    argnums: int = 0,
    select: Any = None,
    num_probes: int | None = None,
    distribution: str = "rademacher",
    chunk_size: int | None = None,
    with_stderr: bool = False,
    strategy: str = "auto",
    method: str = "hutchinson",
    per_block: bool = False,
    exact: str = "auto",
    progress: bool = False,
    per_sample: bool = False,
) -> Callable[..., Any]:
    """Transform ``f`` into a function returning tr(∇²_θ f), exact or by a randomized estimator.

    * ``num_probes=None``: exact, the sum of :func:`hessian_diagonal` (the structured
      sweep when it applies, else Σ_i e_iᵀ H e_i from P one-hot Hessian-vector products).
    * ``num_probes=K``: Hutchinson, (1/K) Σ_k v_kᵀ H v_k with probes drawn from
      ``generator``; unbiased since E[v vᵀ] = I. Cost: K HVPs (in eager mode K
      forward passes in tangent mode, ``strategy="taylor"``), ``chunk_size`` at a time.
      ``method="hutch++"`` or ``"xtrace"`` spend the same K products on a low-rank
      sketch plus Hutchinson on the remainder, far more accurate when the spectrum
      decays fast (``"xnystrace"`` too, for positive semi-definite Hessians only).
    * ``per_block=True``: the trace of each diagonal block H_bb, one block per leaf of
      θ (per-layer curvature), as a pytree of 0-dim tensors shaped like θ whose sum is
      the total. Exact from the exact diagonal, or by ``method`` from one set of K
      products (every method; full HVPs instead of quadratic forms).
    * ``per_sample=True``: a leading batch axis, row n = tr ∇²_θ f_n for f = Σ_n f_n
      (see :func:`hessian_diagonal`; with a mean each row carries the 1/N); the rows sum
      to the trace.

    Args:
        f: a function of ``*args`` returning a scalar tensor.
        argnums: which positional argument of ``f`` is θ (any pytree of floating tensors).
        select: compute over a subset of the parameters ``args[argnums]`` (a dict keyed
            by name): a glob, a list of globs, a compiled regex or a predicate on names; the
            others are held fixed and results hold only the selected entries
            (:mod:`secorder._select`).
        num_probes: ``None`` for the exact trace, or the number K of random probes.
        distribution: ``"rademacher"`` (default, lowest variance), ``"gaussian"`` or
            ``"sphere"`` (uniform on the sphere of radius √P; XTrace's improved variant),
            see :mod:`secorder.probes`.
        chunk_size: probes (or one-hot rows) per batched product; ``None`` sizes chunks
            from the memory budget (:func:`secorder.set_memory_budget`). The result does
            not depend on it beyond rounding.
        with_stderr: also return the standard error of the estimate (0 for exact; for
            Hutch++ the error conditional on its sketch, for XTrace/XNysTrace the papers'
            leave-one-out error estimate, which tends to understate the error at small
            budgets; see :mod:`secorder.estimators`).
        strategy: how Hessian-vector products are formed (:mod:`secorder.operators`).
        method: the randomized estimator used when ``num_probes`` is given (a key of
            :data:`secorder.estimators.TRACE_ESTIMATORS`: ``"hutchinson"``,
            ``"hutch++"``, ``"xtrace"``, ``"xnystrace"``); ``num_probes`` is its total
            budget of products.
        per_block: return one trace per leaf of θ instead of the total.
        exact: how the exact trace (``num_probes=None``) is computed: ``"auto"`` (default),
            ``"sweep"`` or ``"hvp"``, as for :func:`hessian_diagonal` (the sum of its exact
            diagonal); ``fn.method_info`` reports the choice.
        progress: show a tqdm bar over the chunks of one-hot products of the exact trace
            (``exact="hvp"``; tqdm is an optional dependency).
        per_sample: return the (N,) per-sample traces (per leaf with ``per_block``), exact,
            from the structured sweep (as for :func:`hessian_diagonal`).

    Returns:
        ``trace_fn(*args, generator=None)`` returning a 0-dim tensor (a pytree of them
        shaped like θ with ``per_block=True``; (N,) tensors with ``per_sample``), or
        ``(estimate, stderr)`` with
        ``with_stderr=True``. Same generator state gives the same result. Composes with
        ``torch.func.vmap`` and ``torch.func.grad``.

    Raises:
        ValueError, TypeError: invalid options (at construction) or arguments (at call).

    Example:
        >>> import torch
        >>> f = lambda x: (x**2).sum() + x[0] * x[1]
        >>> hessian_trace(f)(torch.ones(3))                 # H = [[2,1,0],[1,2,0],[0,0,2]]
        tensor(6.)
        >>> g = lambda x: (x**2 * torch.tensor([1.0, 2.0, 3.0])).sum()
        >>> gen = torch.Generator().manual_seed(0)
        >>> hessian_trace(g, num_probes=5)(torch.ones(3), generator=gen)
        tensor(12.)
        >>> h = lambda p: (p["w"] ** 2).sum() + 3 * p["b"] ** 2
        >>> hessian_trace(h, per_block=True)({"w": torch.ones(2), "b": torch.tensor(0.0)})
        {'w': tensor(4.), 'b': tensor(6.)}

    See Also:
        :func:`hessian_diagonal`, :func:`hessian_trace_adaptive`, :func:`secorder.fisher_trace`.

    References:
        M. F. Hutchinson (1989), see :mod:`secorder.estimators.hutchinson`; Hutch++
        (Meyer et al. 2021) and XTrace/XNysTrace (Epperly, Tropp, Webber 2024), see
        :mod:`secorder.estimators`.
    """
    call = "hessian_trace(f)(*args)"
    _check_common(call, f, argnums, chunk_size, strategy)
    selector = check_select(call, select)
    check_num_probes(call, num_probes)
    estimator = check_method(call, method, TRACE_ESTIMATORS)
    block_estimator = BLOCK_TRACE_ESTIMATORS.get(str(method))
    check_min_probes(call, str(method), num_probes)
    _probes.check_distribution(call, distribution)
    check_bool(call, "with_stderr", with_stderr)
    check_bool(call, "per_block", per_block)
    check_bool(call, "progress", progress)
    _check_exact(call, exact, num_probes)
    _check_per_sample(call, per_sample, num_probes, exact)

    @functools.wraps(f)
    def trace_fn(*args: Any, generator: torch.Generator | None = None) -> Any:
        swept = (
            _exact_diagonal_leaves(
                call,
                trace_fn,
                *_select_args(call, selector, f, args, argnums),
                argnums,
                chunk_size,
                exact,
                per_sample,
            )
            if num_probes is None
            else None
        )
        if swept is not None:
            diag, spec = swept
            sums = [d.flatten(1).sum(1) if per_sample else d.sum() for d in diag]
            est = sum(sums[1:], start=sums[0])
            out = unflatten(spec, sums) if per_block else est
            if not with_stderr:
                return out
            return out, (
                unflatten(spec, [torch.zeros_like(t) for t in sums]) if per_block else torch.zeros_like(est)
            )
        op, spec, gen = _bound_operator(
            call, *_select_args(call, selector, f, args, argnums), argnums, strategy, generator
        )
        leaves = op.leaves
        if per_block:
            sizes = [leaf.numel() for leaf in leaves]
            if num_probes is None or block_estimator is None:
                blocks = exact_block_traces(op, sizes, chunk_size=chunk_size, progress=progress)
                block_err = torch.zeros_like(blocks)
            else:
                blocks, block_err = block_estimator(
                    op, num_probes, sizes, distribution=distribution, generator=gen, chunk_size=chunk_size
                )
            tree = unflatten(spec, list(blocks.unbind()))
            return (tree, unflatten(spec, list(block_err.unbind()))) if with_stderr else tree
        if num_probes is None:
            est = exact_diagonal(op, chunk_size=chunk_size, progress=progress).sum()
            err = torch.zeros_like(est)
        else:
            est, err = estimator(
                op, num_probes, distribution=distribution, generator=gen, chunk_size=chunk_size
            )
        return (est, err) if with_stderr else est

    return trace_fn


def hessian_diagonal(
    f: Callable[..., Any],
    /,
    *,
    argnums: int = 0,
    select: Any = None,
    num_probes: int | None = None,
    distribution: str = "rademacher",
    chunk_size: int | None = None,
    with_stderr: bool = False,
    strategy: str = "auto",
    method: str = "hutchinson",
    exact: str = "auto",
    progress: bool = False,
    per_sample: bool = False,
) -> Callable[..., Any]:
    """Transform ``f`` into a function returning diag(∇²_θ f) as a pytree shaped like θ.

    * ``num_probes=None``: exact. For ``f(θ, *batch)`` a sum over samples, by default the
      structured second-order sweep (R batched reverse walks over a tape of the whole batch,
      R the curvature columns per sample; see ``exact``); otherwise H_ii = e_iᵀ H e_i from
      batched one-hot Hessian-vector products (``vmap`` over chunks of standard-basis
      tangents), never the P×P Hessian. Cost: P HVPs; memory: ``chunk_size`` tangents
      (default from the memory budget, :mod:`secorder._chunking`).
    * ``num_probes=K``: Hutchinson's diagonal estimate (1/K) Σ_k v_k ⊙ H v_k, or with
      ``method="xdiag"`` the exchangeable XDiag estimate (Epperly, Tropp, Webber
      2024) from K products, with per-entry standard errors from its leave-one-out
      estimates (:mod:`secorder.estimators.epperly2024xdiag`).
    * ``per_sample=True``: per-sample diagonals with a leading batch axis N. The batch-axis
      proof of the structured sweep writes f(θ) = Σ_n f_n(θ) + (terms linear in θ), f_n
      the part of f that reads sample n only (the adjoints come from f itself): for
      ``f = mean_n l_n`` f_n = l_n / N, for a weighted mean f_n = w_n l_n / Σ_m w_m, for a
      sum f_n = l_n. Row n is diag ∇²_θ f_n (so with a mean each row carries the 1/N), and
      the rows sum to the batch diagonal. The squares are formed per sample before the sum
      over samples (no loop over samples, no other route): where the sweep cannot run
      (inside ``torch.func`` transforms, parameters requiring grad, an op mixing samples or
      without a rule) an error says why. A term with curvature in θ alone (a regularizer
      λ‖θ‖², a reparametrized weight) belongs to no sample and is refused: leave it out of
      f (its diagonal is known, 2λ for λ‖θ‖²) and add it to the batch total.

    Args:
        f: a function of ``*args`` returning a scalar tensor.
        argnums: which positional argument of ``f`` is θ.
        select: compute over a subset of the parameters ``args[argnums]`` (a dict keyed
            by name): a glob, a list of globs, a compiled regex or a predicate on names; the
            others are held fixed and results hold only the selected entries
            (:mod:`secorder._select`).
        num_probes: ``None`` for the exact diagonal, or the number of random probes.
        distribution: ``"rademacher"``, ``"gaussian"`` or ``"sphere"`` (randomized method
            only; :mod:`secorder.probes`).
        chunk_size: one-hot rows or probes per batched product (``None``: automatic).
        with_stderr: also return a pytree of per-entry standard errors (zeros if exact).
        strategy: how Hessian-vector products are formed (:mod:`secorder.operators`).
        method: the randomized estimator used when ``num_probes`` is given (a key of
            :data:`secorder.estimators.DIAGONAL_ESTIMATORS`: ``"hutchinson"`` or
            ``"xdiag"``); ``num_probes`` is its total budget of products.
        exact: how the exact diagonal is computed. ``"auto"`` (default): the structured
            second-order sweep of :mod:`secorder._engine.sweep` whenever it applies (an eager
            call whose parameters do not require grad, every other argument a tensor batched
            along dimension 0, the batch-axis proof holds — f is a sum over samples of
            per-sample terms plus parameter-only terms, any weighting —, every op has a rule,
            and R ≤ P), else one-hot HVPs. ``"sweep"`` forces the sweep (an error says why it
            cannot run; where the structured sweep has no rule yet, the op-level per-sample
            sweep of :mod:`secorder._graph_sweep`). ``"hvp"``: P one-hot Hessian-vector
            products (any function, composes with ``torch.func`` transforms and keeps the
            graph of parameters that require grad). ``fn.method_info`` reports the method,
            R (columns per sample), P and the reason after each eager exact call (not updated
            while ``torch.compile`` traces).
        progress: show a tqdm bar over the chunks of one-hot products of the exact diagonal
            (``exact="hvp"``; tqdm is an optional dependency).
        per_sample: return per-sample diagonals, each leaf ``(N, *leaf.shape)`` (see above;
            ``exact`` ``"auto"`` or ``"sweep"``, no ``num_probes``).

    Returns:
        ``diag_fn(*args, generator=None)`` returning a pytree with θ's structure and key
        order (or ``(diagonal, stderr)``); leaves with a leading N with ``per_sample``.

    Example:
        >>> import torch
        >>> f = lambda p: (p["w"] ** 3).sum() + (p["b"] ** 2).sum()
        >>> hessian_diagonal(f)({"w": torch.tensor([1.0, 2.0]), "b": torch.zeros(1)})
        {'w': tensor([ 6., 12.]), 'b': tensor([2.])}
    """
    call = "hessian_diagonal(f)(*args)"
    _check_common(call, f, argnums, chunk_size, strategy)
    selector = check_select(call, select)
    check_num_probes(call, num_probes)
    estimator = check_method(call, method, DIAGONAL_ESTIMATORS)
    check_min_probes(call, str(method), num_probes)
    _probes.check_distribution(call, distribution)
    check_bool(call, "with_stderr", with_stderr)
    check_bool(call, "progress", progress)
    _check_exact(call, exact, num_probes)
    _check_per_sample(call, per_sample, num_probes, exact)

    @functools.wraps(f)
    def diag_fn(*args: Any, generator: torch.Generator | None = None) -> Any:
        swept = (
            _exact_diagonal_leaves(
                call,
                diag_fn,
                *_select_args(call, selector, f, args, argnums),
                argnums,
                chunk_size,
                exact,
                per_sample,
            )
            if num_probes is None
            else None
        )
        if swept is not None:
            diag_leaves, spec = swept
            tree = unflatten(spec, diag_leaves)
            return (
                (tree, unflatten(spec, [torch.zeros_like(d) for d in diag_leaves])) if with_stderr else tree
            )
        op, spec, gen = _bound_operator(
            call, *_select_args(call, selector, f, args, argnums), argnums, strategy, generator
        )
        leaves = op.leaves
        if num_probes is None:
            diag = exact_diagonal(op, chunk_size=chunk_size, progress=progress)
            err = torch.zeros_like(diag)
        else:
            diag, err = estimator(
                op, num_probes, distribution=distribution, generator=gen, chunk_size=chunk_size
            )
        shapes = [leaf.shape for leaf in leaves]
        tree = unflatten(spec, unravel(diag, shapes))
        if with_stderr:
            return tree, unflatten(spec, unravel(err, shapes))
        return tree

    return diag_fn


def hessian_trace_adaptive(
    f: Callable[..., Any],
    /,
    *,
    argnums: int = 0,
    select: Any = None,
    atol: float = 0.0,
    rtol: float = 1e-2,
    max_probes: int = 1000,
    batch: int = 10,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    chunk_size: int | None = None,
    strategy: str = "auto",
) -> Callable[..., AdaptiveResult]:
    """Transform ``f`` into a function estimating tr(∇²_θ f) until its standard error is small.

    Products are drawn in rounds until stderr ≤ ``atol`` + ``rtol`` · abs(estimate) or
    ``max_probes`` products are spent (see :mod:`secorder.estimators.stopping`).
    Eager only: the number of rounds depends on the data, so inside ``torch.func``
    transforms use :func:`hessian_trace` with a fixed ``num_probes``.

    Args:
        f: a function of ``*args`` returning a scalar tensor.
        argnums: which positional argument of ``f`` is θ.
        select: compute over a subset of the parameters ``args[argnums]`` (a dict keyed
            by name): a glob, a list of globs, a compiled regex or a predicate on names; the
            others are held fixed and results hold only the selected entries
            (:mod:`secorder._select`).
        atol: absolute tolerance on the standard error.
        rtol: relative tolerance on the standard error.
        max_probes: the most Hessian-vector products to spend.
        batch: products per round (Hutchinson) or of the first run (other methods).
        method: a key of :data:`secorder.estimators.TRACE_ESTIMATORS`.
        distribution: ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
        chunk_size: products per batched call (``None``: automatic).
        strategy: how Hessian-vector products are formed (:mod:`secorder.operators`).

    Returns:
        ``fn(*args, generator=None)`` returning
        :class:`~secorder.estimators.AdaptiveResult` ``(estimate, stderr,
        num_products, converged)``; ``converged=False`` means the budget ran out first.

    Raises:
        ValueError, TypeError: invalid options or arguments.
        RuntimeError: called inside a ``torch.func`` transform.

    Example:
        >>> import torch
        >>> g = lambda x: (x**2 * torch.tensor([1.0, 2.0, 3.0])).sum()
        >>> fn = hessian_trace_adaptive(g, rtol=0.01)
        >>> fn(torch.ones(3), generator=torch.Generator().manual_seed(0))
        AdaptiveResult(estimate=tensor(12.), stderr=tensor(0.), num_products=10, converged=True)
    """
    call = "hessian_trace_adaptive(f)(*args)"
    _check_common(call, f, argnums, chunk_size, strategy)
    selector = check_select(call, select)
    check_adaptive_options(call, atol, rtol, max_probes, batch, method)
    _probes.check_distribution(call, distribution)

    @functools.wraps(f)
    def adaptive_fn(*args: Any, generator: torch.Generator | None = None) -> AdaptiveResult:
        g, leaves, _, _ = _bind(call, *_select_args(call, selector, f, args, argnums), argnums)
        gen = _probes.check_generator(call, generator, leaves[0].device)
        check_eager(
            call,
            leaves,
            what="stopping on the standard error",
            fix="Inside transforms use a fixed budget: hessian_trace(f, num_probes=K, with_stderr=True).",
        )
        op = HessianOperator(g, leaves, resolve_strategy(call, strategy, leaves), call)
        return adaptive_trace(
            op,
            atol=atol,
            rtol=rtol,
            max_probes=max_probes,
            batch=batch,
            method=method,
            distribution=distribution,
            generator=gen,
            chunk_size=chunk_size,
        )

    return adaptive_fn


def hessian_frobenius_norm_sq(
    f: Callable[..., Any],
    /,
    *,
    argnums: int = 0,
    select: Any = None,
    num_probes: int | None = None,
    distribution: str = "rademacher",
    chunk_size: int | None = None,
    with_stderr: bool = False,
    strategy: str = "auto",
) -> Callable[..., Any]:
    """Transform ``f`` into a function returning ‖∇²_θ f‖²_F = tr(H²), exact or estimated.

    * ``num_probes=None``: exact, Σ_i ‖He_i‖² from P one-hot HVPs.
    * ``num_probes=K``: Hutchinson on H², (1/K) Σ_k ‖Hv_k‖² (unbiased since
      E[vvᵀ] = I), K HVPs. It predicts the variance of Hutchinson's trace estimate:
      2(‖H‖²_F − Σ H_ii²)/K for Rademacher probes.

    Args:
        f: a function of ``*args`` returning a scalar tensor.
        argnums: which positional argument of ``f`` is θ.
        select: compute over a subset of the parameters ``args[argnums]`` (a dict keyed
            by name): a glob, a list of globs, a compiled regex or a predicate on names; the
            others are held fixed and results hold only the selected entries
            (:mod:`secorder._select`).
        num_probes: ``None`` for the exact value, or the number K of probes.
        distribution: ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
        chunk_size: products per batched call (``None``: automatic).
        with_stderr: also return the standard error (0 for exact).
        strategy: how Hessian-vector products are formed (:mod:`secorder.operators`).

    Returns:
        ``fn(*args, generator=None)`` returning a 0-dim tensor (or ``(estimate, stderr)``).
        Composes with ``torch.func.vmap`` and ``torch.func.grad``.

    Example:
        >>> import torch
        >>> f = lambda x: (x**2).sum() + x[0] * x[1]            # H = [[2,1,0],[1,2,0],[0,0,2]]
        >>> hessian_frobenius_norm_sq(f)(torch.ones(3))
        tensor(14.)
    """
    call = "hessian_frobenius_norm_sq(f)(*args)"
    _check_common(call, f, argnums, chunk_size, strategy)
    selector = check_select(call, select)
    check_num_probes(call, num_probes)
    _probes.check_distribution(call, distribution)
    check_bool(call, "with_stderr", with_stderr)

    @functools.wraps(f)
    def frobenius_fn(*args: Any, generator: torch.Generator | None = None) -> Any:
        op, _spec, gen = _bound_operator(
            call, *_select_args(call, selector, f, args, argnums), argnums, strategy, generator
        )
        if num_probes is None:
            est = exact_frobenius_norm_sq(op, chunk_size=chunk_size)
            err = torch.zeros_like(est)
        else:
            est, err = frobenius_norm_sq(
                op, num_probes, distribution=distribution, generator=gen, chunk_size=chunk_size
            )
        return (est, err) if with_stderr else est

    return frobenius_fn


def hessian_eigenvalues(
    f: Callable[..., Any],
    /,
    *,
    argnums: int = 0,
    select: Any = None,
    k: int = 1,
    which: str = "largest",
    tol: float | None = None,
    max_steps: int | None = None,
    return_eigenvectors: bool = False,
    strategy: str = "auto",
) -> Callable[..., Any]:
    """Transform ``f`` into a function returning the k extreme eigenvalues of ∇²_θ f (Lanczos).

    Lanczos with full reorthogonalization (:func:`secorder.spectra.lanczos_eigenvalues`)
    runs until the k wanted Ritz pairs have residuals ‖Hx − θx‖ ≤ ``tol`` · max abs(θ);
    a ``RuntimeWarning`` says so when ``max_steps`` HVPs were not enough. Eager only.

    Args:
        f: a function of ``*args`` returning a scalar tensor.
        argnums: which positional argument of ``f`` is θ.
        select: compute over a subset of the parameters ``args[argnums]`` (a dict keyed
            by name): a glob, a list of globs, a compiled regex or a predicate on names; the
            others are held fixed and results hold only the selected entries
            (:mod:`secorder._select`).
        k: how many eigenvalues.
        which: ``"largest"`` or ``"smallest"`` (most negative: directions of negative
            curvature).
        tol: relative residual tolerance (``None``: √ε of the dtype; ε of float16/bfloat16 for
            half-precision parameters, whose products are no more precise).
        max_steps: the most HVPs of each Lanczos run (the first one and each deflated run that
            certifies the multiset; ``None``: max(300, 20k), capped by P and by the memory budget
            for the m × P Lanczos basis).
        return_eigenvectors: also return the eigenvectors.
        strategy: how Hessian-vector products are formed (:mod:`secorder.operators`).

    Returns:
        ``fn(*args, generator=None)`` returning the ``(k,)`` eigenvalues (descending for
        ``"largest"``, ascending for ``"smallest"``), or ``(eigenvalues, eigenvectors)``
        where ``eigenvectors`` is a pytree shaped like θ with a leading dimension k
        (unit vectors over all of θ).

    Raises:
        ValueError, TypeError: invalid options or arguments.
        RuntimeError: called inside a ``torch.func`` transform.

    Example:
        >>> import torch
        >>> f = lambda x: (torch.arange(1.0, 6.0, dtype=torch.float64) * x**2).sum() / 2
        >>> x, gen = torch.ones(5, dtype=torch.float64), torch.Generator().manual_seed(0)
        >>> # H = diag(1..5)
        >>> [round(v, 8) for v in hessian_eigenvalues(f, k=2)(x, generator=gen).tolist()]
        [5.0, 4.0]

    References:
        C. Lanczos (1950); C. C. Paige (1971); see :mod:`secorder.spectra`.
    """
    call = "hessian_eigenvalues(f)(*args)"
    _check_common(call, f, argnums, None, strategy)
    selector = check_select(call, select)
    check_lanczos_options(call, k, which, tol, max_steps)
    check_bool(call, "return_eigenvectors", return_eigenvectors)

    @functools.wraps(f)
    def eig_fn(*args: Any, generator: torch.Generator | None = None) -> Any:
        g, leaves, spec, _ = _bind(call, *_select_args(call, selector, f, args, argnums), argnums)
        gen = _probes.check_generator(call, generator, leaves[0].device)
        check_eager(call, leaves, what="Lanczos", fix="Call it outside torch.func transforms.")
        size = sum(leaf.numel() for leaf in leaves)
        if k > size:
            raise error(
                call, f"k must not exceed the number of parameters {size}", f"k={k}", f"Pass k <= {size}."
            )
        op = HessianOperator(g, leaves, resolve_strategy(call, strategy, leaves), call, one_at_a_time=True)
        res = lanczos_eigenvalues(
            op,
            k,
            which=which,
            tol=tol,
            max_steps=max_steps,
            return_eigenvectors=return_eigenvectors,
            generator=gen,
        )
        if not res.converged:
            warnings.warn(
                f"{call}: Lanczos did not reach the tolerance in {res.num_products} steps "
                f"(largest residual {float(res.residuals.max()):.3g}); raise max_steps or tol.",
                RuntimeWarning,
                stacklevel=2,
            )
        if not return_eigenvectors:
            return res.eigenvalues
        assert res.eigenvectors is not None
        vectors = unflatten(spec, unravel(res.eigenvectors, [leaf.shape for leaf in leaves]))
        return res.eigenvalues, vectors

    return eig_fn


def hessian_spectral_density(
    f: Callable[..., Any],
    /,
    *,
    argnums: int = 0,
    select: Any = None,
    num_runs: int = 10,
    num_steps: int = 80,
    num_points: int = 1024,
    sigma: float | None = None,
    distribution: str = "rademacher",
    chunk_size: int | None = None,
    strategy: str = "auto",
    reorthogonalize: bool = True,
) -> Callable[..., tuple[Tensor, Tensor]]:
    """Transform ``f`` into a function returning the spectral density of ∇²_θ f (SLQ).

    Stochastic Lanczos quadrature (:func:`secorder.spectra.spectral_density`):
    ``num_runs`` Lanczos runs of ``num_steps`` HVPs from random starts, Gauss
    quadrature nodes broadened by Gaussians of width ``sigma``. Eager only. Plot the
    result with :func:`secorder.spectra.plot_spectral_density`.

    Args:
        f: a function of ``*args`` returning a scalar tensor.
        argnums: which positional argument of ``f`` is θ.
        select: compute over a subset of the parameters ``args[argnums]`` (a dict keyed
            by name): a glob, a list of globs, a compiled regex or a predicate on names; the
            others are held fixed and results hold only the selected entries
            (:mod:`secorder._select`).
        num_runs: independent Lanczos runs.
        num_steps: Lanczos steps (HVPs) per run.
        num_points: grid points.
        sigma: Gaussian width (``None``: 1% of the spectral spread).
        distribution: of the start vectors (``"rademacher"``, ``"gaussian"`` or
            ``"sphere"``; they are normalized, so the choice matters little).
        chunk_size: runs advanced together (``None``: by the memory budget).
        strategy: how Hessian-vector products are formed (:mod:`secorder.operators`).
        reorthogonalize: full reorthogonalization of each Lanczos run (default);
            ``False`` is several times faster on large models, with a density that is
            accurate in practice (see :func:`secorder.spectra.slq_nodes_weights`).

    Returns:
        ``fn(*args, generator=None)`` returning ``(grid, density)``; the density
        integrates to 1 over the grid.

    Raises:
        ValueError, TypeError: invalid options or arguments.
        RuntimeError: called inside a ``torch.func`` transform.

    References:
        L. Lin, Y. Saad, C. Yang (2016); S. Ubaru, J. Chen, Y. Saad (2017); see
        :mod:`secorder.spectra`.
    """
    call = "hessian_spectral_density(f)(*args)"
    _check_common(call, f, argnums, chunk_size, strategy)
    selector = check_select(call, select)
    _probes.check_distribution(call, distribution)
    check_bool(call, "reorthogonalize", reorthogonalize)

    @functools.wraps(f)
    def density_fn(*args: Any, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        g, leaves, _, _ = _bind(call, *_select_args(call, selector, f, args, argnums), argnums)
        gen = _probes.check_generator(call, generator, leaves[0].device)
        check_eager(
            call, leaves, what="Stochastic Lanczos quadrature", fix="Call it outside torch.func transforms."
        )
        op = HessianOperator(g, leaves, resolve_strategy(call, strategy, leaves), call, one_at_a_time=True)
        return spectral_density(
            op,
            num_runs=num_runs,
            num_steps=num_steps,
            num_points=num_points,
            sigma=sigma,
            distribution=distribution,
            generator=gen,
            chunk_size=chunk_size,
            reorthogonalize=reorthogonalize,
        )

    return density_fn

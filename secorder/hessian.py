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
from typing import Any, NamedTuple

import torch
from torch import Tensor

from secorder import _cost
from secorder import probes as _probes
from secorder._chunking import check_chunk_size
from secorder._errors import SecorderError, error
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
    "SweepInfo",
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


class SweepInfo(NamedTuple):
    """Which method computed the last call: ``method`` (``"sweep"``, ``"hvp"`` or
    ``"curvature_propagation"``), ``num_columns`` R of the sweep per sample (0 if unknown),
    ``num_params`` P, ``reason`` (why ``"auto"`` chose it, or why the sweep was refused) and
    ``cost``: the cost model's estimates of the exact routes it compared, in products, and the
    budget (:mod:`secorder._cost`; empty for estimators)."""

    method: str
    num_columns: int
    num_params: int
    reason: str
    cost: str = ""


def _randomized_routes(call: str, option: str, sweep: bool) -> list[str]:
    """The caller's randomized calls for a refusal of the exact value (``sweep``: the structured
    sweep applies here, so curvature propagation is offered)."""
    cp = "(the sweep's columns mixed by random signs: 2 column walks per probe)"
    if option == "method":  # module_hessian_diagonal / module_hessian_trace
        routes = [
            "secorder.hessian_diagonal(f, num_probes=K) (Hutchinson, K HVPs) with f from "
            "secorder.module_loss(model, loss)"
        ]
        return ([f"method='curvature_propagation', num_probes=K {cp}"] if sweep else []) + routes
    name = "hessian_trace" if call.startswith("hessian_trace") else "hessian_diagonal"
    more = (
        "method='hutch++' or 'xtrace' for a fast-decaying spectrum"
        if name == "hessian_trace"
        else "or method='xdiag'"
    )
    routes = [f"{name}(f, num_probes=K) (Hutchinson, K HVPs; {more})"]
    if sweep:
        routes.append(f"{name}(f, num_probes=K, method='curvature_propagation') {cp}")
    return routes


def _exact_diagonal_leaves(
    call: str,
    fn: Any,
    f: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: int,
    chunk_size: int | None,
    exact: str,
    per_sample: bool = False,
    *,
    option: str = "exact",
    max_hvp_params: int | None = None,
) -> tuple[list[Tensor], TreeSpec] | None:
    """The exact diagonal per leaf by the structured sweep of :mod:`secorder._engine.sweep`, or
    None when ``exact="auto"`` (or ``"hvp"``) takes one-hot HVPs; sets ``fn.method_info``
    (method, R, P, the reason for the choice and the cost model's estimates) either way.
    ``per_sample``: rows (N, *leaf.shape) from the structured sweep, or an error naming why it
    cannot run (no other route).

    The cost model (:mod:`secorder._cost`): the sweep costs R column walks (R from its plan,
    after one recording of ``f``; the walks start only within the limit), one-hot HVPs P
    products; ``"auto"`` takes the cheaper, and every route, forced or not, must fit
    :func:`secorder._cost.exact_budget` or the call is refused before its products start.

    ``option`` names the caller's keyword in messages (``exact``, or ``method`` for
    :func:`secorder.module_hessian_diagonal`). ``max_hvp_params`` (``"auto"`` only; ``None``: no
    limit): above it one-hot HVPs are not an option, so the sweep runs whatever R and a function
    it refuses is an error."""
    from secorder._engine.sweep import EngineTooCostlyError, EngineUnsupportedError, engine_diagonal

    g, leaves, spec, index = _bind(call, f, args, argnums)
    p_count = sum(leaf.numel() for leaf in leaves)
    hvp_route = _cost.Route("hvp", p_count, f"P={p_count:,} one-hot Hessian-vector products")
    quantity = (
        "Hessian trace" if call.startswith(("hessian_trace", "module_hessian_trace")) else "Hessian diagonal"
    )
    if exact == "hvp":
        _cost.check_budget(
            call, quantity, [hvp_route], _randomized_routes(call, option, False), f"{option}='hvp' requested"
        )
        _report(fn, SweepInfo("hvp", 0, p_count, f"{option}='hvp' requested", _cost.describe([hvp_route])))
        return None
    hvp_allowed = exact == "auto" and not per_sample and (max_hvp_params is None or p_count <= max_hvp_params)
    hvp_routes = [hvp_route] if hvp_allowed else []
    if exact == "sweep" and not per_sample:  # forced: the shared policies' refusals, in their words
        check_eager(
            call,
            leaves,
            what=f"{option}='sweep' (it records the function as a tape of ATen ops)",
            fix=f"Inside torch.func transforms use {option}='hvp'.",
        )
    if (exact == "sweep" or per_sample) and not in_functorch_transform(leaves):
        check_requires_no_grad(  # the input policy of secorder._validate for non-differentiable routes
            call,
            leaves,
            "per_sample=True" if per_sample else f"{option}='sweep'",
            "Per-sample rows come from the structured sweep, which is not differentiable."
            if per_sample
            else "For a differentiable exact value use "
            + ("exact='auto' or exact='hvp'" if option == "exact" else f"{option}='hvp'")
            + " (one-hot HVPs keep the graph).",
        )
    randomized = _randomized_routes(call, option, True)
    if per_sample:
        randomized = [
            f"no randomized route gives per-sample rows; for the batch value drop per_sample: {randomized[0]}"
        ]
    why = _sweep_refusal(call, args, argnums, leaves)
    compared = [hvp_route]  # the estimates behind the choice, for method_info
    if why is None:
        data = [a for i, a in enumerate(args) if i != index]
        budget = _cost.exact_budget()
        limits = [p_count] if hvp_allowed else []
        limits += [] if budget is None else [budget]
        report: dict[str, Any] = {}
        try:
            with torch.no_grad():
                diag, r = engine_diagonal(
                    g,
                    leaves,
                    data,
                    chunk_size=chunk_size,
                    max_columns=min(limits) if limits else None,
                    per_sample=per_sample,
                    report=report,
                )
        except EngineTooCostlyError as exc:
            sweep_route = exc.args[0]
            _cost.check_budget(call, quantity, [sweep_route, *hvp_routes], randomized)
            why = (
                f"the sweep's estimate, {sweep_route.products:,} products ({sweep_route.what}), "
                f"exceeds P={p_count:,} one-hot HVPs"
            )
            compared = [sweep_route, hvp_route]
        except EngineUnsupportedError as exc:
            _raise_users_error(exc, g, leaves)
            why = f"the structured sweep refused: {exc.args[0]}"
        else:
            check_finite_result(call, "Hessian diagonal", ravel(diag), lambda: diagnose_nonfinite(g, leaves))
            reason = f"structured sweep over the batch tape; R={r}, P={p_count}"
            if exact == "auto" and not hvp_allowed and not per_sample:
                reason += f" (P > max_hvp_params={max_hvp_params}: one-hot HVPs not considered)"
            sweep_route = report["route"]
            _report(fn, SweepInfo("sweep", r, p_count, reason, _cost.describe([sweep_route, *hvp_routes])))
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
            cls=RuntimeError if "torch.func" in why or "require grad" in why else SecorderError,
        )
    if exact == "sweep" or not hvp_allowed:
        estimates = "; ".join(_randomized_routes(call, option, False))
        if _cost.within(p_count):
            fix = (
                f"Use {option}='hvp' (one-hot Hessian-vector products, cost P HVPs), which works for any "
                "function"
                + ("" if exact == "sweep" else f" (or raise max_hvp_params above P={p_count})")
                + f"; for an estimate {estimates}."
            )
        else:  # the cost model: one-hot HVPs are out of the budget too
            fix = (
                f"One-hot Hessian-vector products ({option}='hvp') would start P={p_count:,} products, more "
                f"than secorder.exact_budget()={_cost.exact_budget():,} (secorder.set_exact_budget lifts "
                f"it); for an estimate use {estimates}."
            )
        raise error(
            call,
            f"{option}={exact!r} needs the structured sweep here: an eager call on a sum over the "
            "samples of the batched arguments with every op covered by a rule",
            why,
            fix,
            cls=RuntimeError if "torch.func" in why or "require grad" in why else SecorderError,
        )
    # one-hot HVPs; within the budget when the sweep's estimate was compared above
    _cost.check_budget(
        call, quantity, [hvp_route], _randomized_routes(call, option, False), f"no sweep: {why}"
    )
    _report(fn, SweepInfo("hvp", 0, p_count, f"one-hot HVPs: {why}", _cost.describe(compared)))
    return None


def _raise_users_error(refusal: Exception, g: Callable[[list[Tensor]], Tensor], leaves: list[Tensor]) -> None:
    """When recording ``f`` for the sweep failed with an exception of its own, evaluate it once
    plainly: the user's own exception passes through unchanged (the input policy); if the plain
    evaluation succeeds, the refusal stands."""
    from secorder._engine.tape import TapeUnsupportedError

    cause = refusal.__cause__
    if isinstance(cause, TapeUnsupportedError) and cause.__cause__ is not None:
        with torch.no_grad():
            g(leaves)


def _cp_diagonal_leaves(
    call: str,
    fn: Any,
    f: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: int,
    num_probes: int,
    generator: object,
    chunk_size: int | None,
    *,
    fix: str = "Use method='hutchinson' (Hessian-vector products, any function) or 'xdiag'.",
) -> tuple[list[Tensor], list[Tensor], list[Tensor], TreeSpec]:
    """Curvature propagation on the structured sweep (:func:`secorder._engine.sweep.engine_cp_diagonal`):
    the estimate, its standard errors and the K per-probe estimates per leaf; sets
    ``fn.method_info``. Where the sweep cannot run, an error says why (no other route gives
    this estimator); ``fix`` is the caller's advice."""
    from secorder._engine.sweep import EngineUnsupportedError, engine_cp_diagonal

    g, leaves, spec, index = _bind(call, f, args, argnums)
    p_count = sum(leaf.numel() for leaf in leaves)
    route = "method='curvature_propagation'"
    check_eager(call, leaves, what=f"{route} (it records the function as a tape of ATen ops)", fix=fix)
    check_requires_no_grad(
        call, leaves, route, "For a differentiable estimate use Hessian-vector products: " + fix
    )
    gen = _probes.check_generator(call, generator, leaves[0].device)
    why = _sweep_refusal(call, args, argnums, leaves)
    if why is None:
        data = [a for i, a in enumerate(args) if i != index]
        try:
            with torch.no_grad():
                mean, err, per_probe, r = engine_cp_diagonal(
                    g, leaves, data, num_probes=num_probes, generator=gen, chunk_size=chunk_size
                )
        except EngineUnsupportedError as exc:
            _raise_users_error(exc, g, leaves)
            why = f"the structured sweep refused: {exc.args[0]}"
        else:
            check_finite_result(
                call, "Hessian diagonal estimate", ravel(mean), lambda: diagnose_nonfinite(g, leaves)
            )
            reason = f"curvature propagation over the batch tape; K={num_probes}, R={r}, P={p_count}"
            _report(fn, SweepInfo("curvature_propagation", r, p_count, reason))
            return mean, err, per_probe, spec
    raise error(
        call,
        f"{route} mixes the curvature columns of the structured sweep: an eager call on a sum over "
        "the samples of the batched arguments with every op covered by a rule",
        why,
        fix,
        cls=RuntimeError if "require grad" in why else SecorderError,
    )


def _check_cp(call: str, method: object, num_probes: object, distribution: object) -> bool:
    """Construction-time checks of ``method="curvature_propagation"``; True when it is chosen."""
    if method != "curvature_propagation":
        return False
    if num_probes is None:
        raise error(
            call,
            "method='curvature_propagation' is an estimator and needs num_probes",
            "num_probes=None",
            "Pass num_probes=K (e.g. 10), or drop method for the exact value.",
        )
    if distribution != "rademacher":
        raise error(
            call,
            "method='curvature_propagation' mixes curvature columns with Rademacher signs",
            f"distribution={distribution!r}",
            "Drop distribution (or pass 'rademacher').",
        )
    return True


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
      ``method="curvature_propagation"``: the sum of the curvature-propagation diagonal
      estimate of :func:`hessian_diagonal` (the sweep's columns mixed by random signs), its
      standard error over the K per-probe traces.
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
            budget of products. Or ``"curvature_propagation"`` (Rademacher only, eager, where
            the structured sweep applies; see :func:`hessian_diagonal`).
        per_block: return one trace per leaf of θ instead of the total.
        exact: how the exact trace (``num_probes=None``) is computed: ``"auto"`` (default),
            ``"sweep"`` or ``"hvp"``, as for :func:`hessian_diagonal` (the sum of its exact
            diagonal, within the same exact budget); ``fn.method_info`` reports the choice.
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
    cp = _check_cp(call, method, num_probes, distribution)
    estimator = None if cp else check_method(call, method, TRACE_ESTIMATORS)
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
        if cp:
            assert num_probes is not None
            _, _, per_probe, spec = _cp_diagonal_leaves(
                call, trace_fn, *_select_args(call, selector, f, args, argnums), argnums, num_probes,
                generator, chunk_size,
                fix="Use method='hutchinson' (Hessian-vector products, any function), 'hutch++' or 'xtrace'.",
            )  # fmt: skip
            blocks = torch.stack([p.flatten(1).sum(1) for p in per_probe], 1)  # (K, leaves)
            blocks_mean, blocks_err = _mean_stderr(blocks)
            totals_mean, totals_err = _mean_stderr(blocks.sum(1))
            if per_block:
                tree = unflatten(spec, list(blocks_mean.unbind()))
                return (tree, unflatten(spec, list(blocks_err.unbind()))) if with_stderr else tree
            return (totals_mean, totals_err) if with_stderr else totals_mean
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
            assert estimator is not None
            est, err = estimator(
                op, num_probes, distribution=distribution, generator=gen, chunk_size=chunk_size
            )
        return (est, err) if with_stderr else est

    return trace_fn


def _mean_stderr(per_probe: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over dimension 0 (the K probes) and its standard error (NaN for one probe)."""
    k = per_probe.shape[0]
    mean = per_probe.mean(0)
    if k < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, per_probe.std(0, correction=1) / k**0.5


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
    * ``num_probes=K, method="curvature_propagation"``: curvature propagation (Martens,
      Sutskever and Swersky 2012) on the structured sweep: probe k mixes the signed curvature
      columns s_{n,c} (signs σ_{n,c}) of each sample with independent Rademacher signs v into
      P = Σ_{σ>0} v_c s_c and Q = Σ_{σ<0} v_c s_c, and (J_nᵀ P)^⊙2 − (J_nᵀ Q)^⊙2 estimates
      sample n's share of the diagonal without bias (E[v vᵀ] = I). Mean over the K probes,
      per-entry standard errors from their spread (NaN for K = 1). Cost: the sweep's
      columns once, then one batched walk of 2 columns per probe (instead of R per sample);
      variance far below Hutchinson's where the diagonal dominates. Eager only, parameters
      not requiring grad, where the sweep applies (an error says why otherwise: there is no
      other route for this estimator; use ``"hutchinson"``).
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
            ``"xdiag"``); ``num_probes`` is its total budget of products. Or
            ``"curvature_propagation"`` (see above; ``distribution="rademacher"`` only).
        exact: how the exact diagonal is computed. ``"auto"`` (default): the structured
            second-order sweep of :mod:`secorder._engine.sweep` whenever it applies (an eager
            call whose parameters do not require grad, every other argument a tensor batched
            along dimension 0, the batch-axis proof holds — f is a sum over samples of
            per-sample terms plus parameter-only terms, any weighting —, every op has a rule,
            and R ≤ P), else one-hot HVPs. ``"sweep"`` forces the sweep (an error gives the
            engine's reason where it cannot run). ``"hvp"``: P one-hot Hessian-vector
            products (any function, composes with ``torch.func`` transforms and keeps the
            graph of parameters that require grad). ``fn.method_info`` reports the method,
            R (columns per sample), P, the reason and the cost model's estimates after each
            eager exact call (not updated while ``torch.compile`` traces). Every exact route
            (forced ones too) needs at most :func:`secorder.exact_budget` products (R column
            walks, P HVPs); above it the call is refused before any product, naming the
            randomized routes (``docs/large_vocabularies.rst``).
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
    cp = _check_cp(call, method, num_probes, distribution)
    estimator = None if cp else check_method(call, method, DIAGONAL_ESTIMATORS)
    check_min_probes(call, str(method), num_probes)
    _probes.check_distribution(call, distribution)
    check_bool(call, "with_stderr", with_stderr)
    check_bool(call, "progress", progress)
    _check_exact(call, exact, num_probes)
    _check_per_sample(call, per_sample, num_probes, exact)

    @functools.wraps(f)
    def diag_fn(*args: Any, generator: torch.Generator | None = None) -> Any:
        if cp:
            assert num_probes is not None
            cp_mean, cp_err, _, spec = _cp_diagonal_leaves(
                call, diag_fn, *_select_args(call, selector, f, args, argnums), argnums, num_probes,
                generator, chunk_size,
            )  # fmt: skip
            tree = unflatten(spec, cp_mean)
            return (tree, unflatten(spec, cp_err)) if with_stderr else tree
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
            assert estimator is not None
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
            p_count = op.size
            _cost.check_budget(
                call,
                "squared Frobenius norm",
                [_cost.Route("hvp", p_count, f"P={p_count:,} one-hot Hessian-vector products")],
                ["hessian_frobenius_norm_sq(f, num_probes=K) (K HVPs, unbiased)"],
            )
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
    certify: bool = True,
    strategy: str = "auto",
) -> Callable[..., Any]:
    """Transform ``f`` into a function returning the k extreme eigenvalues of ∇²_θ f (Lanczos).

    Lanczos with full reorthogonalization (:func:`secorder.spectra.lanczos_eigenvalues`)
    runs until the k wanted Ritz pairs have residuals ‖Hx − θx‖ ≤ ``tol`` · max abs(θ);
    a ``RuntimeWarning`` says so when ``max_steps`` HVPs were not enough. Each returned θ is
    within its residual of an eigenvalue, and typically within residual²/gap: ``tol`` bounds
    the residual, not the relative change of the estimate that power iteration (PyHessian's
    ``tol``) tests, and ``tol=1e-3`` typically gives eigenvalues accurate to ~1e-6. A second,
    deflated Lanczos run then certifies that no copy of a repeated eigenvalue and no larger
    eigenvalue was missed (about as many HVPs again; ``certify=False`` skips it). Eager only.

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
        certify: run the deflated Lanczos runs that certify the top-k multiset (default);
            ``False`` about halves the HVPs, and the result may then hold a single copy of a
            repeated eigenvalue or miss one the random start vector barely touches (the
            residual guarantee of ``tol`` holds either way).
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
    check_bool(call, "certify", certify)

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
            certify=certify,
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

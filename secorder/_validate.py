"""Argument checks shared by every public entry point (one message format, see _errors)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from secorder._errors import error
from secorder._kernels import plain_kernels, with_plain_kernels

T = TypeVar("T")

__all__ = [
    "check_module_names",
    "check_deterministic_module",
    "inspectable",
    "finite_checks",
    "check_module_call",
    "diagnose_nonfinite",
    "check_call_inputs",
    "call_deterministic",
    "check_finite_enabled",
    "check_finite_result",
    "check_finite_tree",
    "check_grad_context",
    "check_nonempty_batch",
    "check_param_names",
    "check_requires_no_grad",
    "nonfinite_report",
    "set_check_finite",
    "check_argnums",
    "check_bool",
    "check_callable",
    "check_method",
    "check_num_probes",
    "check_same_dtype_device",
    "check_scalar_output",
    "half_precision_refusal",
]


def check_callable(call: str, name: str, f: object) -> None:
    if not callable(f):
        raise error(
            call,
            f"{name} must be callable",
            f"{type(f).__name__}",
            f"Pass the function itself, e.g. {name}=loss_fn, not its result.",
            cls=TypeError,
        )


def check_method(call: str, method: object, registry: Mapping[str, T]) -> T:
    """Look ``method`` up in ``registry`` with a clear error for unknown names."""
    if not isinstance(method, str) or method not in registry:
        raise error(
            call,
            f"method must be one of {', '.join(repr(m) for m in registry)}",
            f"{method!r}",
            'Use method="hutchinson" or another listed estimator.',
        )
    return registry[method]


def check_num_probes(call: str, num_probes: object, *, allow_none: bool = True) -> int | None:
    if num_probes is None and allow_none:
        return None
    if not isinstance(num_probes, int) or isinstance(num_probes, bool) or num_probes < 1:
        none = "None (exact) or " if allow_none else ""
        raise error(
            call,
            f"num_probes must be {none}an int >= 1",
            f"{num_probes!r} ({type(num_probes).__name__})",
            "Pass a positive number of probes, e.g. num_probes=100"
            + (", or None for the exact value." if allow_none else "."),
        )
    return num_probes


def check_bool(call: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise error(
            call,
            f"{name} must be True or False",
            f"{value!r}",
            f"Pass {name}=True or {name}=False.",
            cls=TypeError,
        )
    return value


def check_argnums(call: str, argnums: object, nargs: int | None = None) -> int:
    """Check ``argnums`` is an int (and, given ``nargs``, a valid index); return it normalized."""
    if not isinstance(argnums, int) or isinstance(argnums, bool):
        raise error(
            call,
            "argnums must be a single int (the position of the argument to differentiate)",
            f"{argnums!r}",
            "Pass argnums=0 for the first argument; group several tensors into one pytree "
            "argument (a dict or tuple) to differentiate with respect to all of them.",
            cls=TypeError,
        )
    if nargs is not None:
        if not -nargs <= argnums < nargs:
            raise error(
                call,
                f"argnums must index one of the {nargs} positional arguments",
                f"argnums={argnums}",
                f"Use an argnums between {-nargs} and {nargs - 1}, or pass the missing argument.",
            )
        return argnums % nargs
    return argnums


@with_plain_kernels
def check_same_dtype_device(call: str, name: str, leaves: Sequence[Tensor]) -> None:
    dtypes = {leaf.dtype for leaf in leaves}
    devices = {leaf.device for leaf in leaves}
    if len(dtypes) > 1 or len(devices) > 1:
        raise error(
            call,
            f"all leaves of {name} must share one dtype and one device",
            f"dtypes {sorted(str(d) for d in dtypes)} on devices {sorted(str(d) for d in devices)}",
            "Cast them first, e.g. model.to(torch.float64) or {k: v.double() for k, v in params.items()}.",
        )


def half_precision_refusal(leaves: Sequence[Tensor], route: str) -> str | None:
    """Why ``route`` cannot honour the precision policy for these parameters (``None``: it can).

    The policy (:func:`secorder._pytree.accumulation_dtype`): the user's function runs in the
    parameters' dtype, everything secorder sums runs in float32 for float16/bfloat16. Every
    operator honours it at its boundary (:func:`secorder._pytree.accumulating`); the structured
    engines (the sweeps, the per-layer and per-sample column routes, curvature propagation) square
    and sum their columns in the dtype of the recorded values, so for half-precision parameters
    the callers take an operator route instead (one-hot or randomized products), or refuse
    naming one, with this reason.
    """
    from secorder._pytree import HALF_DTYPES

    dtype = leaves[0].dtype if leaves else None
    if dtype not in HALF_DTYPES:
        return None
    return (
        f"the parameters are {dtype}, and {route} squares and sums its columns in the parameters' "
        "dtype (half-precision results are accumulated in float32 only through operator products)"
    )


def check_scalar_output(call: str, out: Any) -> Tensor:
    """Check that ``f`` returned a 0-dim real floating tensor and return it."""
    if not isinstance(out, Tensor):
        raise error(
            call,
            "f must return a scalar (0-dim) tensor",
            f"a {type(out).__name__}",
            "Return the loss as a tensor, e.g. torch.nn.functional.cross_entropy(...); "
            "if f returns (loss, aux), return only the loss.",
            cls=TypeError,
        )
    if out.dim() != 0:
        raise error(
            call,
            "f must return a scalar (0-dim) tensor",
            f"a tensor of shape {tuple(out.shape)}",
            "Reduce it with .sum() or .mean(); for the curvature of vector outputs through a loss "
            "use secorder.fisher_trace (GGN), or torch.func.jacrev for Jacobians.",
        )
    if not out.is_floating_point():
        raise error(
            call,
            "f must return a real floating-point scalar",
            f"dtype {out.dtype}",
            "Compute the loss in floating point (e.g. float32 or float64).",
            cls=TypeError,
        )
    return out


# -- policies shared by every entry point (see docs/architecture.rst, "Input policies") ------------
_CHECK_FINITE = [True]


def set_check_finite(enabled: bool, /) -> None:
    """Turn the non-finite checks of every secorder call on (the default) or off.

    With the checks on, every eager call checks its parameters, tensor arguments and
    results for NaN and Inf and raises naming what was non-finite and where (which leaf,
    how many entries; for a non-finite result whether the loss, the gradient or the
    second-order products were the first to go non-finite). Each check is one
    ``isfinite().all()`` per tensor, a device synchronization; turn them off for speed
    once a setup is known to be sound. Inside ``torch.func`` transforms values cannot be
    inspected and nothing is checked.

    Example:
        >>> import secorder
        >>> secorder.set_check_finite(False); secorder.check_finite_enabled()
        False
        >>> secorder.set_check_finite(True)
    """
    check_bool("set_check_finite(enabled)", "enabled", enabled)
    _CHECK_FINITE[0] = enabled


def check_finite_enabled() -> bool:
    """Whether the non-finite checks are on (:func:`set_check_finite`)."""
    return _CHECK_FINITE[0]


def inspectable(t: Tensor) -> bool:
    """Whether ``t``'s values can be read here (not under torch.compile or a torch.func transform)."""
    if torch.compiler.is_compiling():
        return False
    try:
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    except AttributeError:  # pragma: no cover - very old torch
        pass
    return t.device.type != "meta"


def nonfinite_report(t: Tensor, samples: bool = False) -> str | None:
    """``None`` if ``t`` is finite, else how many NaN/Inf entries it has and the first position
    (with ``samples``, also which indices along dimension 0, the samples of a batch)."""
    # one reduction first: a NaN or infinite entry makes the sum NaN or infinite, so a finite
    # sum proves every entry finite (an overflowing sum of finite entries takes the full check)
    if bool(torch.isfinite(t.sum(dtype=_sum_dtype(t.dtype)))):  # float16 sums in float32: no overflow
        return None
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    bad = (~finite).nonzero()
    first = tuple(int(i) for i in bad[0]) if t.dim() else ()
    where = f", first at index {first}" if first else ""
    if samples and t.dim():
        rows = sorted({int(i) for i in bad[:, 0]})
        where += f", in samples [{', '.join(str(r) for r in rows[:10])}{', ...' if len(rows) > 10 else ''}]"
    return f"{n_nan} NaN and {n_inf} infinite entries (of {t.numel()}){where}"


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    from secorder._pytree import accumulation_dtype

    return accumulation_dtype(dtype)


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """True when every entry of every tensor is finite, by one reduction per dtype and device:
    the sum of the per-tensor sums on the CPU (measured ~7x faster there than ``_foreach_norm``
    on a 784-128-128-10 MLP and its batch), elsewhere one ``_foreach_norm`` (L1, one launch for
    all tensors). A NaN/Inf entry makes the sum or norm NaN/Inf (Inf - Inf is NaN); False also
    when a sum of finite entries overflows (the caller then checks each tensor fully)."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), ts in groups.items():
        if dtype.is_complex or device.type == "cpu" or not hasattr(torch, "_foreach_norm"):
            sums = [t.sum(dtype=_sum_dtype(t.dtype)) for t in ts]
            if not bool(torch.isfinite(torch.stack(sums).sum()).all()):
                return False
            continue
        norms = torch._foreach_norm(ts, 1)
        if not bool(torch.isfinite(torch.stack(norms).sum())):
            return False
    return True


def check_finite_tree(call: str, name: str, tree: Any, fix: str | None = None, samples: bool = False) -> None:
    """Raise if a floating tensor leaf of ``tree`` holds NaN or Inf (when the checks are on)."""
    if not _CHECK_FINITE[0]:
        return
    with plain_kernels():  # secorder's own arithmetic: no TorchFunctionMode intercept per op
        _check_finite_tree(call, name, tree, fix, samples)


def _checked_leaves(leaves: Sequence[Any]) -> list[tuple[int, Tensor]]:
    """The (index, detached tensor) of the leaves the finite checks read."""
    return [
        (i, leaf.detach())
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, Tensor)
        and (leaf.is_floating_point() or leaf.is_complex())
        and inspectable(leaf)
        and leaf.numel() > 0
    ]


def _finite_candidates(trees: Sequence[Any]) -> list[Tensor]:
    from secorder._pytree import flatten

    return [leaf for tree in trees for _, leaf in _checked_leaves(flatten(tree)[0])]


def _check_finite_tree(call: str, name: str, tree: Any, fix: str | None, samples: bool) -> None:
    from secorder._pytree import _leaf_path, flatten

    leaves, spec = flatten(tree)
    checked = _checked_leaves(leaves)
    if _all_finite([leaf for _, leaf in checked]):  # one reduction for the whole tree
        return
    for i, leaf in checked:
        report = nonfinite_report(leaf, samples)
        if report is not None:
            raise error(
                call,
                f"{name} must be finite (secorder checks NaN/Inf everywhere; "
                "secorder.set_check_finite(False) turns the checks off)",
                f"{report} at {name}{_leaf_path(spec, i)}",
                fix
                or "Find where the NaN/Inf came from (a diverged training step, a log of 0, a division "
                "by 0) and fix it there; the curvature at a non-finite point is not defined."
                + (
                    f" float16 holds at most {torch.finfo(torch.float16).max:.0f}: an overflow there "
                    "is a common cause (bfloat16 has float32's range)."
                    if leaf.dtype == torch.float16
                    else ""
                ),
            )


def check_finite_result(
    call: str, quantity: str, value: Tensor, diagnose: Any = None, fix: str | None = None
) -> None:
    """Raise if a computed ``value`` is non-finite; ``diagnose()`` says where it first went wrong."""
    if not _CHECK_FINITE[0] or not isinstance(value, Tensor) or not inspectable(value):
        return
    with plain_kernels():
        report = nonfinite_report(value.detach())
    if report is None:
        return
    where = diagnose() if diagnose is not None else None
    raise error(
        call,
        f"the {quantity} must be finite (secorder checks NaN/Inf everywhere; "
        "secorder.set_check_finite(False) turns the checks off)",
        f"{report} in the {quantity}" + (f", from {where}" if where else ""),
        fix
        or "The parameters and inputs were finite: the loss overflowed or has a singular point "
        "here (a log or division at 0); compute in float64, or check the loss function.",
    )


def check_grad_context(call: str, leaves: Sequence[Tensor]) -> None:
    """Refuse contexts in which second derivatives would come out silently wrong.

    * ``torch.inference_mode()``, or parameters created under it: autograd records nothing,
      so every product would be 0;
    * ``torch.autocast``: the products would be computed in the autocast dtype (bfloat16,
      float16), with 2-3 significant digits, and results could come back in it.

    Nothing is checked while Dynamo traces (``torch.compile``): these queries break its graph,
    and a compiled call cannot run under inference mode's autograd-free dispatch anyway.
    """
    if torch.compiler.is_compiling():
        return
    if torch.is_inference_mode_enabled():
        raise error(
            call,
            "second derivatives need autograd, which records nothing under torch.inference_mode()",
            "a call inside torch.inference_mode()",
            "Call it outside the inference_mode block (use torch.no_grad() if you only want to "
            "avoid building a graph for your own forward passes; secorder enables grad itself).",
            cls=RuntimeError,
        )
    bad = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.is_inference()]
    if bad:
        raise error(
            call,
            "the parameters must not be inference tensors (autograd cannot differentiate "
            "tensors created under torch.inference_mode())",
            f"inference tensors at parameter leaves {bad[:10]}",
            "Clone them outside inference mode, e.g. {k: v.clone() for k, v in params.items()} "
            "after the with-block, or create them without inference_mode.",
            cls=RuntimeError,
        )
    devices = {leaf.device.type for leaf in leaves if isinstance(leaf, Tensor)} | {"cpu"}
    for dev in sorted(devices):
        try:
            on = torch.is_autocast_enabled(dev)
        except (TypeError, RuntimeError):  # pragma: no cover - device types without autocast
            on = False
        if on:
            dtype = torch.get_autocast_dtype(dev)
            raise error(
                call,
                "curvature is computed in the parameters' precision, not under torch.autocast "
                f"(second-order products in {dtype} keep 2-3 significant digits)",
                f"a call inside torch.autocast({dev!r}, dtype={dtype})",
                "Call it outside the autocast block, or inside it wrap the call in "
                f"torch.autocast({dev!r}, enabled=False).",
                cls=RuntimeError,
            )


def check_nonempty_batch(
    call: str, args: Sequence[Any], skip: int | None = None, names: Sequence[str] | None = None
) -> None:
    """Refuse an empty batch: a tensor argument (other than ``args[skip]``) with 0 samples."""
    from secorder._pytree import flatten

    for i, a in enumerate(args):
        if i == skip:
            continue
        for leaf in flatten(a)[0]:
            if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == 0:
                raise error(
                    call,
                    "every batch must hold at least one sample (the mean of a loss over 0 samples "
                    "is NaN, and its curvature is not defined)",
                    f"a tensor of shape {tuple(leaf.shape)} in {names[i] if names else f'args[{i}]'}",
                    "Skip empty batches before the call (e.g. drop_last=True, or `if len(x):`).",
                )


def check_requires_no_grad(call: str, leaves: Sequence[Tensor], route: str, fix: str) -> None:
    """Refuse a non-differentiable route when the result must carry a gradient."""
    if torch.is_grad_enabled() and any(isinstance(leaf, Tensor) and leaf.requires_grad for leaf in leaves):
        raise error(
            call,
            f"{route} returns values without a gradient, so a curvature regularizer built on it "
            "would silently lose its gradient",
            "parameters that require grad with grad mode on",
            fix + " If you do not need the gradient, pass detached parameters "
            "({k: p.detach() for k, p in params.items()}) or call it under torch.no_grad().",
        )


def check_param_names(
    call: str, expected: Sequence[str], given: Mapping[Any, Any], optional: Sequence[str] = ()
) -> None:
    """Refuse a params dict whose keys differ from the model's parameter names.

    ``expected`` (the trainable parameters) must all be there; ``optional`` names (frozen
    parameters, buffers) may be. A misspelled key would otherwise be ignored by
    ``functional_call`` (its curvature would be 0) and a missing one silently replaced by the
    model's own live parameter.
    """
    import difflib

    exp = set(expected)
    got = set(given)
    if got == exp:
        return
    unknown = sorted(str(k) for k in got - exp - set(optional))
    missing = sorted(exp - got)
    if not unknown and not missing:
        return
    exp = exp | set(optional)
    parts = []
    if unknown:
        hints = []
        for k in unknown[:5]:
            near = difflib.get_close_matches(k, sorted(exp), n=1, cutoff=0.5)
            stripped = k.removeprefix("module.").removeprefix("_orig_mod.")
            if stripped in exp:
                near = [stripped]
            hints.append(f"{k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        parts.append(f"unknown keys {', '.join(hints)}" + (" ..." if len(unknown) > 5 else ""))
    if missing:
        parts.append(f"missing keys {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
    prefixed = any(str(k).startswith(("module.", "_orig_mod.")) for k in unknown)
    raise error(
        call,
        "the keys of params must be the names of all the model's parameters that require grad "
        f"({len(expected)} names, e.g. {sorted(expected)[:3]}), optionally with frozen ones",
        "; ".join(parts),
        (
            "Strip the wrapper prefix: pass the unwrapped module (ddp.module, compiled._orig_mod) "
            "or {k.removeprefix('module.'): v for k, v in params.items()}."
            if prefixed
            else "Build params from the same model, e.g. the params returned by "
            "secorder.module_loss(model, loss), or {k: p.detach() for k, p in model.named_parameters()}; "
            "for the curvature of a subset, freeze the other parameters first (p.requires_grad_(False))."
        ),
    )


def _rng_snapshot(devices: set[torch.device]) -> list[tuple[str, Tensor]]:
    with torch._C._DisableFuncTorch():  # plain state tensors, also inside torch.func transforms
        states = [("cpu", torch.random.default_generator.get_state())]
        for dev in sorted(devices, key=str):
            if dev.type == "cuda":
                states.append((str(dev), torch.cuda.get_rng_state(dev)))
    return states


def _same_states(a: list[tuple[str, Tensor]], b: list[tuple[str, Tensor]]) -> bool:
    # past any dispatch mode too: under the engine's tape recorder the .numpy() calls would be
    # recorded as (constant) tape nodes, two per evaluation
    with torch._C._DisableFuncTorch(), torch._C._DisableTorchDispatch():
        return all((x.numpy() == y.numpy()).all() for (_, x), (_, y) in zip(a, b))


def _restore(states: list[tuple[str, Tensor]]) -> None:
    with torch._C._DisableFuncTorch():
        for dev, state in states:
            if dev == "cpu":
                torch.random.default_generator.set_state(state)
            else:
                torch.cuda.set_rng_state(state, dev)


def call_deterministic(call: str, fn: Any, leaves: Sequence[Tensor], *args: Any) -> Any:
    """``fn(*args)``, refusing a function that draws from PyTorch's global random generator.

    Dropout in train mode (or any ``torch.rand*`` inside ``f``) would make every product see a
    different function: the same ``generator`` would give different numbers, and the global
    generator would be consumed. secorder's own randomness comes only from the ``generator``
    argument, so any change of the global state during ``f`` is ``f``'s own. On refusal the
    global generator states are restored, so the failed call consumed nothing.
    """
    if torch.compiler.is_compiling():  # Dynamo traces f once; random ops are its concern there
        return fn(*args)
    devices = {leaf.device for leaf in leaves if isinstance(leaf, Tensor)}
    before = _rng_snapshot(devices)
    out = fn(*args)
    if not _same_states(_rng_snapshot(devices), before):
        _restore(before)
        raise error(
            call,
            "f must be a deterministic function of its arguments (secorder draws randomness only "
            "from the generator you pass; a random f makes every Hessian-vector product see a "
            "different function)",
            "an f that drew from PyTorch's global random generator (train-mode Dropout, "
            "torch.rand*, torch.bernoulli, ...)",
            "Call model.eval() (or set the dropout probability to 0) before computing curvature; "
            "for the curvature of one fixed dropout mask, draw the mask once outside f and pass it in.",
        )
    return out


@with_plain_kernels  # secorder's own checks: no TorchFunctionMode intercept per tensor op
def check_call_inputs(
    call: str, args: Sequence[Any], index: int, leaves: Sequence[Tensor], names: Sequence[str] | None = None
) -> None:
    """The call-time policies of every transform, on θ = ``args[index]`` (``leaves``) and the data.

    Context (inference mode, autocast: :func:`check_grad_context`), parameters with values
    (not all empty, not on the meta device), no empty batch (:func:`check_nonempty_batch`) and,
    in eager mode, finite parameters and data (:func:`check_finite_tree`).
    """
    check_grad_context(call, leaves)
    if sum(int(leaf.numel()) for leaf in leaves) == 0:
        raise error(
            call,
            f"args[{index}] must hold at least one parameter entry",
            f"only empty tensors (shapes {[tuple(leaf.shape) for leaf in leaves][:8]})",
            "Pass the parameters to differentiate; drop empty tensors from the pytree.",
        )
    if any(leaf.device.type == "meta" for leaf in leaves):
        raise error(
            call,
            f"args[{index}] must hold values (curvature is computed from numbers)",
            "tensors on the meta device",
            "Materialize the model first, e.g. model.to_empty(device='cpu') and load its state dict.",
        )
    label = list(names) if names is not None else [f"args[{i}]" for i in range(len(args))]
    check_nonempty_batch(call, args, index, label)
    if any(inspectable(leaf) for leaf in leaves) and _CHECK_FINITE[0]:
        if _all_finite(_finite_candidates(args)):  # parameters and data at once: one reduction
            return
        check_finite_tree(call, label[index], args[index])
        for i, a in enumerate(args):
            if i != index:
                check_finite_tree(call, label[i], a, samples=True)


def diagnose_nonfinite(fn: Any, leaves: Sequence[Tensor]) -> str:
    """Where a non-finite result of the curvature of ``fn(leaves)`` first went wrong."""
    inputs = [leaf.detach().requires_grad_(True) for leaf in leaves]
    with torch.enable_grad():
        loss = fn(inputs)
        report = nonfinite_report(loss.detach())
        if report is not None:
            return f"a non-finite loss ({float(loss.detach())})" + _overflow(leaves)
        if not loss.requires_grad:
            return "a finite loss"
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    bad = [i for i, g in enumerate(grads) if g is not None and nonfinite_report(g) is not None]
    if bad:
        return f"a finite loss but a non-finite gradient (at parameter leaves {bad[:10]})" + _overflow(leaves)
    return "a finite loss and gradient but non-finite second-order products" + _overflow(leaves)


def _overflow(leaves: Sequence[Tensor]) -> str:
    """The likely cause of a non-finite product of float16 parameters: the format's narrow range."""
    if not leaves or leaves[0].dtype != torch.float16:
        return ""
    big = torch.finfo(torch.float16).max
    return (
        f"; the parameters are float16, whose largest finite value is {big:.0f}: the products "
        "overflowed it (bfloat16 has float32's range, or compute in float32)"
    )


def check_module_call(
    call: str, model: Any, params: Any, leaves: Sequence[Tensor], data: Sequence[Any]
) -> None:
    """The call-time policies of the ``nn.Module`` entry points (Fisher, module Hessian).

    The params keys against ``model``'s trainable parameter names (:func:`check_param_names`),
    then :func:`check_call_inputs` on ``(params, *data)``.
    """
    if model is not None:
        check_module_names(call, model, params)
    check_call_inputs(call, [params, *data], 0, leaves, ["params", "inputs", "targets"][: 1 + len(data)])


@contextlib.contextmanager
def finite_checks(enabled: bool) -> Iterator[None]:
    """Within the block, the non-finite checks are ``enabled`` (then restored).

    For entry points that check their own results with more context (``secorder.data``
    names the batch).
    """
    old = _CHECK_FINITE[0]
    _CHECK_FINITE[0] = bool(enabled)
    try:
        yield
    finally:
        _CHECK_FINITE[0] = old


def check_deterministic_module(call: str, model: Any) -> None:
    """Refuse a module with train-mode Dropout (a mask redrawn on every evaluation)."""
    from torch import nn

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise error(
                call,
                "the model must be deterministic: curvature is taken of one fixed function",
                f"{type(m).__name__}(p={m.p}) in train mode at '{name}'",
                "Call model.eval() first (a dropout mask is redrawn on every pass).",
            )


def check_module_names(call: str, model: Any, params: Any) -> None:
    """:func:`check_param_names` of a params dict against ``model``'s trainable parameters
    (frozen parameter and buffer names may be added)."""
    if isinstance(params, Mapping):
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
        check_param_names(call, names, params, [*frozen, *(k for k, _ in model.named_buffers())])

"""Argument checks shared by every public entry point (one message format, see _errors)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor

from secorder._errors import error

T = TypeVar("T")

__all__ = [
    "check_argnums",
    "check_bool",
    "check_callable",
    "check_method",
    "check_num_probes",
    "check_same_dtype_device",
    "check_scalar_output",
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

"""Parameter subsets by name: the ``select=`` option of every transform that takes a params dict.

``select`` picks the parameters the curvature is taken over; the others are held fixed
at their values (they still enter every evaluation) and results contain only the selected
entries, in the params dict's key order. Accepted forms:

* a glob pattern (``"fc2.*"``, ``"*.bias"``; :func:`fnmatch.fnmatchcase`), or a list or tuple of
  them (a name is selected when any pattern matches);
* a compiled regular expression (``re.compile(r"layers\\.[23]\\.")``; ``search`` semantics);
* a predicate ``name -> bool``.

A selection that matches nothing, or params that are not a dict keyed by names, is an error
naming the call. This module is the one place selections are parsed and applied.

Example:
    >>> import torch
    >>> p = {"fc1.weight": torch.ones(2), "fc1.bias": torch.ones(1), "fc2.weight": torch.ones(3)}
    >>> sel = check_select("demo", "fc1.*")
    >>> chosen, restore = split("demo", sel, p)
    >>> list(chosen)
    ['fc1.weight', 'fc1.bias']
    >>> list(restore({k: 2 * v for k, v in chosen.items()}).values())
    [tensor([2., 2.]), tensor([2.]), tensor([1., 1., 1.])]
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from typing import Any

from secorder._errors import error

__all__ = ["Selector", "check_select", "split"]

Selector = Callable[[str], bool]


def check_select(call: str, select: object) -> Selector | None:
    """Validate ``select`` at construction; return a predicate on names (``None``: everything)."""
    if select is None:
        return None
    if isinstance(select, str):
        pattern = select
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    if isinstance(select, (list, tuple)) and select and all(isinstance(s, str) for s in select):
        patterns = tuple(select)
        return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)
    if isinstance(select, re.Pattern):
        regex = select
        return lambda name: regex.search(name) is not None
    if callable(select):
        predicate = select
        return lambda name: bool(predicate(name))
    raise error(
        call,
        "select must be a glob pattern, a non-empty list of them, a compiled regular expression or "
        "a predicate name -> bool",
        f"{select!r}",
        "Pass e.g. select='fc2.*', select=['*.weight'], select=re.compile(r'layers\\.1\\.') or "
        "select=lambda name: 'lora' in name.",
        cls=TypeError,
    )


def split(call: str, selector: Selector | None, params: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(selected, restore)``: the selected entries of ``params`` (dict order kept), and
    ``restore(new_selected)``, the full dict again in ``params``' key order with the others fixed.

    With ``selector=None`` returns ``params`` unchanged and the identity (any pytree).
    """
    if selector is None:
        return params, lambda p: p
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise error(
            call,
            "select= picks parameters by name, so params must be a dict keyed by parameter names",
            f"params of type {type(params).__name__}",
            "Pass a dict such as {k: p.detach() for k, p in model.named_parameters()}, or drop select=.",
            cls=TypeError,
        )
    chosen = {k: v for k, v in params.items() if selector(k)}
    if not chosen:
        names = list(params)
        shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
        raise error(
            call,
            "select= must match at least one parameter name",
            f"a selection matching none of the {len(names)} names [{shown}]",
            "Check the pattern against dict(model.named_parameters()) (globs match the whole name: "
            "use 'fc2.*', not 'fc2').",
        )
    full = dict(params)

    def restore(new: Any) -> dict[str, Any]:
        return {k: new[k] if k in chosen else v for k, v in full.items()}

    return chosen, restore

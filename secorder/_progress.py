"""Optional tqdm progress bars (tqdm is an optional dependency)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from secorder._errors import error

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable[Any], enabled: bool, call: str, desc: str) -> Iterable[Any]:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (tqdm is an optional dependency)."""
    if not enabled:
        return iterable
    try:
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError as exc:
        raise error(
            call,
            "progress=True needs the optional dependency tqdm",
            "an ImportError when importing tqdm",
            "Install it (pip install tqdm) or pass progress=False.",
            cls=ImportError,
        ) from exc
    total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
    return tqdm(iterable, total=total, desc=desc, leave=False)

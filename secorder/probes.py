"""Probe distributions for randomized estimators, drawn in bounded chunks.

Every draw takes an explicit :class:`torch.Generator` (or ``None`` for the global
generator, which is what ``torch.func.vmap(..., randomness="different")`` needs).
Probe ``i`` is drawn from the generator by its own call, in order, so the probes
-- and hence every estimate -- depend on the generator state and the number of
probes, not on ``chunk_size``.

Distributions (all isotropic: E[v vᵀ] = I):

* ``"rademacher"``: independent ±1 entries. Drawn as random bytes expanded through a
  256×8 sign table, so one random byte yields eight entries (about 8× cheaper than
  ``randint`` per entry).
* ``"gaussian"``: independent standard normal entries.
* ``"sphere"``: uniform on the sphere of radius √P (used by some estimators).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from secorder._errors import error

__all__ = ["DISTRIBUTIONS", "check_distribution", "check_generator", "chunks", "draw"]

DISTRIBUTIONS = ("rademacher", "gaussian", "sphere")

_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def check_distribution(call: str, distribution: object) -> str:
    """Validate a distribution name, raising a clear error for unknown ones."""
    if distribution not in DISTRIBUTIONS:
        raise error(
            call,
            f"distribution must be one of {', '.join(repr(d) for d in DISTRIBUTIONS)}",
            f"{distribution!r}",
            'Use distribution="rademacher" (lowest variance for Hutchinson) or "gaussian".',
        )
    return str(distribution)


def check_generator(call: str, generator: object, device: torch.device) -> torch.Generator | None:
    """Check that ``generator`` is ``None`` or a :class:`torch.Generator` on ``device``'s type."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise error(
            call,
            "generator must be a torch.Generator or None",
            f"{type(generator).__name__}",
            "Pass generator=torch.Generator(device).manual_seed(seed).",
            cls=TypeError,
        )
    if generator.device.type != device.type:
        raise error(
            call,
            "the generator must live on the same device type as the parameters",
            f"a generator on {generator.device} for parameters on {device}",
            f"Create it with torch.Generator(device={str(device)!r}).manual_seed(seed).",
        )
    return generator


def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (dtype, device)
    table = _SIGN_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = (bits * 2 - 1).to(dtype=dtype, device=device)
        _SIGN_TABLES[key] = table
    return table


def _draw_one(
    size: int,
    distribution: str,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    if distribution == "rademacher":
        nbytes = (size + 7) // 8
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator, device=device)
        return _sign_table(dtype, device)[raw.long()].reshape(-1)[:size]
    v = torch.randn(size, generator=generator, dtype=dtype, device=device)
    if distribution == "sphere":
        v = v * (size**0.5 / torch.linalg.vector_norm(v))
    return v


def draw(
    num: int,
    size: int,
    distribution: str,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Draw ``num`` probes of length ``size`` as the rows of a ``(num, size)`` tensor.

    Row ``i`` comes from the ``i``-th call on ``generator``, so drawing 2 then 3 rows
    gives the same 5 rows as drawing 5 at once.
    """
    if distribution == "rademacher":
        # One generator call per probe (chunk invariance), one table gather for all.
        nbytes = (size + 7) // 8
        raw = torch.stack(
            [
                torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator, device=device)
                for _ in range(num)
            ]
        )
        table = _sign_table(dtype, device)
        signs = table.index_select(0, raw.reshape(-1).long()).reshape(num, nbytes * 8)
        return signs if nbytes * 8 == size else signs[:, :size].contiguous()
    rows = [_draw_one(size, distribution, generator, dtype, device) for _ in range(num)]
    return torch.stack(rows)


def chunks(total: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` ranges covering ``range(total)`` in pieces of ``chunk_size``."""
    step = total if chunk_size is None else max(1, int(chunk_size))
    step = max(step, 1)
    for start in range(0, total, step):
        yield start, min(start + step, total)

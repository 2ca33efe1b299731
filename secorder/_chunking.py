"""Default chunk sizes: how many probe or one-hot rows to push through an operator at once.

Rule: a chunk of ``c`` rows costs about ``c · P · itemsize · ROW_OVERHEAD`` bytes for
the probes, the products and the intermediate tangents of the batched products (the
per-row activations of a model are not known in advance, so ``ROW_OVERHEAD`` is a
deliberately generous constant). ``c`` is the largest count that fits
``memory_budget()`` bytes, at least 1 and at most the number of rows requested.
The budget defaults to 1 GiB; change it with :func:`set_memory_budget` or pass
``chunk_size`` explicitly.

Within the budget, chunks are also capped at ``THROUGHPUT_BYTES`` (8 MiB) of probe
entries: measured on CPU (benchmarks/RESULTS.md), 100 probes of a 118k-parameter MLP
ran about 2× faster in chunks of 10–25 than all at once, because the chunk's tangents
stay in cache.
"""

from __future__ import annotations

from secorder._errors import error

__all__ = [
    "ROW_OVERHEAD",
    "THROUGHPUT_BYTES",
    "check_chunk_size",
    "default_chunk_size",
    "memory_budget",
    "set_memory_budget",
]

ROW_OVERHEAD = 8
THROUGHPUT_BYTES = 8 << 20
_BUDGET = [1 << 30]


def memory_budget() -> int:
    """The memory budget in bytes used to pick default chunk sizes."""
    return _BUDGET[0]


def set_memory_budget(num_bytes: int) -> None:
    """Set the memory budget (bytes) used to pick default chunk sizes."""
    if not isinstance(num_bytes, int) or isinstance(num_bytes, bool) or num_bytes < 1:
        raise error(
            "set_memory_budget(num_bytes)",
            "num_bytes must be a positive int",
            f"{num_bytes!r}",
            "Pass e.g. 2**30 for 1 GiB.",
        )
    _BUDGET[0] = num_bytes


def default_chunk_size(rows: int, size: int, itemsize: int) -> int:
    """Rows per chunk for ``rows`` vectors of ``size`` entries of ``itemsize`` bytes."""
    row_bytes = max(1, size * itemsize)
    fits = min(memory_budget() // (row_bytes * ROW_OVERHEAD), max(1, THROUGHPUT_BYTES // row_bytes))
    return max(1, min(rows, fits))


def check_chunk_size(call: str, chunk_size: object) -> int | None:
    """Validate ``chunk_size`` (``None`` or an int >= 1)."""
    if chunk_size is None:
        return None
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise error(
            call,
            "chunk_size must be None (automatic) or an int >= 1",
            f"{chunk_size!r}",
            "Pass chunk_size=None to size chunks from the memory budget, or a positive int.",
        )
    return chunk_size

"""Uniform error messages: the call, the contract, what was received, and a fix."""

from __future__ import annotations

__all__ = ["SecorderError", "error"]


class SecorderError(ValueError):
    """Raised for invalid input to a secorder call.

    A subclass of :class:`ValueError`, so ``except ValueError`` keeps working.
    """


def error(
    call: str, contract: str, received: str, fix: str, cls: type[Exception] = SecorderError
) -> Exception:
    """Build an exception whose message reads ``call: contract, but received ... . Fix``.

    Args:
        call: the call form, e.g. ``"hessian_trace(f)(*args)"``.
        contract: what the call expects, e.g. ``"f must return a scalar tensor"``.
        received: what it got instead.
        fix: how to correct the call.
        cls: the exception class (``SecorderError`` by default).

    Returns:
        The exception, for the caller to ``raise``.
    """
    return cls(f"{call}: {contract}, but received {received}. {fix}")

"""Write the offline fallback intersphinx inventories (``python.inv``, ``torch.inv``).

Sphinx's inventory format version 2: four header lines, then zlib-compressed lines
``name domain:role priority uri display-name`` (``$`` in the uri stands for the name,
``-`` as display name for the name itself). Only the objects the docs link to are
listed; online builds use the projects' full inventories. Run from anywhere:
``python docs/_inventories/make_inventories.py``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

PYTHON = (
    [
        (name, "py:exception", "library/exceptions.html#$")
        for name in ("ValueError", "TypeError", "RuntimeError", "NotImplementedError")
    ]
    + [
        (name, "py:class", "library/stdtypes.html#$")
        for name in ("list", "tuple", "dict", "int", "float", "str")
    ]
    + [
        ("bool", "py:class", "library/functions.html#$"),
        ("functools.partial", "py:function", "library/functools.html#$"),
        ("functools.wraps", "py:function", "library/functools.html#$"),
        ("doctest", "py:module", "library/doctest.html#module-doctest"),
    ]
)

TORCH = [
    ("torch.Tensor", "py:class", "tensors.html#$"),
    ("torch.dtype", "py:class", "tensor_attributes.html#$"),
    ("torch.device", "py:class", "tensor_attributes.html#$"),
    ("torch.Generator", "py:class", "generated/$.html#$"),
    ("torch.nn.Module", "py:class", "generated/$.html#$"),
    ("torch.nn.MSELoss", "py:class", "generated/$.html#$"),
    ("torch.nn.CrossEntropyLoss", "py:class", "generated/$.html#$"),
    ("torch.nn.BatchNorm1d", "py:class", "generated/$.html#$"),
    ("torch.nn.functional.mse_loss", "py:function", "generated/$.html#$"),
    ("torch.nn.functional.cross_entropy", "py:function", "generated/$.html#$"),
    ("torch.no_grad", "py:class", "generated/$.html#$"),
    ("torch.autograd.grad", "py:function", "generated/$.html#$"),
    ("torch.autograd.functional.hessian", "py:function", "generated/$.html#$"),
    ("torch.func.vmap", "py:function", "generated/$.html#$"),
    ("torch.func.grad", "py:function", "generated/$.html#$"),
    ("torch.func.jvp", "py:function", "generated/$.html#$"),
    ("torch.func.vjp", "py:function", "generated/$.html#$"),
    ("torch.func.jacrev", "py:function", "generated/$.html#$"),
    ("torch.func.hessian", "py:function", "generated/$.html#$"),
    ("torch.func.functional_call", "py:function", "generated/$.html#$"),
    ("torch.func.stack_module_state", "py:function", "generated/$.html#$"),
]


def write(path: Path, project: str, version: str, entries: list[tuple[str, str, str]]) -> None:
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in entries)
    path.write_bytes(header.encode() + zlib.compress(body.encode()))


if __name__ == "__main__":
    write(HERE / "python.inv", "Python", "3", PYTHON)
    write(HERE / "torch.inv", "PyTorch", "stable", TORCH)

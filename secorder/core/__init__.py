"""The eager API in torch_secorder's shape: a closure ``func()`` and a list of tensors.

Code written for torch_secorder 0.0.1 runs after replacing ``torch_secorder`` by
``secorder``: the same modules, names, signatures and defaults, with exact numbers
and batched products. Every function here is a thin wrapper: it builds an operator
over the autograd graph of ``func()`` (:mod:`secorder.core._closure`) and hands it to
the estimators of :mod:`secorder.estimators`, the same ones the ``torch.func``
transforms (:func:`secorder.hessian_trace`, ...) use.

Submodules: :mod:`secorder.core.hessian_trace`, :mod:`secorder.core.hessian_diagonal`,
:mod:`secorder.core.hvp`.
"""

from secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from secorder.core.hessian_trace import hessian_trace, model_hessian_trace
from secorder.core.hvp import exact_hvp, gauss_newton_product, model_hvp

__all__ = [
    # Hessian-vector products
    "exact_hvp",
    "model_hvp",
    "gauss_newton_product",
    # Hessian diagonal
    "hessian_diagonal",
    "model_hessian_diagonal",
    # Hessian trace (exact; Hutchinson is secorder.core.hvp.hessian_trace)
    "hessian_trace",
    "model_hessian_trace",
]

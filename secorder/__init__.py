"""secorder: second-order quantities for PyTorch as composable ``torch.func`` transforms."""

from secorder._chunking import memory_budget, set_memory_budget
from secorder._errors import SecorderError
from secorder.data import (
    dataset_fisher_diagonal,
    dataset_fisher_trace,
    dataset_hessian_diagonal,
    dataset_hessian_trace,
)

# Fisher / GGN / empirical Fisher transforms
from secorder.fisher import FisherPath, fisher_diagonal, fisher_operator, fisher_trace
from secorder.hessian import hessian_diagonal, hessian_operator, hessian_trace, hvp

# exact Hessian diagonal of nn.Module losses (structured sweep, curvature propagation)
from secorder.module_hessian import SweepInfo, module_hessian_diagonal, module_hessian_trace
from secorder.modules import module_loss

__version__ = "0.1.0"

__all__ = [
    # Hessian transforms
    "hvp",
    "hessian_trace",
    "hessian_diagonal",
    "hessian_operator",
    # Fisher / GGN / empirical Fisher transforms
    "fisher_trace",
    "fisher_diagonal",
    "fisher_operator",
    "FisherPath",
    # whole datasets (secorder.data)
    "dataset_hessian_trace",
    "dataset_hessian_diagonal",
    "dataset_fisher_trace",
    "dataset_fisher_diagonal",
    # nn.Module helpers
    "module_loss",
    # exact Hessian diagonal of nn.Module losses (structured sweep, curvature propagation)
    "module_hessian_diagonal",
    "module_hessian_trace",
    "SweepInfo",
    # configuration and errors
    "memory_budget",
    "set_memory_budget",
    "SecorderError",
]

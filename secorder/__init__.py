"""secorder: second-order quantities for PyTorch as composable ``torch.func`` transforms."""

from secorder._chunking import memory_budget, set_memory_budget
from secorder._errors import SecorderError
from secorder.hessian import (
    hessian_diagonal,
    hessian_eigenvalues,
    hessian_frobenius_norm_sq,
    hessian_operator,
    hessian_spectral_density,
    hessian_trace,
    hessian_trace_adaptive,
    hvp,
)
from secorder.modules import module_loss
from secorder.spectra import lanczos_eigenvalues, plot_spectral_density, spectral_density

__version__ = "0.1.0"

__all__ = [
    # Hessian transforms
    "hvp",
    "hessian_trace",
    "hessian_diagonal",
    "hessian_operator",
    # Hessian: stopping on the standard error, squared Frobenius norm
    "hessian_trace_adaptive",
    "hessian_frobenius_norm_sq",
    # spectra: transforms, and operator-level functions for any operator (Hessian, GGN, Fisher)
    "hessian_eigenvalues",
    "hessian_spectral_density",
    "lanczos_eigenvalues",
    "spectral_density",
    "plot_spectral_density",
    # nn.Module helpers
    "module_loss",
    # configuration and errors
    "memory_budget",
    "set_memory_budget",
    "SecorderError",
]

"""secorder: second-order quantities for PyTorch as composable ``torch.func`` transforms."""

from secorder._chunking import memory_budget, set_memory_budget
from secorder._cost import exact_budget, set_exact_budget
from secorder._errors import SecorderError
from secorder._validate import check_finite_enabled, set_check_finite
from secorder.data import (
    dataset_fisher_diagonal,
    dataset_fisher_trace,
    dataset_hessian_diagonal,
    dataset_hessian_trace,
)

# Fisher / GGN / empirical Fisher transforms
from secorder.fisher import FisherPath, fisher_diagonal, fisher_operator, fisher_trace
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

# exact Hessian diagonal of nn.Module losses (structured sweep, curvature propagation)
from secorder.module_hessian import SweepInfo, module_hessian_diagonal, module_hessian_trace
from secorder.modules import module_loss

# PDE operators of a network at a batch of points (collapsed Taylor mode)
from secorder.pde import PDEInfo, biharmonic, laplacian

# spectra of any operator (Hessian, GGN, Fisher): Lanczos, stochastic Lanczos quadrature
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
    # spectra: Hessian transforms, and operator-level functions for any operator
    # (e.g. lanczos_eigenvalues(fisher_operator(model, "cross_entropy")(params, x, y)[0], k=5))
    "hessian_eigenvalues",
    "hessian_spectral_density",
    "lanczos_eigenvalues",
    "spectral_density",
    "plot_spectral_density",
    # PDE operators at a batch of points: Laplacian (exact, stochastic, weighted), biharmonic
    "laplacian",
    "biharmonic",
    "PDEInfo",
    # nn.Module helpers
    "module_loss",
    # exact Hessian diagonal of nn.Module losses (structured sweep, curvature propagation)
    "module_hessian_diagonal",
    "module_hessian_trace",
    "SweepInfo",
    # configuration and errors
    "memory_budget",
    "set_memory_budget",
    "exact_budget",
    "set_exact_budget",
    "set_check_finite",
    "check_finite_enabled",
    "SecorderError",
]

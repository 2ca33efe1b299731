"""Hessian spectrum of a small classifier: top eigenvalues (Lanczos), density (SLQ)."""

import matplotlib.pyplot as plt
import torch
from torch import nn

import secorder

torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
).double()
x, y = torch.randn(256, 10, dtype=torch.float64), torch.randint(0, 3, (256,))
f, params = secorder.module_loss(model, nn.functional.cross_entropy)

gen = torch.Generator().manual_seed(0)
top = secorder.hessian_eigenvalues(f, k=5)(params, x, y, generator=gen)
grid, density = secorder.hessian_spectral_density(f, num_runs=8, num_steps=60)(
    params, x, y, generator=gen
)

fig, ax = plt.subplots()
secorder.plot_spectral_density(grid, density, ax=ax, eigenvalues=top)
ax.set_title(
    f"{sum(p.numel() for p in params.values())}-parameter MLP; red: top 5 eigenvalues"
)

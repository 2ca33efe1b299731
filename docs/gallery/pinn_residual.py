"""A Poisson PINN trained with secorder.laplacian, and its residual (docs/pinn.rst).

Run by matplotlib's plot directive when the documentation is built
(about 5 s on one CPU core).
"""

import math

import matplotlib.pyplot as plt
import torch

import secorder

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(2, 32),
    torch.nn.Tanh(),
    torch.nn.Linear(32, 32),
    torch.nn.Tanh(),
    torch.nn.Linear(32, 1),
)
params = dict(model.named_parameters())


def u(params, x):
    net = torch.func.functional_call(model, params, (x,)).squeeze(-1)
    bubble = x[:, 0] * (1 - x[:, 0]) * x[:, 1] * (1 - x[:, 1])  # zero on the boundary
    return bubble * net


def f(x):
    return 2 * math.pi**2 * torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])


lap = secorder.laplacian(u)
gen = torch.Generator().manual_seed(0)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
losses = []
for _ in range(300):
    x = torch.rand(128, 2, generator=gen)
    loss = ((-lap(params, x) - f(x)) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())

g = torch.linspace(0, 1, 60)
grid = torch.cartesian_prod(g, g)
with torch.no_grad():
    residual = (-lap(params, grid) - f(grid)).abs().reshape(60, 60)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
ax1.semilogy(losses)
ax1.set_xlabel("Adam step")
ax1.set_ylabel("mean (−Δu − f)² over 128 random points")
ax1.set_title("training loss")
im = ax2.imshow(residual.T.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
fig.colorbar(im, ax=ax2)
ax2.set_title("|−Δu − f| after 300 steps")
ax2.set_xlabel("x₁")
ax2.set_ylabel("x₂")
fig.tight_layout()

"""A diagonal Laplace approximation of a small regression network (exact GGN diagonal).

Posterior precision = GGN diagonal / σ² + prior precision (the GGN of the summed squared
error is 2 JᵀJ, hence the factor 1/2); predictive band from 200 weight samples.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import secorder

torch.manual_seed(0)
x = (
    torch.cat([torch.linspace(-3, -1, 20), torch.linspace(1, 3, 20)])
    .double()
    .unsqueeze(1)
)
y = torch.sin(2 * x) + 0.1 * torch.randn_like(x)
model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)).double()
opt = torch.optim.Adam(model.parameters(), lr=0.02)
for _ in range(600):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y, reduction="sum").backward()
    opt.step()

params = {k: v.detach() for k, v in model.named_parameters()}
noise_var, prior_prec = 0.1**2, 1.0
ggn = secorder.fisher_diagonal(model, "mse", reduction="sum")(params, x, y)
post_var = {k: 1 / (g / (2 * noise_var) + prior_prec) for k, g in ggn.items()}

grid = torch.linspace(-5, 5, 200, dtype=torch.float64).unsqueeze(1)
gen = torch.Generator().manual_seed(0)
samples = torch.stack(
    [
        torch.func.functional_call(
            model,
            {
                k: v
                + post_var[k].sqrt()
                * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                for k, v in params.items()
            },
            (grid,),
        ).squeeze(1)
        for _ in range(200)
    ]
)
mean, std = samples.mean(0), samples.std(0)

fig, ax = plt.subplots()
g = grid.squeeze(1)
ax.fill_between(
    g, mean - 2 * std, mean + 2 * std, alpha=0.3, label="±2 std (diagonal Laplace)"
)
ax.plot(g, model(grid).detach().squeeze(1), label="MAP fit")
ax.plot(x.squeeze(1), y.squeeze(1), "k.", label="data")
ax.set_ylim(-3, 3)
ax.set_title("Diagonal Laplace from fisher_diagonal(model, 'mse')")
ax.legend(loc="lower left")

"""secorder in a few seconds: exact Hessian trace, Hutchinson with its stderr, the diagonal."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import secorder

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    f, params = secorder.module_loss(model, nn.functional.cross_entropy)
    print(f"model: 20-32-5 tanh MLP, {sum(p.numel() for p in params.values())} parameters, batch 64")

    exact = secorder.hessian_trace(f)(params, x, y)
    print(f"exact trace of the Hessian:        {exact.item():.5f}")

    est, err = secorder.hessian_trace(f, num_probes=200, with_stderr=True)(
        params, x, y, generator=torch.Generator().manual_seed(0)
    )
    print(f"Hutchinson, 200 Rademacher probes: {est.item():.5f} ± {err.item():.5f} (stderr)")
    print(f"  |error| / stderr = {abs(est - exact).item() / err.item():.2f}")

    diag = secorder.hessian_diagonal(f)(params, x, y)
    flat = torch.cat([d.reshape(-1) for d in diag.values()])
    names = [f"{k}[{i}]" for k, d in diag.items() for i in range(d.numel())]
    top = torch.topk(flat, 5)
    print("largest Hessian diagonal entries:")
    for value, index in zip(top.values, top.indices):
        print(f"  {names[index]:<16} {value.item():.5f}")
    print(f"sum of the diagonal = trace: {bool(torch.isclose(flat.sum(), exact))}")


if __name__ == "__main__":
    main()

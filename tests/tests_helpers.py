from __future__ import annotations

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def train_steps(
    model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int
) -> None:
    """Least squares on fixed random data: a deterministic stand-in for training."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(16, model.in_features, generator=gen).to(device)
        y = torch.randn(16, model.out_features, generator=gen).to(device)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

"""Small models and a training loop for the lab's experiments (a client of optiscope)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import optiscope

from .data import Dataset


def mlp(
    data: Dataset, hidden: int, p_drop: float, seed: int, depth: int = 2
) -> nn.Sequential:
    """ReLU MLP with an ``optiscope.Dropout`` after each hidden layer."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = data.n_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(), optiscope.Dropout(p_drop)]
        width = hidden
    layers.append(nn.Linear(width, data.n_classes))
    return nn.Sequential(*layers)


@dataclass
class History:
    """Per-step series of one training run."""

    minibatch_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(
        default_factory=list
    )  # full training set, every step


def minibatches(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` index sets, reshuffling the data each epoch."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=gen)
        out += [order[i : i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Dataset,
    *,
    steps: int,
    batch: int,
    seed: int,
    track_train_loss: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> History:
    history = History()
    model.train()
    for step, rows in enumerate(minibatches(len(data.y_train), batch, steps, seed)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(
            model(data.x_train[rows]), data.y_train[rows]
        )
        loss.backward()
        opt.step()
        history.minibatch_loss.append(loss.item())
        if track_train_loss:
            history.train_loss.append(full_loss(model, data.x_train, data.y_train))
            model.train()
        if on_step is not None:
            on_step(step)
    model.eval()
    return history


@torch.no_grad()
def full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return nn.functional.cross_entropy(model(x), y).item()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).double().mean().item()


@torch.no_grad()
def monte_carlo_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int, seed: int
) -> float:
    """Accuracy of the average softmax over ``passes`` stochastic (training-mode) passes."""
    torch.manual_seed(seed)
    model.train()
    probs = sum(model(x).softmax(1) for _ in range(passes))
    model.eval()
    return (probs.argmax(1) == y).double().mean().item()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

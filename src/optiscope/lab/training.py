"""Many small independent nets trained as one batched computation.

An :class:`Ensemble` holds ``runs`` MLPs with the same shape, one slice of each
weight tensor per run (``(runs, fan_in, fan_out)``), so a seed sweep is one
``torch.bmm`` per layer instead of a Python loop. The loss is the sum over runs
of each run's own mean loss, so each run's gradient is exactly the one it would
get alone, and Momentum and Adam are element-wise: every run is an independent
training run, stepped by optiscope's optimizers like any other model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

import optiscope

from .data import Dataset


class Ensemble(nn.Module):
    """``runs`` ReLU MLPs, each with an ``optiscope.Dropout`` after every hidden layer.

    Initialised as ``nn.Linear`` is (uniform in ±1/√fan_in), from ``seed``.
    Inputs are ``(runs, batch, d)``, or ``(batch, d)`` shared by every run;
    outputs are ``(runs, batch, classes)``.
    """

    def __init__(
        self,
        runs: int,
        sizes: Sequence[int],
        p_drop: float,
        seed: int,
        dropout: Callable[[float], nn.Module] = optiscope.Dropout,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.runs = runs
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(sizes):
            bound = 1 / math.sqrt(fan_in)
            w = (torch.rand(runs, fan_in, fan_out, generator=gen) * 2 - 1) * bound
            b = (torch.rand(runs, 1, fan_out, generator=gen) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
        self.drops = nn.ModuleList(dropout(p_drop) for _ in sizes[1:-1])

    def hidden(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Activations after hidden layer ``layer``'s ReLU and dropout: (runs, batch, h)."""
        if x.dim() == 2:
            x = x.expand(self.runs, *x.shape)
        for i in range(layer + 1):
            x = self.drops[i](
                torch.relu(torch.baddbmm(self.biases[i], x, self.weights[i]))
            )
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The output layer applied to the last hidden layer's activations."""
        return torch.baddbmm(self.biases[-1], h, self.weights[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x, len(self.drops) - 1))


def mlp(data: Dataset, runs: int, hidden: int, depth: int, p_drop: float, seed: int):
    sizes = [data.n_features, *[hidden] * depth, data.n_classes]
    return Ensemble(runs, sizes, p_drop, seed)


def batch_indices(n: int, runs: int, batch: int, steps: int, seed: int):
    """``steps`` index sets of shape (runs, batch): each run reshuffles every epoch."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch)
    done = 0
    while done < steps:
        order = torch.argsort(torch.rand(runs, n, generator=gen), dim=1)
        for i in range(min(per_epoch, steps - done)):
            yield order[:, i * batch : (i + 1) * batch]
            done += 1


def run_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-run mean cross-entropy, (runs,): x (runs, batch, d) or (batch, d)."""
    logits = model(x)  # (runs, batch, classes)
    runs, batch = logits.shape[:2]
    target = y.expand(runs, batch) if y.dim() == 1 else y
    losses = nn.functional.cross_entropy(
        logits.reshape(runs * batch, -1), target.reshape(-1), reduction="none"
    )
    return losses.view(runs, batch).mean(1)


def train(
    models: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    data: Dataset,
    *,
    steps: int,
    batch: int,
    seed: int,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Train every model on the same per-run minibatches: run r of each model sees
    the same rows at every step, so comparisons across models are paired.

    ``penalty(model)`` is added to each run's loss, e.g. an L2 term, (runs,).
    """
    runs = models[0].runs
    for model in models:
        model.train()
    n = len(data.y_train)
    for step, rows in enumerate(batch_indices(n, runs, batch, steps, seed)):
        x, y = data.x_train[rows], data.y_train[rows]
        for opt in optimizers:
            opt.zero_grad()
        total = sum(
            (run_losses(m, x, y) + (penalty(m) if penalty else 0)).sum() for m in models
        )
        total.backward()
        for opt in optimizers:
            opt.step()
        if on_step is not None:
            on_step(step)
    for model in models:
        model.eval()


@torch.no_grad()
def losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-run mean cross-entropy in eval mode, (runs,)."""
    model.eval()
    return run_losses(model, x, y)


@torch.no_grad()
def accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-run accuracy in eval mode, (runs,) float64."""
    model.eval()
    return (model(x).argmax(-1) == y).double().mean(-1)


@torch.no_grad()
def monte_carlo_accuracies(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int, seed: int
) -> torch.Tensor:
    """Per-run accuracy of the mean softmax over ``passes`` training-mode passes."""
    torch.manual_seed(seed)
    model.train()
    probs = sum(model(x).softmax(-1) for _ in range(passes))
    model.eval()
    return (probs.argmax(-1) == y).double().mean(-1)


@torch.no_grad()
def single_pass_accuracies(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int, seed: int
) -> torch.Tensor:
    """Per-run accuracy of one training-mode pass, averaged over ``passes`` draws."""
    torch.manual_seed(seed)
    model.train()
    total = sum((model(x).argmax(-1) == y).double().mean(-1) for _ in range(passes))
    model.eval()
    return total / passes

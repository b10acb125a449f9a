"""Work that several claims use, computed on first use and kept for one run.

A :class:`Shared` is made by the runner for each run and handed to every claim
in its :class:`~._common.Context`; nothing is kept in module globals. Each
item is a deterministic function of (data, seed, quick), so a claim's result
is the same whether it runs alone, after the others, or after a resume.

- :meth:`Shared.dropout_nets`: MLPs trained with dropout p = 0.5 and without
  (C4–C7), the same initial weights and minibatches for both, one run per seed.
- :meth:`Shared.convex`: a softmax regression (C3, C8), its optimum, the
  per-weight v it starts from, and Adam and momentum swept over learning rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

import optiscope

from ..data import Dataset
from ..training import Ensemble, losses, mlp, run_losses, train

DROPOUT_P = 0.5
HIDDEN, DEPTH, NET_LR, NET_BATCH = 256, 2, 1e-3, 32

L2 = 1e-3  # the convex problem's λ/2·‖W‖²: a unique optimum
CONVEX_BATCH = 32
ADAM_LRS = tuple(1e-3 * 2**k for k in range(8))  # 0.001 … 0.128
MOMENTUM_LRS = tuple(0.01 * 2**k for k in range(10))  # 0.01 … 5.12
MOMENTUM_BETA = 0.9  # Adam's β1: momentum is Adam's m without ÷√v̂
MIN_GROUP = 8  # weights in each of the small-v and large-v quarters
MIN_SPREAD = 10.0  # median v of the large-v quarter over that of the small-v one
TRACE_EVERY = 5  # steps between distance-to-optimum records


@dataclass
class DropoutNets:
    """``runs`` nets (one per seed) trained with dropout ``p``."""

    model: Ensemble
    p: float
    keep_rate: float  # what the Dropout probes saw in training (nan for p = 0)
    units_seen: int


@dataclass
class Sweep:
    """One optimizer over a grid of learning rates, ``runs`` seeds at each."""

    name: str
    lrs: tuple[float, ...]
    final_objective: torch.Tensor  # (lrs, runs)
    traces: torch.Tensor  # (lrs, records, runs, 2): distance to optimum, small/large v
    steps: list[int]  # the step of each record
    best: int  # index of the tuned learning rate (lowest mean final objective)
    optimizer: torch.optim.Optimizer
    modules: list[nn.Module]

    @property
    def best_lr(self) -> float:
        return self.lrs[self.best]


@dataclass
class Quarters:
    """The weights with the smallest and the largest quarter of v."""

    v: torch.Tensor  # (d·classes,) mean square of a minibatch gradient, per weight
    small: torch.Tensor  # flat indices of the small-v quarter
    large: torch.Tensor  # flat indices of the large-v quarter
    spread: float  # median v (large) / median v (small)
    reason: str | None  # why they cannot be compared on this data, or None


@dataclass
class Convex:
    """Softmax regression with an L2 term: the optimum, and v where training
    starts (W = 0, for C3) and at the optimum (for C8)."""

    w_star: torch.Tensor  # (d, classes) float32
    b_star: torch.Tensor  # (1, classes)
    objective_star: float
    objective_zero: float  # at W = 0: a uniform guess
    start: Quarters
    near: Quarters
    runs: int
    sweeps: dict[str, Sweep] = field(default_factory=dict)

    @property
    def reason(self) -> str | None:
        return self.start.reason

    @property
    def small(self) -> torch.Tensor:
        return self.start.small

    @property
    def large(self) -> torch.Tensor:
        return self.start.large

    @property
    def spread(self) -> float:
        return self.start.spread


def minibatch_v(
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    l2_grad: torch.Tensor | None = None,
    where: str = "at W = 0",
) -> Quarters:
    """v of each weight at (w, b): E[ḡ²] = (E g)² + Var(g)/B for the mean of B
    per-row gradients g = x ⊗ (softmax − onehot) (+ the L2 term's λw), and its
    quarters."""
    error = torch.softmax(x @ w + b, dim=1)
    error[torch.arange(len(y)), y] -= 1
    mean = x.T @ error / len(y)
    square = (x**2).T @ (error**2) / len(y)
    variance = (square - mean**2).clamp_min(0)
    if l2_grad is not None:
        mean = mean + l2_grad
    v = (mean**2 + variance / CONVEX_BATCH).reshape(-1)
    valid = v > 1e-12 * v.max()  # a weight of an always-0 feature never moves
    small = large = torch.zeros(0, dtype=torch.long)
    spread = math.nan
    if valid.sum() >= 4:
        lo, hi = torch.quantile(v[valid], torch.tensor([0.25, 0.75], dtype=v.dtype))
        small = torch.nonzero(valid & (v <= lo)).flatten()
        large = torch.nonzero(valid & (v >= hi)).flatten()
        spread = (v[large].median() / v[small].median()).item()
    reason = None
    if min(len(small), len(large)) < MIN_GROUP or not spread >= MIN_SPREAD:
        reason = (
            f"needs at least {MIN_GROUP} weights in each of the small-v and "
            f"large-v quarters of the linear model (v {where}), {MIN_SPREAD:g}× "
            f"apart in median v; this data gives {len(small)} and {len(large)} "
            f"weights, {spread:.3g}× apart"
        )
    return Quarters(v, small, large, spread, reason)


class LinearRuns(nn.Module):
    """``runs`` softmax regressions as one batched computation.

    Each run starts at (w, b): shared (d, classes) and (1, classes) tensors, or
    one slice per run, (runs, d, classes) and (runs, 1, classes).
    """

    def __init__(self, runs: int, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.runs = runs
        self.weight = nn.Parameter(w.expand(runs, *w.shape[-2:]).clone())
        self.bias = nn.Parameter(b.expand(runs, *b.shape[-2:]).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.expand(self.runs, *x.shape)
        return torch.baddbmm(self.bias, x, self.weight)

    def flat(self) -> torch.Tensor:
        return self.weight.detach().reshape(self.runs, -1)


def l2(module: nn.Module) -> torch.Tensor:
    return 0.5 * L2 * (module.weight**2).sum((1, 2))


class Shared:
    def __init__(self, data: Dataset, seed: int, quick: bool) -> None:
        self.data, self.seed, self.quick = data, seed, quick
        self._nets: dict[float, DropoutNets] = {}
        self._convex: Convex | None = None

    @property
    def runs(self) -> int:
        """Seeds per comparison: each is one independent training run."""
        return 5 if self.quick else 8

    # -- C4–C7 ----------------------------------------------------------------------
    def dropout_nets(self, p: float) -> DropoutNets:
        """Nets trained with dropout ``p`` (0.5 or 0): both are trained on first use."""
        if not self._nets:
            self._train_nets()
        return self._nets[p]

    def _train_nets(self) -> None:
        data, seed = self.data, self.seed + 500
        models = {
            p: mlp(data, self.runs, HIDDEN, DEPTH, p, seed) for p in (DROPOUT_P, 0.0)
        }
        probes = optiscope.probe(models[DROPOUT_P], history=None)
        # Dropout draws its masks' seeds from torch's default generator: seed it
        # here, so the nets do not depend on what ran before them.
        torch.manual_seed(seed + 2)
        opts = [optiscope.Adam(m.parameters(), lr=NET_LR) for m in models.values()]
        steps = 500 if self.quick else 1500
        train(
            list(models.values()),
            opts,
            data,
            steps=steps,
            batch=NET_BATCH,
            seed=seed + 1,
        )
        kept = seen = 0
        for pr in probes:
            for record in pr.history.records:
                module = record["modules"][pr.name]
                kept += module["keep_rate"] * module["numel"]
                seen += module["numel"]
        # Monte-Carlo passes later run dropout on purpose, under no_grad.
        optiscope.probes.remove(models[DROPOUT_P])
        self._nets[DROPOUT_P] = DropoutNets(
            models[DROPOUT_P], DROPOUT_P, kept / seen if seen else math.nan, seen
        )
        self._nets[0.0] = DropoutNets(models[0.0], 0.0, math.nan, 0)

    # -- C3, C8 ---------------------------------------------------------------------
    def convex(self) -> Convex:
        if self._convex is None:
            self._convex = self._solve_convex()
            if self._convex.reason is None:
                self._sweep(self._convex)
        return self._convex

    def _solve_convex(self) -> Convex:
        x, y = self.data.x_train.double(), self.data.y_train
        d, classes = x.shape[1], self.data.n_classes
        w = torch.zeros(d, classes, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, classes, dtype=torch.float64, requires_grad=True)

        def objective() -> torch.Tensor:
            loss = nn.functional.cross_entropy(x @ w + b, y)
            return loss + 0.5 * L2 * (w**2).sum()

        with torch.no_grad():
            objective_zero = objective().item()
        solver = torch.optim.LBFGS(
            [w, b],
            lr=1,
            max_iter=1000,
            tolerance_grad=1e-10,
            tolerance_change=1e-15,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            solver.zero_grad()
            value = objective()
            value.backward()
            return value

        solver.step(closure)
        with torch.no_grad():
            objective_star = objective().item()
        start = minibatch_v(x, y, torch.zeros_like(w), torch.zeros_like(b))
        near = minibatch_v(
            x,
            y,
            w.detach(),
            b.detach(),
            l2_grad=L2 * w.detach(),
            where="at the optimum",
        )
        return Convex(
            w.detach().float(),
            b.detach().float(),
            objective_star,
            objective_zero,
            start,
            near,
            self.runs,
        )

    def _sweep(self, convex: Convex) -> None:
        """Adam and momentum over their learning-rate grids from one random start per
        seed (as ``nn.Linear`` initialises: uniform in ±1/√d), paired by seed.

        A random start gives every weight a distance to close; from W = 0 the
        weights whose features are rarely active would start next to an optimum
        that the L2 term keeps near 0, and have nothing to learn.
        """
        data, runs = self.data, self.runs
        d, classes = convex.w_star.shape
        gen = torch.Generator().manual_seed(self.seed + 402)
        bound = 1 / math.sqrt(d)
        w0 = (torch.rand(runs, d, classes, generator=gen) * 2 - 1) * bound
        b0 = (torch.rand(runs, 1, classes, generator=gen) * 2 - 1) * bound
        grids = {"adam": ADAM_LRS, "momentum": MOMENTUM_LRS}
        modules = {k: [LinearRuns(runs, w0, b0) for _ in g] for k, g in grids.items()}
        opts = {
            "adam": optiscope.Adam(
                [
                    {"params": m.parameters(), "lr": lr}
                    for m, lr in zip(modules["adam"], ADAM_LRS, strict=True)
                ]
            ),
            "momentum": optiscope.Momentum(
                [
                    {"params": m.parameters(), "lr": lr}
                    for m, lr in zip(modules["momentum"], MOMENTUM_LRS, strict=True)
                ],
                momentum=MOMENTUM_BETA,
            ),
        }
        star = convex.w_star.reshape(-1)
        groups = (convex.small, convex.large)

        def distances(module: LinearRuns) -> torch.Tensor:
            w = module.flat()
            return torch.stack([(w[:, g] - star[g]).norm(dim=1) for g in groups], dim=1)

        traces: dict[str, list[list[torch.Tensor]]] = {
            k: [[distances(m)] for m in ms] for k, ms in modules.items()
        }
        record_steps = [0]

        def record(step: int) -> None:
            if (step + 1) % TRACE_EVERY == 0:
                record_steps.append(step + 1)
                for k, ms in modules.items():
                    for i, m in enumerate(ms):
                        traces[k][i].append(distances(m))

        steps = 200 if self.quick else 400
        all_modules = [m for ms in modules.values() for m in ms]
        train(
            all_modules,
            list(opts.values()),
            data,
            steps=steps,
            batch=CONVEX_BATCH,
            seed=self.seed + 401,
            penalty=l2,
            on_step=record,
        )
        for k, ms in modules.items():
            final = torch.stack(
                [losses(m, data.x_train, data.y_train) + l2(m).detach() for m in ms]
            ).double()
            ranked = torch.where(final.isfinite(), final, torch.inf).mean(1)
            convex.sweeps[k] = Sweep(
                k,
                grids[k],
                final,
                torch.stack([torch.stack(t) for t in traces[k]]),
                record_steps,
                int(ranked.argmin()),
                opts[k],
                ms,
            )


def full_objective(module: LinearRuns, data: Dataset) -> torch.Tensor:
    """Per-run objective on the whole training split, (runs,) float64."""
    with torch.no_grad():
        return (run_losses(module, data.x_train, data.y_train) + l2(module)).double()

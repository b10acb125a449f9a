"""C1: EMA momentum lowers the variance of the updates, by (1−β)/(1+β) for i.i.d. noise."""

from __future__ import annotations

import torch
from torch import nn

import optiscope

from ..training import mlp, run_losses, train
from ..verdicts import Check, t_interval
from ._common import (
    Claim,
    Context,
    ci_text,
    line_figure,
    number,
    outcome_words,
    result,
    series,
)

BETA = 0.9
LR = 0.1
BAND = 0.15  # the frozen-θ ratio must lie within ±15% of theory
BURN_IN = 60  # steps before the buffers forget their zero start (β^60 ≈ 0.002)
WINDOW = 20  # steps per window of the in-training variance
PROBE_WARMUP = 100  # the probe's running means span about 100 steps


def _frozen_ratios(ctx: Context, runs: int, steps: int) -> dict[str, torch.Tensor]:
    """Per-run total variance of the update at a frozen θ, for three buffers fed one g_t.

    Minibatches are drawn with replacement, so at a fixed θ the g_t are i.i.d.
    with mean ḡ, the full training-set gradient. Each optimizer steps its own
    copy of θ, reset after every step, so its update is a function of the
    gradient history alone, with known mean α·ḡ (α·ḡ/(1−β) for the summing
    buffer). Deviations are measured from that mean, not from a sample mean,
    which would bias the autocorrelated EMA's variance low by about 19/steps.
    """
    data = ctx.data
    model = mlp(data, runs, 64, 1, 0.0, ctx.seed + 10)
    model.train()
    run_losses(model, data.x_train, data.y_train).sum().backward()
    mean_grad = torch.cat([p.grad.reshape(runs, -1) for p in model.parameters()], 1)
    means = {
        "sgd": LR * mean_grad.double(),
        "ema": LR * mean_grad.double(),
        "sum": LR * mean_grad.double() / (1 - BETA),
    }
    theta0 = [p.detach().clone() for p in model.parameters()]
    copies = {k: [nn.Parameter(t.clone()) for t in theta0] for k in means}
    opts = {
        "sgd": optiscope.Momentum(copies["sgd"], lr=LR, momentum=0.0),
        "ema": optiscope.Momentum(copies["ema"], lr=LR, momentum=BETA),
        "sum": torch.optim.SGD(copies["sum"], lr=LR, momentum=BETA, dampening=0),
    }
    squares = {k: torch.zeros(runs, dtype=torch.float64) for k in opts}
    gen = torch.Generator().manual_seed(ctx.seed + 11)
    n = len(data.y_train)
    for t in range(steps):
        rows = torch.randint(n, (runs, 32), generator=gen)
        model.zero_grad()
        run_losses(model, data.x_train[rows], data.y_train[rows]).sum().backward()
        for key, opt in opts.items():
            for copy, p in zip(copies[key], model.parameters(), strict=True):
                copy.grad = p.grad
            opt.step()
            with torch.no_grad():
                update = torch.cat(
                    [
                        (t0 - c).reshape(runs, -1)
                        for t0, c in zip(theta0, copies[key], strict=True)
                    ],
                    dim=1,
                ).double()
                for c, t0 in zip(copies[key], theta0, strict=True):
                    c.copy_(t0)
            if t >= BURN_IN:
                squares[key] += ((update - means[key]) ** 2).sum(1)
        ctx.advance(0.5 * (t + 1) / steps)
    return {
        "ema": squares["ema"] / squares["sgd"],
        "sum": squares["sum"] / squares["sgd"],
    }


class _Windows:
    """Total variance of a run's updates inside consecutive windows of WINDOW steps."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.previous = self._flat()
        self.sum = torch.zeros_like(self.previous)
        self.square = torch.zeros_like(self.previous)
        self.filled = 0
        self.variances: list[torch.Tensor] = []  # (runs,) per window

    def _flat(self) -> torch.Tensor:
        runs = self.model.runs
        return torch.cat(
            [p.detach().reshape(runs, -1) for p in self.model.parameters()], 1
        ).double()

    def step(self, step: int) -> None:
        now = self._flat()
        update, self.previous = self.previous - now, now
        if step < 50:  # past the start, where both runs still move fast
            return
        self.sum += update
        self.square += update * update
        self.filled += 1
        if self.filled == WINDOW:
            var = (self.square - self.sum**2 / WINDOW) / (WINDOW - 1)
            self.variances.append(var.sum(1))
            self.sum.zero_()
            self.square.zero_()
            self.filled = 0

    def mean(self) -> torch.Tensor:
        return torch.stack(self.variances).mean(0)


def run(ctx: Context) -> dict:
    data = ctx.data
    runs = ctx.shared.runs
    frozen_steps = ctx.pick(600, 1500)
    frozen = _frozen_ratios(ctx, runs, frozen_steps)
    theory_ema = (1 - BETA) / (1 + BETA)
    theory_sum = 1 / (1 - BETA**2)
    relative = t_interval((frozen["ema"] / theory_ema).tolist())
    ema = t_interval(frozen["ema"].tolist())
    summing = t_interval(frozen["sum"].tolist())

    # In training θ moves, so compare variances inside short windows.
    train_steps = ctx.pick(300, 600)
    models = {b: mlp(data, runs, 64, 1, 0.0, ctx.seed + 12) for b in (0.0, BETA)}
    opts = {
        b: optiscope.Momentum(m.parameters(), lr=LR, momentum=b)
        for b, m in models.items()
    }
    probe = optiscope.probe(opts[BETA], history=None)
    windows = {b: _Windows(m) for b, m in models.items()}

    def on_step(step: int) -> None:
        for w in windows.values():
            w.step(step)
        ctx.advance(0.5 + 0.5 * (step + 1) / train_steps)

    train(
        list(models.values()),
        list(opts.values()),
        data,
        steps=train_steps,
        batch=32,
        seed=ctx.seed + 13,
        on_step=on_step,
    )
    training = t_interval((windows[BETA].mean() / windows[0.0].mean()).tolist())

    # The in-pass probe: running means of Σg², Σm², Σg·m_prev over ~100 steps.
    raw = probe.history.series("group0", "variance_ratio")
    shown = [(s, r) for s, r in enumerate(raw, start=1) if s > PROBE_WARMUP and r > 0]
    excluded = sum(
        1 for s, r in enumerate(raw, start=1) if s > PROBE_WARMUP and not r > 0
    )
    tail = [r for _, r in shown[-50:]]
    probe_end = sum(tail) / len(tail) if tail else float("nan")

    checks = [
        Check(
            "frozen-θ variance ratio, EMA momentum / SGD, divided by (1−β)/(1+β)",
            "within",
            1 - BAND,
            relative,
            upper=1 + BAND,
        ),
        Check(
            f"variance ratio in training ({WINDOW}-step windows), momentum / SGD",
            "below",
            1.0,
            training,
        ),
    ]
    note = (
        f"At a frozen θ the EMA buffer's update variance is {ci_text(ema, 4)} times "
        f"plain SGD's, theory {theory_ema:.4f}: "
        + outcome_words(checks[0], "within", "outside", "not clearly within")
        + f" ±{BAND:.0%} of theory. torch's summing buffer gives {ci_text(summing, 2)} "
        f"(theory {theory_sum:.2f}): the same β raises the variance when the buffer "
        f"sums instead of averaging. During training the ratio is {ci_text(training)}, "
        + outcome_words(checks[1], "below 1", "not below 1", "not clearly below 1")
        + "."
    )
    return result(
        checks,
        headline=f"Var ratio at frozen θ {ema.estimate:.4f} (theory {theory_ema:.4f}); "
        f"in training {training.estimate:.3f}; torch SGD buffer {summing.estimate:.2f} "
        f"(theory {theory_sum:.2f})",
        note=note,
        numbers=[
            number("β (momentum)", BETA),
            number("learning rate α", LR),
            number("runs (seeds)", runs),
            number("frozen-θ steps per run (first 60 discarded)", frozen_steps),
            number("frozen-θ Var ratio, EMA momentum / SGD", ema.estimate, "", ema),
            number("theory (1−β)/(1+β)", theory_ema),
            number(
                "frozen-θ Var ratio, torch SGD buffer / SGD",
                summing.estimate,
                "",
                summing,
            ),
            number("theory 1/(1−β²)", theory_sum),
            number("training steps per run", train_steps),
            number(
                "in-training Var ratio, momentum / SGD", training.estimate, "", training
            ),
            number(
                "probe's in-pass Var(m)/Var(g), mean of its last 50 points", probe_end
            ),
            number(f"probe points excluded (≤ 0, after step {PROBE_WARMUP})", excluded),
        ],
        series={"momentum_probe_variance_ratio": raw},
        figures=[
            line_figure(
                "Update variance relative to plain SGD (i.i.d. gradients)",
                "momentum β",
                "Var(update) / Var(SGD update), log (lower is smoother)",
                [
                    series(
                        "EMA momentum (optiscope): theory (1−β)/(1+β)",
                        [(1 - b) / (1 + b) for b in BETAS],
                        BETAS,
                        style="theory",
                    ),
                    series(
                        "summing buffer (torch SGD): theory 1/(1−β²)",
                        [1 / (1 - b * b) for b in BETAS],
                        BETAS,
                        style="theory",
                    ),
                    series(
                        "measured, EMA momentum",
                        [ema.estimate],
                        [BETA],
                        low=[ema.low],
                        high=[ema.high],
                    ),
                    series(
                        "measured, torch SGD buffer",
                        [summing.estimate],
                        [BETA],
                        low=[summing.low],
                        high=[summing.high],
                    ),
                ],
                logy=True,
                caption="Dots: the mean over runs with its 95% t-interval.",
            ),
            line_figure(
                "Probe: in-pass estimate of Var(m)/Var(g) while training",
                "step",
                "Var(m) / Var(g), log (lower is smoother)",
                [
                    series(
                        "momentum β=0.9, probe",
                        [r for _, r in shown],
                        [s for s, _ in shown],
                    ),
                    series(
                        "theory for i.i.d. noise, (1−β)/(1+β)",
                        [theory_ema, theory_ema],
                        [PROBE_WARMUP, len(raw)],
                        style="theory",
                    ),
                ],
                logy=True,
                caption=f"Drawn from step {PROBE_WARMUP + 1}, after the probe's running "
                f"means (about {PROBE_WARMUP} steps) have filled. The estimator is a "
                "difference of running means and can dip to 0 or below while they are "
                f"noisy; such points cannot be drawn on a log axis and are left out "
                f"({excluded} of {max(len(raw) - PROBE_WARMUP, 0)}).",
            ),
        ],
    )


BETAS = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99]

CLAIM = Claim(
    "C1",
    "Momentum lowers the variance of updates",
    "when we use momentum, only (1 − β1)·∇J contributed to the change, another part "
    "β1 comes from last gradient/change",
    "At a frozen θ, one stream of i.i.d. minibatch gradients feeds plain SGD, EMA "
    "momentum and torch's summing buffer, and we compare the variance of their "
    "updates, one run per seed; then we compare SGD and momentum inside short "
    "windows of real training, where θ moves.",
    run,
)

"""C2b: the "big rock": does momentum reach the global optimum of a bumpy landscape
more often than SGD?"""

from __future__ import annotations

import math

import torch
from torch import nn

import optiscope

from ..verdicts import Check, t_interval
from ._common import Claim, Context, ci_text, dot_figure, number, outcome_words, result

LR, BETA, NOISE = 0.05, 0.9, 0.5
MARGIN = 0.05  # an advantage under 5 points of starts is no practical advantage
BASIN = math.pi / 3  # |x| < π/3: the global minimum's basin


def rugged(x: torch.Tensor) -> torch.Tensor:
    """A bowl with ripples: global minimum at 0, local minima near every 2π/3."""
    return 0.05 * x**2 + (1 - torch.cos(3 * x))


def run(ctx: Context) -> dict:
    runs = ctx.shared.runs
    starts = ctx.pick(300, 400)
    steps = ctx.pick(600, 1500)
    gen = torch.Generator().manual_seed(ctx.seed + 300)
    x0 = (torch.rand(runs, starts, generator=gen, dtype=torch.float64) * 2 - 1) * 8
    xs = {name: nn.Parameter(x0.clone()) for name in ("sgd", "momentum")}
    opts = {
        "sgd": optiscope.Momentum([xs["sgd"]], lr=LR, momentum=0.0),
        "momentum": optiscope.Momentum([xs["momentum"]], lr=LR, momentum=BETA),
    }
    noise_gen = torch.Generator().manual_seed(ctx.seed + 301)
    for step in range(steps):
        noise = NOISE * torch.randn(
            runs, starts, generator=noise_gen, dtype=torch.float64
        )
        for name, opt in opts.items():  # the same noise for both: a paired comparison
            opt.zero_grad()
            rugged(xs[name]).sum().backward()
            xs[name].grad += noise
            opt.step()
        if step % 50 == 0:
            ctx.advance(step / steps)
    fraction = {
        name: (x.detach().abs() < BASIN).double().mean(1) for name, x in xs.items()
    }  # per run (seed)
    difference = t_interval((fraction["momentum"] - fraction["sgd"]).tolist())
    each = {name: t_interval(f.tolist()) for name, f in fraction.items()}
    checks = [
        Check(
            "fraction of starts ending in the global basin, momentum − SGD",
            "above",
            0.0,
            difference,
            fail_at=MARGIN,
        )
    ]
    note = (
        f"{each['momentum'].estimate:.3f} of momentum's starts and "
        f"{each['sgd'].estimate:.3f} of SGD's end in the global basin; the difference is "
        f"{ci_text(difference, 3, True)}: "
        + outcome_words(
            checks[0],
            "momentum reaches the global optimum more often",
            f"any advantage of momentum is under {MARGIN:.0%} of starts",
            "not resolved either way",
        )
        + ". At the same learning rate the EMA buffer moves like SGD on the slope "
        "and only filters the noise; it does not carry the iterate over the ripples "
        "the way a heavier rock would."
    )
    return result(
        checks,
        headline=f"global basin {each['momentum'].estimate:.3f} (momentum) vs "
        f"{each['sgd'].estimate:.3f} (SGD); difference {ci_text(difference, 3, True)}",
        note=note,
        numbers=[
            number("runs (seeds)", runs),
            number("starts per run, uniform in [−8, 8]", starts),
            number("steps", steps),
            number("learning rate α (both)", LR),
            number("gradient noise, standard deviation", NOISE),
            number(
                "fraction in the global basin, SGD",
                each["sgd"].estimate,
                "",
                each["sgd"],
            ),
            number(
                "fraction in the global basin, momentum",
                each["momentum"].estimate,
                "",
                each["momentum"],
            ),
            number("difference, momentum − SGD", difference.estimate, "", difference),
        ],
        figures=[
            dot_figure(
                "Starts ending in the global basin of a rippled bowl",
                "fraction of starts (higher is better)",
                ["SGD (β=0)", "momentum (β=0.9)"],
                [each["sgd"], each["momentum"]],
                caption="f(x) = 0.05x² + 1 − cos 3x with Gaussian gradient noise; "
                "mean over runs with 95% t-intervals.",
            ),
        ],
    )


CLAIM = Claim(
    "C2b",
    "A big rock rolls past the bumps to the global optimum",
    "a big rock … is not that sensitive to the ups and downs (high momentum) and "
    "are more likely to reach the global optimum",
    "Thousands of noisy 1-D descents on a rippled bowl, SGD and EMA momentum at the "
    "same learning rate with the same starts and the same noise, several seeds: we "
    "count how often each ends in the global minimum's basin. This landscape is "
    "synthetic: the result does not depend on --data.",
    run,
)

"""C5: evaluation must not drop units, or one input gets inconsistent answers."""

from __future__ import annotations

import torch

from ..verdicts import Check, exact, wilson_interval
from ._common import Claim, Context, dot_figure, number, outcome_words, result


def run(ctx: Context) -> dict:
    nets = ctx.shared.dropout_nets(0.5)
    net, x = nets.model, ctx.data.x_val
    net.eval()
    rng_before = torch.get_rng_state()
    with torch.no_grad():
        first, second = net(x), net(x)
    deterministic = bool(torch.equal(first, second))
    rng_untouched = bool(torch.equal(rng_before, torch.get_rng_state()))
    ctx.advance(0.3)

    torch.manual_seed(ctx.seed + 600)
    net.train()
    with torch.no_grad():
        a, b = net(x).argmax(-1), net(x).argmax(-1)
    net.eval()
    disagree = int((a != b).sum())
    total = a.numel()
    rate = wilson_interval(disagree, total, "inputs × runs")
    ctx.advance(1.0)
    checks = [
        Check(
            "in eval mode, two passes give bitwise equal outputs",
            "true",
            1,
            exact(deterministic),
        ),
        Check(
            "in eval mode, a pass leaves torch's RNG state untouched",
            "true",
            1,
            exact(rng_untouched),
        ),
        Check(
            f"share of inputs on which two training-mode passes (p = {nets.p}) predict "
            "different classes",
            "above",
            0.0,
            rate,
        ),
    ]
    note = (
        "In eval mode optiscope's Dropout is the identity: "
        + outcome_words(
            checks[0], "two passes agree bit for bit", "two passes differ", ""
        )
        + " and "
        + outcome_words(
            checks[1], "no random number is drawn", "random numbers are drawn", ""
        )
        + f". Left in training mode, the same net answers differently on "
        f"{rate.estimate:.1%} of inputs from one pass to the next "
        f"(95% [{rate.low:.1%}, {rate.high:.1%}])."
    )
    return result(
        checks,
        headline=f"eval bitwise equal: {deterministic}, RNG untouched: {rng_untouched}; "
        f"train-mode disagreement {rate.estimate:.3f} at p = {nets.p}",
        note=note,
        numbers=[
            number("eval outputs bitwise equal", deterministic),
            number("eval leaves the RNG state untouched", rng_untouched),
            number(
                "training-mode disagreement", rate.estimate, "share of inputs", rate
            ),
            number("inputs compared (validation inputs × runs)", total),
        ],
        figures=[
            dot_figure(
                "Two passes over the same inputs predict differently",
                "share of inputs with different predictions",
                ["eval mode", f"training mode, p = {nets.p}"],
                [exact(0.0 if deterministic else 1.0), rate],
                ylim_from_zero=True,
                caption="Training mode: 95% Wilson interval over inputs × runs.",
            ),
        ],
    )


CLAIM = Claim(
    "C5",
    "No dropout at evaluation",
    "we don't want to randomly drop some neurons during evaluation which will lead "
    "to inconsistent results in same input",
    "We run a trained net twice in eval mode and compare outputs and torch's RNG "
    "state; then we count how often two training-mode passes disagree.",
    run,
)

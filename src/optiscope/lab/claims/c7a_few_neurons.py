"""C7a: a net trained with dropout does not depend on a few neurons.

We remove (zero) units of the last hidden layer and measure what the net loses.
Which units matter is measured on the training split, the loss on validation.
"""

from __future__ import annotations

import torch
from torch import nn

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

FEW = 16  # "a few neurons": the 16 most important of 256
KS = (1, 2, 4, 8, 16, 32, 64)


def _importance(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Training-loss increase when each last-layer unit alone is removed, (runs, units)."""
    h = net.hidden(x, len(net.drops) - 1)  # (runs, n, units)
    logits = net.head(h)
    w = net.weights[-1]  # (runs, units, classes)
    base = nn.functional.log_softmax(logits, -1).gather(
        -1, y.expand(net.runs, -1)[..., None]
    )
    out = torch.empty(h.shape[0], h.shape[2])
    for j in range(h.shape[2]):
        ablated = logits - h[:, :, j, None] * w[:, j, None, :]
        lp = nn.functional.log_softmax(ablated, -1).gather(
            -1, y.expand(net.runs, -1)[..., None]
        )
        out[:, j] = (base - lp).mean((1, 2))
    return out


def _accuracy_without(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, units: torch.Tensor
) -> torch.Tensor:
    """Per-run validation accuracy with ``units`` (runs, k) of the last layer removed."""
    h = net.hidden(x, len(net.drops) - 1).clone()
    if units.shape[1]:
        h.scatter_(2, units[:, None, :].expand(-1, h.shape[1], -1), 0.0)
    return (net.head(h).argmax(-1) == y).double().mean(-1)


@torch.no_grad()
def _drops(ctx: Context, net: nn.Module) -> dict[int, torch.Tensor]:
    """Accuracy lost when the k most important units are removed, per run, for each k."""
    net.eval()
    data = ctx.data
    order = _importance(net, data.x_train, data.y_train).argsort(1, descending=True)
    intact = _accuracy_without(net, data.x_val, data.y_val, order[:, :0])
    return {
        k: intact - _accuracy_without(net, data.x_val, data.y_val, order[:, :k])
        for k in KS
    }


def run(ctx: Context) -> dict:
    with_dropout = ctx.shared.dropout_nets(0.5)
    without = ctx.shared.dropout_nets(0.0)
    drops = {"dropout": _drops(ctx, with_dropout.model)}
    ctx.advance(0.5)
    drops["none"] = _drops(ctx, without.model)
    ctx.advance(1.0)
    units = with_dropout.model.weights[-1].shape[1]
    k = FEW
    difference = t_interval((drops["none"][k] - drops["dropout"][k]).tolist())
    each = {name: t_interval(d[k].tolist()) for name, d in drops.items()}
    checks = [
        Check(
            f"validation accuracy lost when the {k} most important of {units} last-layer "
            "units are removed, without dropout − with dropout",
            "above",
            0.0,
            difference,
        )
    ]
    note = (
        f"Removing the {k} units that matter most costs the net trained without "
        f"dropout {each['none'].estimate:.3f} of validation accuracy and the net "
        f"trained with p = {with_dropout.p} {each['dropout'].estimate:.3f}; the "
        f"difference is {ci_text(difference, 3, True)}: "
        + outcome_words(
            checks[0],
            "dropout spreads what the net knows over more units",
            "the dropout net depends more on its top units",
            "not resolved either way",
        )
        + "."
    )
    lines = []
    for name, label in (
        ("none", "trained without dropout"),
        ("dropout", f"trained with dropout p = {with_dropout.p}"),
    ):
        stats = [t_interval(drops[name][kk].tolist()) for kk in KS]
        lines.append(
            series(
                label,
                [s.estimate for s in stats],
                KS,
                low=[s.low for s in stats],
                high=[s.high for s in stats],
            )
        )
    return result(
        checks,
        headline=f"accuracy lost without the top {k} units: {each['none'].estimate:.3f} "
        f"(no dropout) vs {each['dropout'].estimate:.3f} (dropout); difference "
        f"{ci_text(difference, 3, True)}",
        note=note,
        numbers=[
            number("runs (seeds)", with_dropout.model.runs),
            number("units in the last hidden layer", units),
            number("units removed", k),
            number(
                "accuracy lost, no dropout",
                each["none"].estimate,
                "accuracy",
                each["none"],
            ),
            number(
                "accuracy lost, dropout",
                each["dropout"].estimate,
                "accuracy",
                each["dropout"],
            ),
            number(
                "difference, no dropout − dropout",
                difference.estimate,
                "accuracy",
                difference,
            ),
            number(
                "accuracy lost by the single most important unit, no dropout",
                drops["none"][1].mean().item(),
                "accuracy",
            ),
            number(
                "accuracy lost by the single most important unit, dropout",
                drops["dropout"][1].mean().item(),
                "accuracy",
            ),
        ],
        figures=[
            line_figure(
                "Validation accuracy lost when the most important units are removed",
                "units removed (most important first), log",
                "accuracy lost (lower: depends less on a few units)",
                lines,
                logx=True,
                caption="Importance: the training-loss increase when a unit alone is "
                "removed. Mean over runs with 95% t-intervals.",
            )
        ],
    )


CLAIM = Claim(
    "C7a",
    "With dropout the network does not depend on a few neurons",
    "we do not want model to solely be confident in / dependent on a few neurons",
    "Nets trained with and without dropout (same initial weights and minibatches, "
    "several seeds) lose units of their last hidden layer, most important first; "
    "we compare the validation accuracy each loses.",
    run,
)

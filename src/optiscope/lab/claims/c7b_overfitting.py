"""C7b: dropout keeps the network from overfitting: a smaller train–validation gap."""

from __future__ import annotations

from ..training import accuracies, losses
from ..verdicts import Check, t_interval
from ._common import Claim, Context, ci_text, dot_figure, number, outcome_words, result


def run(ctx: Context) -> dict:
    data = ctx.data
    nets = {
        "dropout": ctx.shared.dropout_nets(0.5),
        "none": ctx.shared.dropout_nets(0.0),
    }
    gap, acc_gap = {}, {}
    for name, n in nets.items():
        train_loss = losses(n.model, data.x_train, data.y_train).double()
        val_loss = losses(n.model, data.x_val, data.y_val).double()
        gap[name] = val_loss - train_loss
        acc_gap[name] = accuracies(n.model, data.x_train, data.y_train) - accuracies(
            n.model, data.x_val, data.y_val
        )
    ctx.advance(1.0)
    difference = t_interval((gap["none"] - gap["dropout"]).tolist())
    each = {k: t_interval(g.tolist()) for k, g in gap.items()}
    each_acc = {k: t_interval(g.tolist()) for k, g in acc_gap.items()}
    checks = [
        Check(
            "overfitting gap (validation loss − training loss), without dropout − "
            "with dropout",
            "above",
            0.0,
            difference,
        )
    ]
    p = nets["dropout"].p
    note = (
        f"The validation loss exceeds the training loss by {ci_text(each['none'], 3)} "
        f"nats without dropout and {ci_text(each['dropout'], 3)} with p = {p}: dropout "
        + outcome_words(
            checks[0],
            "narrows the gap",
            "widens the gap",
            "does not change the gap beyond noise",
        )
        + f" ({ci_text(difference, 3, True)}). In accuracy the gaps are "
        f"{each_acc['none'].estimate:.4f} and {each_acc['dropout'].estimate:.4f}."
    )
    return result(
        checks,
        headline=f"val − train loss {each['none'].estimate:.3f} (no dropout) vs "
        f"{each['dropout'].estimate:.3f} (dropout); difference {ci_text(difference, 3, True)}",
        note=note,
        numbers=[
            number("runs (seeds)", nets["dropout"].model.runs),
            number("loss gap, no dropout", each["none"].estimate, "nats", each["none"]),
            number(
                "loss gap, dropout", each["dropout"].estimate, "nats", each["dropout"]
            ),
            number(
                "difference, no dropout − dropout",
                difference.estimate,
                "nats",
                difference,
            ),
            number(
                "accuracy gap (train − val), no dropout",
                each_acc["none"].estimate,
                "accuracy",
                each_acc["none"],
            ),
            number(
                "accuracy gap (train − val), dropout",
                each_acc["dropout"].estimate,
                "accuracy",
                each_acc["dropout"],
            ),
        ],
        figures=[
            dot_figure(
                "Overfitting: validation loss minus training loss",
                "nats (lower: less overfitting)",
                ["no dropout", f"dropout p = {p}"],
                [each["none"], each["dropout"]],
                caption="Mean over runs with 95% t-intervals.",
            )
        ],
    )


CLAIM = Claim(
    "C7b",
    "Dropout keeps the network from overfitting",
    "… dependent on a few neurons and be overfitting",
    "The same nets trained with and without dropout: we compare how far the "
    "validation loss rises above the training loss, paired by seed.",
    run,
)

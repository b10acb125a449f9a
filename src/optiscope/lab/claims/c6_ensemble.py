"""C6: a net trained with dropout, evaluated without it, acts as an ensemble."""

from __future__ import annotations

from ..training import accuracies, monte_carlo_accuracies, single_pass_accuracies
from ..verdicts import Check, t_interval
from ._common import Claim, Context, ci_text, dot_figure, number, outcome_words, result

PASSES = (1, 10, 50)
SINGLE_DRAWS = 20  # one stochastic pass's accuracy: averaged over 20 independent draws
LABELS = {
    1: f"accuracy of one training-mode pass (mean of {SINGLE_DRAWS} draws)",
    10: "accuracy of the mean softmax of 10 training-mode passes",
    50: "accuracy of the mean softmax of 50 training-mode passes",
}
SHORT = {1: "one pass", 10: "ensemble of 10", 50: "ensemble of 50"}
BAND = 0.01  # weight scaling "matches" the 50-pass ensemble within ±1 point


def run(ctx: Context) -> dict:
    data = ctx.data
    nets = ctx.shared.dropout_nets(0.5)
    net = nets.model
    deterministic = accuracies(net, data.x_val, data.y_val)
    mc = {
        k: monte_carlo_accuracies(net, data.x_val, data.y_val, k, ctx.seed + 700 + k)
        for k in PASSES
        if k > 1
    }
    mc[1] = single_pass_accuracies(
        net, data.x_val, data.y_val, SINGLE_DRAWS, ctx.seed + 701
    )
    ctx.advance(1.0)
    matches = t_interval((deterministic - mc[50]).tolist())
    beats = t_interval((deterministic - mc[1]).tolist())
    checks = [
        Check(
            "validation accuracy, weight-scaled evaluation − 50-pass Monte-Carlo ensemble",
            "within",
            -BAND,
            matches,
            upper=BAND,
        ),
        Check(
            f"validation accuracy, weight-scaled evaluation − one stochastic pass "
            f"(its mean over {SINGLE_DRAWS} draws)",
            "above",
            0.0,
            beats,
        ),
    ]
    note = (
        f"Evaluated deterministically, the net is {ci_text(matches, 4, True)} from the "
        "average of 50 dropout sub-networks: "
        + outcome_words(
            checks[0],
            f"within ±{BAND}",
            f"outside ±{BAND}",
            f"not resolved within ±{BAND}",
        )
        + f"; and {ci_text(beats, 4, True)} from a single sub-network: "
        + outcome_words(
            checks[1],
            "better, as an ensemble is better than its members",
            "worse",
            "no difference resolved (a tie is not an ensemble effect)",
        )
        + "."
    )
    each = {"eval": t_interval(deterministic.tolist())} | {
        f"k{k}": t_interval(v.tolist()) for k, v in mc.items()
    }
    return result(
        checks,
        headline=f"accuracy: eval {each['eval'].estimate:.4f}, MC k=1 "
        f"{each['k1'].estimate:.4f}, k=50 {each['k50'].estimate:.4f}; eval − k=1 "
        f"{ci_text(beats, 4, True)}",
        note=note,
        numbers=[
            number("runs (seeds)", net.runs),
            number("validation inputs", len(data.y_val)),
            number(
                "accuracy, weight-scaled evaluation",
                each["eval"].estimate,
                "",
                each["eval"],
            ),
            *[
                number(
                    LABELS[k],
                    each[f"k{k}"].estimate,
                    "",
                    each[f"k{k}"],
                )
                for k in PASSES
            ],
            number("evaluation − 50 passes", matches.estimate, "accuracy", matches),
            number("evaluation − 1 pass", beats.estimate, "accuracy", beats),
        ],
        figures=[
            dot_figure(
                "Validation accuracy of one net, evaluated four ways",
                "validation accuracy (higher is better)",
                ["weight-scaled (eval)"] + [SHORT[k] for k in PASSES],
                [each["eval"]] + [each[f"k{k}"] for k in PASSES],
                caption="Mean over runs with 95% t-intervals (not from 0: dots, not bars).",
            ),
        ],
    )


CLAIM = Claim(
    "C6",
    "The trained network acts as an ensemble",
    'we already have an "ensembled" model',
    "We compare deterministic (weight-scaled) evaluation of nets trained with "
    "dropout p = 0.5 with Monte-Carlo averages of k stochastic passes, paired by "
    "seed.",
    run,
)

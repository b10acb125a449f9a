"""C4: inverted dropout's γ = 1/(1−p) keeps the expectation of every activation."""

from __future__ import annotations

import math

import torch

from optiscope.functional import dropout

from ..verdicts import Check, normal_interval, wilson_interval
from ._common import (
    Claim,
    Context,
    line_figure,
    number,
    outcome_words,
    result,
    series,
    table,
)

PS = (0.1, 0.3, 0.5, 0.7, 0.9)
BAND = 0.01  # E[h_drop]/h must lie within 1 ± 1%
KEEP_BAND = 0.005  # the observed keep rate within 1 − p ± 0.5 points
COUNTERFACTUAL_P = 0.5


def run(ctx: Context) -> dict:
    nets = ctx.shared.dropout_nets(0.5)
    net = nets.model
    with torch.no_grad():  # run 0's first hidden layer, after ReLU, before dropout
        h = torch.relu(
            torch.addmm(net.biases[0][0], ctx.data.x_val, net.weights[0][0])
        ).double()
    draws = ctx.pick(100, 400)
    torch.manual_seed(ctx.seed + 501)
    positive = h > 0
    total_h = h.sum().item()
    rows, intervals, errors = [], {}, {}
    for i, p in enumerate(PS):
        total = torch.zeros_like(h)
        for _ in range(draws):
            total += dropout(h, p)
        mean = total / draws
        ratio = mean.sum().item() / total_h
        se = math.sqrt((h**2).sum().item() * p / ((1 - p) * draws)) / total_h
        basis = f"±1.96 CLT standard errors over {draws} draws"
        intervals[p] = normal_interval(ratio, se, basis)
        errors[p] = se
        z = (mean - h)[positive] / (h * math.sqrt(p / ((1 - p) * draws)))[positive]
        rows.append(
            {
                "p": p,
                "ratio": ratio,
                "low": intervals[p].low,
                "high": intervals[p].high,
                "ratio_gamma_one": ratio * (1 - p),
                "z_over": (z.abs() > 1.96).double().mean().item(),
            }
        )
        ctx.advance(0.8 * (i + 1) / len(PS))

    # The same draws with γ = 1 (no rescaling): the check must be able to see it.
    p0 = COUNTERFACTUAL_P
    wrong = normal_interval(
        intervals[p0].estimate * (1 - p0), errors[p0] * (1 - p0), intervals[p0].basis
    )
    keep = wilson_interval(
        round(nets.keep_rate * nets.units_seen),
        nets.units_seen,
        "units the Dropout probes saw in training",
    )
    checks = [
        Check(
            f"E[h_drop]/h at p = {p}",
            "within",
            1 - BAND,
            intervals[p],
            upper=1 + BAND,
        )
        for p in PS
    ]
    checks.append(
        Check(
            f"keep rate the Dropout probes observed while training at p = {nets.p}",
            "within",
            1 - nets.p - KEEP_BAND,
            keep,
            upper=1 - nets.p + KEEP_BAND,
        )
    )
    checks.append(
        Check(
            f"the same draws with γ = 1 at p = {p0}: E[h_drop]/h",
            "below",
            1 - BAND,
            wrong,
            role="instrument",
        )
    )
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    passed = sum(c.outcome == "holds" for c in checks[: len(PS)])
    note = (
        f"{passed} of {len(PS)} drop rates keep the mean within ±{BAND:.0%}; the "
        f"largest deviation is {worst['ratio'] - 1:+.1e} at p = {worst['p']}. "
        f"The Dropout probes saw a keep rate of {keep.estimate:.5f} over "
        f"{nets.units_seen:,} units in training ("
        + outcome_words(checks[len(PS)], "as", "unlike", "not clearly as")
        + f" 1 − p = {1 - nets.p}). Without γ the same draws give "
        f"{wrong.estimate:.3f} at p = {p0}, which the band "
        + outcome_words(checks[-1], "rejects", "would not reject", "may not reject")
        + ": the check can fail."
    )
    return result(
        checks,
        headline=f"E[h_drop]/h within {abs(worst['ratio'] - 1):.1e} of 1 (worst: "
        f"p = {worst['p']}); γ = 1 gives {wrong.estimate:.3f} at p = {p0}; probe "
        f"keep rate {keep.estimate:.4f}",
        note=note,
        numbers=[
            number("draws per unit", draws),
            number("units (validation inputs × hidden units)", h.numel()),
            number("of which positive (after ReLU)", int(positive.sum())),
            number(
                f"keep rate seen by the probes (p = {nets.p})", keep.estimate, "", keep
            ),
        ],
        tables=[
            table(
                "By drop probability",
                [
                    ("p", "drop probability p"),
                    ("ratio", "E[h_drop]/h, γ = 1/(1−p)"),
                    ("low", "95% low"),
                    ("high", "95% high"),
                    ("ratio_gamma_one", "E[h_drop]/h, γ = 1"),
                    ("z_over", "share of units with |z| > 1.96 (≈ 0.05 expected)"),
                ],
                rows,
            )
        ],
        figures=[
            line_figure(
                "Mean activation after dropout, relative to h",
                "drop probability p",
                "E[h_drop] / h  (1 keeps the expectation)",
                [
                    series(
                        "γ = 1/(1−p) (inverted), measured",
                        [r["ratio"] for r in rows],
                        PS,
                        low=[r["low"] for r in rows],
                        high=[r["high"] for r in rows],
                    ),
                    series(
                        "γ = 1, measured (same draws)",
                        [r["ratio_gamma_one"] for r in rows],
                        PS,
                    ),
                    series(
                        "theory for γ = 1: 1 − p",
                        [1 - p for p in PS],
                        PS,
                        style="theory",
                    ),
                ],
                caption="Each measured point is the mean of optiscope's dropout over "
                "many draws, summed over units; the dashed line is the prediction for "
                "γ = 1, drawn under its measured points.",
            ),
        ],
    )


CLAIM = Claim(
    "C4",
    "γ = 1/(1−p) keeps the expectation",
    "E[h_drop]_i = γ h_i (1 − P_drop) = h_i ⇒ γ = 1/(1 − P_drop)",
    "We apply optiscope's dropout many times to a trained net's hidden activations "
    "and compare the mean with h, with CLT confidence intervals; the Dropout probes "
    "report the keep rate seen in training; and we show that the same test rejects "
    "γ = 1.",
    run,
)

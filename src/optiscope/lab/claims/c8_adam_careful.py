"""C8: near the optimum Adam is careful where v is large, which avoids divergence.

From the optimum of the convex problem (see :mod:`.shared`), Adam and momentum
run at rising multiples of their tuned learning rates. "Careful": the steps of
large-v weights, relative to small-v ones. "Avoids divergence": the largest
multiple at which a run ends no further from the optimum, in loss, than
W = 0 (a uniform guess).
"""

from __future__ import annotations

import math

import torch

import optiscope

from ..training import train
from ..verdicts import Check, t_interval
from ._common import (
    Claim,
    Context,
    ci_text,
    line_figure,
    not_applicable,
    number,
    outcome_words,
    result,
    series,
    table,
)
from .shared import CONVEX_BATCH, MOMENTUM_BETA, LinearRuns, full_objective, l2

MULTIPLIERS = (1, 2, 4, 8, 16, 32, 64)
LAST = 20  # steps over which the step size is measured


def _near_optimum(
    ctx: Context, convex, name: str, lr: float
) -> dict[str, torch.Tensor]:
    runs = convex.runs
    modules = [LinearRuns(runs, convex.w_star, convex.b_star) for _ in MULTIPLIERS]
    groups = [
        {"params": m.parameters(), "lr": lr * k}
        for m, k in zip(modules, MULTIPLIERS, strict=True)
    ]
    opt = (
        optiscope.Adam(groups)
        if name == "adam"
        else optiscope.Momentum(groups, momentum=MOMENTUM_BETA)
    )
    steps = ctx.pick(100, 200)
    previous = [m.flat().clone() for m in modules]
    squares = torch.zeros(len(MULTIPLIERS), runs, 2, dtype=torch.float64)
    index = (convex.near.small, convex.near.large)

    def on_step(step: int) -> None:
        for i, m in enumerate(modules):
            now = m.flat()
            if step >= steps - LAST:
                delta = (now - previous[i]).double()
                for g, idx in enumerate(index):
                    squares[i, :, g] += (delta[:, idx] ** 2).mean(1)
            previous[i] = now.clone()

    train(
        modules,
        [opt],
        ctx.data,
        steps=steps,
        batch=CONVEX_BATCH,
        seed=ctx.seed + 800,
        penalty=l2,
        on_step=on_step,
    )
    final = torch.stack([full_objective(m, ctx.data) for m in modules])  # (mult, runs)
    return {"objective": final, "step_rms": (squares / LAST).sqrt()}


def _largest_stable(diverged: torch.Tensor) -> torch.Tensor:
    """log2 of the largest multiplier with no divergence at it or below, per run;
    −1 when even the tuned rate diverges."""
    out = torch.empty(diverged.shape[1])
    for r in range(diverged.shape[1]):
        k = -1.0
        for i, m in enumerate(MULTIPLIERS):
            if diverged[i, r]:
                break
            k = math.log2(m)
        out[r] = k
    return out


def run(ctx: Context) -> dict:
    convex = ctx.shared.convex()
    ctx.advance(0.5)
    near = convex.near
    quarters = [
        number("weights in the small-v quarter at the optimum", len(near.small)),
        number("weights in the large-v quarter at the optimum", len(near.large)),
        number("median v there, large-v quarter / small-v quarter", near.spread, "×"),
    ]
    reason = convex.reason or near.reason  # C8 needs C3's tuned rates too
    if reason is not None:
        return not_applicable(reason, quarters)
    runs = {}
    for name in ("adam", "momentum"):
        runs[name] = _near_optimum(ctx, convex, name, convex.sweeps[name].best_lr)
        ctx.advance(0.5 + 0.25 * len(runs))
    limit = convex.objective_zero - convex.objective_star  # a uniform guess's excess
    excess = {k: r["objective"] - convex.objective_star for k, r in runs.items()}
    diverged = {k: ~e.isfinite() | (e > limit) for k, e in excess.items()}
    stable = {k: _largest_stable(d) for k, d in diverged.items()}
    # Step RMS of large-v over small-v weights at the tuned rate, log2, per run.
    ratio = {
        k: (r["step_rms"][0, :, 1] / r["step_rms"][0, :, 0]).log2()
        for k, r in runs.items()
    }
    careful = t_interval((ratio["adam"] - ratio["momentum"]).tolist())
    margin = t_interval((stable["adam"] - stable["momentum"]).tolist())
    checks = [
        Check(
            "log2 of (step RMS of large-v weights / small-v weights) near the optimum at "
            "the tuned rate, Adam − momentum",
            "below",
            0.0,
            careful,
        ),
        Check(
            "log2 of the largest learning-rate multiple (of the tuned rate) without "
            "divergence, Adam − momentum",
            "above",
            0.0,
            margin,
        ),
    ]
    each_ratio = {k: t_interval(v.tolist()) for k, v in ratio.items()}
    each_stable = {k: t_interval(v.tolist()) for k, v in stable.items()}
    note = (
        f"Near the optimum, large-v weights step 2^{each_ratio['adam'].estimate:.2f} "
        f"times as far as small-v weights under Adam and 2^"
        f"{each_ratio['momentum'].estimate:.2f} under momentum: Adam is "
        + outcome_words(
            checks[0], "more careful", "less careful", "not clearly more careful"
        )
        + " where v is large. Raising the learning rate, Adam stays stable up to "
        f"2^{each_stable['adam'].estimate:.1f}× its tuned rate and momentum up to "
        f"2^{each_stable['momentum'].estimate:.1f}× (a run diverges when it ends with "
        f"more excess loss than W = 0, a uniform guess: {limit:.3f} nats); the difference "
        f"{ci_text(margin, 2, True)} "
        + outcome_words(
            checks[1],
            "shows Adam avoiding divergence where momentum does not",
            "shows Adam diverging first",
            "does not resolve which diverges first",
        )
        + f" (capped at 2^{math.log2(MULTIPLIERS[-1]):.0f}×)."
    )
    rows = []
    for i, m in enumerate(MULTIPLIERS):
        rows.append(
            {
                "k": m,
                "adam_excess": float(excess["adam"][i].mean()),
                "momentum_excess": float(excess["momentum"][i].mean()),
                "adam_diverged": int(diverged["adam"][i].sum()),
                "momentum_diverged": int(diverged["momentum"][i].sum()),
                "adam_large": float(runs["adam"]["step_rms"][i, :, 1].mean()),
                "momentum_large": float(runs["momentum"]["step_rms"][i, :, 1].mean()),
            }
        )
    lines = []
    for name, label in (("adam", "Adam"), ("momentum", "momentum (β=0.9)")):
        finite = [
            i for i in range(len(MULTIPLIERS)) if excess[name][i].isfinite().all()
        ]
        stats = [t_interval(excess[name][i].clamp_min(1e-12).tolist()) for i in finite]
        lines.append(
            series(
                label,
                [s.estimate for s in stats],
                [MULTIPLIERS[i] for i in finite],
                low=[max(s.low, 1e-12) for s in stats],
                high=[s.high for s in stats],
            )
        )
    lines.append(
        series(
            "divergence threshold: excess loss of W = 0",
            [limit, limit],
            [MULTIPLIERS[0], MULTIPLIERS[-1]],
            style="theory",
        )
    )
    return result(
        checks,
        headline=f"large-/small-v step ratio 2^{each_ratio['adam'].estimate:.2f} (Adam) vs "
        f"2^{each_ratio['momentum'].estimate:.2f} (momentum); stable up to "
        f"2^{each_stable['adam'].estimate:.1f}× vs 2^{each_stable['momentum'].estimate:.1f}× "
        "the tuned rate",
        note=note,
        numbers=[
            number("runs (seeds)", convex.runs),
            *quarters,
            number("tuned learning rate, Adam", convex.sweeps["adam"].best_lr),
            number("tuned learning rate, momentum", convex.sweeps["momentum"].best_lr),
            number("steps from the optimum", ctx.pick(100, 200)),
            number(
                "log2 step ratio large/small v, Adam",
                each_ratio["adam"].estimate,
                "",
                each_ratio["adam"],
            ),
            number(
                "log2 step ratio large/small v, momentum",
                each_ratio["momentum"].estimate,
                "",
                each_ratio["momentum"],
            ),
            number(
                "log2 largest stable multiple, Adam",
                each_stable["adam"].estimate,
                "",
                each_stable["adam"],
            ),
            number(
                "log2 largest stable multiple, momentum",
                each_stable["momentum"].estimate,
                "",
                each_stable["momentum"],
            ),
            number("divergence threshold (excess loss at W = 0)", limit, "nats"),
        ],
        tables=[
            table(
                "By learning-rate multiple (means over runs)",
                [
                    ("k", "multiple of the tuned rate"),
                    ("adam_excess", "Adam: excess loss (nats)"),
                    ("momentum_excess", "momentum: excess loss (nats)"),
                    ("adam_diverged", "Adam: diverged runs"),
                    ("momentum_diverged", "momentum: diverged runs"),
                    ("adam_large", "Adam: step RMS, large-v weights"),
                    ("momentum_large", "momentum: step RMS, large-v weights"),
                ],
                rows,
            )
        ],
        figures=[
            line_figure(
                "Excess loss after starting at the optimum",
                "multiple of the tuned learning rate, log",
                "final loss − optimal loss, nats, log (lower is stabler)",
                lines,
                logx=True,
                logy=True,
                caption="Mean over runs with 95% t-intervals; a multiple where a run "
                "ended non-finite is left out of its line.",
            )
        ],
    )


CLAIM = Claim(
    "C8",
    "Adam is careful where v is large, which avoids divergence near the optimum",
    "θ_j that already changed/moved a lot would be more careful near the optimum to "
    "avoid divergence",
    "Starting at the optimum of the softmax regression of C3, Adam and momentum run "
    "at 1× to 64× their tuned learning rates over several seeds; we compare the steps "
    "of the weights whose v at the optimum is in the largest and the smallest "
    "quarter, and the largest multiple at which each optimizer stays near the "
    "optimum.",
    run,
)

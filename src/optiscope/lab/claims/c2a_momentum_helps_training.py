"""C2a: lower-variance updates help training: momentum against SGD, each at its best rate."""

from __future__ import annotations

import math

import numpy as np
import torch

import optiscope

from ..training import accuracies, losses, mlp, train
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
    table,
)

RATES = (0.03, 0.1, 0.3, 1.0, 2.0, 4.0)
BETA = 0.9
BATCH = 16
CURVE_RATE = 0.3  # the rate whose per-step loss curves are kept
CURVE_ROWS = 256  # a fixed subset of training rows for the per-step curve


def _roughness(curve: np.ndarray) -> np.ndarray:
    """RMS of the second difference of each loss curve (steps, runs): jitter, not trend."""
    return np.sqrt(np.mean(np.diff(curve, n=2, axis=0) ** 2, axis=0))


def run(ctx: Context) -> dict:
    data = ctx.data
    runs = ctx.shared.runs
    steps = ctx.pick(300, 600)
    seed = ctx.seed + 100
    models = {
        name: [mlp(data, runs, 64, 1, 0.0, seed) for _ in RATES]
        for name in ("sgd", "momentum")
    }
    opts = [
        optiscope.Momentum(
            [
                {"params": m.parameters(), "lr": lr}
                for m, lr in zip(models[name], RATES, strict=True)
            ],
            momentum=beta,
        )
        for name, beta in (("sgd", 0.0), ("momentum", BETA))
    ]
    at = RATES.index(CURVE_RATE)
    rows = torch.randperm(
        len(data.y_train), generator=torch.Generator().manual_seed(seed)
    )
    x_curve, y_curve = data.x_train[rows[:CURVE_ROWS]], data.y_train[rows[:CURVE_ROWS]]
    curves: dict[str, list[torch.Tensor]] = {"sgd": [], "momentum": []}

    def on_step(step: int) -> None:
        for name in curves:
            curves[name].append(losses(models[name][at], x_curve, y_curve))
            models[name][at].train()
        ctx.advance(0.9 * (step + 1) / steps)

    everything = [m for ms in models.values() for m in ms]
    train(
        everything, opts, data, steps=steps, batch=BATCH, seed=seed + 1, on_step=on_step
    )

    final = {  # (rates, runs); a diverged run's loss is non-finite
        name: torch.stack([losses(m, data.x_train, data.y_train) for m in ms])
        .double()
        .numpy()
        for name, ms in models.items()
    }
    acc = {
        name: torch.stack([accuracies(m, data.x_val, data.y_val) for m in ms]).numpy()
        for name, ms in models.items()
    }
    chance = math.log(data.n_classes)  # the loss of a uniform guess
    diverged = {name: ~np.isfinite(f) | (f > chance) for name, f in final.items()}
    ranked = {
        name: np.where(np.isfinite(f), f, np.inf).mean(1) for name, f in final.items()
    }
    best = {name: int(np.argmin(r)) for name, r in ranked.items()}
    difference = final["momentum"][best["momentum"]] - final["sgd"][best["sgd"]]
    paired = t_interval(difference.tolist())
    rough = {
        name: _roughness(torch.stack(c).double().numpy()) for name, c in curves.items()
    }
    rough_ci = {name: t_interval(r.tolist()) for name, r in rough.items()}

    checks = [
        Check(
            "final training loss, momentum − SGD, each at its best learning rate",
            "below",
            0.0,
            paired,
        )
    ]
    unstable = {
        name: [lr for lr, d in zip(RATES, diverged[name], strict=True) if d.any()]
        for name in final
    }
    note = (
        f"Each optimizer's best learning rate on this grid (lowest mean final training "
        f"loss): SGD {RATES[best['sgd']]}, momentum {RATES[best['momentum']]}. There, "
        f"momentum's final training loss minus SGD's is {ci_text(paired, 4, True)}: "
        + outcome_words(
            checks[0],
            "momentum trains to a lower loss",
            "momentum trains to a higher loss",
            "no difference is resolved",
        )
        + f". Runs that end above the loss of a uniform guess (ln {data.n_classes} = "
        f"{chance:.3f}) or non-finite count as diverged: SGD at lr ∈ "
        f"{unstable['sgd'] or 'none'}, momentum at lr ∈ {unstable['momentum'] or 'none'}. "
        f"At lr = {CURVE_RATE} momentum's loss curve is "
        f"{rough_ci['sgd'].estimate / rough_ci['momentum'].estimate:.1f}× smoother "
        "(RMS second difference)."
    )

    def band(values: np.ndarray) -> tuple[float, float, float]:
        interval = t_interval(values.tolist())
        return interval.estimate, interval.low, interval.high

    rows_out = []
    for i, lr in enumerate(RATES):
        rows_out.append(
            {
                "lr": lr,
                "loss_sgd": float(np.mean(final["sgd"][i])),
                "loss_momentum": float(np.mean(final["momentum"][i])),
                "acc_sgd": float(np.mean(acc["sgd"][i])),
                "acc_momentum": float(np.mean(acc["momentum"][i])),
                "diverged_sgd": int(diverged["sgd"][i].sum()),
                "diverged_momentum": int(diverged["momentum"][i].sum()),
            }
        )
    lines = []
    for name, label in (("sgd", "SGD (β=0)"), ("momentum", "momentum (β=0.9)")):
        finite = [i for i in range(len(RATES)) if np.isfinite(final[name][i]).all()]
        stats = [band(final[name][i]) for i in finite]
        lines.append(
            series(
                label,
                [s[0] for s in stats],
                [RATES[i] for i in finite],
                low=[s[1] for s in stats],
                high=[s[2] for s in stats],
            )
        )
    return result(
        checks,
        headline=f"final loss at best lr: momentum {final['momentum'][best['momentum']].mean():.4f} "
        f"(lr {RATES[best['momentum']]}) vs SGD {final['sgd'][best['sgd']].mean():.4f} "
        f"(lr {RATES[best['sgd']]}); difference {ci_text(paired, 4, True)}",
        note=note,
        numbers=[
            number("runs (seeds) per learning rate", runs),
            number("steps", steps),
            number("batch size", BATCH),
            number("best learning rate, SGD", RATES[best["sgd"]]),
            number("best learning rate, momentum", RATES[best["momentum"]]),
            number(
                "final training loss, momentum − SGD, at the best rates",
                paired.estimate,
                "nats",
                paired,
            ),
            number(
                f"loss-curve roughness at lr {CURVE_RATE}, SGD",
                rough_ci["sgd"].estimate,
                "nats",
                rough_ci["sgd"],
            ),
            number(
                f"loss-curve roughness at lr {CURVE_RATE}, momentum",
                rough_ci["momentum"].estimate,
                "nats",
                rough_ci["momentum"],
            ),
        ],
        tables=[
            table(
                "By learning rate (means over runs)",
                [
                    ("lr", "learning rate α"),
                    ("loss_sgd", "final train loss, SGD (nats)"),
                    ("loss_momentum", "final train loss, momentum (nats)"),
                    ("acc_sgd", "val. accuracy, SGD"),
                    ("acc_momentum", "val. accuracy, momentum"),
                    ("diverged_sgd", "diverged runs, SGD"),
                    ("diverged_momentum", "diverged runs, momentum"),
                ],
                rows_out,
            )
        ],
        series={
            f"{name}_lr{CURVE_RATE}_run0_loss": torch.stack(c)[:, 0].tolist()
            for name, c in curves.items()
        },
        figures=[
            line_figure(
                "Final training loss against learning rate",
                "learning rate α, log",
                "final training loss, nats, log (lower is better)",
                lines,
                logx=True,
                logy=True,
                caption="Mean over runs with 95% t-intervals; a rate where any run "
                "diverged to a non-finite loss is left out of that line.",
            ),
            line_figure(
                f"Training loss per step at lr = {CURVE_RATE} (run 0)",
                "step",
                "training loss, nats, log (lower is better)",
                [
                    series("SGD (β=0)", torch.stack(curves["sgd"])[:, 0].tolist()),
                    series(
                        "momentum (β=0.9)",
                        torch.stack(curves["momentum"])[:, 0].tolist(),
                    ),
                ],
                logy=True,
                caption=f"Loss on a fixed subset of {CURVE_ROWS} training rows after every step.",
            ),
        ],
    )


CLAIM = Claim(
    "C2a",
    "Low-variance updates help learning",
    "why this low variance may be helpful to learning",
    "SGD and EMA momentum (β = 0.9, the same effective step) train the same nets "
    "from the same initial weights on the same minibatches, over a grid of learning "
    "rates and several seeds; we compare the final training loss of each at its "
    "own best rate.",
    run,
)

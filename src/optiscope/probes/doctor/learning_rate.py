"""The learning-rate findings: ``lr_too_high``, ``lr_too_low`` and ``lr_low``
(from the update-to-weight ratio RMS(Δθ)/RMS(θ)), and ``eps_dominates`` (Adam's
ε larger than √v̂ for most coordinates)."""

from __future__ import annotations

import math

import numpy as np

from .finding import Finding, _finding, _steps
from .records import _latter, _number, _Run
from .thresholds import (
    EPS_FRACTION,
    EPS_GRAD_FACTOR,
    MIN_RECORDS,
    RULE_OF_THUMB,
    UW_HIGH,
    UW_HIGH_PEAK,
    UW_HIGH_STEPS,
    UW_LOW,
    UW_SLOW,
    ZERO_START_SKIP,
)


def _eps(run: _Run, out: list[Finding]) -> set[str]:
    flagged = set()
    eps = _group_eps(run)
    if eps is None:
        return flagged
    for name, t in run.tensors.items():
        if not len(t.eps.values) or not len(t.grad.values):
            continue
        steps, fractions = _latter(t.eps)
        fraction = float(np.median(fractions))
        grad = float(np.median(_latter(t.grad)[1]))
        if fraction >= EPS_FRACTION and grad < EPS_GRAD_FACTOR * eps:
            flagged.add(name)
            out.append(
                _finding(
                    run,
                    code="eps_dominates",
                    severity="warning",
                    title="ε dominates Adam's denominator",
                    scope=name,
                    parameters=(name,),
                    steps=_steps(steps),
                    evidence={
                        "eps_dominated_fraction": fraction,
                        "eps": eps,
                        "grad_rms": grad,
                    },
                    threshold=f"median fraction of coordinates with √v̂ < ε ≥ "
                    f"{EPS_FRACTION} while median RMS(g) < {EPS_GRAD_FACTOR:g}·ε",
                    basis="where √v̂ < ε the step is α·m̂/ε: SGD with learning rate "
                    "α/ε, without the per-coordinate scaling that makes Adam; the "
                    "RMS(g) condition separates this from coordinates that never "
                    "received a gradient (also √v̂ < ε)",
                    action=f"lower eps well below the gradient scale (RMS(g) = "
                    f"{grad:.1e}): at most {grad / 1e3:.0e}, or the default 1e-8",
                )
            )
    return flagged


def _group_eps(run: _Run) -> float | None:
    values = [_number(g.get("eps")) for g in run.groups.values()]
    values = [v for v in values if math.isfinite(v)]
    return max(values) if values else None


def _learning_rate(
    run: _Run, out: list[Finding], skip_high: set[str], skip_low: set[str]
) -> None:
    lrs = sorted({_number(g.get("lr")) for g in run.groups.values()})
    for name, t in run.tensors.items():
        if t.nonfinite_first is not None or not len(t.uw.values):
            continue
        sustained = t.high_max >= UW_HIGH_PEAK or t.high_count >= 0.1 * t.records
        if t.high_count >= UW_HIGH_STEPS and sustained and name not in skip_high:
            out.append(
                _finding(
                    run,
                    code="lr_too_high",
                    severity="warning",
                    title="learning rate too high",
                    scope=name,
                    parameters=(name,),
                    steps=(t.high[0], t.high_last),
                    evidence={
                        "steps_above": t.high_count,
                        "max_update_to_weight": t.high_max,
                        "lr": lrs[-1] if lrs else None,
                    },
                    threshold=f"RMS(Δθ)/RMS(θ) > {UW_HIGH:g} on at least "
                    f"{UW_HIGH_STEPS} measured steps, reaching {UW_HIGH_PEAK:g} or "
                    "on 10% of them (for a tensor that starts at 0, from its "
                    f"{ZERO_START_SKIP + 1}st step)",
                    basis=f"100× {RULE_OF_THUMB}: each such step changes the tensor "
                    "by a tenth of its size; the lab's healthy digits MLP peaks at "
                    "3e-2 (Adam, lr 1e-3, first step), and small tensors such as "
                    "biases reach 0.1–0.2 for a few early steps in runs that train "
                    "well (a linear model on the digits, Momentum lr 1), hence the "
                    "second condition",
                    action=f"lower the learning rate about "
                    f"{_round_factor(t.high_max / 1e-2)}× (until the ratio stays "
                    "below 1e-2), or add a warm-up",
                )
            )
            continue
        if name in skip_low:
            continue
        steps, values = _latter(t.uw)
        median = float(np.median(values))
        if median >= UW_SLOW or len(values) < MIN_RECORDS // 2:
            continue
        low = median < UW_LOW
        out.append(
            _finding(
                run,
                code="lr_too_low" if low else "lr_low",
                severity="warning" if low else "info",
                title="learning rate too low" if low else "slow updates",
                scope=name,
                parameters=(name,),
                steps=_steps(steps),
                evidence={
                    "median_update_to_weight": median,
                    "lr": lrs[-1] if lrs else None,
                },
                threshold=f"median RMS(Δθ)/RMS(θ) over the second half < "
                f"{UW_LOW if low else UW_SLOW:g}",
                basis=(
                    f"1.5 decades below {RULE_OF_THUMB}; the lab's healthy digits "
                    "MLP: Adam (lr 1e-3) 2.5e-3 to 1e-2, Momentum at its defaults "
                    "from 9e-5; lr ÷1000 gives 4e-6 to 9e-6"
                    if low
                    else f"a decade below {RULE_OF_THUMB}"
                ),
                action=(
                    "the steps round away in the parameter's dtype (θ does not "
                    "change): raise the learning rate"
                    if median == 0
                    else f"raise the learning rate about "
                    f"{_round_factor(1e-3 / median)}×"
                    if low
                    else "training may be slow: a larger learning rate could help"
                ),
            )
        )


def _round_factor(x: float) -> str:
    if not math.isfinite(x) or x <= 0:
        return "?"
    return f"{10 ** round(math.log10(x)):g}"

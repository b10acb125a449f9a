"""The momentum finding: ``variance_ratio``, Momentum's smoothed Var(m)/Var(g)
far from (1−β)/(1+β)."""

from __future__ import annotations

import numpy as np

from .finding import Finding, _finding, _steps
from .records import _latter, _number, _Run
from .thresholds import MIN_RECORDS, VARIANCE_FACTOR


def _variance(run: _Run, out: list[Finding]) -> None:
    for index, series in run.group_variance.items():
        group = run.groups.get(index, {})
        predicted = _number(group.get("predicted_variance_ratio"))
        steps, values = _latter(series)
        if len(values) < MIN_RECORDS // 2 or not predicted > 0:
            continue
        median = float(np.median(values))
        if predicted / VARIANCE_FACTOR <= median <= predicted * VARIANCE_FACTOR:
            continue
        out.append(
            _finding(
                run,
                code="variance_ratio",
                severity="info",
                title="gradients correlated across steps",
                scope=f"group{index}",
                parameters=tuple(
                    n for n, t in run.tensors.items() if len(t.variance.values)
                ),
                steps=_steps(steps),
                evidence={
                    "variance_ratio": median,
                    "predicted": predicted,
                    "momentum": _number(group.get("momentum")),
                },
                threshold=f"median smoothed Var(m)/Var(g) over the second half "
                f"outside [1/{VARIANCE_FACTOR:g}, {VARIANCE_FACTOR:g}]× (1−β)/(1+β)",
                basis="on gradients with i.i.d. noise the estimate is within 5% of "
                "(1−β)/(1+β) (tests/test_probes.py), and 0.052 against 0.053 in the "
                "lab's minibatch digits run; far from it, the noise is not "
                "independent from step to step (full batch, drifting or "
                "oscillating gradients), and momentum's smoothing is not what "
                "theory says",
                action="no action needed; with full-batch or very large batches "
                "momentum averages little noise, so its value is in acceleration",
            )
        )

"""The gradient findings: ``nonfinite_gradients`` and ``nonfinite_parameters``,
``zero_gradient`` (exactly zero from some step on), and ``exploding_gradients``
and ``vanishing_gradients`` (the trend of RMS(g) against its first steps)."""

from __future__ import annotations

import numpy as np

from .finding import Finding, _finding, _layers, _steps
from .records import _Run
from .thresholds import EXPLODE, MIN_RECORDS, VANISH, ZERO_GRAD_STEPS


def _nonfinite(run: _Run) -> list[Finding]:
    hit = {n: t for n, t in run.tensors.items() if t.nonfinite_first is not None}
    out = []
    if hit:
        first = min(t.nonfinite_first[0] for t in hit.values())
        origin = sorted(n for n, t in hit.items() if t.nonfinite_first[0] == first)
        entries = sum(hit[n].nonfinite_first[1] for n in origin)
        later = max(t.nonfinite_records for t in hit.values())
        last = max(t.last_step for t in hit.values())
        out.append(
            _finding(
                run,
                code="nonfinite_gradients",
                severity="error",
                title="non-finite gradients",
                scope=", ".join(origin),
                parameters=tuple(origin),
                steps=(first, last),
                evidence={
                    "first_step": first,
                    "entries_at_first_step": entries,
                    "parameters_affected": len(hit),
                    "records_with_nonfinite": later,
                },
                threshold="any NaN or infinite gradient entry",
                basis="a non-finite gradient enters the optimizer state (Adam's m "
                "and v, Momentum's buffer) and from there every later step",
                action=f"find what made the gradient of {origin[0]} non-finite at "
                f"step {first} (the loss or inputs of that batch; "
                "torch.autograd.set_detect_anomaly(True) names the operation); "
                "clip gradients or skip such steps (GradScaler does)",
            )
        )
    broken = {n: t.param_nonfinite for n, t in run.tensors.items() if t.param_nonfinite}
    if broken:
        first = min(broken.values())
        names = sorted(n for n, s in broken.items() if s == first)
        out.append(
            _finding(
                run,
                code="nonfinite_parameters",
                severity="error",
                title="non-finite parameters",
                scope=", ".join(names),
                parameters=tuple(sorted(broken)),
                steps=(first, run.last_step),
                evidence={"first_step": first, "parameters_affected": len(broken)},
                threshold="RMS(θ) not finite after a step",
                basis="a parameter with a NaN or inf entry makes every output it "
                "feeds non-finite: the model is lost from this step on",
                action="restart from a checkpoint before step "
                f"{first} after removing the cause (see nonfinite_gradients, or a "
                "learning rate that overflows the parameters)",
            )
        )
    return out


def _zero_gradient(run: _Run, out: list[Finding]) -> set[str]:
    """Tensors whose gradient is exactly 0 at every step from some step on."""
    zero = {
        n: t
        for n, t in run.tensors.items()
        if t.zero_since is not None
        and (t.zero_records >= ZERO_GRAD_STEPS or t.zero_since == t.first_step)
        and t.nonfinite_first is None
    }
    for layer, parts in _layers(zero).items():
        names = [parts[k] for k in ("weight", "bias", "tensor") if k in parts]
        all_parts = _layers(run.tensors)[layer]
        whole = set(all_parts.values()) <= set(zero)
        t = zero[names[0]]
        since = min(zero[n].zero_since for n in names)
        always = all(zero[n].last_nonzero_grad is None for n in names)
        only_weight = not whole and "bias" in all_parts
        if only_weight:
            severity = "warning"
            cause = (
                "its bias does receive a gradient, so the inputs of this layer "
                "were all zero: the layer before it is dead"
            )
            action = "fix the layer that feeds this one (see its findings)"
        else:
            severity = "error"
            cause = (
                "no path from the loss reaches it: its units never activate "
                "(ReLU with a large negative bias or pre-activation), or its "
                "output is unused"
            )
            action = (
                "check the layer's initialisation (a bias far below 0 kills a "
                "ReLU layer) and that its output reaches the loss; if it died "
                "during training, lower the learning rate"
            )
        out.append(
            _finding(
                run,
                code="zero_gradient",
                severity=severity,
                title="gradient exactly zero"
                + (" from the first step" if always else f" since step {since}"),
                scope=", ".join(names),
                parameters=tuple(names),
                steps=(since, max(zero[n].last_step for n in names)),
                evidence={
                    "zero_gradient_records": min(zero[n].zero_records for n in names),
                    "last_nonzero_gradient_step": t.last_nonzero_grad,
                    "numel": sum(zero[n].numel for n in names),
                },
                threshold=f"RMS(g) = 0 exactly on every measured step (at least "
                f"{ZERO_GRAD_STEPS}, or all of them)",
                basis=f"an exactly zero gradient on every step: {cause}",
                action=action,
            )
        )
    return set(zero)


def _windows(values: np.ndarray) -> np.ndarray:
    """Medians of consecutive windows (5 points, or 1/20 of the series)."""
    size = max(5, len(values) // 20)
    count = len(values) // size
    return np.median(values[: count * size].reshape(count, size), axis=1)


def _trend(run: _Run, out: list[Finding], skip: set[str]) -> None:
    for name, t in run.tensors.items():
        steps, values = t.grad.arrays()
        if len(values) < MIN_RECORDS:
            continue
        windows = _windows(values)
        size = len(values) // len(windows)
        start = float(np.median(values[:5]))  # before anything could build up
        peak = int(np.argmax(windows))
        if windows[peak] >= EXPLODE * start:
            factor = float(windows[peak] / start)
            out.append(
                _finding(
                    run,
                    code="exploding_gradients",
                    severity="error" if factor >= EXPLODE**2 else "warning",
                    title="exploding gradients",
                    scope=name,
                    parameters=(name,),
                    steps=(
                        int(steps[0]),
                        int(steps[min(len(steps) - 1, (peak + 1) * size - 1)]),
                    ),
                    evidence={
                        "initial_grad_rms": float(start),
                        "peak_grad_rms": float(windows[peak]),
                        "factor": factor,
                    },
                    threshold=f"a window median of RMS(g) ≥ {EXPLODE:g}× the median "
                    "of the first 5 measured steps",
                    basis="in the lab's healthy digits runs the gradient RMS stays "
                    "within 0.3× to 10× of its first steps",
                    action="lower the learning rate, clip gradients "
                    "(torch.nn.utils.clip_grad_norm_), or normalise the inputs",
                )
            )
            continue
        end = windows[-1]
        if end <= VANISH * start and name not in skip:  # else: zero_gradient
            out.append(
                _finding(
                    run,
                    code="vanishing_gradients",
                    severity="warning",
                    title="vanishing gradients",
                    scope=name,
                    parameters=(name,),
                    steps=_steps(steps),
                    evidence={
                        "initial_grad_rms": float(start),
                        "final_grad_rms": float(end),
                        "factor": float(end / start),
                    },
                    threshold=f"the last window median of RMS(g) ≤ {VANISH:g}× the "
                    "median of the first 5 measured steps (and not exactly 0)",
                    basis="in the lab's healthy digits runs the gradient RMS stays "
                    "within 0.3× to 10× of its first steps; a fall by 1000× means "
                    "saturated units or a loss at its floor",
                    action="if the loss is not yet low: check for saturating "
                    "activations, use normalisation or residual connections",
                )
            )

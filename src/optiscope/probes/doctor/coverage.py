"""The coverage findings, from Adam coordinates whose ``v`` is still 0 at the
last step (they never received a gradient): ``dead_units`` (bias entries: whole
rows), ``zero_inputs`` (weight columns beyond those rows) and ``never_updated``
(tensors without a bias to tell the two apart)."""

from __future__ import annotations

import math

from .finding import Finding, _finding, _layers
from .records import _number, _Run
from .thresholds import DEAD_ERROR, DEAD_WARNING


def _never(run: _Run, out: list[Finding], skip: set[str]) -> None:
    """Coordinates whose v is 0 at the last step (Adam only)."""
    counts: dict[str, tuple[float, int]] = {}
    for name, t in run.tensors.items():
        if name in skip or not t.last_unbounded or not t.numel:
            continue
        fraction = _number(t.last.get("eps_dominated_fraction"))
        if math.isfinite(fraction) and fraction > 0:
            counts[name] = (fraction, t.numel)
    for parts in _layers(run.tensors).values():
        weight, bias = parts.get("weight"), parts.get("bias")
        dead = 0
        if bias in counts:
            fraction, units = counts[bias]
            dead = round(fraction * units)
            share = dead / units
            severity = (
                "error"
                if share >= DEAD_ERROR
                else "warning"
                if share >= DEAD_WARNING
                else "info"
            )
            t = run.tensors[bias]
            out.append(
                _finding(
                    run,
                    code="dead_units",
                    severity=severity,
                    title="units that never received a gradient",
                    scope=", ".join(n for n in (weight, bias) if n),
                    parameters=tuple(n for n in (weight, bias) if n),
                    steps=(t.first_step, t.last_step),
                    evidence={
                        "dead_units": dead,
                        "units": units,
                        "dead_fraction": share,
                    },
                    threshold=f"bias entries with v = 0 at the last step; info below "
                    f"{DEAD_WARNING:.0%} of the layer, warning from {DEAD_WARNING:.0%}, "
                    f"error from {DEAD_ERROR:.0%}",
                    basis="a unit whose bias never received a gradient was never "
                    "active for any example (a dead ReLU); a few % are dead from "
                    "initialisation in healthy ReLU nets (2.7% of the first layer of "
                    "the lab's digits MLP)",
                    action="no action needed"
                    if severity == "info"
                    else "re-initialise (a bias far below 0 kills ReLUs; He "
                    "initialisation), lower the learning rate, or use a leaky ReLU",
                )
            )
        if weight in counts:
            fraction, numel = counts[weight]
            never = fraction * numel
            t = run.tensors[weight]
            if bias is not None and bias in run.tensors:
                units = run.tensors[bias].numel or 1
                inputs = numel // units
                alive = units - dead
                columns = (never - dead * inputs) / alive if alive > 0 else 0.0
                if columns < 0.05:
                    continue
                out.append(
                    _finding(
                        run,
                        code="zero_inputs",
                        severity="info",
                        title="inputs that were always zero",
                        scope=weight,
                        parameters=(weight,),
                        steps=(t.first_step, t.last_step),
                        evidence={
                            "zero_input_columns": round(columns, 1),
                            "inputs": inputs,
                            "never_updated": round(never),
                            "never_updated_fraction": fraction,
                        },
                        threshold="weight coordinates with v = 0 at the last step "
                        "beyond the rows of dead units",
                        basis="a weight column whose input is 0 for every example "
                        "never receives a gradient, while the bias does: a fact "
                        "about the data (never-lit pixels, constant features) or "
                        "about dead units of the layer before; an input that is "
                        "rarely non-zero leaves part of its column at v = 0 and "
                        "counts as a fraction of a column",
                        action="no action needed (drop constant features to save "
                        "compute)",
                    )
                )
            elif not bias:
                out.append(
                    _never_updated(
                        run,
                        weight,
                        counts[weight],
                        basis="rows or columns that no example reached (embeddings "
                        "of unseen tokens, always-zero inputs)",
                    )
                )
        tensor = parts.get("tensor")
        if tensor in counts:
            out.append(
                _never_updated(
                    run,
                    tensor,
                    counts[tensor],
                    basis="coordinates that no example reached (embeddings of "
                    "unseen tokens, always-zero inputs, dead units)",
                )
            )


def _never_updated(
    run: _Run, name: str, count: tuple[float, int], basis: str
) -> Finding:
    """The ``never_updated`` finding of tensor ``name``, whose ``count`` is
    (fraction of coordinates with v = 0 at the last step, numel)."""
    fraction, numel = count
    t = run.tensors[name]
    return _finding(
        run,
        code="never_updated",
        severity="info",
        title="coordinates that never received a gradient",
        scope=name,
        parameters=(name,),
        steps=(t.first_step, t.last_step),
        evidence={"never_updated_fraction": fraction, "numel": numel},
        threshold="coordinates with v = 0 at the last step",
        basis=basis,
        action="no action needed",
    )

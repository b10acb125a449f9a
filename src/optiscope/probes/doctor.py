"""``diagnose(records)``: what the probe records say is wrong, as data.

Each :class:`Finding` names the run, the parameter (or layer, group, module)
and the steps it is about, the evidence (the numbers it rests on), the
threshold it crossed and where that threshold comes from, a suggested action,
and a severity:

``info``
    A fact about the model or the data that needs no action (the border
    pixels of the digits are never lit, so Adam's ``v`` stays 0 for the
    weights that read them).
``warning``
    Training works less well than it could; the action says what to change.
``error``
    Training is broken (non-finite values, a layer that receives no gradient).

The checks, by ``code``:

``lr_too_high``, ``lr_too_low``, ``lr_low``
    Per parameter, from the update-to-weight ratio RMS(Δθ)/RMS(θ).
``eps_dominates``
    Adam's ε larger than √v̂ for most coordinates.
``dead_units``, ``zero_inputs``, ``never_updated``
    Adam coordinates whose ``v`` is still 0 at the last step: they never
    received a gradient. A layer's bias tells dead units (a whole row, and
    the bias entry) from inputs that were always zero (whole columns).
``zero_gradient``
    A tensor whose gradient is exactly zero at every step (from some step on).
``exploding_gradients``, ``vanishing_gradients``
    The trend of the gradient RMS against its level at the start.
``nonfinite_gradients``, ``nonfinite_parameters``
    NaN or infinite gradients (where they first appear) or parameters.
``forgotten_eval``
    A Dropout layer run in training mode with gradients off.
``keep_rate``
    A Dropout layer's observed keep rate outside its binomial bounds.
``variance_ratio``
    Momentum's smoothed Var(m)/Var(g) far from (1−β)/(1+β).

The thresholds were set on the digits MLP of ``optiscope lab`` (64-256-256-10,
ReLU, dropout 0.5, batch 32) with injected pathologies (``tests/test_doctor.py``);
each finding's ``basis`` says so where it applies. Records are read once, in
order, keeping a bounded summary per tensor (long series are thinned to at
most :data:`MAX_POINTS` evenly spaced points), so a file of any length fits in
memory.

Example:
    >>> import torch, optiscope
    >>> w = torch.nn.Parameter(torch.ones(100))
    >>> opt = optiscope.Adam([w], lr=1e-7, probe=True)
    >>> for _ in range(100):
    ...     w.grad = torch.randn(100)
    ...     opt.step()
    >>> [f.code for f in optiscope.probes.diagnose(opt._probe.history)]
    ['lr_too_low']
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SEVERITIES = ("info", "warning", "error")

#: The most points of one series a diagnosis keeps (longer ones are thinned).
MAX_POINTS = 4096

# -- thresholds, each with where it comes from ----------------------------------
RULE_OF_THUMB = (
    "the rule of thumb that a step changes a tensor by about 1e-3 of its size "
    "(Karpathy, CS231n, 'Neural Networks Part 3')"
)
UW_HIGH = 1e-1
UW_HIGH_STEPS = 3
UW_HIGH_PEAK = 0.3
UW_LOW = 3e-5
UW_SLOW = 1e-4
ZERO_START_SKIP = 20
EPS_FRACTION = 0.5
EPS_GRAD_FACTOR = 100.0
DEAD_WARNING = 0.1
DEAD_ERROR = 0.9
ZERO_GRAD_STEPS = 10
EXPLODE = 100.0
VANISH = 1e-3
KEEP_Z_POOLED = 5.0
KEEP_Z_CALL = 6.0
VARIANCE_FACTOR = 3.0
MIN_RECORDS = 20


@dataclass(frozen=True)
class Finding:
    """One conclusion from the probe records, with what it rests on."""

    code: str
    severity: str
    title: str
    scope: str  # a parameter, a layer ("0": 0.weight and 0.bias), a group, a module
    steps: tuple[int, int]  # the first and last step of the evidence
    evidence: dict[str, Any]
    threshold: str
    basis: str
    action: str
    source: str = ""  # "Adam", "Momentum", "Dropout", ...
    run: str | None = None
    parameters: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``steps`` and ``parameters`` as lists)."""
        out = asdict(self)
        out["steps"] = list(self.steps)
        out["parameters"] = list(self.parameters)
        return out

    def __str__(self) -> str:
        first, last = self.steps
        steps = f"step {first}" if first == last else f"steps {first}–{last}"
        return f"[{self.severity}] {self.title}: {self.scope} ({steps})"


# -- reading -------------------------------------------------------------------------
class _Series:
    """(step, value) pairs, thinned to every other point past MAX_POINTS."""

    __slots__ = ("seen", "steps", "stride", "values")

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: list[float] = []
        self.stride = 1
        self.seen = 0

    def add(self, step: int, value: float) -> None:
        if self.seen % self.stride == 0:
            self.steps.append(step)
            self.values.append(value)
            if len(self.values) > MAX_POINTS:
                del self.steps[1::2], self.values[1::2]
                self.stride *= 2
        self.seen += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.steps, dtype=np.int64), np.asarray(
            self.values, dtype=np.float64
        )


class _Tensor:
    """What one parameter's records add up to."""

    def __init__(self) -> None:
        self.uw = _Series()
        self.grad = _Series()
        self.eps = _Series()
        self.variance = _Series()
        self.first_step: int | None = None
        self.last_step = 0
        self.records = 0
        self.numel = 0
        self.started_at_zero = False
        self.high: list[int] = []  # steps with update_to_weight > UW_HIGH (first few)
        self.high_count = 0
        self.high_max = 0.0
        self.high_last = 0
        self.nonfinite_first: tuple[int, int] | None = None  # (step, entries)
        self.nonfinite_records = 0
        self.param_nonfinite: int | None = None
        self.last_nonzero_grad: int | None = None
        self.zero_since: int | None = None
        self.zero_records = 0
        self.last: dict[str, Any] = {}
        self.last_unbounded = False  # step_max == α/ε at the last record

    def add(self, step: int, values: dict[str, Any], bounds: list[float]) -> None:
        if self.first_step is None:
            self.first_step = step
            uw0 = values.get("update_to_weight", math.nan)
            # θ was 0 before its first step exactly when θ = −Δθ after it.
            self.started_at_zero = not abs(uw0 - 1) > 1e-6
        self.last_step = step
        self.records += 1
        self.numel = int(values.get("numel", self.numel) or 0)
        grad = _number(values.get("grad_rms"))
        uw = _number(values.get("update_to_weight"))
        bad = int(values.get("nonfinite_grads") or 0)
        if bad:
            self.nonfinite_records += 1
            if self.nonfinite_first is None:
                self.nonfinite_first = (step, bad)
        param = _number(values.get("param_rms"))
        if not math.isfinite(param) and self.param_nonfinite is None:
            self.param_nonfinite = step
        if math.isfinite(grad):
            if grad > 0:
                self.last_nonzero_grad = step
                self.zero_since = None
                self.zero_records = 0
                self.grad.add(step, grad)
            else:
                if self.zero_since is None:
                    self.zero_since = step
                self.zero_records += 1
        if math.isfinite(uw) and grad > 0:
            self.uw.add(step, uw)
            young = self.started_at_zero and self.records <= ZERO_START_SKIP
            if uw > UW_HIGH and not young:
                self.high_count += 1
                self.high_max = max(self.high_max, uw)
                self.high_last = step
                if len(self.high) < 1:
                    self.high.append(step)
        if "eps_dominated_fraction" in values and math.isfinite(grad):
            self.eps.add(step, float(values["eps_dominated_fraction"]))
        ratio = _number(values.get("variance_ratio"))
        if math.isfinite(ratio):
            self.variance.add(step, ratio)
        self.last = values
        step_max = _number(values.get("step_max"))
        self.last_unbounded = any(
            math.isfinite(step_max) and abs(step_max - b) <= 1e-4 * b for b in bounds
        )


class _Run:
    """The summaries of one (run, source)."""

    def __init__(self, run: str | None, source: str) -> None:
        self.run = run
        self.source = source
        self.tensors: dict[str, _Tensor] = defaultdict(_Tensor)
        self.groups: dict[int, dict[str, Any]] = {}
        self.group_variance: dict[int, _Series] = defaultdict(_Series)
        self.modules: dict[str, _Module] = defaultdict(_Module)
        self.records = 0
        self.first_step: int | None = None
        self.last_step = 0

    def add(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", self.records + 1))
        if self.first_step is None:
            self.first_step = step
        self.last_step = step
        self.records += 1
        bounds = []
        for group in record.get("groups", ()):
            index = int(group.get("group", 0))
            self.groups[index] = group
            lr, eps = _number(group.get("lr")), _number(group.get("eps"))
            if eps > 0 and math.isfinite(lr):
                bounds.append(lr / eps)
            ratio = _number(group.get("variance_ratio"))
            if math.isfinite(ratio):
                self.group_variance[index].add(step, ratio)
        for name, values in record.get("params", {}).items():
            self.tensors[name].add(step, values, bounds)
        for name, values in record.get("modules", {}).items():
            self.modules[name].add(step, values)


class _Module:
    def __init__(self) -> None:
        self.kept = 0.0
        self.seen = 0
        self.expected: float | None = None
        self.worst: tuple[float, int] = (0.0, 0)  # (|z|, step)
        self.no_grad_steps: list[int] = []
        self.no_grad_count = 0
        self.first_step: int | None = None
        self.last_step = 0

    def add(self, step: int, values: dict[str, Any]) -> None:
        if self.first_step is None:
            self.first_step = step
        self.last_step = step
        if values.get("grad_enabled") is False:
            self.no_grad_count += 1
            if len(self.no_grad_steps) < 5:
                self.no_grad_steps.append(step)
        n = int(values.get("numel") or 0)
        rate, expected = (
            _number(values.get("keep_rate")),
            values.get("expected_keep_rate"),
        )
        if n and math.isfinite(rate) and expected is not None:
            self.expected = float(expected)
            self.kept += rate * n
            self.seen += n
            z = _z(rate, self.expected, n)
            if abs(z) > abs(self.worst[0]):
                self.worst = (z, step)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _z(rate: float, expected: float, n: int) -> float:
    sd = math.sqrt(expected * (1 - expected) / n) if n else 0.0
    if sd == 0:
        return 0.0 if rate == expected else math.inf
    return (rate - expected) / sd


def _records(source: Any) -> Iterator[dict[str, Any]]:
    if isinstance(source, (str, Path)):
        from .sinks import read_jsonl

        yield from read_jsonl(source)
        return
    if hasattr(source, "history"):  # a probe
        yield from source.history
        return
    for item in source:
        if isinstance(item, dict):
            yield item
        elif hasattr(item, "history"):  # a list of probes, as probe(model) returns
            yield from item.history
        else:
            raise TypeError(
                f"diagnose() takes records (dicts), a History, a probe or a path, "
                f"got an item of type {type(item).__name__}"
            )


# -- the diagnosis ------------------------------------------------------------------------
def diagnose(
    records: Iterable[dict[str, Any]] | str | Path | Any, *, severity: str = "info"
) -> list[Finding]:
    """The findings of probe ``records``, most severe first.

    ``records`` may be a list of record dicts, a ``probe.history``, a probe,
    the list ``optiscope.probe(model)`` returns, or the path of a JSONL file
    (records of several runs are diagnosed apart, by their ``run`` id).
    ``severity`` leaves out the findings below it.
    """
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    runs: dict[tuple[str | None, str], _Run] = {}
    for record in _records(records):
        key = (record.get("run"), str(record.get("source", "")))
        if key not in runs:
            runs[key] = _Run(*key)
        runs[key].add(record)
    findings: list[Finding] = []
    for run in runs.values():
        findings += _optimizer_findings(run) + _module_findings(run)
    floor = SEVERITIES.index(severity)
    kept = [f for f in findings if SEVERITIES.index(f.severity) >= floor]
    order = {(r.run, r.source): i for i, r in enumerate(runs.values())}
    kept.sort(
        key=lambda f: (-SEVERITIES.index(f.severity), order[(f.run, f.source)], f.steps)
    )
    return kept


def _finding(run: _Run, **fields: Any) -> Finding:
    return Finding(source=run.source, run=run.run, **fields)


def _layers(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """Tensors by layer: ``{"0": {"weight": "0.weight", "bias": "0.bias"}}``."""
    layers: dict[str, dict[str, str]] = defaultdict(dict)
    for name in names:
        prefix, _, kind = name.rpartition(".")
        if kind in ("weight", "bias") and prefix:
            layers[prefix][kind] = name
        else:
            layers[name]["tensor"] = name
    return layers


def _optimizer_findings(run: _Run) -> list[Finding]:
    if not run.tensors:
        return []
    out: list[Finding] = []
    out += _nonfinite(run)
    zero = _zero_gradient(run, out)
    eps = _eps(run, out)
    _never(run, out, skip=zero | eps)
    # A tensor whose gradient died is still named if its steps were too large
    # (the likely cause); its small steps after that are not "too low".
    _learning_rate(run, out, skip_high=eps, skip_low=zero | eps)
    _trend(run, out, skip=zero)
    _variance(run, out)
    return out


def _steps(steps: np.ndarray) -> tuple[int, int]:
    return (int(steps[0]), int(steps[-1])) if len(steps) else (0, 0)


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


def _latter(series: _Series) -> tuple[np.ndarray, np.ndarray]:
    """The second half of a series (all of it below MIN_RECORDS points)."""
    steps, values = series.arrays()
    if len(values) >= MIN_RECORDS:
        half = len(values) // 2
        steps, values = steps[half:], values[half:]
    return steps, values


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
                    _finding(
                        run,
                        code="never_updated",
                        severity="info",
                        title="coordinates that never received a gradient",
                        scope=weight,
                        parameters=(weight,),
                        steps=(t.first_step, t.last_step),
                        evidence={"never_updated_fraction": fraction, "numel": numel},
                        threshold="coordinates with v = 0 at the last step",
                        basis="rows or columns that no example reached (embeddings "
                        "of unseen tokens, always-zero inputs)",
                        action="no action needed",
                    )
                )
        tensor = parts.get("tensor")
        if tensor in counts:
            fraction, numel = counts[tensor]
            t = run.tensors[tensor]
            out.append(
                _finding(
                    run,
                    code="never_updated",
                    severity="info",
                    title="coordinates that never received a gradient",
                    scope=tensor,
                    parameters=(tensor,),
                    steps=(t.first_step, t.last_step),
                    evidence={"never_updated_fraction": fraction, "numel": numel},
                    threshold="coordinates with v = 0 at the last step",
                    basis="coordinates that no example reached (embeddings of "
                    "unseen tokens, always-zero inputs, dead units)",
                    action="no action needed",
                )
            )


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


def _module_findings(run: _Run) -> list[Finding]:
    out = []
    for name, m in run.modules.items():
        if m.no_grad_count:
            out.append(
                _finding(
                    run,
                    code="forgotten_eval",
                    severity="warning",
                    title="dropout active under no_grad",
                    scope=name,
                    parameters=(name,),
                    steps=(m.no_grad_steps[0], m.no_grad_steps[-1]),
                    evidence={
                        "calls": m.no_grad_count,
                        "first_calls": list(m.no_grad_steps),
                    },
                    threshold="a Dropout call in training mode with gradients off",
                    basis="evaluation under torch.no_grad without model.eval() "
                    "drops units: its outputs are noisy and its accuracy lower",
                    action="call model.eval() before evaluating (and model.train() "
                    "after); ignore if it is Monte-Carlo dropout on purpose",
                )
            )
        if m.seen and m.expected is not None:
            rate = m.kept / m.seen
            z = _z(rate, m.expected, m.seen)
            worst, at = m.worst
            if abs(z) > KEEP_Z_POOLED or abs(worst) > KEEP_Z_CALL:
                out.append(
                    _finding(
                        run,
                        code="keep_rate",
                        severity="error",
                        title="keep rate outside its binomial bounds",
                        scope=name,
                        parameters=(name,),
                        steps=(m.first_step, m.last_step),
                        evidence={
                            "keep_rate": rate,
                            "expected": m.expected,
                            "units": m.seen,
                            "z": z,
                            "worst_call_z": worst,
                            "worst_call": at,
                        },
                        threshold=f"|z| > {KEEP_Z_POOLED:g} over all calls or > "
                        f"{KEEP_Z_CALL:g} in one, z = (kept/n − (1−p)) / "
                        "√(p(1−p)/n)",
                        basis="each unit is kept with probability 1 − p "
                        "independently, so kept/n has standard deviation "
                        "√(p(1−p)/n); a 5σ deviation happens by chance with "
                        "probability 6e-7",
                        action="the mask is not Bernoulli(1 − p): check that p was "
                        "not changed mid-run and that the generator is seeded "
                        "correctly; report it if not",
                    )
                )
    return out


# -- output ---------------------------------------------------------------------------
def to_json(findings: list[Finding]) -> str:
    """The findings as a JSON array (NaN and inf as JSON's extensions)."""
    return json.dumps([f.to_dict() for f in findings], indent=2, allow_nan=True)


def _format(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        if 1e-3 <= abs(value) < 1e4:
            return f"{value:.4g}"
        return f"{value:.2e}"
    if isinstance(value, list):
        return ", ".join(_format(v) for v in value)
    return str(value)


def evidence_text(finding: Finding, separator: str = "; ") -> str:
    return separator.join(
        f"{k} {_format(v)}" for k, v in finding.evidence.items() if v is not None
    )


def render_table(findings: list[Finding], title: str = "optiscope doctor") -> Any:
    """A ``rich.table.Table`` of the findings, one row each; the basis of each
    threshold is in :func:`bases` (printed under the table)."""
    from rich.markup import escape
    from rich.table import Table

    colours = {"info": "cyan", "warning": "yellow", "error": "bold red"}
    runs = {f.run for f in findings}
    notes = _notes(findings)
    table = Table(title=title, show_lines=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("finding", ratio=2)
    table.add_column("where", ratio=2)
    table.add_column("steps", no_wrap=True)
    table.add_column("evidence", ratio=3)
    table.add_column("threshold", ratio=3)
    table.add_column("action", ratio=3)
    for f in findings:
        first, last = f.steps
        run = f"\nrun {f.run}" if len(runs) > 1 and f.run else ""
        table.add_row(
            f"[{colours[f.severity]}]{f.severity}[/]",
            escape(f"{f.title}\n({f.code})"),
            escape(f"{f.source} {f.scope}{run}"),
            f"{first}" if first == last else f"{first}–{last}",
            escape(evidence_text(f, "\n")),
            escape(f"{f.threshold} [{notes[(f.code, f.basis)]}]"),
            escape(f.action),
        )
    return table


def _notes(findings: list[Finding]) -> dict[tuple[str, str], int]:
    notes: dict[tuple[str, str], int] = {}
    for f in findings:
        notes.setdefault((f.code, f.basis), len(notes) + 1)
    return notes


def bases(findings: list[Finding]) -> list[str]:
    """Where each threshold of the table comes from, numbered as in the table."""
    return [f"[{n}] {code}: {basis}" for (code, basis), n in _notes(findings).items()]


def add_doctor_parser(subparsers: Any) -> None:
    import argparse

    parser = subparsers.add_parser(
        "doctor",
        help="read a probe JSONL file and say what is wrong, with the evidence",
        description="Diagnose a training run from its probe records (written by "
        "optiscope.probes.JSONLSink): learning rates, Adam's ε, dead units and "
        "never-updated inputs, gradient trends, non-finite values, dropout left "
        "on during evaluation, keep rates and momentum's variance ratio. Each "
        "finding names the parameter and steps, the evidence, the threshold and "
        "where it comes from, and an action.",
    )
    parser.add_argument(
        "run", type=Path, metavar="RUN.jsonl", help="probe records, one per line"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the findings as a JSON array"
    )
    parser.add_argument(
        "--severity",
        choices=SEVERITIES,
        default="info",
        help="leave out findings below this severity (default: %(default)s)",
    )
    parser.add_argument(
        "--fail-on",
        choices=SEVERITIES,
        default=None,
        metavar="SEVERITY",
        help="exit with status 1 if there is a finding at or above SEVERITY "
        "(info, warning or error)",
    )
    parser.set_defaults(handler=_main, parser=parser)
    del argparse


def _main(args: Any) -> int:
    import sys
    import warnings

    from .sinks import TruncatedRecordWarning

    def fail(message: str) -> int:
        print(f"optiscope doctor: error: {message}", file=sys.stderr)
        return 2

    if not args.run.is_file():
        return fail(f"{args.run}: no such file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedRecordWarning)
        try:
            records = 0

            def counted() -> Iterator[dict[str, Any]]:
                nonlocal records
                from .sinks import read_jsonl

                for record in read_jsonl(args.run):
                    records += 1
                    yield record

            findings = diagnose(counted(), severity=args.severity)
        except ValueError as error:
            return fail(str(error))
    for warning in caught:
        print(f"optiscope doctor: warning: {warning.message}", file=sys.stderr)
    if not records:
        return fail(f"{args.run}: no records")
    if args.json:
        print(to_json(findings))
    else:
        _print_table(findings, args.run, records)
    if args.fail_on is not None:
        floor = SEVERITIES.index(args.fail_on)
        if any(SEVERITIES.index(f.severity) >= floor for f in findings):
            return 1
    return 0


def _print_table(findings: list[Finding], path: Path, records: int) -> None:
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    summary = (
        f"{path}: {records} records; "
        + ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES))
        + ("" if findings else ": no findings")
    )
    try:
        from rich.console import Console
    except ImportError:  # rich comes with optiscope[lab]; plain text without it
        for f in findings:
            print(
                f"{f}\n  evidence: {evidence_text(f)}\n  threshold: {f.threshold}"
                f"\n  basis: {f.basis}\n  action: {f.action}"
            )
        print(summary)
        return
    console = Console()
    if findings:
        console.print(render_table(findings))
        console.print("where the thresholds come from:", style="bold")
        for note in bases(findings):
            console.print(note, highlight=False, markup=False)
    console.print(summary, highlight=False, markup=False)

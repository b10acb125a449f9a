"""Reading probe records into bounded summaries: one :class:`_Run` per (run,
source), holding a :class:`_Tensor` per parameter and a :class:`_Module` per
probed module; each series is a :class:`_Series` thinned to at most
:data:`~.thresholds.MAX_POINTS` points."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .thresholds import MAX_POINTS, MIN_RECORDS, UW_HIGH, ZERO_START_SKIP


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
        from ..sinks import read_jsonl

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


def _latter(series: _Series) -> tuple[np.ndarray, np.ndarray]:
    """The second half of a series (all of it below MIN_RECORDS points)."""
    steps, values = series.arrays()
    if len(values) >= MIN_RECORDS:
        half = len(values) // 2
        steps, values = steps[half:], values[half:]
    return steps, values

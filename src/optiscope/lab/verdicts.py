"""Verdicts from confidence intervals: each rule is written once, as data.

A claim's evidence is a list of :class:`Check` records. Each check holds an
interval (an estimate with its 95% confidence bounds, and how they were
computed), the rule that decides it, and the outcome. The criterion text the
report shows is rendered from the same records (:func:`criterion`), and the
claim's verdict is :func:`combine` of their outcomes, so text and decision
cannot drift apart; a test re-decides every recorded check from its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import stdtrit

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive"
NOT_APPLICABLE = "not applicable"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NOT_APPLICABLE)

CONFIDENCE = 0.95
RULES = ("above", "below", "within", "true")
ROLES = ("evidence", "instrument")

COMBINATION = (
    "The claim holds when every check holds, does not hold when any evidence "
    "check does not hold, and is inconclusive otherwise. An instrument check "
    "shows that the measurement works (it is not evidence for the claim); if one "
    "does not hold, the claim is inconclusive."
)


@dataclass(frozen=True)
class Interval:
    """An estimate and its confidence bounds; ``basis`` says how they were computed."""

    estimate: float
    low: float
    high: float
    basis: str


def t_interval(values: Iterable[float], what: str = "seeds") -> Interval:
    """Mean of ``values`` with its two-sided 95% Student-t interval.

    With one value, or any value not finite, the interval is unbounded: nothing
    can be decided from it.
    """
    x = np.asarray(list(values), dtype=np.float64)
    n = len(x)
    basis = f"95% t-interval over {n} {what}"
    if n == 0:
        return Interval(math.nan, -math.inf, math.inf, basis)
    mean = float(x.mean())
    if n < 2 or not np.isfinite(x).all():
        return Interval(mean, -math.inf, math.inf, basis)
    half = float(stdtrit(n - 1, 0.5 + CONFIDENCE / 2)) * float(x.std(ddof=1))
    half /= math.sqrt(n)
    return Interval(mean, mean - half, mean + half, basis)


def wilson_interval(successes: int, trials: int, what: str) -> Interval:
    """A binomial proportion with its 95% Wilson score interval."""
    basis = f"95% Wilson interval over {trials} {what}"
    if trials == 0:
        return Interval(math.nan, -math.inf, math.inf, basis)
    z = 1.959963984540054
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z
        * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
        / (1 + z * z / trials)
    )
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), basis)


def normal_interval(estimate: float, standard_error: float, basis: str) -> Interval:
    """``estimate ± 1.96 standard_error`` (a CLT interval)."""
    half = 1.959963984540054 * standard_error
    return Interval(estimate, estimate - half, estimate + half, basis)


def exact(value: float, basis: str = "exact: deterministic") -> Interval:
    return Interval(float(value), float(value), float(value), basis)


def fmt(x: float) -> str:
    """Numbers in criterion text: 4 significant digits, no trailing noise."""
    if isinstance(x, bool):
        return str(x)
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.4g}"


@dataclass(frozen=True)
class Check:
    """One quantity, its interval, and the rule that turns it into an outcome.

    Rules, on the interval [low, high]:

    - ``above``: holds if low > threshold; does not hold if high < fail_at
      (default: the threshold; above it, a margin of no practical effect);
    - ``below``: holds if high < threshold; does not hold if low > fail_at;
    - ``within``: holds if the interval lies inside [threshold, upper]; does not
      hold if it lies wholly outside;
    - ``true``: a deterministic yes/no (estimate 1 or 0).

    Anything else is inconclusive.
    """

    quantity: str
    rule: str
    threshold: float
    interval: Interval
    upper: float | None = None  # the band's top, for rule "within"
    fail_at: float | None = None
    role: str = "evidence"

    def __post_init__(self) -> None:
        if self.rule not in RULES or self.role not in ROLES:
            raise ValueError(f"bad check {self.rule!r}/{self.role!r}")
        if (self.rule == "within") != (self.upper is not None):
            raise ValueError("rule 'within' needs upper, and only it")

    @property
    def outcome(self) -> str:
        return decide(self)

    def describe(self) -> str:
        """The rule in words, from the same numbers :func:`decide` uses."""
        what = f"{self.quantity} ({self.interval.basis})"
        t = fmt(self.threshold)
        if self.rule == "true":
            return f"{self.quantity}: holds if true, does not hold if false"
        if self.rule == "within":
            return (
                f"{what}: holds if the interval lies inside [{t}, {fmt(self.upper)}], "
                "does not hold if it lies wholly outside"
            )
        fail = fmt(self._fail_at())
        side, other = ("above", "below") if self.rule == "above" else ("below", "above")
        return f"{what}: holds if the interval lies {side} {t}, does not hold if it lies {other} {fail}"

    def _fail_at(self) -> float:
        return self.threshold if self.fail_at is None else self.fail_at

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (infinite bounds as the strings "inf"/"-inf"), with the outcome."""
        record = asdict(self)
        record["interval"] = {k: _encode(v) for k, v in record["interval"].items()}
        record["outcome"] = self.outcome
        record["text"] = self.describe()
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Check:
        fields = {k: v for k, v in record.items() if k not in ("outcome", "text")}
        fields["interval"] = Interval(
            **{k: _decode(v) for k, v in fields["interval"].items()}
        )
        return cls(**fields)


def _encode(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "inf", "-inf", "nan"
    return v


def _decode(v: Any) -> Any:
    return float(v) if v in ("inf", "-inf", "nan") else v


def decide(check: Check) -> str:
    low, high = check.interval.low, check.interval.high
    if any(math.isnan(v) for v in (low, high)):
        return INCONCLUSIVE
    if check.rule == "true":
        return HOLDS if check.interval.estimate == 1 else FAILS
    if check.rule == "within":
        assert check.upper is not None
        if check.threshold <= low and high <= check.upper:
            return HOLDS
        if high < check.threshold or low > check.upper:
            return FAILS
        return INCONCLUSIVE
    fail_at = check._fail_at()
    if check.rule == "above":
        if low > check.threshold:
            return HOLDS
        return FAILS if high < fail_at else INCONCLUSIVE
    if high < check.threshold:
        return HOLDS
    return FAILS if low > fail_at else INCONCLUSIVE


def combine(checks: Sequence[Check]) -> str:
    """The claim's verdict from its checks (see :data:`COMBINATION`)."""
    if not checks:
        return INCONCLUSIVE
    if any(c.outcome != HOLDS for c in checks if c.role == "instrument"):
        return INCONCLUSIVE
    outcomes = [c.outcome for c in checks if c.role == "evidence"]
    if FAILS in outcomes:
        return FAILS
    return HOLDS if outcomes and all(o == HOLDS for o in outcomes) else INCONCLUSIVE


def criterion(checks: Sequence[Check]) -> str:
    """The criterion text: every check's rule, then how they combine."""
    parts = [
        f"({i}) {'[instrument] ' if c.role == 'instrument' else ''}{c.describe()}."
        for i, c in enumerate(checks, start=1)
    ]
    return " ".join([*parts, COMBINATION])

"""The lab's verdict rules: every rule can give every outcome, the text states the
numbers the decision uses, and intervals match scipy."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from optiscope.lab import verdicts
from optiscope.lab.verdicts import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    Check,
    Interval,
    combine,
    criterion,
    decide,
    exact,
    t_interval,
    wilson_interval,
)


def iv(low: float, high: float) -> Interval:
    return Interval((low + high) / 2, low, high, "test")


@pytest.mark.parametrize(
    ("check", "outcome"),
    [
        (Check("q", "above", 0.0, iv(0.1, 0.3)), HOLDS),
        (Check("q", "above", 0.0, iv(-0.3, -0.1)), FAILS),
        (Check("q", "above", 0.0, iv(-0.1, 0.1)), INCONCLUSIVE),
        (Check("q", "above", 0.0, iv(0.0, 0.1)), INCONCLUSIVE),  # a tie never holds
        (Check("q", "above", 0.0, iv(-0.01, 0.03), fail_at=0.05), FAILS),
        (Check("q", "above", 0.0, iv(-0.01, 0.07), fail_at=0.05), INCONCLUSIVE),
        (Check("q", "below", 1.0, iv(0.2, 0.9)), HOLDS),
        (Check("q", "below", 1.0, iv(1.1, 1.2)), FAILS),
        (Check("q", "below", 1.0, iv(0.9, 1.1)), INCONCLUSIVE),
        (Check("q", "within", 0.9, iv(0.95, 1.05), upper=1.1), HOLDS),
        (Check("q", "within", 0.9, iv(1.2, 1.3), upper=1.1), FAILS),
        (Check("q", "within", 0.9, iv(0.8, 1.0), upper=1.1), INCONCLUSIVE),
        (Check("q", "true", 1, exact(True)), HOLDS),
        (Check("q", "true", 1, exact(False)), FAILS),
        (Check("q", "above", 0.0, t_interval([0.5])), INCONCLUSIVE),  # one seed
    ],
)
def test_each_rule_gives_each_outcome(check, outcome) -> None:
    assert decide(check) == outcome == check.outcome


def test_text_states_the_thresholds_the_decision_uses() -> None:
    check = Check("Δ loss", "above", 0.0, iv(0.1, 0.2), fail_at=0.05)
    text = check.describe()
    assert "lies above 0" in text and "lies below 0.05" in text
    band = Check("ratio", "within", 0.85, iv(0.9, 1.0), upper=1.15)
    assert "[0.85, 1.15]" in band.describe()
    assert "test" in band.describe()  # the interval's basis is named


def test_combination() -> None:
    good, bad, unclear = (
        Check("a", "above", 0, iv(1, 2)),
        Check("b", "above", 0, iv(-2, -1)),
        Check("c", "above", 0, iv(-1, 1)),
    )
    broken = Check("i", "above", 0, iv(-2, -1), role="instrument")
    assert combine([good, good]) == HOLDS
    assert combine([good, bad]) == FAILS
    assert combine([good, unclear]) == INCONCLUSIVE
    assert combine([bad, unclear]) == FAILS
    assert (
        combine([good, broken]) == INCONCLUSIVE
    )  # a broken instrument decides nothing
    assert combine([]) == INCONCLUSIVE
    text = criterion([good, broken])
    assert text.startswith("(1) a (test)") and "(2) [instrument] i" in text


def test_json_round_trip_keeps_infinite_bounds() -> None:
    check = Check("q", "above", 0.0, t_interval([1.0]))
    record = check.to_json()
    assert record["interval"]["low"] == "-inf" and record["outcome"] == INCONCLUSIVE
    assert Check.from_json(record) == check


def test_t_interval_matches_scipy() -> None:
    values = [0.1, 0.4, 0.35, 0.2, 0.3]
    got = t_interval(values)
    low, high = stats.t.interval(
        0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values)
    )
    assert (got.low, got.high) == pytest.approx((low, high), rel=1e-12)
    assert t_interval([0.2, 0.2, 0.2]).low == pytest.approx(0.2)  # no spread


def test_wilson_interval_matches_scipy() -> None:
    got = wilson_interval(30, 450, "inputs")
    ref = stats.binomtest(30, 450).proportion_ci(0.95, method="wilson")
    assert (got.low, got.high) == pytest.approx((ref.low, ref.high), rel=1e-9)
    assert wilson_interval(0, 10, "x").low == 0.0
    assert math.isinf(wilson_interval(0, 0, "x").high)


def test_bad_checks_are_refused() -> None:
    with pytest.raises(ValueError):
        Check("q", "sideways", 0.0, iv(0, 1))
    with pytest.raises(ValueError):
        Check("q", "within", 0.0, iv(0, 1))  # no upper
    assert verdicts.VERDICTS == (HOLDS, FAILS, INCONCLUSIVE, "not applicable")

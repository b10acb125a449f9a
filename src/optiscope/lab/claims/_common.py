"""What every claim module shares: its context, its registry entry, and the
builders of its result (plain data: checks, numbers, tables, series, figures)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data import Dataset
from ..verdicts import NOT_APPLICABLE, Check, Interval, combine, criterion

if TYPE_CHECKING:
    from .shared import Shared


@dataclass
class Context:
    data: Dataset
    seed: int
    quick: bool
    shared: Shared  # work several claims need (trained nets, the convex problem)
    advance: Callable[[float], None]  # progress: fraction of this claim done

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    quote: str  # the study sheet's words this claim tests
    method: str
    run: Callable[[Context], dict[str, Any]]


def rounded(x: Any, digits: int = 6) -> Any:
    """Floats to ``digits`` significant digits (stable JSON); others unchanged."""
    if isinstance(x, bool) or not isinstance(x, float):
        return x
    if not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return float(f"{x:.{digits}g}")


def number(
    label: str, value: Any, unit: str = "", interval: Interval | None = None
) -> dict[str, Any]:
    """One named measurement for the report's numbers table."""
    entry: dict[str, Any] = {"label": label, "value": rounded(value), "unit": unit}
    if interval is not None:
        entry.update(
            low=rounded(interval.low), high=rounded(interval.high), basis=interval.basis
        )
    return entry


def table(
    title: str, columns: Sequence[tuple[str, str]], rows: Iterable[dict[str, Any]]
) -> dict[str, Any]:
    """A table: ``columns`` are (key, human label with unit), the swept variable first."""
    return {
        "title": title,
        "columns": [{"key": k, "label": label} for k, label in columns],
        "rows": [{k: rounded(v) for k, v in row.items()} for row in rows],
    }


def series(
    label: str,
    y: Iterable[float],
    x: Iterable[float] | None = None,
    *,
    low: Iterable[float] | None = None,
    high: Iterable[float] | None = None,
    style: str = "measured",  # or "theory": a dashed line without markers
) -> dict[str, Any]:
    """One line of a figure; ``low``/``high`` draw its confidence band as error bars."""
    ys = [rounded(float(v)) for v in y]
    entry: dict[str, Any] = {
        "label": label,
        "x": list(range(len(ys))) if x is None else [rounded(float(v)) for v in x],
        "y": ys,
        "style": style,
    }
    if low is not None and high is not None:
        entry["low"] = [rounded(float(v)) for v in low]
        entry["high"] = [rounded(float(v)) for v in high]
    return entry


def line_figure(
    title: str, xlabel: str, ylabel: str, lines: list[dict[str, Any]], **options: Any
) -> dict[str, Any]:
    """A line figure; options: logx, logy, caption (the rule behind what is drawn)."""
    return {
        "type": "line",
        "title": title,
        "xlabel": xlabel,
        "ylabel": ylabel,
        "series": lines,
        **options,
    }


def dot_figure(
    title: str,
    ylabel: str,
    labels: Sequence[str],
    intervals: Sequence[Interval],
    **options: Any,
) -> dict[str, Any]:
    """Categorical estimates drawn as dots with their confidence intervals."""
    return {
        "type": "dots",
        "title": title,
        "ylabel": ylabel,
        "labels": list(labels),
        "values": [rounded(i.estimate) for i in intervals],
        "low": [rounded(i.low) for i in intervals],
        "high": [rounded(i.high) for i in intervals],
        **options,
    }


def result(
    checks: Sequence[Check],
    headline: str,
    note: str,
    numbers: list[dict[str, Any]],
    *,
    tables: Sequence[dict[str, Any]] = (),
    series: dict[str, list[float]] | None = None,
    figures: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A claim's outcome: the verdict and criterion are derived from ``checks``."""
    return {
        "verdict": combine(checks),
        "criterion": criterion(checks),
        "checks": [c.to_json() for c in checks],
        "headline": headline,
        "note": note,
        "numbers": numbers,
        "tables": list(tables),
        "series": {
            k: [rounded(float(v)) for v in s] for k, s in (series or {}).items()
        },
        "figures": list(figures),
    }


def not_applicable(reason: str, numbers: list[dict[str, Any]]) -> dict[str, Any]:
    """A claim this data cannot test, and why."""
    return {
        "verdict": NOT_APPLICABLE,
        "reason": reason,
        "criterion": "",
        "checks": [],
        "headline": f"not applicable: {reason}",
        "note": "",
        "numbers": numbers,
        "tables": [],
        "series": {},
        "figures": [],
    }


def outcome_words(check: Check, holds: str, fails: str, unclear: str) -> str:
    """The phrase for a check's outcome, so a note reads from the numbers."""
    return {"holds": holds, "does not hold": fails}.get(check.outcome, unclear)


def ci_text(interval: Interval, digits: int = 3, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return (
        f"{interval.estimate:{sign}.{digits}f} "
        f"[{interval.low:{sign}.{digits}f}, {interval.high:{sign}.{digits}f}]"
    )

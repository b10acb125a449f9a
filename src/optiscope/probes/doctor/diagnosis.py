"""``diagnose(records)``: reads the records once, per (run, source), and runs
every check on each, in the order in which one check's findings decide what
the next may skip."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .coverage import _never
from .dropout import _module_findings
from .finding import SEVERITIES, Finding
from .gradients import _nonfinite, _trend, _zero_gradient
from .learning_rate import _eps, _learning_rate
from .momentum import _variance
from .records import _records, _Run


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

"""``optiscope doctor RUN.jsonl``: the parser, the table (``rich``, or plain
text without it) with the bases of its thresholds, and ``--json``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .diagnosis import diagnose
from .finding import SEVERITIES, Finding


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

    from ..sinks import TruncatedRecordWarning

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
                from ..sinks import read_jsonl

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

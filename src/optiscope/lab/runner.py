"""``optiscope lab``: run the claims, keep every finished one, write the report.

Each finished experiment is written at once to ``DIR/.lab-partial/<claim>.json``
(atomically), so an interruption loses at most the experiment in progress;
``--resume`` reuses the finished ones if the run's configuration is unchanged.
``results.json`` is the single source of the report, and every file the lab
writes lands by rename, so no reader ever sees half a file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from .._io import atomic_write

SCHEMA = 1
CLAIM_KEYS = (
    "C1",
    "C2",
    "C3",
    "C4",
    "C5",
    "C6",
)  # checked against claims.CLAIMS in tests


def add_lab_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lab",
        help="reproduce every claim of the seed on real data and write a report",
        description="Measure each claim of the seed (C1–C6) with optiscope's own "
        "optimizers and dropout, and write report.html, results.json and metrics.csv.",
    )
    parser.add_argument(
        "--out",
        default="optiscope-lab",
        metavar="DIR",
        help="output directory, created if missing (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer steps, seeds and draws: about a quarter of the time",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed for every random draw; same seed, same results.json "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="CLAIM",
        help=f"run only these claims, of {', '.join(CLAIM_KEYS)} (default: all)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the experiments an interrupted run in DIR finished",
    )
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="your own data instead of the digits: .csv with a header and a "
        "'label' column, or .npz with arrays X and y; runs C3–C6 "
        "(at least 50 rows, 2 classes)",
    )
    parser.add_argument(
        "--label-column",
        default="label",
        metavar="NAME",
        help="label column of a --data .csv (default: %(default)s)",
    )
    parser.set_defaults(handler=run, parser=parser)


def _fail(message: str) -> int:
    print(f"optiscope lab: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import report
    from .claims import CLAIMS, Context
    from .data import DataError, load

    selected = args.only or list(CLAIMS)
    unknown = [c for c in selected if c not in CLAIMS]
    if unknown:
        return _fail(
            f"unknown claim {', '.join(unknown)}; choose from {', '.join(CLAIMS)}"
        )
    if args.data is not None:
        skipped = [c for c in selected if CLAIMS[c].needs_digits]
        selected = [c for c in selected if not CLAIMS[c].needs_digits]
        if not selected:
            return _fail(
                f"{', '.join(skipped)} run only on the digits; with --data "
                "choose from C3–C6"
            )
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        partial = out / ".lab-partial"
        partial.mkdir(exist_ok=True)
        probe = partial / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        return _fail(f"cannot write to --out {args.out}: {error.strerror or error}")
    try:
        data = load(args.data, args.seed, args.label_column)
    except DataError as error:
        return _fail(str(error))

    config = {
        "seed": args.seed,
        "quick": args.quick,
        "data": data.name,
        "data_sha256": data.sha256,
        "claims": selected,
    }
    config_file = partial / "config.json"
    resumable = (
        args.resume
        and config_file.exists()
        and json.loads(config_file.read_text()) == config
    )
    if not resumable:
        for old in partial.glob("*.json"):
            old.unlink()
        atomic_write(config_file, json.dumps(config, indent=2))

    # The nets are tiny: one thread is fastest, and a fixed count keeps results.json
    # identical from machine to machine load (OpenMP threads spin when a core is busy).
    torch.set_num_threads(1)
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 120  # logs and CI: room for the summary table
    results: dict[str, Any] = {}
    columns = (TextColumn("{task.description:<48}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        for key in selected:
            claim = CLAIMS[key]
            done = partial / f"{key}.json"
            task = progress.add_task(f"{key} {claim.title}", total=1.0)
            if done.exists():
                results[key] = json.loads(done.read_text())
                progress.update(task, completed=1.0, description=f"{key} (resumed)")
                continue
            ctx = Context(
                data,
                args.seed,
                args.quick,
                lambda f, task=task: progress.update(task, completed=f),
            )
            outcome = claim.run(ctx)
            results[key] = {
                "title": claim.title,
                "seed_words": claim.seed_words,
                "method": claim.method,
                **outcome,
            }
            atomic_write(done, json.dumps(results[key]))
            progress.update(task, completed=1.0)

    document = {"schema": SCHEMA, "config": config, "claims": results}
    atomic_write(out / "results.json", json.dumps(document, indent=1, sort_keys=True))
    atomic_write(out / "metrics.csv", _metrics_csv(results))
    report.write(out / "results.json", out / "report.html")
    console.print(report.summary_table(document))
    console.print(f"report: {out / 'report.html'}")
    return 0


def _metrics_csv(results: dict[str, Any]) -> str:
    """Long format, one row per (claim, series, step): the per-step series of every run."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["claim", "series", "step", "value"])
    for key, result in results.items():
        for name, values in result.get("series", {}).items():
            for step, value in enumerate(values):
                writer.writerow([key, name, step, repr(float(value))])
    return buffer.getvalue()

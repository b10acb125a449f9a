"""``optiscope lab``: run the claims, keep every finished one, write the report.

Each finished claim is written at once to ``DIR/.lab-partial/<claim>.json``
(see :mod:`.cache`), so an interruption loses at most the claim in progress;
``--resume`` reuses the finished ones if they were made under this run's
configuration, and refuses, saying what differs, if not. ``results.json`` is
the single source of the report. The folder is handled by :mod:`.files`: the
lab writes and removes only files it owns, and one run at a time.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .claims import KEYS
from .data import DIGITS_SCALING, STANDARDISATION

MAX_SEED = 2**31 - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 0 to {MAX_SEED}, got {value}"
        )
    return value


def add_lab_parser(subparsers: argparse._SubParsersAction) -> None:
    families = sorted({k.rstrip("ab") for k in KEYS if k != k.rstrip("ab")})
    parser = subparsers.add_parser(
        "lab",
        help="measure every claim of the study sheet and write a report",
        description="Measure each claim of the study sheet "
        f"({', '.join(KEYS)}) with optiscope's own optimizers and dropout, and "
        "write report.html, results.json, metrics.csv and figures/ to --out.",
        epilog=f"Data: the embedded digits use {DIGITS_SCALING}. A --data file has "
        f"{STANDARDISATION}. Claims a data set cannot test are reported as 'not "
        "applicable', with the reason. Exit status: 0 done, 2 bad input, "
        "130 interrupted (resume with --resume).",
    )
    parser.add_argument(
        "--out",
        default="optiscope-lab",
        metavar="DIR",
        help="output folder, created if missing; one the lab did not make must be "
        "empty unless --force (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer steps and draws: about a third of the time, wider intervals",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help=f"seed for every random draw, 0 to {MAX_SEED}; same seed, same "
        "results (default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="CLAIM",
        help=f"run only these claims, case-insensitive, separated by spaces or "
        f"commas (e.g. C3,c4); {', '.join(families)} select all their parts "
        "(default: all)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the claims an interrupted run in DIR finished, if it ran with "
        "the same seed, options, data and optiscope version",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out that the lab did not make (its other "
        "files are left alone)",
    )
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="your own data instead of the digits: a UTF-8 (or Latin-1) .csv with a "
        "header and a label column, or an .npz with arrays X (numbers) and y; at "
        "least 50 rows and 2 classes; each feature is standardised to mean 0, "
        "standard deviation 1 (training split's statistics); a file of more than "
        "20000 rows is subsampled to 20000 by --seed",
    )
    parser.add_argument(
        "--label-column",
        default="label",
        metavar="NAME",
        help="label column of a --data .csv, case-insensitive (default: %(default)s)",
    )
    parser.set_defaults(handler=run, parser=parser)


def select(tokens: list[str] | None) -> list[str]:
    """Claim keys from ``--only``: case-insensitive, commas or spaces, C2 = C2a+C2b."""
    if not tokens:
        return list(KEYS)
    wanted: set[str] = set()
    unknown = []
    for token in (t for arg in tokens for t in arg.replace(",", " ").split()):
        matches = [
            k
            for k in KEYS
            if k.lower() == token.lower() or k.lower().rstrip("ab") == token.lower()
        ]
        if matches:
            wanted.update(matches)
        else:
            unknown.append(token)
    if unknown or not wanted:
        raise ValueError(
            f"unknown claim {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(KEYS)}"
        )
    return [k for k in KEYS if k in wanted]


def _fail(message: str) -> int:
    print(f"optiscope lab: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        return _run(args, out)
    except KeyboardInterrupt:
        # A Ctrl-C inside a numba compile leaves half-built LLVM objects whose
        # finalizers complain at exit: that noise is not the lab's message.
        sys.unraisablehook = _quiet_compiler_finalizers
        print(
            f"optiscope lab: interrupted; finished claims are kept in {out / '.lab-partial'}"
            " — run the same command with --resume to continue",
            file=sys.stderr,
        )
        return 130


def _quiet_compiler_finalizers(unraisable: Any) -> None:
    """Drop what llvmlite's (and numba's) finalizers raise; report the rest."""
    owner = getattr(unraisable.object, "__module__", None) or ""
    if not owner.startswith(("llvmlite", "numba")):
        sys.__unraisablehook__(unraisable)


def _run(args: argparse.Namespace, out: Path) -> int:
    import numpy
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    import optiscope
    from optiscope.kernels import loading

    from . import cache, checkup, report
    from .claims import CLAIMS, SOURCE, Context, Shared
    from .data import DataError, load
    from .files import PARTIAL, Folder, OutputError

    started = datetime.now(UTC)
    clock = time.perf_counter()
    try:
        selected = select(args.only)
    except ValueError as error:
        return _fail(str(error))
    folder = Folder(out, force=args.force)
    try:
        folder.open()
    except OutputError as error:
        return _fail(str(error))
    try:
        try:
            data = load(args.data, args.seed, args.label_column)
        except DataError as error:
            return _fail(str(error))
        # The CPU kernels now, in this thread: a claim's first step would
        # load (or compile) them on a thread of their own, which would still
        # be at it when a Ctrl-C ends the run, and whose teardown then prints.
        loading.backend()
        config = {
            "seed": args.seed,
            "quick": args.quick,
            "data": data.name,
            "data_sha256": data.sha256,
            "label_column": args.label_column if args.data else None,
            "optiscope": optiscope.__version__,
            "torch": torch.__version__,
        }
        cached: dict[str, dict[str, Any]] = {}
        doctor: dict[str, Any] | None = None
        doctor_file = f"{PARTIAL}/{checkup.KEY}.json"
        if args.resume:
            for key in selected:
                path = out / PARTIAL / f"{key}.json"
                if path.exists():
                    try:
                        cached[key] = cache.load(path, key, config)
                    except cache.CacheError as error:
                        return _fail(str(error))
            if (out / doctor_file).exists():
                try:
                    doctor = cache.read(out / doctor_file, config, checkup.problems)
                except cache.CacheError as error:
                    return _fail(str(error))
        else:
            for relative in folder.owned_under(PARTIAL):
                folder.remove(relative)

        # The nets are tiny: one thread is fastest, and a fixed count keeps results
        # identical from machine to machine load.
        torch.set_num_threads(1)
        progress_console = Console(stderr=True)
        shared = Shared(data, args.seed, args.quick)
        results: dict[str, Any] = {}
        columns = (
            TextColumn("{task.description:<58}"),
            BarColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=progress_console, transient=False) as progress:
            for key in selected:
                claim = CLAIMS[key]
                task = progress.add_task(f"{key} {claim.title}"[:58], total=1.0)
                if key in cached:
                    results[key] = cached[key]
                    progress.update(task, completed=1.0, description=f"{key} (resumed)")
                    continue
                ctx = Context(
                    data,
                    args.seed,
                    args.quick,
                    shared,
                    lambda f, task=task: progress.update(task, completed=f),
                )
                outcome = claim.run(ctx)
                results[key] = {
                    "key": key,
                    "title": claim.title,
                    "quote": claim.quote,
                    "method": claim.method,
                    **outcome,
                }
                folder.write(f"{PARTIAL}/{key}.json", cache.entry(config, results[key]))
                progress.update(task, completed=1.0)
            # optiscope doctor on the lab's own training (a resumed run that
            # lacks it computes it).
            task = progress.add_task("doctor: probed Adam and Momentum runs", total=1.0)
            if doctor is None:
                doctor = checkup.run(data, args.seed, args.quick)
                folder.write(doctor_file, cache.entry(config, doctor))
                progress.update(task, completed=1.0)
            else:
                progress.update(task, completed=1.0, description="doctor (resumed)")

        document = {
            "schema": cache.SCHEMA,
            "config": config,
            "source": SOURCE,
            "data": data.describe(),
            "not_run": [k for k in KEYS if k not in selected],
            "claims": results,
            "doctor": doctor,
            "run": {
                "started": started.isoformat(timespec="seconds"),
                "wall_time_s": round(time.perf_counter() - clock, 1),
                "versions": {
                    "optiscope": optiscope.__version__,
                    "torch": torch.__version__,
                    "numpy": numpy.__version__,
                    "python": platform.python_version(),
                },
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.machine(),
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                },
                "resumed": sorted(cached),
            },
        }
        try:
            folder.write("results.json", json.dumps(document, indent=1, sort_keys=True))
            folder.write("metrics.csv", _metrics_csv(results))
            written = report.write(folder)
        except OSError as error:
            return _fail(
                f"cannot write the report in {out}: {error.strerror or error} "
                f"({getattr(error, 'filename', '') or 'a file'}); every claim is kept: "
                "fix it and run again with --resume"
            )
        folder.finish()
    finally:
        folder.close()
    stdout = Console()
    if not stdout.is_terminal:
        stdout.width = 120  # logs and CI: room for the summary table
    stdout.print(report.summary_table(document))
    print(f"report: {written}", file=sys.stderr)
    return 0


def _metrics_csv(results: dict[str, Any]) -> str:
    """Long format, one row per (claim, series, step): every per-step series."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["claim", "series", "step", "value"])
    for key, result in results.items():
        for name, values in result.get("series", {}).items():
            for step, value in enumerate(values):
                writer.writerow([key, name, step, "" if value is None else value])
    return buffer.getvalue()

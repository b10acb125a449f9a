"""``optiscope plot RUN.jsonl --out DIR``: one PNG per question a probe series answers."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from .sinks import TruncatedRecordWarning

# (file name, question, metric, y label, log scale, reference line)
QUESTIONS = [
    (
        "update_to_weight",
        "Is each step the right size?",
        "update_to_weight",
        "RMS(Δθ) / RMS(θ)  (rule of thumb ≈ 1e-3)",
        True,
        1e-3,
    ),
    ("grad_rms", "How large are the gradients?", "grad_rms", "RMS(g)", True, None),
    (
        "nonfinite_grads",
        "Are there NaN or inf gradients?",
        "nonfinite_grads",
        "non-finite gradient entries (0 is healthy)",
        False,
        None,
    ),
    (
        "momentum_variance",
        "How much does momentum smooth the updates?",
        "variance_ratio",
        "Var(m) / Var(g)  (lower is smoother)",
        False,
        None,
    ),
    (
        "adam_step",
        "What step does Adam give a median coordinate?",
        "step_median",
        "α/(√v̂+ε), median (min and max shaded)",
        True,
        None,
    ),
    (
        "adam_eps",
        "How often does ε dominate √v̂?",
        "eps_dominated_fraction",
        "fraction of coordinates with √v̂ < ε",
        False,
        None,
    ),
    (
        "dropout_keep",
        "Does dropout keep 1 − p of the units?",
        "keep_rate",
        "observed keep rate (dashed: 1 − p)",
        False,
        None,
    ),
]


def load(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a truncated last line is skipped with a
    :class:`~optiscope.probes.sinks.TruncatedRecordWarning`."""
    from .sinks import read_jsonl

    return list(read_jsonl(path))


def series(records: list[dict[str, Any]], metric: str) -> dict[str, tuple[list, list]]:
    """``{label: (steps, values)}`` for one metric, groups and modules only.

    Runs are kept apart: by the records' ``run`` id, and within a run (or a
    file written before records carried one) wherever the step goes back,
    as when a second run was appended to the file. Labels name the run only
    where the records hold more than one.
    """
    out: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    last: dict[tuple, int] = {}
    segment: dict[tuple, int] = defaultdict(int)
    for record in records:
        run, source, step = record.get("run"), record.get("source", ""), record["step"]
        stream = (run, source, tuple(record.get("modules", {})))
        if stream in last and step <= last[stream]:
            segment[stream] += 1
        last[stream] = step
        part = (run, segment[stream])
        scopes = [(f"{source} group{g['group']}", g) for g in record.get("groups", [])]
        scopes += list(record.get("modules", {}).items())
        for scope, values in scopes:
            if metric in values and values[metric] is not None:
                out[(part, scope)][0].append(step)
                out[(part, scope)][1].append(values[metric])
    parts = {part for part, _ in out}

    def label(run: str | None, seg: int) -> str:
        if len(parts) == 1:
            return ""
        if run is None:
            return f" [part {seg + 1}]"
        repeated = sum(p[0] == run for p in parts) > 1
        return f" [run {run}{f' #{seg + 1}' if repeated else ''}]"

    names = {part: label(*part) for part in parts}
    return {f"{scope}{names[part]}": line for (part, scope), line in out.items()}


def render(records: list[dict[str, Any]], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    from .._io import atomic_write

    written = []
    for name, question, metric, ylabel, log, reference in QUESTIONS:
        lines = series(records, metric)
        if not lines:
            continue
        fig = Figure(figsize=(6.4, 3.8), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        for scope, (steps, values) in lines.items():
            ax.plot(steps, values, label=scope, linewidth=1.2)
        if metric == "step_median":
            for low, high in zip(
                series(records, "step_min").values(),
                series(records, "step_max").values(),
                strict=True,
            ):
                ax.fill_between(low[0], low[1], high[1], alpha=0.15)
        for guide in ("predicted_variance_ratio", "expected_keep_rate"):
            if metric in ("variance_ratio", "keep_rate"):
                for steps, values in series(records, guide).values():
                    ax.plot(steps, values, linestyle="--", color="black", linewidth=1)
        if reference is not None:
            ax.axhline(reference, linestyle="--", color="black", linewidth=1)
        if log:
            ax.set_yscale("log")
        ax.set_title(question)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = out / f"{name}.png"
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
        atomic_write(path, buffer.getvalue())
        written.append(path)
    return written


def add_plot_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="render a probe JSONL file as PNG plots, one question per figure",
        description="Render the series of a probe JSONL file (written by "
        "optiscope.probes.JSONLSink) as PNG plots.",
    )
    parser.add_argument(
        "run", type=Path, metavar="RUN.jsonl", help="probe records, one per line"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("probe-plots"),
        metavar="DIR",
        help="output directory, created if missing (default: %(default)s)",
    )
    parser.set_defaults(handler=_main, parser=parser)


def _main(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"optiscope plot: error: {message}", file=sys.stderr)
        return 2

    if not args.run.is_file():
        return fail(f"{args.run}: no such file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedRecordWarning)
        try:
            records = load(args.run)
        except ValueError as error:
            return fail(str(error))
    for warning in caught:
        print(f"optiscope plot: warning: {warning.message}", file=sys.stderr)
    if not records:
        return fail(f"{args.run}: no records")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return fail(f"cannot write to --out {args.out}: {error.strerror or error}")
    for path in render(records, args.out):
        print(path)
    return 0

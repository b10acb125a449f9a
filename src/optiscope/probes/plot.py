"""``optiscope plot RUN.jsonl --out DIR``: one PNG per question a probe series answers."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

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
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}, line {number}: not JSON ({error.msg})"
                    ) from None
    return records


def series(records: list[dict[str, Any]], metric: str) -> dict[str, tuple[list, list]]:
    """``{scope: (steps, values)}`` for one metric, groups and modules only."""
    out: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for record in records:
        scopes = [
            (f"{record['source']} group{g['group']}", g)
            for g in record.get("groups", [])
        ]
        scopes += list(record.get("modules", {}).items())
        for scope, values in scopes:
            if metric in values and values[metric] is not None:
                out[scope][0].append(record["step"])
                out[scope][1].append(values[metric])
    return dict(out)


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
    try:
        records = load(args.run)
    except ValueError as error:
        return fail(str(error))
    if not records:
        return fail(f"{args.run}: no records")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return fail(f"cannot write to --out {args.out}: {error.strerror or error}")
    for path in render(records, args.out):
        print(path)
    return 0

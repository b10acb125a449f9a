"""The ``optiscope`` console command: ``optiscope lab``, ``bench``, ``plot`` and ``doctor``.

Results go to stdout, progress and messages to stderr; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .bench import add_bench_parser
from .lab.runner import add_lab_parser
from .probes.doctor import add_doctor_parser
from .probes.plot import add_plot_parser


def _version() -> str:
    import numpy
    import torch

    return f"optiscope {__version__} (torch {torch.__version__}, numpy {numpy.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optiscope",
        description="Momentum, Adam and inverted dropout for PyTorch, measured.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_lab_parser(subparsers)
    add_bench_parser(subparsers)
    add_plot_parser(subparsers)
    add_doctor_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # report it with the subcommand's usage, not the top-level one
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:  # the lab says more (--resume); the others stop here
        print(f"optiscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

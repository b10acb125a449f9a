"""Wall time of `optiscope lab` (full and --quick), each in a fresh process.

The issue's budget is 2 minutes for the full run and 30 s for --quick on a 2-core
CPU; this script measures it (timed tests would be flaky on a shared machine).
Usage: python benchmarks/lab_wall_time.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time


def wall_time(*args: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "optiscope", "lab", "--out", out, *args],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="runs of each mode")
    rounds = parser.parse_args().rounds
    for label, args, budget in (("--quick", ["--quick"], 30.0), ("full", [], 120.0)):
        times = [wall_time(*args) for _ in range(rounds)]
        median = statistics.median(times)
        verdict = "within" if median <= budget else "OVER"
        print(
            f"{label:8s} median {median:6.1f} s over {rounds} run(s) "
            f"({verdict} the {budget:.0f} s budget)"
        )


if __name__ == "__main__":
    main()

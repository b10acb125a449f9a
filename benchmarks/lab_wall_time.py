"""Wall time of `optiscope lab` (full and --quick), each in a fresh process.

The budget is 120 s for the full run and 30 s for --quick on a 2-core CPU; this
script measures it (timed tests would be flaky on a shared machine) and prints
the CPU time and the load average beside it, since other work on the machine
stretches wall time. Usage: python benchmarks/lab_wall_time.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def timed(*args: str) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one lab run in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "optiscope", "lab", "--out", f"{out}/lab", *args],
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="runs of each mode")
    rounds = parser.parse_args().rounds
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}")
    for label, args, budget in (("--quick", ["--quick"], 30.0), ("full", [], 120.0)):
        runs = [timed(*args) for _ in range(rounds)]
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        verdict = "within" if wall <= budget else "OVER"
        print(
            f"{label:8s} median {wall:6.1f} s wall, {cpu:6.1f} s CPU over {rounds} "
            f"run(s) ({verdict} the {budget:.0f} s budget); load average now "
            f"{os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    main()

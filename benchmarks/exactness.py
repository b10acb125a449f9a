"""The largest errors of every configuration against optiscope.reference and torch.

Runs the same comparisons as tests/test_against_oracles.py and prints the worst
relative error of each (max |x - x_ref| / max |x_ref|), for the closing notes
and BENCHMARKS.md. Usage: python benchmarks/exactness.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from configs import CONFIGS
from test_against_oracles import (
    float32_step_error,
    float64_trajectory_error,
    torch_error,
)


def main() -> None:
    print(
        "| config | float64, 1000 steps vs reference | float32 per step vs reference "
        "| float32, 100 steps vs torch |"
    )
    print("|---|---|---|---|")
    for config in CONFIGS:
        row = [
            float64_trajectory_error(config),
            float32_step_error(config),
            torch_error(config) if config.torch_equivalent else float("nan"),
        ]
        cells = " | ".join("n/a" if np.isnan(x) else f"{x:.2e}" for x in row)
        print(f"| {config.name} | {cells} |")


if __name__ == "__main__":
    main()

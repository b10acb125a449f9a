"""The largest errors of every configuration against optiscope.reference and torch.

Runs the same comparisons as tests/test_against_oracles.py and prints the worst
relative error of each (max |x - x_ref| / max |x_ref|), for the closing notes
and BENCHMARKS.md. Usage: python benchmarks/exactness.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from configs import CONFIGS, Config, ReferenceRun
from test_against_oracles import (
    gradient_sequence,
    make_params,
    relative_error,
    run_optimizer,
)


def float64_trajectory(config: Config) -> float:
    params = make_params(torch.float64)
    initial = [p.detach().numpy().copy() for p in params]
    grads = gradient_sequence(1000)
    run_optimizer(config, params, grads, torch.float64)
    worst = 0.0
    for i, p in enumerate(params):
        ref = ReferenceRun(config, initial[i])
        for step_grads in grads:
            expected = ref.step(step_grads[i])
        worst = max(worst, relative_error(p.detach().numpy(), expected))
    return worst


def float32_steps(config: Config) -> float:
    params = make_params(torch.float32)
    opt = config.cls(params, **config.options)
    refs = [ReferenceRun(config, p.detach().double().numpy()) for p in params]
    worst = 0.0
    for step_grads in gradient_sequence(1000):
        for p, g, ref in zip(params, step_grads, refs, strict=True):
            p.grad = torch.as_tensor(g, dtype=torch.float32)
            ref.sync(p, opt.state.get(p, {}))
            ref.step(p.grad.double().numpy())
        opt.step()
        for p, ref in zip(params, refs, strict=True):
            worst = max(worst, relative_error(p.detach().double().numpy(), ref.theta))
    return worst


def against_torch(config: Config) -> float:
    if config.torch_equivalent is None:
        return float("nan")
    torch_cls, torch_options = config.torch_equivalent
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    grads = gradient_sequence(100)
    run_optimizer(config, ours, grads, torch.float32)
    run_optimizer(
        Config("torch", torch_cls, torch_options), theirs, grads, torch.float32
    )
    return max(
        relative_error(a.detach().double().numpy(), b.detach().double().numpy())
        for a, b in zip(ours, theirs, strict=True)
    )


def main() -> None:
    print(
        "| config | float64, 1000 steps vs reference | float32 per step vs reference "
        "| float32, 100 steps vs torch |"
    )
    print("|---|---|---|---|")
    for config in CONFIGS:
        row = [float64_trajectory(config), float32_steps(config), against_torch(config)]
        cells = " | ".join("n/a" if np.isnan(x) else f"{x:.2e}" for x in row)
        print(f"| {config.name} | {cells} |")


if __name__ == "__main__":
    main()

"""Every configuration against optiscope.reference (float64 NumPy) and against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from configs import CONFIGS, Config, ReferenceRun

SHAPES = [(), (7,), (5, 6)]  # 0-dim, vector, and a non-contiguous (transposed) matrix


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        data = torch.randn(shape[::-1], generator=gen, dtype=torch.float64)
        data = data.t() if data.dim() == 2 else data
        params.append(torch.nn.Parameter(data.to(dtype)))
    assert not params[2].is_contiguous()
    return params


def gradient_sequence(steps: int, seed: int = 1) -> list[list[np.ndarray]]:
    """Gaussian gradients with per-coordinate scales spread over four decades."""
    rng = np.random.default_rng(seed)
    scales = [10.0 ** rng.uniform(-3, 1, size=s) for s in SHAPES]
    return [
        [
            scale * rng.standard_normal(s)
            for s, scale in zip(SHAPES, scales, strict=True)
        ]
        for _ in range(steps)
    ]


def run_optimizer(config: Config, params, grads, dtype) -> None:
    opt = config.cls(params, **config.options)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = torch.as_tensor(g, dtype=dtype)
        opt.step()


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|, over all coordinates."""
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def float64_trajectory_error(config: Config) -> float:
    """Free-running: the worst relative error after 1000 float64 steps."""
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


def float32_step_error(config: Config) -> float:
    """The worst relative error of one float32 step, over 1000 steps.

    The oracle restarts from our state every step, so this measures the rule's
    rounding, not the random walk that float32 rounding makes over 1000 steps.
    """
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


def torch_error(config: Config) -> float:
    """The worst relative error against the torch equivalent after 100 float32 steps."""
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


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_float64_trajectory_matches_reference_over_1000_steps(config: Config) -> None:
    assert float64_trajectory_error(config) <= 1e-12


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_float32_steps_match_reference_over_1000_steps(config: Config) -> None:
    assert float32_step_error(config) <= 1e-5


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.torch_equivalent], ids=str)
def test_matches_torch_over_100_steps(config: Config) -> None:
    assert torch_error(config) <= 1e-6


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_state_keys_follow_torch(config: Config) -> None:
    params = make_params(torch.float32)
    opt = config.cls(params, **config.options)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[params[0]]) == set(config.state_keys)

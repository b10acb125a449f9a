"""Edge-case numerics, the same in every CPU backend, the reference and torch:
NaN and infinite gradients, huge finite gradients, an ε that underflows, and
float64 steps within 1e-15 of the reference.

Each backend runs through the optimizer: "kernel" is the numba path, "rule" the
per-tensor torch rule (what a device without a kernel or a tensor subclass
takes), forced by routing every tensor to it. The Triton kernels are held to
the same cases in test_triton_kernels.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from configs import config

import optiscope
from optiscope import reference
from optiscope.kernels import dispatch, torch_rule

BACKENDS = ["kernel", "rule"]
SPECIAL = [math.nan, math.inf, -math.inf, 1e20, -3e19, 0.0, 1.0, -1e-3]


@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "rule":
        monkeypatch.setattr(dispatch, "_backend", lambda t: torch_rule)
    return request.param


def kind(x: np.ndarray) -> list[str]:
    """Each value as 'nan', '+inf', '-inf' or 'finite'."""
    return [
        "nan"
        if math.isnan(v)
        else "+inf"
        if v == math.inf
        else "-inf"
        if v == -math.inf
        else "finite"
        for v in np.asarray(x, dtype=np.float64).ravel().tolist()
    ]


def run(cls, options, grads, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Two steps from θ = 1 with the gradients ``grads[0]``, ``grads[1]``;
    returns θ after each."""
    p = torch.nn.Parameter(torch.ones(len(grads[0]), dtype=dtype))
    opt = cls([p], **options)
    after = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        after.append(p.detach().clone())
    return after[0], after[1]


def adam_reference(grads, *, lr, eps=1e-8, betas=(0.9, 0.999)):
    theta, m, v = (
        np.ones(len(grads[0])),
        np.zeros(len(grads[0])),
        np.zeros(len(grads[0])),
    )
    out = []
    with np.errstate(all="ignore"):
        for t, g in enumerate(grads, start=1):
            theta, m, v, _ = reference.adam_step(
                theta,
                m,
                v,
                np.array(g),
                t=t,
                lr=lr,
                beta1=betas[0],
                beta2=betas[1],
                eps=eps,
            )
            out.append(theta)
    return out


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_adam_special_gradients_give_torchs_pattern(backend) -> None:
    grads = [SPECIAL, [0.5] * len(SPECIAL)]
    ours = run(optiscope.Adam, dict(lr=0.1), grads)
    p = torch.nn.Parameter(torch.ones(len(SPECIAL)))
    opt = torch.optim.Adam([p], lr=0.1)
    theirs = []
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        theirs.append(p.detach().clone())
    oracle = adam_reference(grads, lr=0.1)
    for step in range(2):
        assert kind(ours[step]) == kind(theirs[step]) == kind(oracle[step])
    # A finite gradient of 1e20 overflows g² but not ((1-β2)·g)·g: θ keeps moving.
    assert kind(ours[1])[3:5] == ["finite", "finite"]
    assert ours[1][3] < ours[0][3] < 1.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_momentum_special_gradients_give_the_sgd_pattern(backend, beta) -> None:
    grads = [SPECIAL, [0.5] * len(SPECIAL)]
    ours = run(optiscope.Momentum, dict(lr=0.1, momentum=beta), grads)
    p = torch.nn.Parameter(torch.ones(len(SPECIAL)))
    # Momentum(lr=α, momentum=β) ≡ SGD(lr=α(1−β), momentum=β, dampening=0)
    opt = torch.optim.SGD([p], lr=0.1 * (1 - beta), momentum=beta)
    theirs = []
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        theirs.append(p.detach().clone())
    theta, m = np.ones(len(SPECIAL)), np.zeros(len(SPECIAL))
    for step, g in enumerate(grads):
        with np.errstate(all="ignore"):
            theta, m = reference.momentum_step(
                theta, m, np.array(g), lr=0.1, momentum=beta
            )
        assert kind(ours[step]) == kind(theirs[step]) == kind(theta)
    assert kind(ours[0])[1:3] == ["-inf", "+inf"]  # θ − α·m with m = ±inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_an_eps_that_underflows_gives_a_zero_step_not_nan(backend, dtype) -> None:
    """ε = 1e-50 is 0 in float32: a coordinate with only zero gradients has
    √v̂ + ε = 0 and, by the convention of every backend and the reference,
    takes no step."""
    options = dict(lr=0.1, eps=1e-50, bias_correction=False)
    _, second = run(optiscope.Adam, options, [[0.0, 2.0], [0.0, 2.0]], dtype)
    assert second[0].item() == 1.0
    assert math.isfinite(second[1].item()) and second[1].item() < 1.0
    oracle = adam_reference([[0.0, 2.0], [0.0, 2.0]], lr=0.1, eps=1e-50)
    assert oracle[1][0] == 1.0 and math.isfinite(oracle[1][1])


@pytest.mark.parametrize(
    "name", ["adam", "adam-l2-amsgrad", "adamw", "adam-no-bias-correction", "momentum"]
)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_float64_step_is_within_1e_15_of_the_reference(backend, name) -> None:
    """From the same state, one float64 step of every backend lies within
    1e-15 of the reference, relative to the largest |θ|: a few ulp."""
    cfg = config(name)
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(4096, generator=gen, dtype=torch.float64)
    p = torch.nn.Parameter(theta.clone())
    opt = cfg.cls([p], **cfg.options)
    rng = np.random.default_rng(7)
    worst = 0.0
    for _ in range(30):
        g = rng.standard_normal(4096) * 10.0 ** rng.uniform(-3, 1, 4096)
        state = {
            k: v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in opt.state[p].items()
        }
        start = p.detach().numpy().copy()
        p.grad = torch.from_numpy(g)
        opt.step()
        expected = _reference_step(cfg, start, state, g)
        worst = max(
            worst,
            float(
                np.max(np.abs(p.detach().numpy() - expected)) / np.max(np.abs(expected))
            ),
        )
    assert worst <= 1e-15


def _reference_step(cfg, theta, state, g):
    o = cfg.options
    if cfg.cls is optiscope.Momentum:
        m = state["momentum_buffer"].numpy() if state else np.zeros_like(theta)
        return reference.momentum_step(
            theta,
            m,
            g,
            lr=o["lr"],
            momentum=o["momentum"],
            weight_decay=o.get("weight_decay", 0.0),
            maximize=o.get("maximize", False),
        )[0]
    zeros = np.zeros_like(theta)
    decoupled = cfg.cls is optiscope.AdamW
    beta1, beta2 = o.get("betas", (0.9, 0.999))
    return reference.adam_step(
        theta,
        state["exp_avg"].numpy() if state else zeros,
        state["exp_avg_sq"].numpy() if state else zeros,
        g,
        t=int(state["step"].item()) + 1 if state else 1,
        lr=o["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=o.get("eps", 1e-8),
        weight_decay=o.get("weight_decay", 1e-2 if decoupled else 0.0),
        decoupled_weight_decay=decoupled,
        amsgrad=o.get("amsgrad", False),
        v_max=state["max_exp_avg_sq"].numpy()
        if state and "max_exp_avg_sq" in state
        else None,
        maximize=o.get("maximize", False),
        bias_correction=o.get("bias_correction", True),
    )[0]

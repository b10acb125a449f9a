"""One table of optimizer configurations drives the generic tests.

Each row names an optiscope optimizer with options, the equivalent update in
``optiscope.reference``, and, where torch has the same rule, the torch optimizer
that must take the same steps. Adding a row is all it takes to cover a variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import optiscope
from optiscope import reference


@dataclass(frozen=True)
class Config:
    name: str
    cls: type
    options: dict[str, Any]
    torch_equivalent: tuple[type, dict[str, Any]] | None = None
    state_keys: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return self.name


def _sgd_mapping(
    lr: float, momentum: float, **rest: Any
) -> tuple[type, dict[str, Any]]:
    # Momentum(lr=a, momentum=b) == SGD(lr=a(1-b), momentum=b, dampening=0)
    return torch.optim.SGD, dict(
        lr=lr * (1 - momentum), momentum=momentum, dampening=0, **rest
    )


CONFIGS = [
    Config(
        "momentum",
        optiscope.Momentum,
        dict(lr=0.05, momentum=0.9),
        _sgd_mapping(0.05, 0.9),
        ("momentum_buffer",),
    ),
    Config(
        "sgd",
        optiscope.Momentum,
        dict(lr=0.05, momentum=0.0),
        (torch.optim.SGD, dict(lr=0.05)),
        ("momentum_buffer",),
    ),
    Config(
        "momentum-l2-max",
        optiscope.Momentum,
        dict(lr=0.03, momentum=0.5, weight_decay=0.1, maximize=True),
        _sgd_mapping(0.03, 0.5, weight_decay=0.1, maximize=True),
        ("momentum_buffer",),
    ),
    Config(
        "adam",
        optiscope.Adam,
        dict(lr=1e-2),
        (torch.optim.Adam, dict(lr=1e-2)),
        ("step", "exp_avg", "exp_avg_sq"),
    ),
    Config(
        "adam-l2-amsgrad",
        optiscope.Adam,
        dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True),
        (
            torch.optim.Adam,
            dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True),
        ),
        ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    ),
    Config(
        "adam-maximize",
        optiscope.Adam,
        dict(lr=1e-2, maximize=True),
        (torch.optim.Adam, dict(lr=1e-2, maximize=True)),
        ("step", "exp_avg", "exp_avg_sq"),
    ),
    Config(
        "adam-seed-rule",
        optiscope.Adam,
        dict(lr=1e-2, bias_correction=False, eps=0.0),
        None,
        ("step", "exp_avg", "exp_avg_sq"),
    ),
    Config(
        "adam-no-bias-correction",
        optiscope.Adam,
        dict(lr=1e-2, bias_correction=False, betas=(0.5, 0.9)),
        None,
        ("step", "exp_avg", "exp_avg_sq"),
    ),
    Config(
        "adamw",
        optiscope.AdamW,
        dict(lr=1e-2),
        (torch.optim.AdamW, dict(lr=1e-2)),
        ("step", "exp_avg", "exp_avg_sq"),
    ),
    Config(
        "adamw-amsgrad",
        optiscope.AdamW,
        dict(lr=1e-2, weight_decay=0.3, amsgrad=True),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.3, amsgrad=True)),
        ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    ),
]


def config(name: str) -> Config:
    """The row called ``name``: tests pick rows by name, never by position."""
    for row in CONFIGS:
        if row.name == name:
            return row
    raise KeyError(f"no config named {name!r}; have {[c.name for c in CONFIGS]}")


ADAM_CONFIGS = [c for c in CONFIGS if c.cls is not optiscope.Momentum]
MOMENTUM_CONFIGS = [c for c in CONFIGS if c.cls is optiscope.Momentum]

#: Every parameter dtype optiscope updates, widest first.
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: The dtypes that compute in float32 (and round once on store).
LOW_PRECISION = (torch.bfloat16, torch.float16)


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The one tensor factory of the suite: float64 normal draws, scaled, then
    cast, so every dtype sees the same values rounded once."""
    t = torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * scale
    return t.to(device=device, dtype=dtype)


def adam_options(config: Config) -> dict[str, Any]:
    """The keyword arguments of ``adam_step``/``kernels.adam_`` for an Adam row."""
    o = config.options
    beta1, beta2 = o.get("betas", (0.9, 0.999))
    decoupled = config.cls is optiscope.AdamW
    return dict(
        lr=o["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=o.get("eps", 1e-8),
        weight_decay=o.get("weight_decay", 1e-2 if decoupled else 0.0),
        decoupled_weight_decay=decoupled,
        amsgrad=o.get("amsgrad", False),
        maximize=o.get("maximize", False),
        bias_correction=o.get("bias_correction", True),
    )


def momentum_options(config: Config) -> dict[str, Any]:
    """The keyword arguments of ``momentum_step``/``kernels.momentum_``."""
    o = config.options
    return dict(
        lr=o["lr"],
        momentum=o["momentum"],
        weight_decay=o.get("weight_decay", 0.0),
        maximize=o.get("maximize", False),
    )


class ReferenceRun:
    """Replays a config in ``optiscope.reference`` (NumPy float64), one tensor."""

    def __init__(self, config: Config, theta: np.ndarray) -> None:
        self.config = config
        self.theta = theta.astype(np.float64)
        self.m = np.zeros_like(self.theta)
        self.v = np.zeros_like(self.theta)
        self.v_max = None
        self.t = 0

    def sync(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        """Restart from an optimizer's current parameter and state (as float64)."""

        def f64(t: torch.Tensor) -> np.ndarray:
            return t.detach().double().numpy().copy()

        self.theta = f64(param)
        if "momentum_buffer" in state:
            self.m = f64(state["momentum_buffer"])
        if "exp_avg" in state:
            self.m, self.v = f64(state["exp_avg"]), f64(state["exp_avg_sq"])
            self.t = int(state["step"].item())
        if "max_exp_avg_sq" in state:
            self.v_max = f64(state["max_exp_avg_sq"])

    def step(self, g: np.ndarray) -> np.ndarray:
        if self.config.cls is optiscope.Momentum:
            self.theta, self.m = reference.momentum_step(
                self.theta, self.m, g, **momentum_options(self.config)
            )
            return self.theta
        self.t += 1
        self.theta, self.m, self.v, self.v_max = reference.adam_step(
            self.theta,
            self.m,
            self.v,
            g,
            t=self.t,
            v_max=self.v_max,
            **adam_options(self.config),
        )
        return self.theta


def adam_hyper(config: Config) -> optiscope.kernels.records.AdamHyper:
    """The ``AdamHyper`` record of an Adam row (what a backend's ``adam_`` takes)."""
    from optiscope.kernels.records import AdamHyper

    return AdamHyper(**adam_options(config))


def momentum_hyper(config: Config) -> optiscope.kernels.records.MomentumHyper:
    """The ``MomentumHyper`` record of a Momentum row."""
    from optiscope.kernels.records import MomentumHyper

    return MomentumHyper(**momentum_options(config))


def corrections(
    hyper: optiscope.kernels.records.AdamHyper, steps: list[int]
) -> list[optiscope.rules.BiasCorrection]:
    """Each row's bias corrections at its step count, as the dispatcher makes them."""
    from optiscope.rules import bias_corrections

    return [
        bias_corrections(hyper.beta1, hyper.beta2, t, hyper.bias_correction)
        for t in steps
    ]

"""Argument checks shared by every public entry point.

Each check raises before anything is modified, with a message that names the
argument, the value it got and the range it allows, so a refused call leaves
optimizer state and tensors exactly as they were.
"""

from __future__ import annotations

import math
from numbers import Real

import torch


def real(name: str, value: object) -> float:
    """Return ``value`` as a float, or raise TypeError naming the argument."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got a tensor of "
                f"shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def non_negative(name: str, value: object) -> float:
    """``value >= 0`` and finite."""
    x = real(name, value)
    if not (0.0 <= x < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return x


def unit_interval_open_right(name: str, value: object) -> float:
    """``0 <= value < 1``: the range of an EMA decay (1 would freeze the average)."""
    x = real(name, value)
    if not (0.0 <= x < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return x


def probability(name: str, value: object) -> float:
    """``0 <= value <= 1``."""
    x = real(name, value)
    if not (0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return x


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def betas(value: object) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {value!r}")
    return (
        unit_interval_open_right("betas[0]", value[0]),
        unit_interval_open_right("betas[1]", value[1]),
    )


def floating_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {value.dtype}; "
            "cast it first, e.g. x.float()"
        )
    return value

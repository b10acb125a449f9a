"""The named records a fused step travels in, from the dispatcher to a backend.

Hyperparameters are Python floats and bools, exactly as the param group holds
them; each backend rounds them to its compute dtype itself. Tensor lists are
rows: ``params[i]``, ``grads[i]`` and the states at ``i`` belong together.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..rules import BiasCorrection

__all__ = [
    "AdamBatch",
    "AdamHyper",
    "BiasCorrection",
    "MomentumBatch",
    "MomentumHyper",
    "StochasticRounding",
]


class MomentumHyper(NamedTuple):
    """The options of :func:`optiscope.rules.momentum_step`."""

    lr: float
    momentum: float
    weight_decay: float
    maximize: bool


class AdamHyper(NamedTuple):
    """The options of :func:`optiscope.rules.adam_step`, without the step count."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    amsgrad: bool
    maximize: bool
    bias_correction: bool


class MomentumBatch(NamedTuple):
    """The tensors of one fused momentum step, one row per parameter."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    buffers: list[torch.Tensor]


class StochasticRounding(NamedTuple):
    """Where the words that round bfloat16 moments stochastically come from:
    row ``i`` takes ``philox.random_words(numel, seed, offsets[i])``, with
    ``offsets[i]`` from :func:`optiscope.rules.rounding_offset`."""

    seed: int
    offsets: list[int]


class AdamBatch(NamedTuple):
    """The tensors of one fused Adam step, one row per parameter.

    ``max_exp_avg_sqs`` is None unless amsgrad; ``corrections[i]`` belongs to
    row ``i`` (its step count has already been advanced). ``rounding`` is None
    (moments rounded to nearest) or where their stochastic rounding's words
    come from.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    max_exp_avg_sqs: list[torch.Tensor] | None
    corrections: list[BiasCorrection]
    rounding: StochasticRounding | None = None

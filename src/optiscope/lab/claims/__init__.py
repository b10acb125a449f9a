"""The study sheet's claims, one module each (C7 and C8 are the sheet's
claims that the first lab did not test).

Every claim is a function ``(Context) -> dict`` returning plain data: its
checks (from which the verdict and the criterion text are derived), a
headline, a note computed from the numbers, numbers and tables with human
labels, per-step series, and figure specs that ``report`` draws. Each seeds
its own random draws from ``ctx.seed``, and what several claims share
(trained nets, the convex problem) comes from ``ctx.shared``.
"""

from __future__ import annotations

from . import (
    c1_momentum_variance,
    c2a_momentum_helps_training,
    c2b_big_rock,
    c3_adam_small_v,
    c4_dropout_expectation,
    c5_no_dropout_at_eval,
    c6_ensemble,
    c7a_few_neurons,
    c7b_overfitting,
    c8_adam_careful,
)
from ._common import Claim, Context
from .shared import Shared

#: The source every quote comes from (the study sheet's file has no title line).
SOURCE = "the study sheet (seed.md: worked answers on momentum, Adam and dropout)"

CLAIMS: dict[str, Claim] = {
    module.CLAIM.key: module.CLAIM
    for module in (
        c1_momentum_variance,
        c2a_momentum_helps_training,
        c2b_big_rock,
        c3_adam_small_v,
        c4_dropout_expectation,
        c5_no_dropout_at_eval,
        c6_ensemble,
        c7a_few_neurons,
        c7b_overfitting,
        c8_adam_careful,
    )
}
KEYS = tuple(CLAIMS)

__all__ = ["CLAIMS", "KEYS", "SOURCE", "Claim", "Context", "Shared"]

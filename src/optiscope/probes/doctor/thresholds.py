"""The thresholds of the findings (where each comes from is in the ``basis`` of
the findings that use it) and the bound on what a diagnosis keeps in memory."""

from __future__ import annotations

#: The most points of one series a diagnosis keeps (longer ones are thinned).
MAX_POINTS = 4096

# -- thresholds, each with where it comes from ----------------------------------
RULE_OF_THUMB = (
    "the rule of thumb that a step changes a tensor by about 1e-3 of its size "
    "(Karpathy, CS231n, 'Neural Networks Part 3')"
)
UW_HIGH = 1e-1
UW_HIGH_STEPS = 3
UW_HIGH_PEAK = 0.3
UW_LOW = 3e-5
UW_SLOW = 1e-4
ZERO_START_SKIP = 20
EPS_FRACTION = 0.5
EPS_GRAD_FACTOR = 100.0
DEAD_WARNING = 0.1
DEAD_ERROR = 0.9
ZERO_GRAD_STEPS = 10
EXPLODE = 100.0
VANISH = 1e-3
KEEP_Z_POOLED = 5.0
KEEP_Z_CALL = 6.0
VARIANCE_FACTOR = 3.0
MIN_RECORDS = 20

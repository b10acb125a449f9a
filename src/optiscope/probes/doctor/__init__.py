"""``diagnose(records)``: what the probe records say is wrong, as data.

Each :class:`Finding` names the run, the parameter (or layer, group, module)
and the steps it is about, the evidence (the numbers it rests on), the
threshold it crossed and where that threshold comes from, a suggested action,
and a severity:

``info``
    A fact about the model or the data that needs no action (the border
    pixels of the digits are never lit, so Adam's ``v`` stays 0 for the
    weights that read them).
``warning``
    Training works less well than it could; the action says what to change.
``error``
    Training is broken (non-finite values, a layer that receives no gradient).

The checks, by ``code``:

``lr_too_high``, ``lr_too_low``, ``lr_low``
    Per parameter, from the update-to-weight ratio RMS(Δθ)/RMS(θ).
``eps_dominates``
    Adam's ε larger than √v̂ for most coordinates.
``dead_units``, ``zero_inputs``, ``never_updated``
    Adam coordinates whose ``v`` is still 0 at the last step: they never
    received a gradient. A layer's bias tells dead units (a whole row, and
    the bias entry) from inputs that were always zero (whole columns).
``zero_gradient``
    A tensor whose gradient is exactly zero at every step (from some step on).
``exploding_gradients``, ``vanishing_gradients``
    The trend of the gradient RMS against its level at the start.
``nonfinite_gradients``, ``nonfinite_parameters``
    NaN or infinite gradients (where they first appear) or parameters.
``forgotten_eval``
    A Dropout layer run in training mode with gradients off.
``keep_rate``
    A Dropout layer's observed keep rate outside its binomial bounds.
``variance_ratio``
    Momentum's smoothed Var(m)/Var(g) far from (1−β)/(1+β).

The thresholds were set on the digits MLP of ``optiscope lab`` (64-256-256-10,
ReLU, dropout 0.5, batch 32) with injected pathologies (``tests/test_doctor.py``);
each finding's ``basis`` says so where it applies. Records are read once, in
order, keeping a bounded summary per tensor (long series are thinned to at
most :data:`MAX_POINTS` evenly spaced points), so a file of any length fits in
memory.

The package: :mod:`.records` reads records into bounded summaries,
:mod:`.thresholds` holds the thresholds and :mod:`.finding` the
:class:`Finding` type; each family of checks has its module
(:mod:`.learning_rate`, :mod:`.gradients`, :mod:`.coverage`, :mod:`.dropout`,
:mod:`.momentum`); :mod:`.diagnosis` runs them, and :mod:`.cli` is
``optiscope doctor``.

Example:
    >>> import torch, optiscope
    >>> w = torch.nn.Parameter(torch.ones(100))
    >>> opt = optiscope.Adam([w], lr=1e-7, probe=True)
    >>> for _ in range(100):
    ...     w.grad = torch.randn(100)
    ...     opt.step()
    >>> [f.code for f in optiscope.probes.diagnose(opt._probe.history)]
    ['lr_too_low']
"""

from __future__ import annotations

from .cli import add_doctor_parser, bases, evidence_text, render_table, to_json
from .diagnosis import diagnose
from .finding import SEVERITIES, Finding
from .thresholds import (
    DEAD_ERROR,
    DEAD_WARNING,
    EPS_FRACTION,
    EPS_GRAD_FACTOR,
    EXPLODE,
    KEEP_Z_CALL,
    KEEP_Z_POOLED,
    MAX_POINTS,
    MIN_RECORDS,
    RULE_OF_THUMB,
    UW_HIGH,
    UW_HIGH_PEAK,
    UW_HIGH_STEPS,
    UW_LOW,
    UW_SLOW,
    VANISH,
    VARIANCE_FACTOR,
    ZERO_GRAD_STEPS,
    ZERO_START_SKIP,
)

__all__ = [
    "DEAD_ERROR",
    "DEAD_WARNING",
    "EPS_FRACTION",
    "EPS_GRAD_FACTOR",
    "EXPLODE",
    "KEEP_Z_CALL",
    "KEEP_Z_POOLED",
    "MAX_POINTS",
    "MIN_RECORDS",
    "RULE_OF_THUMB",
    "SEVERITIES",
    "UW_HIGH",
    "UW_HIGH_PEAK",
    "UW_HIGH_STEPS",
    "UW_LOW",
    "UW_SLOW",
    "VANISH",
    "VARIANCE_FACTOR",
    "ZERO_GRAD_STEPS",
    "ZERO_START_SKIP",
    "Finding",
    "add_doctor_parser",
    "bases",
    "diagnose",
    "evidence_text",
    "render_table",
    "to_json",
]

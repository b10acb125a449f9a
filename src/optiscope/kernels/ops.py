r"""The fused steps and dropout as registered torch operators.

``torch.ops.optiscope.momentum_``, ``adam_``, ``philox_dropout`` and
``philox_dropout_backward`` are ``torch.library`` custom ops: each declares the
arguments it writes and has a fake implementation, so torch.compile, FakeTensor
and functionalization see one operator with known effects, not an opaque
Python call. The real implementation (:mod:`.dispatch`) runs only on real
tensors, outside tracing, and reads Adam's step counters there: a step count
never becomes a Python constant that a compiled graph would guard on.

Dropout's backward regenerates the Philox mask from ``(p, seed, offset)``, so
autograd saves no tensor for it.
"""

from __future__ import annotations

from typing import Any

import torch

from . import dispatch
from .records import AdamBatch, AdamHyper, MomentumBatch, MomentumHyper

# The fused steps are defined with torch.library's lower-level API rather than
# @custom_op: a step writes hundreds of tensors, and custom_op bumps their
# autograd version counters one Python call at a time (0.4 ms for 800 tensors);
# here each list is bumped in one call (see _bump_versions).
_LIB = torch.library.Library("optiscope", "DEF")
_LIB.define(
    "momentum_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
    "float lr, float momentum, float weight_decay, bool maximize, "
    "Tensor(c!)? stats) -> ()"
)
_LIB.define(
    "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, "
    "float lr, float beta1, float beta2, float eps, float weight_decay, "
    "bool decoupled_weight_decay, bool amsgrad, bool maximize, "
    "bool bias_correction, Tensor(f!)? stats) -> ()"
)


def _momentum_impl(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    stats: torch.Tensor | None,
) -> None:
    """:func:`optiscope.rules.momentum_step` on every row, in one pass."""
    dispatch.momentum(
        MomentumBatch(params, grads, momentum_buffers),
        MomentumHyper(lr, momentum, weight_decay, maximize),
        stats,
    )


def _adam_impl(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    bias_correction: bool,
    stats: torch.Tensor | None,
) -> None:
    """:func:`optiscope.rules.adam_step` on every row, in one pass; each
    ``steps[i]`` is advanced by one first. ``max_exp_avg_sqs`` is empty unless
    ``amsgrad`` (an operator's list argument cannot be None)."""
    hyper = AdamHyper(
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        decoupled_weight_decay,
        amsgrad,
        maximize,
        bias_correction,
    )
    m_max = max_exp_avg_sqs if amsgrad else None
    batch = AdamBatch(params, grads, exp_avgs, exp_avg_sqs, m_max, [])
    dispatch.adam(batch, hyper, steps, stats)


def _fake(*args: Any) -> None:
    return None  # the operators return nothing; their writes are in the schema


def _bump_versions(written: tuple[int, ...]) -> Any:
    """An ADInplaceOrView kernel: mark the written arguments as modified (so
    autograd refuses a stale saved tensor), a whole list per call."""

    def kernel(keyset: Any, op: Any, *args: Any) -> None:
        for index in written:
            if args[index] is not None:
                torch.autograd.graph.increment_version(args[index])
        return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)

    return kernel


for _name, _impl, _written in (
    ("momentum_", _momentum_impl, (0, 2, 7)),
    ("adam_", _adam_impl, (0, 2, 3, 4, 5, 15)),
):
    for _key in ("CPU", "CUDA"):
        _LIB.impl(_name, _impl, _key)
    torch.library.register_fake(f"optiscope::{_name}", _fake, lib=_LIB)
    _bump = _bump_versions(_written)
    _op = getattr(torch.ops.optiscope, _name).default
    _LIB.impl(
        _name,
        lambda keyset, *args, _k=_bump, _o=_op: _k(keyset, _o, *args),
        "ADInplaceOrView",
        with_keyset=True,
    )

momentum_ = torch.ops.optiscope.momentum_.default
adam_ = torch.ops.optiscope.adam_.default


@torch.library.custom_op("optiscope::philox_dropout", mutates_args=())
def philox_dropout(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """``x * (1/(1-p))`` where the Philox word keeps the element, else 0 (``0<p<1``)."""
    return dispatch.dropout(x, p, seed, offset)


@philox_dropout.register_fake
def _(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("optiscope::philox_dropout_backward", mutates_args=())
def philox_dropout_backward(
    grad_y: torch.Tensor, p: float, seed: int, offset: int
) -> torch.Tensor:
    """The same mask and scale applied to the incoming gradient."""
    return dispatch.dropout(grad_y, p, seed, offset, backward=True)


@philox_dropout_backward.register_fake
def _(grad_y: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    return torch.empty_like(grad_y, memory_format=torch.contiguous_format)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, ctx.p, ctx.seed, ctx.offset = inputs  # three numbers; no tensor is saved


def _backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
    grad_x = philox_dropout_backward(grad_y, ctx.p, ctx.seed, ctx.offset)
    return grad_x, None, None, None


philox_dropout.register_autograd(_backward, setup_context=_setup_context)

r"""Dropout as a torch custom op whose backward saves no tensor.

The keep mask is a function of ``(seed, offset, element index)`` (Philox, see
:mod:`optiscope.kernels.philox`), so autograd keeps only ``p``, ``seed`` and
``offset`` and backward regenerates the mask: 0 bytes saved per element,
where ``torch.nn.functional.dropout`` saves a mask of ``numel`` bytes or more.
Being a ``torch.library.custom_op`` with a fake implementation, it also
traces under ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kernels


@torch.library.custom_op("optiscope::philox_dropout", mutates_args=())
def philox_dropout(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """``x * (1/(1-p))`` where the Philox word keeps the element, else 0 (``0<p<1``)."""
    return kernels.dropout_forward(x.contiguous(), p, seed, offset)


@torch.library.custom_op("optiscope::philox_dropout_backward", mutates_args=())
def philox_dropout_backward(
    grad_y: torch.Tensor, p: float, seed: int, offset: int
) -> torch.Tensor:
    """The same mask and scale applied to the incoming gradient."""
    return kernels.dropout_backward(grad_y.contiguous(), p, seed, offset)


@philox_dropout.register_fake
def _(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@philox_dropout_backward.register_fake
def _(grad_y: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    return torch.empty_like(grad_y, memory_format=torch.contiguous_format)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, ctx.p, ctx.seed, ctx.offset = inputs  # three numbers; no tensor is saved


def _backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
    grad_x = philox_dropout_backward(grad_y, ctx.p, ctx.seed, ctx.offset)
    return grad_x, None, None, None


philox_dropout.register_autograd(_backward, setup_context=_setup_context)


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed in ``[0, 2^63 - 1)`` from ``generator`` (or torch's default one), so
    ``torch.manual_seed`` and ``generator=`` make the mask reproducible."""
    device = generator.device if generator is not None else "cpu"
    high = 2**63 - 1
    return int(torch.randint(high, (), generator=generator, device=device).item())

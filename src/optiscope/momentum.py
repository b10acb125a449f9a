r"""Momentum in the EMA form of the seed: :math:`m \leftarrow \beta m + (1-\beta) g`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import _checks, kernels
from ._optimizer import GroupWork, OptiscopeOptimizer, ParamsT, check_state_tensor
from .kernels import rows as layout


class Momentum(OptiscopeOptimizer):
    r"""Momentum SGD with the momentum buffer as an exponential moving average.

    .. math::

        m_t &= \beta\, m_{t-1} + (1-\beta)\, g_t, \qquad m_0 = 0 \\
        \theta_t &= \theta_{t-1} - \alpha\, m_t

    so the first step is :math:`-\alpha(1-\beta) g_1`, and ``momentum=0`` is plain
    SGD. The buffer is stored as ``state[p]["momentum_buffer"]``.

    .. warning::
        ``torch.optim.SGD`` uses another convention: its buffer starts at
        :math:`g_1` and sums, :math:`b_t = \beta b_{t-1} + g_t`, so its steps are
        :math:`1/(1-\beta)` times larger in steady state. The two are the same
        trajectory under the exact mapping

        ``Momentum(lr=α, momentum=β)`` ≡ ``SGD(lr=α(1−β), momentum=β, dampening=0)``

        from the first step on, because :math:`m_t = (1-\beta) b_t` holds at
        :math:`t=1` (:math:`m_1 = (1-\beta)g_1`, :math:`b_1 = g_1`) and both
        recursions are linear with the same :math:`\beta`.

    Weight decay is L2: :math:`\lambda\theta` is added to the gradient before the
    average. ``probe=True`` measures every step in the same pass, including an
    estimate of the variance reduction (see :mod:`optiscope.probes.measure`).

    Example:
        >>> import torch, optiscope
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = optiscope.Momentum([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2)
        >>> opt.step()
        >>> w.detach()  # 1 - 0.1 * (1 - 0.9) * 1
        tensor([0.9900, 0.9900])
    """

    _probe_layout = layout.MOMENTUM

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        probe: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize
        )
        super().__init__(params, defaults, probe=probe)

    def _check_group(self, group: dict[str, Any]) -> dict[str, Any]:
        group["lr"] = _checks.non_negative("lr", group["lr"])
        group["momentum"] = _checks.unit_interval_open_right(
            "momentum", group["momentum"]
        )
        group["weight_decay"] = _checks.non_negative(
            "weight_decay", group["weight_decay"]
        )
        group["maximize"] = _checks.flag("maximize", group["maximize"])
        return group

    def _new_state(
        self, param: torch.Tensor, options: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        if "momentum_buffer" in state:
            return {}
        buffer = torch.zeros_like(param, memory_format=torch.preserve_format)
        return {"momentum_buffer": buffer}

    def _load_state_check(
        self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> None:
        if "momentum_buffer" not in state:
            raise ValueError("lacks momentum_buffer")
        check_state_tensor(
            "momentum_buffer", state["momentum_buffer"], param, (param.dtype,)
        )

    def _columns(self, work: GroupWork) -> tuple:
        return (
            work.params,
            [p.grad for p in work.params],
            [s["momentum_buffer"] for s in work.states],
        )

    def _check_tensors(self, work: GroupWork) -> None:
        kernels.check_momentum(*self._columns(work), labels=work.labels)

    def _update(self, work: GroupWork, stats: np.ndarray | None) -> None:
        o = work.options
        # One fused pass over every tensor of the group; rules.momentum_step is
        # the per-tensor statement of the same rule.
        kernels.momentum_(
            *self._columns(work),
            lr=o["lr"],
            momentum=o["momentum"],
            weight_decay=o["weight_decay"],
            maximize=o["maximize"],
            stats=stats,
        )

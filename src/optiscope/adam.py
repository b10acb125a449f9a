r"""Adam: the seed's :math:`\theta \leftarrow \theta - \alpha\, m/\sqrt{v}`, and Kingma & Ba's form."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import _checks, kernels
from ._moments import bias_correction as _bias_correction
from ._moments import ema_
from ._optimizer import OptiscopeOptimizer, ParamsT
from ._precision import compute_view
from .kernels import rows as layout


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    bias_correction: bool,
) -> None:
    r"""One Adam step for one tensor, in place on ``param`` and the moments.

    ``step`` is :math:`t`, counted from 1 for the first update.

    .. math::

        g &\leftarrow \pm\nabla_\theta J \;(+\lambda\theta \text{ if L2}),
            \qquad \theta \leftarrow (1-\alpha\lambda)\theta \text{ if decoupled} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2)\, g \odot g,
            \qquad \hat v \leftarrow \max(\hat v, v) \text{ if amsgrad} \\
        \theta &\leftarrow \theta - \frac{\alpha}{c_1}\,
            \frac{m}{\sqrt{v / c_2} + \epsilon},
            \qquad c_i = 1-\beta_i^t \text{ (or 1 without bias correction)}

    Where the denominator :math:`\sqrt{v/c_2}+\epsilon` is zero (only possible
    with ``eps=0``, for a coordinate whose gradient has been exactly zero), the
    step is zero: the coordinate has had no signal, so it does not move.
    """
    with compute_view(param, exp_avg, exp_avg_sq, *_present(max_exp_avg_sq)) as views:
        theta, m, v, *vmax = views
        g = grad.to(theta.dtype)
        if maximize:
            g = -g
        if weight_decay != 0.0:
            if decoupled_weight_decay:
                theta.mul_(1.0 - lr * weight_decay)
            else:
                g = g.add(theta, alpha=weight_decay)
        ema_(m, g, beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if amsgrad:
            torch.maximum(vmax[0], v, out=vmax[0])
            v = vmax[0]
        c1 = _bias_correction(beta1, step) if bias_correction else 1.0
        c2 = _bias_correction(beta2, step) if bias_correction else 1.0
        denom = (v.sqrt() / math.sqrt(c2)).add_(eps)
        if eps == 0.0:
            update = (m / denom).masked_fill_(denom == 0, 0.0)
            theta.add_(update, alpha=-lr / c1)
        else:
            theta.addcdiv_(m, denom, value=-lr / c1)


def _present(t: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return () if t is None else (t,)


class Adam(OptiscopeOptimizer):
    r"""Adam, with the seed's rule and Kingma & Ba's as two settings of one class.

    The state names follow torch: ``exp_avg`` is the seed's :math:`m`,
    ``exp_avg_sq`` its :math:`v`, ``step`` the count :math:`t`.

    * ``bias_correction=True`` (default): Kingma & Ba, Algorithm 1, with
      :math:`\epsilon` added after :math:`\sqrt{\hat v}`. Same steps as
      ``torch.optim.Adam`` with the same options.
    * ``bias_correction=False, eps=0.0``: the seed's rule exactly,
      :math:`\theta \leftarrow \theta - \alpha\, m/\sqrt{v}`.

    See :func:`adam_step` for the equations and the convention where :math:`v=0`.
    ``weight_decay`` is L2 (added to the gradient) unless
    ``decoupled_weight_decay=True``, which is :class:`AdamW`.

    ``probe=True`` measures every step in the same pass (see
    :mod:`optiscope.probes`); the latest values are in ``optimizer.probes``.

    ``state_dtype`` stores ``exp_avg``/``exp_avg_sq`` in another dtype than the
    parameter (e.g. ``torch.float32`` for bfloat16 weights, or ``torch.bfloat16``
    to halve state memory for float32 weights); the arithmetic is float32 either way.

    Example:
        >>> import torch, optiscope
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = optiscope.Adam([w], lr=0.1)
        >>> w.grad = torch.tensor([1.0, -1e-3, 0.0])
        >>> opt.step()
        >>> w.detach()  # first step is -lr * sign(g) where |g| >> eps
        tensor([-0.1000,  0.1000,  0.0000])
    """

    _probe_layout = layout.ADAM

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        amsgrad: bool = False,
        maximize: bool = False,
        bias_correction: bool = True,
        *,
        state_dtype: torch.dtype | None = None,
        probe: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            bias_correction=bias_correction,
            state_dtype=state_dtype,
        )
        super().__init__(params, defaults, probe=probe)

    def _check_group(self, group: dict[str, Any]) -> dict[str, Any]:
        group["lr"] = _checks.non_negative("lr", group["lr"])
        group["betas"] = _checks.betas(group["betas"])
        group["eps"] = _checks.non_negative("eps", group["eps"])
        group["weight_decay"] = _checks.non_negative(
            "weight_decay", group["weight_decay"]
        )
        for name in (
            "decoupled_weight_decay",
            "amsgrad",
            "maximize",
            "bias_correction",
        ):
            group[name] = _checks.flag(name, group[name])
        state_dtype = group["state_dtype"]
        if state_dtype is not None and state_dtype not in _checks.FLOATING_DTYPES:
            raise TypeError(
                "state_dtype must be None (the parameter's dtype) or one of "
                f"{', '.join(map(str, _checks.FLOATING_DTYPES))}, got {state_dtype!r}"
            )
        return group

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping ``state_dtype``.

        torch casts every floating-point state to its parameter's dtype on load,
        which would round float32 moments of a bfloat16 parameter to bfloat16;
        the moments of groups with a ``state_dtype`` are restored from the saved
        tensors instead.
        """
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for group, saved_group in zip(
            self.param_groups, state_dict["param_groups"], strict=True
        ):
            dtype = group.get("state_dtype")
            if dtype is None:
                continue
            for param, key in zip(group["params"], saved_group["params"], strict=True):
                for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if name in saved.get(key, {}):
                        self.state[param][name] = saved[key][name].to(
                            device=param.device, dtype=dtype, copy=True
                        )

    def _init_state(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = group["state_dtype"] or param.dtype

        def zeros() -> torch.Tensor:
            return torch.zeros_like(
                param, dtype=dtype, memory_format=torch.preserve_format
            )

        state = {
            "step": torch.tensor(0.0, dtype=torch.float32),
            "exp_avg": zeros(),
            "exp_avg_sq": zeros(),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = zeros()
        return state

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        stats: np.ndarray | None,
    ) -> list[tuple[float, float]] | None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for state in states:
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                # amsgrad switched on mid-run: the running max starts from the current v.
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
        counters = [s["step"] for s in states]
        torch._foreach_add_(counters, 1.0)  # one call, not one per tensor
        steps = [int(t) for t in torch.stack(counters).tolist()]
        # One fused pass over every tensor of the group; adam_step is the
        # per-tensor statement of the same rule (and the kernels' fallback).
        kernels.adam_(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None,
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            bias_correction=group["bias_correction"],
            stats=stats,
        )
        if stats is None:
            return None
        if not group["bias_correction"]:
            return [(1.0, 1.0)] * len(steps)
        return [(_bias_correction(beta1, t), _bias_correction(beta2, t)) for t in steps]


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter):
    :math:`\theta \leftarrow (1-\alpha\lambda)\theta` before the Adam step,
    instead of adding :math:`\lambda\theta` to the gradient. Same steps as
    ``torch.optim.AdamW``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        bias_correction: bool = True,
        *,
        state_dtype: torch.dtype | None = None,
        probe: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=True,
            amsgrad=amsgrad,
            maximize=maximize,
            bias_correction=bias_correction,
            state_dtype=state_dtype,
            probe=probe,
        )

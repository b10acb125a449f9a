r"""Adam: the seed's :math:`\theta \leftarrow \theta - \alpha\, m/\sqrt{v}`, and Kingma & Ba's form."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import _checks, kernels, rules
from ._optimizer import (
    GroupWork,
    OptiscopeOptimizer,
    ParamsT,
    check_state_tensor,
    default_state_dtype,
)
from .kernels import rows as layout


class Adam(OptiscopeOptimizer):
    r"""Adam, with the seed's rule and Kingma & Ba's as two settings of one class.

    The state names follow torch: ``exp_avg`` is the seed's :math:`m`,
    ``exp_avg_sq`` its :math:`v`, ``step`` the count :math:`t`.

    * ``bias_correction=True`` (default): Kingma & Ba, Algorithm 1, with
      :math:`\epsilon` added after :math:`\sqrt{\hat v}`. Same steps as
      ``torch.optim.Adam`` with the same options.
    * ``bias_correction=False, eps=0.0``: the seed's rule exactly,
      :math:`\theta \leftarrow \theta - \alpha\, m/\sqrt{v}`.

    See :func:`optiscope.rules.adam_step` for the equations and the convention where :math:`v=0`.
    ``weight_decay`` is L2 (added to the gradient) unless
    ``decoupled_weight_decay=True``, which is :class:`AdamW`.

    ``probe=True`` measures every step in the same pass (see
    :mod:`optiscope.probes`); the latest values are in ``optimizer.probes``.

    ``state_dtype`` is the dtype of ``exp_avg``/``exp_avg_sq`` (and
    ``max_exp_avg_sq``). ``None`` (default) keeps them in float32 for float16
    parameters and in the parameter's dtype otherwise: float16's range cannot
    hold :math:`(1-\beta_2) g^2` (0 below :math:`|g| \approx 5\cdot10^{-3}` with
    :math:`\beta_2 = 0.999`), and an underflowed :math:`v` makes steps of
    thousands of times ``lr``. ``torch.float32`` suits bfloat16 weights,
    ``torch.bfloat16`` halves state memory for float32 weights;
    ``torch.float16`` is refused. The arithmetic is float32 (or float64) either
    way. A parameter whose dtype changes after its state was made is refused
    at the next step (see :meth:`OptiscopeOptimizer.step`).

    ``stochastic_rounding=True`` (bfloat16 moments only) rounds the stored
    ``exp_avg`` and ``exp_avg_sq`` up or down with probability proportional to
    the distance, so :math:`E[m_\text{stored}] = m` and small updates
    :math:`(1-\beta_2) g^2 \ll v` are not always rounded away (see
    :func:`optiscope.rules.stochastic_round`). The random bits are Philox words
    of ``(rounding_seed, parameter, step, element)``: the same on every backend
    and thread count, and reproducible from a checkpoint. ``rounding_seed``
    lives in the param group (so ``state_dict`` keeps it); None draws it from
    torch's default generator at construction, and only then.

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
    _state_tensors = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

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
        stochastic_rounding: bool = False,
        rounding_seed: int | None = None,
        probe: bool = False,
    ) -> None:
        if stochastic_rounding is True and rounding_seed is None:
            rounding_seed = int(torch.randint(2**63 - 1, ()))
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
            stochastic_rounding=stochastic_rounding,
            rounding_seed=rounding_seed,
        )
        super().__init__(params, defaults, probe=probe)
        for group in self.param_groups:  # the parameters' dtypes, known now
            if group["stochastic_rounding"]:
                self._check_rounding(group)

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
            "stochastic_rounding",
        ):
            group[name] = _checks.flag(name, group[name])
        state_dtype = group["state_dtype"]
        if state_dtype is not None and state_dtype not in _STATE_DTYPES:
            why = (
                ": float16 cannot hold Adam's second moment ((1-beta2)*g*g is 0 in "
                "float16 below |g| ~ 5e-3 with beta2=0.999, and the steps then "
                "explode)"
                if state_dtype == torch.float16
                else ""
            )
            raise TypeError(
                "state_dtype must be None (float32 for float16 parameters, else the "
                "parameter's dtype) or one of "
                f"{', '.join(map(str, _STATE_DTYPES))}, got {state_dtype!r}{why}"
            )
        if group["stochastic_rounding"]:
            self._check_rounding(group)
        return group

    def _check_rounding(self, group: dict[str, Any]) -> None:
        # Only bfloat16 moments round stochastically; the state dtype of each
        # parameter is known once the group has its parameters.
        dtypes = {group["state_dtype"]} - {None}
        dtypes |= {self._state_dtype(p.dtype, group) for p in group.get("params", ())}
        if dtypes - {torch.bfloat16}:
            raise ValueError(
                "stochastic_rounding=True needs bfloat16 moments "
                "(state_dtype=torch.bfloat16, or bfloat16 parameters with "
                f"state_dtype=None), got state dtypes "
                f"{', '.join(sorted(map(str, dtypes)))}"
            )
        seed = group["rounding_seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(
                f"rounding_seed must be an int in [0, 2**63) (or None to draw one) "
                f"with stochastic_rounding=True, got {seed!r}"
            )

    def _state_dtype(self, dtype: torch.dtype, options: dict[str, Any]) -> torch.dtype:
        return options.get("state_dtype") or default_state_dtype(dtype)

    def _load_state_check(
        self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]
    ) -> None:
        dtypes = (self._state_dtype(param.dtype, {**self.defaults, **group}),)
        if "step" not in state:
            raise ValueError("has moments but no step")
        for name in _MOMENTS:
            if name in state:
                check_state_tensor(name, state[name], param, dtypes)
            elif name != "max_exp_avg_sq":
                raise ValueError(f"lacks {name}")

    def _new_state(
        self, param: torch.Tensor, options: dict[str, Any], state: dict[str, Any]
    ) -> dict[str, Any]:
        if not state:
            dtype = self._state_dtype(param.dtype, options)

            def zeros() -> torch.Tensor:
                return torch.zeros_like(
                    param, dtype=dtype, memory_format=torch.preserve_format
                )

            new = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": zeros(),
                "exp_avg_sq": zeros(),
            }
            if options["amsgrad"]:
                new["max_exp_avg_sq"] = zeros()
            return new
        if options["amsgrad"] and "max_exp_avg_sq" not in state:
            # amsgrad switched on mid-run: the running max starts from the current v.
            return {"max_exp_avg_sq": state["exp_avg_sq"].clone()}
        return {}

    def _columns(self, work: GroupWork) -> tuple:
        s = work.states
        amsgrad = work.options["amsgrad"]
        return (
            work.params,
            [p.grad for p in work.params],
            [x["exp_avg"] for x in s],
            [x["exp_avg_sq"] for x in s],
            [x["max_exp_avg_sq"] for x in s] if amsgrad else None,
            [x["step"] for x in s],
        )

    def _check_tensors(self, work: GroupWork) -> None:
        kernels.check_adam(*self._columns(work), labels=work.labels)

    def _update(self, work: GroupWork, stats: np.ndarray | None) -> None:
        o = work.options
        beta1, beta2 = o["betas"]
        # One fused pass over every tensor of the group; rules.adam_step is the
        # per-tensor statement of the same rule.
        kernels.adam_(
            *self._columns(work),
            lr=o["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=o["eps"],
            weight_decay=o["weight_decay"],
            decoupled_weight_decay=o["decoupled_weight_decay"],
            amsgrad=o["amsgrad"],
            maximize=o["maximize"],
            bias_correction=o["bias_correction"],
            rounding_seed=o["rounding_seed"] if o["stochastic_rounding"] else None,
            rounding_streams=self._streams(work) if o["stochastic_rounding"] else (),
            stats=stats,
        )

    def _streams(self, work: GroupWork) -> list[int]:
        """Each parameter's position across all groups, as ``state_dict``
        numbers them: its stochastic rounding stream."""
        first = sum(len(g["params"]) for g in self.param_groups[: work.index])
        position = {id(p): first + j for j, p in enumerate(work.group["params"])}
        return [position[id(p)] for p in work.params]

    def _corrections(self, work: GroupWork) -> list[tuple[float, float]]:
        beta1, beta2 = work.options["betas"]
        enabled = work.options["bias_correction"]
        return [
            tuple(rules.bias_corrections(beta1, beta2, int(s["step"]), enabled))
            for s in work.states
        ]


_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
#: What ``state_dtype`` may be besides None: float16 is refused (see Adam).
_STATE_DTYPES = tuple(d for d in rules.SUPPORTED_DTYPES if d != torch.float16)


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
        stochastic_rounding: bool = False,
        rounding_seed: int | None = None,
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
            stochastic_rounding=stochastic_rounding,
            rounding_seed=rounding_seed,
            probe=probe,
        )

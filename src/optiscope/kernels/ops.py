r"""The fused steps and dropout as registered torch operators.

``torch.ops.optiscope.momentum_``, ``adam_``, ``philox_dropout`` and
``philox_dropout_backward`` are ``torch.library`` custom ops: each declares the
arguments it writes and has a fake implementation, so torch.compile, FakeTensor
and functionalization see one operator with known effects, not an opaque
Python call. The real implementation (:mod:`.dispatch`) runs only on real
tensors, outside tracing, and reads Adam's step counters there: a step count
never becomes a Python constant that a compiled graph would guard on.

Dropout's backward regenerates the Philox mask from ``(p, seed, offset)``, so
autograd saves no tensor for it; ``philox_dropout_`` is its in-place form, and
:class:`PhiloxDropout` binds the operators to eager autograd, forward-mode AD
and ``torch.func`` (``vmap`` included).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._python_dispatch as _python_dispatch
from torch._functorch.utils import unwrap_dead_wrappers

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
    "bool bias_correction, Tensor(f!)? stats, int? rounding_seed=None, "
    "int[] rounding_streams=[]) -> ()"
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
    rounding_seed: int | None = None,
    rounding_streams: list[int] | tuple[int, ...] = (),
) -> None:
    """:func:`optiscope.rules.adam_step` on every row, in one pass; each
    ``steps[i]`` is advanced by one first. ``max_exp_avg_sqs`` is empty unless
    ``amsgrad`` (an operator's list argument cannot be None). With a
    ``rounding_seed`` the bfloat16 moments are rounded stochastically, row
    ``i`` drawing from stream ``rounding_streams[i]``."""
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
    dispatch.adam(
        batch,
        hyper,
        steps,
        stats,
        rounding_seed=rounding_seed,
        rounding_streams=rounding_streams,
    )


def _fake(*args: Any) -> None:
    return None  # the operators return nothing; their writes are in the schema


def _bump(args: tuple, written: tuple[int, ...]) -> None:
    """Mark the written arguments as modified (so autograd refuses a stale
    saved tensor), a whole list per call."""
    for index in written:
        if args[index] is not None:
            torch.autograd.graph.increment_version(args[index])


def _bump_versions(written: tuple[int, ...]) -> Any:
    """An ADInplaceOrView kernel: :func:`_bump`, then on to the implementation."""

    def kernel(keyset: Any, op: Any, *args: Any) -> None:
        _bump(args, written)
        return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)

    return kernel


_STEPS = {
    "momentum_": (_momentum_impl, (0, 2, 7)),
    "adam_": (_adam_impl, (0, 2, 3, 4, 5, 15)),
}


def step(name: str, args: tuple, plain: bool) -> None:
    """``torch.ops.optiscope.<name>(*args)``. With ``plain`` tensors (no
    subclass) on CPU or CUDA in plain eager mode, where nothing traces or
    intercepts operators, the same version bumps and implementation without torch's
    dispatcher, whose Python round trip costs about 0.1 ms right after a torch
    op (BENCHMARKS.md, "Sharing torch's cores")."""
    if (
        plain
        and _plain_eager()
        and _KERNEL_DEVICES.issuperset(map(_device_type, args[0]))
    ):
        impl, written = _STEPS[name]
        _bump(args, written)
        impl(*args)
        return
    getattr(torch.ops.optiscope, name).default(*args)


#: Where torch would run the implementation (a meta tensor, say, takes the fake one).
_KERNEL_DEVICES = frozenset({"cpu", "cuda"})


def _device_type(t: torch.Tensor) -> str:
    return t.device.type


def _plain_eager() -> bool:
    """No torch.compile tracing, dispatch or function mode, or functorch
    transform is active: each would see or change what an operator call does."""
    try:
        return not (
            torch.compiler.is_compiling()
            or _python_dispatch.is_in_torch_dispatch_mode()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None
        )
    except AttributeError:  # a torch without one of these private probes
        return False


for _name, (_impl, _written) in _STEPS.items():
    for _key in ("CPU", "CUDA"):
        _LIB.impl(_name, _impl, _key)
    torch.library.register_fake(f"optiscope::{_name}", _fake, lib=_LIB)
    _versions = _bump_versions(_written)
    _op = getattr(torch.ops.optiscope, _name).default
    _LIB.impl(
        _name,
        lambda keyset, *args, _k=_versions, _o=_op: _k(keyset, _o, *args),
        "ADInplaceOrView",
        with_keyset=True,
    )

momentum_ = torch.ops.optiscope.momentum_.default
adam_ = torch.ops.optiscope.adam_.default


# -- dropout ---------------------------------------------------------------------
# The seed is a one-element int64 tensor, not an int: drawn inside a compiled
# graph, it is an input of the graph, never a constant that dynamo guards on
# (an int seed would recompile on every call).
def _seed_value(seed: torch.Tensor) -> int:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64:
        raise TypeError(
            f"seed must be a one-element int64 tensor, got "
            f"{getattr(seed, 'dtype', type(seed).__name__)}"
        )
    if seed.numel() != 1:
        raise ValueError(
            f"seed must be a one-element int64 tensor, got shape {tuple(seed.shape)}"
        )
    return int(seed.item())  # a real tensor here: the op runs outside tracing


@torch.library.custom_op("optiscope::philox_dropout", mutates_args=())
def philox_dropout(
    x: torch.Tensor, p: float, seed: torch.Tensor, offset: int
) -> torch.Tensor:
    r""":math:`y = \gamma\, d \circ x`, ``d_i`` the Philox keep bit of ``x``'s
    ``i``-th element in row-major order (``0 < p < 1``); ``y`` has ``x``'s strides."""
    return dispatch.dropout(x, p, _seed_value(seed), offset)


@philox_dropout.register_fake
def _(x: torch.Tensor, p: float, seed: torch.Tensor, offset: int) -> torch.Tensor:
    return torch.empty_like(x)  # the strides dispatch.dropout gives: x's own


@torch.library.custom_op("optiscope::philox_dropout_backward", mutates_args=())
def philox_dropout_backward(
    grad_y: torch.Tensor, p: float, seed: torch.Tensor, offset: int
) -> torch.Tensor:
    """The same mask and scale applied to the incoming gradient."""
    return dispatch.dropout(grad_y, p, _seed_value(seed), offset, backward=True)


@philox_dropout_backward.register_fake
def _(grad_y: torch.Tensor, p: float, seed: torch.Tensor, offset: int) -> torch.Tensor:
    return torch.empty_like(grad_y)


@torch.library.custom_op("optiscope::philox_dropout_", mutates_args=("x",))
def philox_dropout_(x: torch.Tensor, p: float, seed: torch.Tensor, offset: int) -> None:
    """:func:`philox_dropout` written over ``x`` (no second buffer where ``x`` is
    contiguous)."""
    dispatch.dropout(x, p, _seed_value(seed), offset, out=x)


@philox_dropout_.register_fake
def _(x: torch.Tensor, p: float, seed: torch.Tensor, offset: int) -> None:
    return None


@torch.library.custom_op("optiscope::philox_dropout_box", mutates_args=())
def philox_dropout_box(
    x: torch.Tensor,
    p: float,
    seed: torch.Tensor,
    offset: int,
    global_shape: list[int],
    start: list[int],
) -> torch.Tensor:
    r""":func:`philox_dropout` of the block ``x`` of a larger tensor of
    ``global_shape`` whose first element is at index ``start``: element
    ``(i_0, ...)`` of ``x`` gets the keep bit of its row-major index in the
    larger tensor, :math:`\sum_k (start_k + i_k) \prod_{j>k} global\_shape_j`,
    so a shard is masked exactly as the whole tensor would be."""
    box = (tuple(global_shape), tuple(start))
    return dispatch.dropout(x, p, _seed_value(seed), offset, box=box)


@philox_dropout_box.register_fake
def _(
    x: torch.Tensor,
    p: float,
    seed: torch.Tensor,
    offset: int,
    global_shape: list[int],
    start: list[int],
) -> torch.Tensor:
    return torch.empty_like(x)


def _setup_box(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, ctx.p, ctx.seed, ctx.offset, ctx.global_shape, ctx.start = inputs


def _backward_box(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
    grad_x = philox_dropout_box(
        grad_y, ctx.p, ctx.seed, ctx.offset, ctx.global_shape, ctx.start
    )
    return grad_x, None, None, None, None, None


philox_dropout_box.register_autograd(_backward_box, setup_context=_setup_box)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    # Kept as attributes, not save_for_backward: the seed is 8 bytes that the
    # backward needs, and autograd then saves no tensor at all.
    _, ctx.p, ctx.seed, ctx.offset = inputs


def _backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
    # The map is linear and self-adjoint (diagonal), so its backward is itself,
    # and differentiable again: double backward needs no other formula.
    grad_x = philox_dropout_backward(grad_y, ctx.p, ctx.seed, ctx.offset)
    return grad_x, None, None, None


philox_dropout.register_autograd(_backward, setup_context=_setup_context)
philox_dropout_backward.register_autograd(_backward, setup_context=_setup_context)


class PhiloxDropout(torch.autograd.Function):
    r""":func:`philox_dropout` for eager autograd and every ``torch.func`` transform.

    :math:`y = \gamma\, d \circ x` is linear in ``x`` with a diagonal Jacobian
    :math:`\gamma\,\mathrm{diag}(d)`, so the backward (``γ·d∘g``), the tangent
    (``γ·d∘t``) and the second derivative all apply the same mask again; it is
    regenerated from ``(seed, offset)`` each time and no tensor is saved.
    Under ``vmap`` a batched ``seed`` (``randomness="different"``) gives each
    sample its own mask, an unbatched one (``"same"``) gives every sample the
    mask of its own row-major element index.

    Dynamo refuses Functions with a custom ``jvp``, so compiled code calls the
    operator itself (its registered autograd is the same backward).
    """

    @staticmethod
    def forward(
        x: torch.Tensor, p: float, seed: torch.Tensor, offset: int
    ) -> torch.Tensor:
        return philox_dropout(x, p, seed, offset)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, None, None, None]:
        grad_x = apply(PhiloxDropout, grad_y, ctx.p, ctx.seed, ctx.offset)
        return grad_x, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, *_: Any) -> torch.Tensor:
        return apply(PhiloxDropout, x_t, ctx.p, ctx.seed, ctx.offset)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], x: torch.Tensor, p: float, seed, offset
    ) -> tuple[torch.Tensor, int]:
        x_dim, _, seed_dim, _ = in_dims
        # One kernel call per sample: the mask of each is that of an unbatched
        # call, a function of (its seed, its own element index).
        outputs = [
            apply(
                PhiloxDropout,
                x if x_dim is None else x.select(x_dim, b),
                p,
                seed if seed_dim is None else seed.select(seed_dim, b),
                offset,
            )
            for b in range(info.batch_size)
        ]
        return torch.stack(outputs), 0


def apply(function: type[torch.autograd.Function], *args: Any) -> torch.Tensor:
    """``function.apply(*args)`` for a Function whose arguments have no defaults.

    ``Function.apply`` binds default arguments through ``inspect.signature`` on
    every call, which doubles the cost of a small dropout (75 µs against 36 µs
    for 1000 elements); outside ``torch.func`` transforms it then only unwraps
    dead functorch wrappers and calls the C++ apply, as this does.
    """
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    args = unwrap_dead_wrappers(args)
    return super(torch.autograd.Function, function).apply(*args)


class PhiloxDropoutInplace(torch.autograd.Function):
    """:class:`PhiloxDropout` written over its input (``inplace=True``); the input
    is marked dirty, so autograd refuses a stale saved copy of it, and the
    backward is the same regenerated mask. Plain eager only: under ``torch.func``
    transforms the caller copies :class:`PhiloxDropout`'s output back instead."""

    @staticmethod
    def forward(
        x: torch.Tensor, p: float, seed: torch.Tensor, offset: int
    ) -> torch.Tensor:
        philox_dropout_(x, p, seed, offset)
        return x

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.mark_dirty(inputs[0])
        _setup_context(ctx, inputs, output)

    backward = staticmethod(PhiloxDropout.backward)

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, *_: Any) -> torch.Tensor:
        # A dirty input's tangent is updated in place, as the primal is.
        philox_dropout_(x_t, ctx.p, ctx.seed, ctx.offset)
        return x_t

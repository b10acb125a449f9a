"""The Triton kernels against the oracles: adam_step/momentum_step, the float64
reference, and the NumPy Philox stream.

Without a GPU the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set here before triton is imported). With
``TRITON_INTERPRET=0`` and a GPU, the same tests run compiled on CUDA tensors.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from configs import CONFIGS, adam_options, momentum_options

import optiscope
from optiscope import adam_step, momentum_step, reference
from optiscope.kernels import philox

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

_MODULE = "optiscope.kernels.triton_kernels"
_imported_before = _MODULE in sys.modules
tk = importlib.import_module(_MODULE)
if _imported_before:
    # Triton picks interpreter or compiler when a kernel is decorated, so a
    # module imported before TRITON_INTERPRET was set must be decorated again
    # (the kernels call only builtins, not triton.language's own @jit helpers,
    # which stay compiled for the rest of the process).
    tk = importlib.reload(tk)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Shapes of one parameter list: several programs, a ragged tail, 0-dim, empty.
SHAPES = [(3, 700), (5,), (), (0,), (4, 0)]
ADAM_CONFIGS = [c for c in CONFIGS if c.cls is not optiscope.Momentum]
MOMENTUM_CONFIGS = [c for c in CONFIGS if c.cls is optiscope.Momentum]


def _randn(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


class AdamState:
    """One list of parameters with Adam state, as the dispatcher would hold it."""

    def __init__(self, dtype, state_dtype, amsgrad, seed=0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = [_randn(s, dtype, gen) for s in SHAPES]
        self.exp_avgs = [torch.zeros_like(p, dtype=state_dtype) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(m) for m in self.exp_avgs]
        self.max_exp_avg_sqs = (
            [torch.zeros_like(m) for m in self.exp_avgs] if amsgrad else None
        )

    def clone(self) -> AdamState:
        other = object.__new__(AdamState)
        for name, value in vars(self).items():
            setattr(other, name, None if value is None else [t.clone() for t in value])
        return other


def _grads(params, gen, zero=False) -> list[torch.Tensor]:
    if zero:
        return [torch.zeros_like(p) for p in params]
    return [_randn(p.shape, p.dtype, gen) for p in params]


def _run_adam(config, dtype, state_dtype, steps=3, zero_grads=False):
    """The same steps through the kernel and through adam_step, tensor by tensor.

    Tensor ``i`` starts ``i`` steps ahead, so bias corrections differ per tensor.
    """
    options = adam_options(config)
    ours = AdamState(dtype, state_dtype, options["amsgrad"])
    theirs = ours.clone()
    gen = torch.Generator().manual_seed(1)
    history = []
    for t in range(1, steps + 1):
        grads = _grads(ours.params, gen, zero=zero_grads)
        counts = [t + i for i in range(len(grads))]
        history.append((grads, counts))
        tk.adam_(
            ours.params,
            grads,
            ours.exp_avgs,
            ours.exp_avg_sqs,
            ours.max_exp_avg_sqs,
            counts,
            **options,
        )
        for i, (g, count) in enumerate(zip(grads, counts, strict=True)):
            adam_step(
                theirs.params[i],
                g,
                theirs.exp_avgs[i],
                theirs.exp_avg_sqs[i],
                theirs.max_exp_avg_sqs[i] if options["amsgrad"] else None,
                step=count,
                **options,
            )
    return ours, theirs, history


def _assert_same_state(ours: AdamState, theirs: AdamState, **tolerance) -> None:
    for name, value in vars(ours).items():
        if value is None:
            continue
        for a, b in zip(value, getattr(theirs, name), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            torch.testing.assert_close(a, b, **tolerance, msg=name)


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_matches_adam_step(config) -> None:
    """float32: the kernel takes adam_step's steps, to float32 rounding."""
    ours, theirs, _ = _run_adam(config, torch.float32, torch.float32)
    _assert_same_state(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_float64_matches_reference(config) -> None:
    """float64 runs in float64: equal to the NumPy reference to 1e-12."""
    options = adam_options(config)
    ours, _, history = _run_adam(config, torch.float64, torch.float64)
    start = AdamState(torch.float64, torch.float64, options["amsgrad"])
    keys = ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay")
    keys += ("amsgrad", "maximize", "bias_correction")
    for i, theta in enumerate(start.params):
        theta = theta.cpu().numpy()
        m, v, v_max = np.zeros_like(theta), np.zeros_like(theta), None
        for grads, counts in history:
            theta, m, v, v_max = reference.adam_step(
                theta,
                m,
                v,
                grads[i].cpu().numpy(),
                t=counts[i],
                v_max=v_max,
                **{k: options[k] for k in keys},
            )
        np.testing.assert_allclose(ours.params[i].cpu(), theta, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ours.exp_avgs[i].cpu(), m, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ours.exp_avg_sqs[i].cpu(), v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("config", MOMENTUM_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_momentum_matches_momentum_step_and_reference(config, dtype) -> None:
    """momentum_step's steps to rounding; float64 equal to the reference."""
    options = momentum_options(config)
    gen = torch.Generator().manual_seed(2)
    params = [_randn(s, dtype, gen) for s in SHAPES]
    bufs = [torch.zeros_like(p) for p in params]
    theirs = [p.clone() for p in params]
    their_bufs = [b.clone() for b in bufs]
    ref = [(p.cpu().numpy().copy(), np.zeros(p.shape)) for p in params]
    for _ in range(3):
        grads = _grads(params, gen)
        tk.momentum_(params, grads, bufs, **options)
        for i, g in enumerate(grads):
            momentum_step(theirs[i], g, their_bufs[i], **options)
            ref[i] = reference.momentum_step(*ref[i], g.cpu().numpy(), **options)
    for p, b, q, c, (theta, m) in zip(
        params, bufs, theirs, their_bufs, ref, strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7)
        if dtype == torch.float64:
            np.testing.assert_allclose(p.cpu(), theta, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(b.cpu(), m, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("dtype", "state_dtype"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
    ids=str,
)
@pytest.mark.parametrize(
    "config", [c for c in ADAM_CONFIGS if c.name in ("adam", "adamw-amsgrad")], ids=str
)
def test_adam_mixed_dtypes(config, dtype, state_dtype) -> None:
    """Low precision is computed in float32 and rounded once, as adam_step does."""
    ours, theirs, _ = _run_adam(config, dtype, state_dtype)
    _assert_same_state(ours, theirs)  # assert_close's tolerance for each dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_momentum_low_precision(dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    params = [_randn(s, dtype, gen) for s in SHAPES]
    bufs = [torch.zeros_like(p) for p in params]
    theirs, their_bufs = [p.clone() for p in params], [b.clone() for b in bufs]
    options = momentum_options(MOMENTUM_CONFIGS[0])
    grads = _grads(params, gen)
    tk.momentum_(params, grads, bufs, **options)
    for i, g in enumerate(grads):
        momentum_step(theirs[i], g, their_bufs[i], **options)
    for a, b in zip(params + bufs, theirs + their_bufs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_float16_zero_gradient_stays_put(config) -> None:
    """A float16 coordinate with zero gradient stays finite (eps, 0/0) and unmoved."""
    ours, _, _ = _run_adam(config, torch.float16, torch.float16, zero_grads=True)
    start = AdamState(torch.float16, torch.float16, False)
    options = adam_options(config)
    for p, p0 in zip(ours.params, start.params, strict=True):
        assert torch.isfinite(p).all()
        if options["weight_decay"] == 0.0:
            assert torch.equal(p, p0)


def test_adam_checks_its_lists() -> None:
    options = adam_options(ADAM_CONFIGS[0])
    p = [torch.zeros(3, device=DEVICE)]
    with pytest.raises(ValueError, match="steps"):
        tk.adam_(p, p, p, p, None, [], **options)
    with pytest.raises(ValueError, match="max_exp_avg_sqs"):
        tk.adam_(p, p, p, p, None, [1], **{**options, "amsgrad": True})
    with pytest.raises(ValueError, match="contiguous"):
        q = [torch.zeros(3, 2, device=DEVICE).t()]
        tk.momentum_(q, q, q, lr=0.1, momentum=0.9, weight_decay=0.0, maximize=False)


# --- dropout -----------------------------------------------------------------

SEEDS_AND_OFFSETS = [(0, 0), (1, 7), (2**32 + 5, 2**32 + 3), (2**63 - 1, 2**64 - 1)]
# Not multiples of 4, one block (4 * DROPOUT_COUNTERS elements), or both.
SIZES = [1, 3, 6, 4 * tk.DROPOUT_COUNTERS + 3, 3 * tk.DROPOUT_COUNTERS + 2]


def _keep(numel: int, p: float, seed: int, offset: int) -> torch.Tensor:
    return torch.from_numpy(philox.keep_mask(numel, p, seed, offset))


@pytest.mark.parametrize(("seed", "offset"), SEEDS_AND_OFFSETS)
@pytest.mark.parametrize("numel", SIZES)
def test_dropout_mask_is_the_philox_reference(seed, offset, numel) -> None:
    """Bit for bit the NumPy Philox mask, for any size and (seed, offset)."""
    p = 0.375
    y = tk.dropout_forward(torch.ones(numel, device=DEVICE), p, seed, offset)
    keep = _keep(numel, p, seed, offset)
    gamma = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.equal(y.cpu(), torch.where(keep, gamma, 0.0))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str
)
def test_dropout_values_and_dtypes(dtype) -> None:
    """y = x * gamma where kept: gamma and the product in float32 (float64 for
    float64), rounded once; shape and dtype preserved."""
    p, seed, offset = 0.2, 11, 3
    x = torch.randn(5, 203, dtype=torch.float64).to(DEVICE, dtype)
    y = tk.dropout_forward(x, p, seed, offset)
    keep = _keep(x.numel(), p, seed, offset).reshape(x.shape)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scaled = (x.cpu().to(compute) * torch.tensor(1 / (1 - p), dtype=compute)).to(dtype)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y.cpu(), torch.where(keep, scaled, torch.zeros((), dtype=dtype)))


def test_dropout_backward_is_the_stored_mask_gradient() -> None:
    """Regenerating the mask gives exactly autograd's gradient through a stored one."""
    p, seed, offset = 0.6, 2**40 + 9, 12
    x = torch.randn(3, 1001, requires_grad=True)
    keep = _keep(x.numel(), p, seed, offset).reshape(x.shape)
    gamma = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    y = torch.where(keep, x * gamma, 0.0)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ours = tk.dropout_backward(grad_y.to(DEVICE), p, seed, offset)
    assert torch.equal(ours.cpu(), x.grad)
    assert torch.equal(
        tk.dropout_forward(x.detach().to(DEVICE), p, seed, offset).cpu(), y
    )


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p) -> None:
    """The fraction kept is within 4 sigma of 1 - p (sigma = sqrt(p(1-p)/n))."""
    n = 1 << 15
    y = tk.dropout_forward(torch.ones(n, device=DEVICE), p, seed=5, offset=0)
    rate = (y != 0).double().mean().item()
    assert abs(rate - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n)


def test_dropout_empty_and_zero_dim() -> None:
    empty = tk.dropout_forward(torch.ones(0, 3, device=DEVICE), 0.5, 0, 0)
    assert empty.shape == (0, 3)
    scalar = tk.dropout_forward(torch.tensor(2.0, device=DEVICE), 0.5, 1, 0)
    assert scalar.shape == () and scalar.item() in (0.0, 4.0)
    assert scalar.item() == 4.0 * philox.keep_mask(1, 0.5, 1, 0)[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(p=0.0, seed=0, offset=0), "p must be"),
        (dict(p=1.0, seed=0, offset=0), "p must be"),
        (dict(p=0.5, seed=-1, offset=0), "seed must be"),
        (dict(p=0.5, seed=2**63, offset=0), "seed must be"),
        (dict(p=0.5, seed=0, offset=2**64), "offset must be"),
    ],
)
def test_dropout_refuses_out_of_range(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        tk.dropout_forward(torch.ones(4, device=DEVICE), **kwargs)


@triton.jit
def _philox_probe(counter_ptr, out_ptr, k0, k1, N: tl.constexpr):
    # counter words as int64 (torch has few uint32 ops), out the same way.
    rows = tl.arange(0, N)
    c = [tl.load(counter_ptr + rows * 4 + j).to(tl.uint32) for j in tl.static_range(4)]
    r = tk._philox4x32_10(
        c[0], c[1], c[2], c[3], tl.cast(k0, tl.uint32), tl.cast(k1, tl.uint32)
    )
    for j in tl.static_range(4):
        tl.store(out_ptr + rows * 4 + j, r[j].to(tl.int64))


def test_philox_rounds_on_high_counter_words() -> None:
    """The device Philox is the reference on counters past 2^32 (tensors > 2^34
    elements) and with every key bit set, where a tensor that large cannot go."""
    counter = np.array(
        [
            [0, 0, 0, 0],
            [0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF],
            [5, 1, 2**31, 7],
            [2**31 + 3, 3, 0, 2**32 - 2],
        ],
        dtype=np.uint32,
    )
    for key in [(0, 0), (0xFFFFFFFF, 0x7FFFFFFF), (12345, 2**31 + 1)]:
        out = torch.empty(counter.shape, dtype=torch.int64, device=DEVICE)
        words = torch.from_numpy(counter.astype(np.int64)).to(DEVICE)
        _philox_probe[(1,)](words, out, key[0], key[1], N=4)
        np.testing.assert_array_equal(
            out.cpu().numpy(), philox.philox4x32(counter, key).astype(np.int64)
        )


# --- probes, summed by the kernels -------------------------------------------------


def _nonfinite_arithmetic():
    """The interpreter computes with NumPy, which warns on inf - inf and the
    like; a GPU does not, and the NaN and inf gradients here are on purpose."""
    return np.errstate(invalid="ignore", over="ignore", divide="ignore")


def _probe_grads(params, gen):
    """Random gradients with zeros (ε-dominated v), a NaN and an inf."""
    grads = _grads(params, gen)
    grads[0].view(-1)[:50] = 0.0
    grads[0].view(-1)[60] = math.nan
    grads[1].view(-1)[2] = math.inf
    return grads


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str
)
def test_adam_probe_rows_match_the_snapshot_oracle(config, dtype) -> None:
    """The kernel's rows against measure.torch_adam_row on before/after copies:
    float64 sums to their order of addition, counts and histogram exactly."""
    from optiscope.kernels import rows as layout
    from optiscope.probes import measure

    options = adam_options(config)
    state = AdamState(dtype, dtype, options["amsgrad"])
    gen = torch.Generator().manual_seed(5)
    for t in (1, 2):
        grads = _probe_grads(state.params, gen) if t == 1 else _grads(state.params, gen)
        counts = [t + i for i in range(len(grads))]
        before = [p.clone() for p in state.params]
        with _nonfinite_arithmetic():
            rows = tk.adam_(
                state.params,
                grads,
                state.exp_avgs,
                state.exp_avg_sqs,
                state.max_exp_avg_sqs,
                counts,
                **options,
                probe=True,
            )
        used = state.max_exp_avg_sqs if options["amsgrad"] else state.exp_avg_sqs
        for i, row in enumerate(rows):
            c2 = (
                1 - options["beta2"] ** counts[i] if options["bias_correction"] else 1.0
            )
            want = measure.torch_adam_row(
                before[i],
                state.params[i],
                grads[i],
                used[i],
                lr=options["lr"],
                eps=options["eps"],
                correction2=c2,
            )
            np.testing.assert_allclose(row, want, rtol=1e-12, atol=0, err_msg=str(i))
            if t == 1 and i == 0:
                assert row[layout.ADAM.index("nonfinite_grads")] == 1
                if (
                    options["weight_decay"] == 0.0 < options["eps"]
                ):  # else g = λθ, or no ε
                    assert row[layout.ADAM.index("eps_dominated")] >= 49


@pytest.mark.parametrize("config", MOMENTUM_CONFIGS, ids=str)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str
)
def test_momentum_probe_rows_match_the_snapshot_oracle(config, dtype) -> None:
    from optiscope.kernels import rows as layout
    from optiscope.probes import measure

    options = momentum_options(config)
    gen = torch.Generator().manual_seed(6)
    params = [_randn(s, dtype, gen) for s in SHAPES]
    bufs = [_randn(s, dtype, gen) for s in SHAPES]
    for t in (1, 2):
        grads = _probe_grads(params, gen) if t == 1 else _grads(params, gen)
        before, m_prev = [p.clone() for p in params], [b.clone() for b in bufs]
        with _nonfinite_arithmetic():
            rows = tk.momentum_(params, grads, bufs, **options, probe=True)
        for i, row in enumerate(rows):
            want = measure.torch_momentum_row(
                before[i],
                params[i],
                grads[i],
                m_prev[i],
                bufs[i],
                maximize=options["maximize"],
                weight_decay=options["weight_decay"],
            )
            # Σg·m_prev: the kernel's g is the compute dtype's (±g + λθ rounded
            # once), the oracle's float64: within a few roundings of Σ|g·m|.
            sign = -1.0 if options["maximize"] else 1.0
            g = sign * grads[i].double() + options["weight_decay"] * before[i].double()
            scale = float((g * m_prev[i].double()).abs().nansum())
            column = layout.MOMENTUM.index("sum_grad_dot_prev_m")
            others = [k for k in range(len(row)) if k != column]
            np.testing.assert_allclose(row[others], want[others], rtol=1e-12)
            if np.isfinite(want[column]):
                assert abs(row[column] - want[column]) <= 1e-6 * scale
            else:
                assert np.isnan(row[column]) == np.isnan(want[column])

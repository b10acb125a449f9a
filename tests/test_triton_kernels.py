"""The Triton backend against the oracles: the per-tensor torch rules
(``optiscope.adam_step``/``momentum_step``), the float64 reference, probe rows
recomputed here from snapshots, and the NumPy Philox stream.

Without a GPU the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set here before triton is imported). With
``TRITON_INTERPRET=0`` and a GPU, the same tests run compiled on CUDA tensors.
The backend is called as the dispatcher calls it: records in, ``stats`` rows
pre-initialised, every tensor contiguous with elements.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import os
import pkgutil
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from configs import (
    ADAM_CONFIGS,
    DTYPES,
    LOW_PRECISION,
    MOMENTUM_CONFIGS,
    adam_options,
    config,
    momentum_options,
    randn,
)

from optiscope import adam_step, momentum_step, reference, rules
from optiscope.kernels import philox, rows
from optiscope.kernels.records import (
    AdamBatch,
    AdamHyper,
    MomentumBatch,
    MomentumHyper,
    StochasticRounding,
)

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

_PACKAGE = "optiscope.kernels.triton"
# Its modules, each after those it imports, then the package.
_SUBMODULES = ["common", "probe_rows", "momentum", "dropout", "adam"]
_MODULES = [*(f"{_PACKAGE}.{name}" for name in _SUBMODULES), _PACKAGE]
_imported_before = any(name in sys.modules for name in _MODULES)
tk = importlib.import_module(_PACKAGE)
if _imported_before:
    # Triton picks interpreter or compiler when a kernel is decorated, so
    # modules imported before TRITON_INTERPRET was set must be decorated again,
    # helpers before the kernels that call them (the kernels call only builtins
    # and the package's own helpers, not triton.language's own @jit helpers,
    # which stay compiled for the rest of the process). A reload keeps the
    # module object, so the names bound below stay valid.
    for _name in _MODULES:
        importlib.reload(sys.modules[_name])
common = sys.modules[f"{_PACKAGE}.common"]
tk_dropout = sys.modules[f"{_PACKAGE}.dropout"]
tk_probe_rows = sys.modules[f"{_PACKAGE}.probe_rows"]

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# One parameter list: several programs with a ragged tail, a few elements, 0-dim.
# No empty tensor: the dispatcher never hands one to a backend.
SHAPES = [(3, 700), (5,), ()]


def _randn(shape, dtype, gen) -> torch.Tensor:
    return randn(shape, dtype=dtype, generator=gen, device=DEVICE)


def _grads(params, gen, zero=False) -> list[torch.Tensor]:
    if zero:
        return [torch.zeros_like(p) for p in params]
    return [_randn(p.shape, p.dtype, gen) for p in params]


def _fresh_stats(count: int, layout: tuple[str, ...]) -> np.ndarray:
    """What the caller passes: zeros, and an empty range for Adam's extrema."""
    stats = np.zeros((count, len(layout)))
    if "step_min" in layout:
        stats[:, layout.index("step_min")] = math.inf
        stats[:, layout.index("step_max")] = -math.inf
    return stats


def _nonfinite_arithmetic():
    """The interpreter computes with NumPy, which warns on inf - inf and the
    like; a GPU does not, and the NaN and inf values here are on purpose."""
    return np.errstate(invalid="ignore", over="ignore", divide="ignore")


# --- Adam --------------------------------------------------------------------


class AdamState:
    """One list of parameters with Adam state, as the dispatcher would hold it."""

    def __init__(self, dtype, state_dtype, amsgrad, seed=0, shapes=SHAPES) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = [_randn(s, dtype, gen) for s in shapes]
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

    def used(self) -> list[torch.Tensor]:
        """The v each step divides by: the running max with amsgrad."""
        return self.max_exp_avg_sqs or self.exp_avg_sqs


def _adam(state: AdamState, grads, counts, options, stats=None) -> None:
    """One call of the backend, the corrections made as the dispatcher makes them."""
    corrections = [
        rules.bias_corrections(
            options["beta1"], options["beta2"], t, options["bias_correction"]
        )
        for t in counts
    ]
    batch = AdamBatch(
        state.params,
        grads,
        state.exp_avgs,
        state.exp_avg_sqs,
        state.max_exp_avg_sqs,
        corrections,
    )
    tk.adam_(batch, AdamHyper(**options), stats)


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
        _adam(ours, grads, counts, options)
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


def _reference_adam(start: AdamState, history, options, i: int):
    """Tensor ``i``'s steps in the float64 NumPy reference."""
    theta = start.params[i].cpu().double().numpy()
    m, v, v_max = np.zeros_like(theta), np.zeros_like(theta), None
    for grads, counts in history:
        theta, m, v, v_max = reference.adam_step(
            theta,
            m,
            v,
            grads[i].cpu().double().numpy(),
            t=counts[i],
            v_max=v_max,
            **options,
        )
    return theta, m, v


def test_the_interface() -> None:
    """The four functions the dispatcher calls, with the records' signature."""
    assert sorted(tk.__all__) == [
        "adam_",
        "dropout_backward",
        "dropout_forward",
        "momentum_",
    ]
    for fn in (tk.adam_, tk.momentum_):
        assert list(inspect.signature(fn).parameters) == ["batch", "hyper", "stats"]
    for fn in (tk.dropout_forward, tk.dropout_backward):
        params = list(inspect.signature(fn).parameters)[1:]
        assert params == ["p", "seed", "offset", "out"]


def test_the_reload_order_covers_the_package() -> None:
    """Every module of the package is reloaded above, after the modules it
    imports: one left out, or reloaded before a helper it calls, would keep
    kernels decorated for the other mode."""
    assert {m.name for m in pkgutil.iter_modules(tk.__path__)} == set(_SUBMODULES)
    for i, name in enumerate(_SUBMODULES):
        tree = ast.parse(inspect.getsource(sys.modules[f"{_PACKAGE}.{name}"]))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                used = [node.module] if node.module else [a.name for a in node.names]
                assert set(used) <= set(_SUBMODULES[:i]), (name, used)


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_matches_adam_step(config) -> None:
    """float32: the kernel takes adam_step's steps, to float32 rounding (torch's
    CPU ops may fuse a multiply and an add; the kernel never does)."""
    ours, theirs, _ = _run_adam(config, torch.float32, torch.float32)
    _assert_same_state(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_float64_matches_reference(config) -> None:
    """float64 runs in float64: equal to the NumPy reference to 1e-12 (the
    reference's m is a multiply and an add, torch's and ours a lerp)."""
    options = adam_options(config)
    ours, _, history = _run_adam(config, torch.float64, torch.float64)
    start = AdamState(torch.float64, torch.float64, options["amsgrad"])
    for i in range(len(SHAPES)):
        theta, m, v = _reference_adam(start, history, options, i)
        np.testing.assert_allclose(ours.params[i].cpu(), theta, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ours.exp_avgs[i].cpu(), m, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ours.exp_avg_sqs[i].cpu(), v, rtol=1e-12, atol=1e-14)


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
@pytest.mark.parametrize("name", ["adam", "adamw-amsgrad"])
def test_adam_mixed_dtypes(name, dtype, state_dtype) -> None:
    """Low precision is computed in float32 and rounded once, as adam_step does."""
    ours, theirs, _ = _run_adam(config(name), dtype, state_dtype)
    _assert_same_state(ours, theirs)  # assert_close's tolerance for each dtype


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


@pytest.mark.parametrize("name", ["adam", "adam-maximize", "adamw-amsgrad"])
def test_adam_huge_finite_gradient_keeps_v_finite(name) -> None:
    """float32 |g| = 1e20: v = ((1-β2)·g)·g = 1e37 is finite, where (1-β2)·(g·g)
    would be inf (g·g overflows), and the step is the reference's."""
    options = adam_options(config(name))
    state = AdamState(torch.float32, torch.float32, options["amsgrad"])
    start = state.clone()
    grads = _grads(state.params, torch.Generator().manual_seed(4))
    grads[0].view(-1)[:3] = torch.tensor([1e20, -1e20, 3e19])
    grads[1].view(-1)[0] = 1e20
    _adam(state, grads, [1] * len(grads), options)
    for i, g in enumerate(grads):
        weight = torch.tensor(1.0 - options["beta2"], dtype=torch.float32)
        assert torch.isfinite(state.exp_avg_sqs[i]).all()
        assert torch.isfinite(state.params[i]).all()
        sign = -1.0 if options["maximize"] else 1.0
        if options["weight_decay"] == 0.0 or options["decoupled_weight_decay"]:
            # First step from v = 0: v is exactly the product, rounded twice.
            assert torch.equal(state.exp_avg_sqs[i], (weight * (sign * g)) * (sign * g))
        theta, _, v = _reference_adam(start, [(grads, [1] * len(grads))], options, i)
        np.testing.assert_allclose(state.exp_avg_sqs[i].cpu(), v, rtol=1e-6)
        np.testing.assert_allclose(state.params[i].cpu(), theta, rtol=1e-6, atol=1e-7)


def test_stochastic_rounding_matches_the_oracle_bit_for_bit() -> None:
    """bfloat16 moments rounded stochastically: with beta1 = 1/2, beta2 = 3/4
    and a 12-bit gradient the first step's m = g/2 and v = g²/4 are exact, so
    the stored bits are the oracle's rounding of them with the Philox words of
    ``(seed, stream 2, step 1)`` (low 16 bits for m, high 16 for v)."""
    seed, numel = 99, 3 * common.OPTIMIZER_BLOCK + 5
    gen = torch.Generator().manual_seed(3)
    g = torch.randint(-4095, 4096, (numel,), generator=gen).float() / 1024
    m = torch.zeros(numel, dtype=torch.bfloat16, device=DEVICE)
    v, v_max = torch.zeros_like(m), torch.zeros_like(m)
    options = {**adam_options(config("adam")), "beta1": 0.5, "beta2": 0.75}
    hyper = AdamHyper(**{**options, "amsgrad": True})
    offset = rules.rounding_offset(2, 1)
    batch = AdamBatch(
        [torch.randn(numel, device=DEVICE)],
        [g.to(DEVICE)],
        [m],
        [v],
        [v_max],
        [rules.bias_corrections(0.5, 0.75, 1)],
        StochasticRounding(seed, [offset]),
    )
    tk.adam_(batch, hyper, None)
    words = philox.random_words(numel, seed, offset)
    g64 = g.double().numpy()
    expected_m = reference.stochastic_round_bfloat16(0.5 * g64, words)
    expected_v = reference.stochastic_round_bfloat16(0.25 * g64 * g64, words >> 16)
    np.testing.assert_array_equal(m.cpu().double().numpy(), expected_m)
    np.testing.assert_array_equal(v.cpu().double().numpy(), expected_v)
    np.testing.assert_array_equal(v_max.cpu().double().numpy(), expected_v)


# --- Momentum ----------------------------------------------------------------


def _momentum(params, grads, bufs, options, stats=None) -> None:
    tk.momentum_(MomentumBatch(params, grads, bufs), MomentumHyper(**options), stats)


@pytest.mark.parametrize("config", MOMENTUM_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_momentum_matches_momentum_step_and_reference(config, dtype) -> None:
    """momentum_step's steps to rounding (torch's CPU add with alpha may fuse);
    float64 bitwise the reference: β·m + (1-β)·g and θ - α·m, each rounded once."""
    options = momentum_options(config)
    gen = torch.Generator().manual_seed(2)
    params = [_randn(s, dtype, gen) for s in SHAPES]
    bufs = [torch.zeros_like(p) for p in params]
    theirs = [p.clone() for p in params]
    their_bufs = [b.clone() for b in bufs]
    ref = [(p.cpu().double().numpy().copy(), np.zeros(p.shape)) for p in params]
    for _ in range(3):
        grads = _grads(params, gen)
        _momentum(params, grads, bufs, options)
        for i, g in enumerate(grads):
            momentum_step(theirs[i], g, their_bufs[i], **options)
            ref[i] = reference.momentum_step(
                *ref[i], g.cpu().double().numpy(), **options
            )
    for p, b, q, c, (theta, m) in zip(
        params, bufs, theirs, their_bufs, ref, strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7)
        if dtype == torch.float64:
            np.testing.assert_array_equal(p.cpu(), theta)
            np.testing.assert_array_equal(b.cpu(), m)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_momentum_low_precision(dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    params = [_randn(s, dtype, gen) for s in SHAPES]
    bufs = [torch.zeros_like(p) for p in params]
    theirs, their_bufs = [p.clone() for p in params], [b.clone() for b in bufs]
    options = momentum_options(config("momentum"))
    grads = _grads(params, gen)
    _momentum(params, grads, bufs, options)
    for i, g in enumerate(grads):
        momentum_step(theirs[i], g, their_bufs[i], **options)
    for a, b in zip(params + bufs, theirs + their_bufs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_momentum_infinite_gradient_gives_infinite_step(beta, dtype) -> None:
    """g = ±inf gives m = ±inf and θ = ∓inf, as the reference and torch's SGD
    mapping do; a lerp would give NaN for β = 0 and β >= 0.5. The other
    coordinates are untouched by it."""
    options = dict(lr=0.1, momentum=beta, weight_decay=0.0, maximize=False)
    gen = torch.Generator().manual_seed(7)
    params = [_randn((3, 700), dtype, gen)]
    bufs = [_randn((3, 700), dtype, gen)]
    grads = _grads(params, gen)
    grads[0].view(-1)[:2] = torch.tensor([math.inf, -math.inf])
    start, m_prev = params[0].clone(), bufs[0].clone()
    with _nonfinite_arithmetic():
        _momentum(params, grads, bufs, options)
        theta, m = reference.momentum_step(
            start.cpu().double().numpy(),
            m_prev.cpu().double().numpy(),
            grads[0].cpu().double().numpy(),
            **options,
        )
    flat, buf = params[0].view(-1).cpu(), bufs[0].view(-1).cpu()
    assert flat[0].item() == -math.inf and flat[1].item() == math.inf
    assert buf[0].item() == math.inf and buf[1].item() == -math.inf
    assert torch.isfinite(flat[2:]).all()
    np.testing.assert_array_equal(
        np.isinf(params[0].cpu().double().numpy()), np.isinf(theta)
    )
    np.testing.assert_array_equal(
        np.sign(params[0].cpu().double().numpy()), np.sign(theta)
    )
    if dtype == torch.float64:
        np.testing.assert_array_equal(params[0].cpu().numpy(), theta)
        np.testing.assert_array_equal(bufs[0].cpu().numpy(), m)
    # torch's SGD from a zero buffer: Momentum(α, β) is SGD(α(1-β), β, dampening=0).
    sgd_param = torch.nn.Parameter(start.cpu().float())
    sgd_param.grad = grads[0].cpu().float()
    torch.optim.SGD([sgd_param], lr=0.1 * (1 - beta), momentum=beta).step()
    ours = [start.clone()]
    with _nonfinite_arithmetic():
        _momentum(ours, grads, [torch.zeros_like(start)], options)
    assert torch.equal(
        ours[0].view(-1)[:2].cpu().float(), sgd_param.detach().view(-1)[:2]
    )


# --- dropout -----------------------------------------------------------------

SEEDS_AND_OFFSETS = [(0, 0), (1, 7), (2**32 + 5, 2**32 + 3), (2**63 - 1, 2**64 - 1)]
# Not multiples of 4, one block (4 * DROPOUT_COUNTERS elements), or both.
SIZES = [1, 3, 6, 4 * common.DROPOUT_COUNTERS + 3, 3 * common.DROPOUT_COUNTERS + 2]


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_values_and_dtypes(dtype) -> None:
    """y = x * gamma where kept: gamma and the product in float32 (float64 for
    float64), rounded once; shape and dtype preserved."""
    p, seed, offset = 0.2, 11, 3
    x = randn((5, 203), dtype=dtype, device=DEVICE)
    y = tk.dropout_forward(x, p, seed, offset)
    keep = _keep(x.numel(), p, seed, offset).reshape(x.shape)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    scaled = (x.cpu().to(compute) * torch.tensor(1 / (1 - p), dtype=compute)).to(dtype)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y.cpu(), torch.where(keep, scaled, torch.zeros((), dtype=dtype)))


def test_dropout_backward_is_the_stored_mask_gradient() -> None:
    """Regenerating the mask gives exactly autograd's gradient through a stored one."""
    p, seed, offset = 0.6, 2**40 + 9, 12
    x = randn((3, 1001)).requires_grad_()
    keep = _keep(x.numel(), p, seed, offset).reshape(x.shape)
    gamma = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    y = torch.where(keep, x * gamma, 0.0)
    grad_y = randn(y.shape)
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


def test_dropout_reads_a_strided_tensor_in_row_major_order() -> None:
    """A transposed (non-contiguous) input gets the mask of its row-major
    copy: element i is the i-th in logical order, whatever the strides."""
    p, seed, offset = 0.5, 3, 1
    x = randn((40, 30), device=DEVICE).t()
    y = tk.dropout_forward(x, p, seed, offset)
    assert torch.equal(y, tk.dropout_forward(x.contiguous(), p, seed, offset))


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
    r = common.philox4x32_10(
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
#
# The oracle: each row recomputed from copies taken before the step, in float64
# with torch, by the definitions of optiscope.kernels.rows (computed here, so a
# move of the library's own snapshot rows does not move the oracle).


def _oracle_common(before, after, grad) -> list[float]:
    g, theta = grad.double(), after.double()
    update = theta - before.double()
    return [
        float(g.numel()),
        float((g * g).sum()),
        float((update * update).sum()),
        float((theta * theta).sum()),
        float((~torch.isfinite(g)).sum()),
    ]


def _oracle_momentum_row(before, after, grad, m_prev, m_new, options) -> np.ndarray:
    g = grad.double() * (-1.0 if options["maximize"] else 1.0)
    if options["weight_decay"] != 0.0:
        g = g + options["weight_decay"] * before.double()
    return np.array(
        [
            *_oracle_common(before, after, grad),
            float((g * m_prev.double()).sum()),
            float((m_new.double() ** 2).sum()),
        ]
    )


def _oracle_adam_row(before, after, grad, v_used, *, lr, eps, c2) -> np.ndarray:
    # In NumPy: torch's CPU division of or by a one-element tensor may multiply
    # by a rounded reciprocal, 1 ulp off the step's definition.
    with _nonfinite_arithmetic():  # eps = 0 and v = 0: an infinite step
        root = np.sqrt(v_used.double().cpu().numpy().reshape(-1) / c2)
        step = lr / (root + eps)
    sample = step[:: rows.hist_stride(step.size)].tolist()
    # rows.octave_bin(inf) reads frexp's exponent 0; inf is above every bin.
    bins = [rows.HIST_BINS - 1 if s == math.inf else rows.octave_bin(s) for s in sample]
    counts = np.bincount(bins, minlength=rows.HIST_BINS)
    return np.array(
        [
            *_oracle_common(before, after, grad),
            float((root < eps).sum()),
            float(step.min()),
            float(step.max()),
            *counts.astype(np.float64),
        ]
    )


def _combine(total: np.ndarray, row: np.ndarray, layout) -> np.ndarray:
    """Two rows of one tensor as ``stats`` accumulates them: sums added, extrema
    combined, NaN winning."""
    out = total + row
    if "step_min" in layout:
        for name, pick in (("step_min", np.minimum), ("step_max", np.maximum)):
            k = layout.index(name)
            out[k] = pick(total[k], row[k])
    return out


def _assert_rows(found: np.ndarray, want: np.ndarray, layout, loose=()) -> None:
    """Counts, extrema and histogram exactly; float64 sums to their order of
    addition; ``loose`` columns are checked by the caller."""
    for k, name in enumerate(layout):
        if name in loose:
            continue
        if name.startswith("sum_"):
            np.testing.assert_allclose(found[k], want[k], rtol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(found[k], want[k], err_msg=name)


def _probe_grads(params, gen):
    """Random gradients with zeros (ε-dominated v), a NaN and an inf."""
    grads = _grads(params, gen)
    grads[0].view(-1)[:50] = 0.0
    grads[0].view(-1)[60] = math.nan
    grads[1].view(-1)[2] = math.inf
    return grads


@pytest.fixture(params=["default", "small"])
def blocks(request, monkeypatch):
    """The kernels' own blocks, or blocks so small that a tensor's rows take
    many programs, many fold steps with a ragged last one, and many histogram
    programs."""
    if request.param == "small":
        monkeypatch.setattr(common, "OPTIMIZER_BLOCK", 64)
        monkeypatch.setattr(common, "FOLD_ROWS", 4)
        monkeypatch.setattr(common, "HIST_LANES", 2)
    return request.param


def _adam_probe_run(config, dtype):
    """Two probed steps into one ``stats``, and the oracle's rows combined alike."""
    options = adam_options(config)
    state = AdamState(dtype, dtype, options["amsgrad"])
    gen = torch.Generator().manual_seed(5)
    stats = _fresh_stats(len(SHAPES), rows.ADAM)
    want = _fresh_stats(len(SHAPES), rows.ADAM)
    for t in (1, 2):
        grads = _probe_grads(state.params, gen) if t == 1 else _grads(state.params, gen)
        counts = [t + i for i in range(len(grads))]
        before = [p.clone() for p in state.params]
        with _nonfinite_arithmetic():
            _adam(state, grads, counts, options, stats)
        for i, count in enumerate(counts):
            c2 = rules.bias_corrections(
                options["beta1"], options["beta2"], count, options["bias_correction"]
            ).c2
            row = _oracle_adam_row(
                before[i],
                state.params[i],
                grads[i],
                state.used()[i],
                lr=options["lr"],
                eps=options["eps"],
                c2=c2,
            )
            with _nonfinite_arithmetic():
                want[i] = _combine(want[i], row, rows.ADAM)
    return options, stats, want


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_probe_rows_match_the_snapshot_oracle(config, dtype) -> None:
    """Two steps' rows, added into one ``stats``, against the oracle: float64
    sums to their order of addition, counts, extrema and histogram exactly."""
    options, stats, want = _adam_probe_run(config, dtype)
    for i in range(len(SHAPES)):
        _assert_rows(stats[i], want[i], rows.ADAM)
    nonfinite = rows.ADAM.index("nonfinite_grads")
    assert stats[0, nonfinite] == 1 and stats[1, nonfinite] == 1
    assert np.isnan(stats[0, rows.ADAM.index("step_min")])  # the NaN g's v
    if options["weight_decay"] == 0.0 < options["eps"]:  # else g = λθ, or no ε
        assert stats[0, rows.ADAM.index("eps_dominated")] >= 49


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_probe_rows_across_programs(config, blocks) -> None:
    """float32 rows with the kernels' blocks and with tiny ones (many program
    rows per tensor folded in steps, a histogram over many programs)."""
    _, stats, want = _adam_probe_run(config, torch.float32)
    for i in range(len(SHAPES)):
        _assert_rows(stats[i], want[i], rows.ADAM)


@pytest.mark.parametrize("name", ["adam", "adamw-amsgrad"])
def test_adam_probe_does_not_change_the_step(name) -> None:
    """The same step, bit for bit, with and without the probe."""
    options = adam_options(config(name))
    probed = AdamState(torch.float32, torch.float32, options["amsgrad"])
    plain = probed.clone()
    gen = torch.Generator().manual_seed(8)
    for t in (1, 2):
        grads = _grads(probed.params, gen)
        stats = _fresh_stats(len(SHAPES), rows.ADAM)
        _adam(probed, grads, [t] * len(grads), options, stats)
        _adam(plain, grads, [t] * len(grads), options)
    _assert_same_state(probed, plain, rtol=0, atol=0)


def test_adam_probe_adds_to_the_callers_rows() -> None:
    """Rows already holding sums and a range get this step's added and combined;
    a NaN already there stays (NaN wins), as it does when the step brings one."""
    options = adam_options(config("adam"))
    state = AdamState(torch.float32, torch.float32, False)
    grads = _grads(state.params, torch.Generator().manual_seed(9))
    fresh = _fresh_stats(len(SHAPES), rows.ADAM)
    _adam(state.clone(), grads, [1] * len(grads), options, fresh)
    earlier = np.arange(len(SHAPES) * len(rows.ADAM), dtype=np.float64)
    earlier = earlier.reshape(len(SHAPES), -1)
    low, high = rows.ADAM.index("step_min"), rows.ADAM.index("step_max")
    earlier[:, low], earlier[:, high] = [1e-9, 1e9, math.nan], [1e-9, 1e9, 1e9]
    stats = earlier.copy()
    _adam(state, grads, [1] * len(grads), options, stats)
    for i in range(len(SHAPES)):
        np.testing.assert_array_equal(
            stats[i], _combine(earlier[i], fresh[i], rows.ADAM)
        )
    assert stats[0, low] == 1e-9 and stats[1, high] == 1e9 and np.isnan(stats[2, low])


def _momentum_probe_run(config, dtype):
    options = momentum_options(config)
    gen = torch.Generator().manual_seed(6)
    params = [_randn(s, dtype, gen) for s in SHAPES]
    bufs = [_randn(s, dtype, gen) for s in SHAPES]
    stats = _fresh_stats(len(SHAPES), rows.MOMENTUM)
    want = _fresh_stats(len(SHAPES), rows.MOMENTUM)
    scale = np.zeros(len(SHAPES))
    for t in (1, 2):
        grads = _probe_grads(params, gen) if t == 1 else _grads(params, gen)
        before, m_prev = [p.clone() for p in params], [b.clone() for b in bufs]
        with _nonfinite_arithmetic():
            _momentum(params, grads, bufs, options, stats)
        for i in range(len(SHAPES)):
            row = _oracle_momentum_row(
                before[i], params[i], grads[i], m_prev[i], bufs[i], options
            )
            with _nonfinite_arithmetic():
                want[i] += row
            sign = -1.0 if options["maximize"] else 1.0
            g = sign * grads[i].double() + options["weight_decay"] * before[i].double()
            scale[i] += float((g * m_prev[i].double()).abs().nansum())
    return stats, want, scale


def _assert_momentum_rows(stats, want, scale) -> None:
    # Σg·m_prev: the kernel's g is the compute dtype's (±g + λθ rounded once),
    # the oracle's float64: within a few roundings of Σ|g·m|.
    dot = rows.MOMENTUM.index("sum_grad_dot_prev_m")
    for i in range(len(SHAPES)):
        _assert_rows(stats[i], want[i], rows.MOMENTUM, loose=("sum_grad_dot_prev_m",))
        if np.isfinite(want[i, dot]):
            assert abs(stats[i, dot] - want[i, dot]) <= 1e-6 * scale[i]
        else:
            assert np.isnan(stats[i, dot]) == np.isnan(want[i, dot])


@pytest.mark.parametrize("config", MOMENTUM_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_momentum_probe_rows_match_the_snapshot_oracle(config, dtype) -> None:
    stats, want, scale = _momentum_probe_run(config, dtype)
    _assert_momentum_rows(stats, want, scale)
    nonfinite = rows.MOMENTUM.index("nonfinite_grads")
    assert stats[0, nonfinite] == 1 and stats[1, nonfinite] == 1


@pytest.mark.parametrize("config", MOMENTUM_CONFIGS, ids=str)
def test_momentum_probe_rows_across_programs(config, blocks) -> None:
    _assert_momentum_rows(*_momentum_probe_run(config, torch.float32))


@pytest.mark.parametrize("eps", [0.0, 1e-300, 1e-8, 1e-6, 0.5])
@pytest.mark.parametrize("c2", [1.0, 0.0010000000000000009, 1e-300, 0.3])
def test_eps_threshold_is_the_least_v_not_dominated(eps, c2) -> None:
    """The probe's ε-dominated count is ``v < threshold``: exact when the
    threshold is the least float64 v with sqrt(v / c2) >= eps."""
    v = tk_probe_rows.eps_threshold(eps, c2)
    assert math.sqrt(v / c2) >= eps
    if v > 0.0:
        assert not math.sqrt(float(np.nextafter(v, 0.0)) / c2) >= eps

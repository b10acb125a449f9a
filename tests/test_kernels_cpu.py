"""The CPU backend, called directly: against the NumPy reference and torch.optim."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from configs import (
    ADAM_CONFIGS,
    CONFIGS,
    DTYPES,
    Config,
    adam_hyper,
    config,
    corrections,
    momentum_hyper,
    randn,
)

import optiscope
from optiscope import reference
from optiscope.kernels import cpu
from optiscope.kernels.records import AdamBatch, MomentumBatch

# 0-dim; 1, 2 and 0 elements left over after a chunk's three parts; and two
# tensors over a chunk (65,536), the second with a 2-element last chunk.
SHAPES = [(), (5,), (7,), (6, 5), (70_001,), (65_538,)]


class Rows(NamedTuple):
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    m: list[torch.Tensor]
    v: list[torch.Tensor]
    vmax: list[torch.Tensor]


def make_rows(dtype: torch.dtype, state_dtype: torch.dtype | None = None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state_dtype = state_dtype or dtype
    params = [randn(s, dtype=dtype, generator=gen) for s in SHAPES]
    grads = [randn(s, dtype=dtype, generator=gen) for s in SHAPES]
    m = [randn(s, dtype=state_dtype, generator=gen, scale=0.1) for s in SHAPES]
    v = [randn(s, dtype=state_dtype, generator=gen, scale=0.1).abs() for s in SHAPES]
    return Rows(params, grads, m, v, [x * 1.5 for x in v])


def concat(many: list[Rows]) -> Rows:
    """The rows of ``many`` in one batch, in order."""
    return Rows(
        *([t for rows in many for t in rows[k]] for k in range(len(Rows._fields)))
    )


def backend_step(cfg: Config, rows: Rows, t: int, stats=None) -> None:
    """One fused step of every row, all at step count ``t`` (Adam)."""
    if cfg.cls is optiscope.Momentum:
        batch = MomentumBatch(rows.params, rows.grads, rows.m)
        cpu.momentum_(batch, momentum_hyper(cfg), stats)
        return
    hyper = adam_hyper(cfg)
    vmax = rows.vmax if hyper.amsgrad else None
    steps = corrections(hyper, [t] * len(rows.params))
    cpu.adam_(
        AdamBatch(rows.params, rows.grads, rows.m, rows.v, vmax, steps), hyper, stats
    )


def f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy().copy()


def reference_step(cfg: Config, start: tuple, g: np.ndarray, t: int) -> tuple:
    """The reference's (θ, m, v, v_max) after one step from ``start`` (float64)."""
    theta, m, v, vmax = start
    if cfg.cls is optiscope.Momentum:
        o = momentum_hyper(cfg)._asdict()
        theta, m = reference.momentum_step(theta, m, g, **o)
        return theta, m, None, None
    o = adam_hyper(cfg)._asdict()
    return reference.adam_step(theta, m, v, g, t=t, v_max=vmax, **o)


def assert_close(actual: torch.Tensor, expected: np.ndarray, dtype, ulps=2.0) -> None:
    """Within ``ulps`` of ``dtype``'s epsilon, relative to the tensor's scale."""
    scale = max(float(np.abs(expected).max()), 1e-30)
    error = float(np.abs(f64(actual) - expected).max()) / scale
    assert error <= ulps * torch.finfo(dtype).eps, error


#: (config, parameter dtype, state dtype): every config in every dtype, and
#: Adam's states in another dtype than the parameter (``state_dtype``).
STEP_CASES = [(c, d, d) for c in CONFIGS for d in DTYPES] + [
    (c, d, s)
    for c in ADAM_CONFIGS
    for d, s in [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float32),
    ]
]


@pytest.mark.parametrize(("cfg", "dtype", "state_dtype"), STEP_CASES, ids=str)
def test_each_step_matches_the_reference(cfg: Config, dtype, state_dtype) -> None:
    """From the stored state, one step is the reference's float64 step rounded:
    within 2 ulp of each stored dtype (3 steps, every shape)."""
    rows = make_rows(dtype, state_dtype)
    amsgrad = adam_hyper(cfg).amsgrad if cfg.cls is not optiscope.Momentum else False
    for t in (1, 2, 3):
        starts = [
            (f64(rows.params[i]), f64(rows.m[i]), f64(rows.v[i]), f64(rows.vmax[i]))
            for i in range(len(SHAPES))
        ]
        starts = [(th, m, v, vmax if amsgrad else None) for th, m, v, vmax in starts]
        backend_step(cfg, rows, t)
        for i, start in enumerate(starts):
            theta, m, v, vmax = reference_step(cfg, start, f64(rows.grads[i]), t)
            assert_close(rows.params[i], theta, dtype)
            assert_close(rows.m[i], m, state_dtype)
            if v is not None:
                assert_close(rows.v[i], v, state_dtype)
            if vmax is not None:
                assert_close(rows.vmax[i], vmax, state_dtype)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.torch_equivalent], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_parameters_follow_torch_optim(cfg: Config, dtype) -> None:
    """Five steps from the same start as the torch optimizer with the same rule
    (torch's SGD with lr·(1−β) for Momentum) stay within a few ulp of it."""
    gen = torch.Generator().manual_seed(3)
    start = [randn(s, dtype=dtype, generator=gen) for s in SHAPES]
    grads = [[randn(s, dtype=dtype, generator=gen) for s in SHAPES] for _ in range(5)]
    theirs = [torch.nn.Parameter(p.clone()) for p in start]
    torch_cls, torch_options = cfg.torch_equivalent
    opt = torch_cls(theirs, **torch_options, foreach=False)
    ours = Rows(
        [p.clone() for p in start],
        [torch.empty_like(p) for p in start],
        [torch.zeros_like(p) for p in start],
        [torch.zeros_like(p) for p in start],
        [torch.zeros_like(p) for p in start],
    )
    for t, step_grads in enumerate(grads, start=1):
        for p, ours_g, g in zip(theirs, ours.grads, step_grads, strict=True):
            p.grad = g.clone()
            ours_g.copy_(g)
        opt.step()
        backend_step(cfg, ours, t)
    for a, b in zip(ours.params, theirs, strict=True):
        assert_close(a, f64(b.detach()), dtype, ulps=4.0)


def test_float32_adam_with_a_huge_finite_gradient_keeps_v_finite_like_torch() -> None:
    """g = 1e20: (1−β2)·(g·g) overflows float32 (g² > 3.4e38), ((1−β2)·g)·g
    does not, and θ moves by about lr, as in torch.optim.Adam."""
    cfg = config("adam")
    rows = Rows(
        [torch.ones(3)],
        [torch.tensor([1e20, -1e20, 1.0])],
        [torch.zeros(3)],
        [torch.zeros(3)],
        [torch.zeros(3)],
    )
    theirs = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([theirs], **cfg.torch_equivalent[1], foreach=False)
    for t in (1, 2):
        backend_step(cfg, rows, t)
        theirs.grad = rows.grads[0].clone()
        opt.step()
        assert torch.isfinite(rows.v[0]).all() and torch.isfinite(rows.params[0]).all()
        torch.testing.assert_close(rows.v[0], opt.state[theirs]["exp_avg_sq"])
        torch.testing.assert_close(rows.params[0], theirs.detach())
    lr = cfg.options["lr"]
    assert rows.params[0][0].item() == pytest.approx(1 - 2 * lr, rel=1e-6)
    assert rows.params[0][1].item() == pytest.approx(1 + 2 * lr, rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_momentum_with_an_infinite_gradient_gives_an_infinite_step(beta, dtype) -> None:
    """g = ±inf gives θ = ∓inf, as torch's SGD (lr·(1−β), momentum β) and the
    reference: m = β·m + (1−β)·g, where a lerp gives NaN for β >= 0.5 or β = 0.
    A finite gradient after it keeps m = ±inf and θ = ∓inf (the lerp: NaN)."""
    lr = 0.1
    param, buffer = torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype)
    hyper = momentum_hyper(config("momentum"))._replace(lr=lr, momentum=beta)
    theirs = torch.nn.Parameter(torch.ones(3, dtype=dtype))
    sgd = torch.optim.SGD([theirs], lr=lr * (1 - beta), momentum=beta, foreach=False)
    theta, m = np.ones(3), np.zeros(3)
    for g in ([np.inf, -np.inf, 1.0], [0.5, 0.5, 0.5]):
        grad = torch.tensor(g, dtype=dtype)
        cpu.momentum_(MomentumBatch([param], [grad], [buffer]), hyper, None)
        theirs.grad = torch.tensor(g, dtype=dtype)
        sgd.step()
        with np.errstate(all="ignore"):
            theta, m = reference.momentum_step(theta, m, np.array(g), **hyper._asdict())
        got = param.double().numpy()
        assert got[:2].tolist() == [-np.inf, np.inf] == theta[:2].tolist()
        assert theirs.detach()[:2].tolist() == [-np.inf, np.inf]
        assert buffer.double().tolist()[:2] == m[:2].tolist()  # ±inf; g if β = 0
        assert np.isfinite(got[2]) and got[2] == pytest.approx(theta[2], rel=1e-2)


@pytest.mark.parametrize("cfg", ADAM_CONFIGS, ids=str)
def test_float64_adam_is_within_1e_15_of_the_reference(cfg: Config) -> None:
    """Five float64 steps, the backend and the reference each on its own state:
    θ, m and v within 1e-15 of the reference's, relative to each tensor's scale.
    They differ only in rounding: m is torch's lerp here, β·m + (1−β)·g there,
    and the step is (lr/c1)·m/(√v/√c2 + ε) here, lr·(m/c1)/(√(v/c2) + ε) there."""
    rows = make_rows(torch.float64, seed=5)
    hyper = adam_hyper(cfg)
    state = [
        (f64(rows.params[i]), f64(rows.m[i]), f64(rows.v[i]))
        + ((f64(rows.vmax[i]),) if hyper.amsgrad else (None,))
        for i in range(len(SHAPES))
    ]
    gen = torch.Generator().manual_seed(6)
    worst = 0.0
    for t in range(1, 6):
        for g in rows.grads:
            g.copy_(randn(g.shape, dtype=torch.float64, generator=gen))
        backend_step(cfg, rows, t)
        for i in range(len(SHAPES)):
            state[i] = reference_step(cfg, state[i], f64(rows.grads[i]), t)
            ours = (rows.params[i], rows.m[i], rows.v[i])
            for a, e in zip(ours, state[i][:3], strict=True):
                scale = max(float(np.abs(e).max()), 1e-300)
                worst = max(worst, float(np.abs(f64(a) - e).max()) / scale)
    assert worst <= 1e-15, worst


def test_rows_of_different_dtypes_step_as_they_would_alone() -> None:
    """One call with rows of every dtype groups them by dtype: each row ends bit
    for bit where a call with its dtype's rows alone leaves it."""
    cfg = config("adam-l2-amsgrad")
    together = [make_rows(d, seed=k) for k, d in enumerate(DTYPES)]
    alone = [make_rows(d, seed=k) for k, d in enumerate(DTYPES)]
    mixed = concat(together)
    backend_step(cfg, mixed, 1)
    for rows in alone:
        backend_step(cfg, rows, 1)
    for a, b in zip(mixed, concat(alone), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_bitwise_identical_across_runs_and_thread_counts(cfg: Config) -> None:
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            rows = make_rows(torch.float32)
            for t in (1, 2):
                backend_step(cfg, rows, t)
            runs.append(rows.params + rows.m + rows.v + rows.vmax)
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


def test_adam_takes_its_bias_corrections_from_the_batch() -> None:
    """Corrections (1, 1) with bias correction on step exactly as bias
    correction off: the backend never recomputes 1 − β^t."""
    on, off = config("adam"), config("adam-no-bias-correction")
    hyper = adam_hyper(off)._replace(bias_correction=True)
    a, b = make_rows(torch.float32), make_rows(torch.float32)
    ones = corrections(adam_hyper(off), [7] * len(SHAPES))
    assert on.cls is off.cls and set(ones) == {(1.0, 1.0)}
    cpu.adam_(AdamBatch(a.params, a.grads, a.m, a.v, None, ones), hyper, None)
    backend_step(off, b, 7)
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params, strict=True))


def test_float16_zero_gradient_stays_finite_where_torch_for_loop_makes_nan() -> None:
    """eps=1e-8 underflows to 0 in float16, so torch's for-loop Adam divides 0 by
    0; the backend computes in float32, where it does not."""
    cfg = config("adam")
    ours = Rows(
        [torch.tensor([0.5, -0.25], dtype=torch.float16)],
        [torch.tensor([0.0, 1.0], dtype=torch.float16)],
        [torch.zeros(2, dtype=torch.float16)],
        [torch.zeros(2, dtype=torch.float16)],
        [torch.zeros(2, dtype=torch.float16)],
    )
    theirs = torch.nn.Parameter(ours.params[0].clone())
    opt = torch.optim.Adam([theirs], lr=cfg.options["lr"], foreach=False)
    for t in (1, 2, 3):
        backend_step(cfg, ours, t)
        theirs.grad = ours.grads[0].clone()
        opt.step()
    assert torch.isnan(theirs[0])
    assert ours.params[0][0].item() == 0.5 and torch.isfinite(ours.params[0]).all()

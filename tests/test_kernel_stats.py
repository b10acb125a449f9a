"""Probe rows computed inside the CPU kernels against the snapshot oracle
(:mod:`optiscope.kernels.torch_rule`, which computes them from copies taken
before the step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from configs import (
    CONFIGS,
    DTYPES,
    Config,
    adam_hyper,
    config,
    corrections,
    momentum_hyper,
    momentum_options,
    randn,
)

import optiscope
from optiscope.kernels import cpu, torch_rule
from optiscope.kernels import rows as layout
from optiscope.kernels.cpu import tables
from optiscope.kernels.cpu.threads import CHUNK
from optiscope.kernels.records import AdamBatch, AdamHyper, MomentumBatch

# 0-dim, vector, matrix, and one over two chunks (> 65,536).
SHAPES = [(), (7,), (6, 5), (150_001,)]
BIG = 3  # the index of the tensor over two chunks
ADAM_SUMS = [layout.ADAM.index(c) for c in ("sum_grad_sq", "sum_update_sq")]
ADAM_SUMS += [layout.ADAM.index("sum_param_sq")]
EXTREMA = [layout.ADAM.index("step_min"), layout.ADAM.index("step_max")]


def empty_rows(config: Config, n: int) -> np.ndarray:
    if config.cls is optiscope.Momentum:
        return np.zeros((n, len(layout.MOMENTUM)))
    rows = np.zeros((n, len(layout.ADAM)))
    rows[:, EXTREMA] = [np.inf, -np.inf]
    return rows


def make(dtype: torch.dtype, bad_grads: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [randn(s, dtype=dtype, generator=gen) for s in SHAPES]
    grads = [randn(s, dtype=dtype, generator=gen) for s in SHAPES]
    if bad_grads:
        grads[1][2], grads[BIG][5], grads[BIG][70_000] = np.nan, np.inf, -np.inf
    m = [randn(s, dtype=dtype, generator=gen, scale=0.1) for s in SHAPES]
    v = [randn(s, dtype=dtype, generator=gen, scale=0.01).abs() for s in SHAPES]
    vmax = [x * 1.5 for x in v]
    return params, grads, m, v, vmax


def adam_batch(hyper: AdamHyper, step: int, tensors) -> AdamBatch:
    params, grads, m, v, vmax = tensors
    steps = corrections(hyper, [step] * len(params))
    return AdamBatch(params, grads, m, v, vmax if hyper.amsgrad else None, steps)


def probed_step(config: Config, dtype, step: int, tensors, *, oracle: bool):
    """One backend step with stats; with ``oracle`` also the snapshot rows and,
    per row, the sum of the magnitudes of each column's terms (the scale of
    its rounding error)."""
    params, grads, m, v, vmax = tensors
    rows = empty_rows(config, len(params))
    before = [p.clone() for p in params]
    m_prev = [b.clone() for b in m]
    if config.cls is optiscope.Momentum:
        options = momentum_options(config)
        cpu.momentum_(MomentumBatch(params, grads, m), momentum_hyper(config), rows)
        expected = [
            momentum_row_and_scale(
                before[i],
                params[i],
                grads[i],
                m_prev[i],
                m[i],
                options,
            )
            for i in range(len(params))
            if oracle
        ]
        return rows, expected
    hyper = adam_hyper(config)
    batch = adam_batch(hyper, step, tensors)
    cpu.adam_(batch, hyper, rows)
    used = vmax if hyper.amsgrad else v
    expected = [
        adam_row_and_scale(
            before[i],
            params[i],
            grads[i],
            used[i],
            lr=hyper.lr,
            eps=hyper.eps,
            correction2=batch.corrections[i].c2,
        )
        for i in range(len(params))
        if oracle
    ]
    return rows, expected


def momentum_row_and_scale(before, after, grad, m_prev, m, options):
    row = torch_rule.momentum_row(
        before,
        after,
        grad,
        m_prev,
        m,
        maximize=options["maximize"],
        weight_decay=options["weight_decay"],
    )
    sign = -1.0 if options["maximize"] else 1.0
    g = sign * grad.double() + options["weight_decay"] * before.double()
    scale = row.copy()  # the other sums' terms are squares
    scale[layout.MOMENTUM.index("sum_grad_dot_prev_m")] = float(
        (g * m_prev.double()).abs().sum()
    )
    return row, scale


def adam_row_and_scale(*args, **kwargs):
    row = torch_rule.adam_row(*args, **kwargs)
    return row, row  # every sum is of squares


SUMS = {
    "Momentum": [layout.MOMENTUM.index(c) for c in layout.MOMENTUM[1:4]]
    + [layout.MOMENTUM.index(c) for c in layout.MOMENTUM[5:]],
    "Adam": ADAM_SUMS,
}


def sum_tolerance(dtype: torch.dtype) -> float:
    """The worst relative error, against the sum of its terms' magnitudes, of a
    kernel's float32 chunk sum. The probed loop adds one term per three
    elements, so each of at least 8 vector lanes adds at most CHUNK/24 + 1
    terms one by one (recursive summation: ``(n-1)·u``), plus the 0-2
    elements left over; the lanes then combine in at most 4 more roundings
    (16 lanes); a term carries 3 roundings (a product and two additions) on
    top of its factors' own, which are at most 2 (momentum's ``g``). float64
    kernels differ from torch's float64 sum only by the order of additions,
    at ``n·2**-53``."""
    if dtype == torch.float64:
        return 2 * CHUNK * 2.0**-53
    return (CHUNK // 24 + 1 + 2 + 4 + 3 + 2) * 2.0**-24


def assert_rows_match(config: Config, rows, expected, used, dtype, step) -> None:
    sums = SUMS["Momentum" if config.cls is optiscope.Momentum else "Adam"]
    tolerance = sum_tolerance(dtype)
    for i, (row, (want, scale)) in enumerate(zip(rows, expected, strict=True)):
        error = np.abs(row[sums] - want[sums])
        assert (error <= tolerance * scale[sums] + 1e-300).all(), (i, error, scale)
        if config.cls is optiscope.Momentum:
            np.testing.assert_array_equal(row[[0, 4]], want[[0, 4]])
            continue
        counts = [layout.ADAM.index(c) for c in ("numel", "nonfinite_grads")]
        counts.append(layout.ADAM.index("eps_dominated"))
        np.testing.assert_array_equal(row[counts], want[counts])
        # The oracle's own float64 rounding differs by a few ulp between torch's
        # vectorized and tail loops, so extrema are equal to 1e-12.
        np.testing.assert_allclose(row[EXTREMA], want[EXTREMA], rtol=1e-12)
        ours, theirs = row[layout.HIST_START :], want[layout.HIST_START :]
        # The histogram bins every hist_stride(numel)-th element: element 0 always.
        stride = layout.hist_stride(int(row[0]))
        assert ours.sum() == theirs.sum() == -(-row[0] // stride)
        moved = np.abs(ours - theirs).sum() / 2
        assert moved <= edge_elements(config, used[i], step), (i, ours - theirs)


def edge_elements(config: Config, v_used: torch.Tensor, step: int) -> int:
    """Elements whose step lies within 1e-12 (relative) of an octave edge: the
    only ones the oracle's ulp-level rounding can put in the neighbouring bin."""
    hyper = adam_hyper(config)
    (c2,) = [c.c2 for c in corrections(hyper, [step])]
    v_hat = v_used.double().reshape(-1) / c2
    s = hyper.lr / (v_hat.sqrt() + hyper.eps)
    _, exponent = torch.frexp(s)
    mantissa = s / torch.ldexp(torch.ones_like(s), exponent - 1)
    return int(((mantissa - 1).abs() < 1e-12).sum() + ((2 - mantissa) < 1e-12).sum())


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_rows_match_the_snapshot_oracle(config: Config, dtype) -> None:
    tensors = make(dtype)
    for step in (1, 2, 3):
        rows, expected = probed_step(config, dtype, step, tensors, oracle=True)
        used = tensors[4] if config.options.get("amsgrad") else tensors[3]
        assert_rows_match(config, rows, expected, used, dtype, step)


@pytest.mark.parametrize("name", ["momentum", "adam-l2-amsgrad"])
def test_non_finite_gradients_are_counted(name: str) -> None:
    cfg = config(name)
    rows, expected = probed_step(
        cfg, torch.float32, 1, make(torch.float32, bad_grads=True), oracle=True
    )
    column = layout.COMMON.index("nonfinite_grads")
    assert rows[:, column].tolist() == [0, 1, 0, 2]
    assert rows[:, column].tolist() == [e[column] for e, _ in expected]
    if cfg.cls is not optiscope.Momentum:  # a NaN step: NaN extrema, as torch's
        assert np.isnan(rows[1, EXTREMA]).all()
        assert np.isnan(expected[1][0][EXTREMA]).all()


def test_rows_add_to_what_the_caller_passed() -> None:
    cfg = config("adam")
    first, _ = probed_step(cfg, torch.float32, 1, make(torch.float32), oracle=False)
    rows = first.copy()
    hyper = adam_hyper(cfg)
    cpu.adam_(adam_batch(hyper, 1, make(torch.float32)), hyper, rows)
    np.testing.assert_array_equal(rows[:, 0], 2 * first[:, 0])
    np.testing.assert_array_equal(rows[:, EXTREMA], first[:, EXTREMA])


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_stats_bitwise_identical_across_thread_counts(config: Config) -> None:
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            tensors = make(torch.float32)
            rows = [
                probed_step(config, torch.float32, t, tensors, oracle=False)[0]
                for t in (1, 2)
            ]
            runs.append(np.stack(rows))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        np.testing.assert_array_equal(run.view(np.uint64), runs[0].view(np.uint64))


@pytest.mark.parametrize("name", ["momentum-l2-max", "adam-l2-amsgrad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_stats_leave_the_update_unchanged(name: str, dtype) -> None:
    """The probed and the plain loop call one per-element update: bit for bit."""
    cfg = config(name)
    plain, probed = make(dtype), make(dtype)
    if cfg.cls is optiscope.Momentum:
        params, grads, m, _, _ = plain
        cpu.momentum_(MomentumBatch(params, grads, m), momentum_hyper(cfg), None)
    else:
        hyper = adam_hyper(cfg)
        cpu.adam_(adam_batch(hyper, 1, plain), hyper, None)
    probed_step(cfg, dtype, 1, probed, oracle=False)
    for a, b in zip(plain, probed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["momentum-l2-max", "adam-l2-amsgrad"])
def test_the_torch_rule_backend_fills_the_same_rows(name: str) -> None:
    """The per-tensor backend fills its rows from snapshots, in extra passes;
    they agree with the kernel's, summed in the same pass (float64 rows)."""
    cfg = config(name)
    in_pass, _ = probed_step(cfg, torch.float64, 1, make(torch.float64), oracle=False)
    snapshot = empty_rows(cfg, len(SHAPES))
    params, grads, m, _, _ = tensors = make(torch.float64)
    if cfg.cls is optiscope.Momentum:
        batch = MomentumBatch(params, grads, m)
        torch_rule.momentum_(batch, momentum_hyper(cfg), snapshot)
    else:
        hyper = adam_hyper(cfg)
        torch_rule.adam_(adam_batch(hyper, 1, tensors), hyper, snapshot)
    np.testing.assert_allclose(snapshot, in_pass, rtol=sum_tolerance(torch.float64))


@pytest.mark.parametrize("lr, eps", [(1e-3, 1e-8), (0.1, 0.0), (1.0, 1e-3)])
def test_step_bin_table_matches_the_formula(lr, eps) -> None:
    """The divide-free bins of the histogram's sample equal the oracle's, edges,
    zeros, subnormals, infinities, NaN and negatives included."""
    c2 = np.array([1e-3, 0.3, 1.0])
    below = tables.step_thresholds(lr, eps, c2)
    bins, cuts = tables.step_bins(below)
    gen = np.random.default_rng(0)
    special = [0.0, -0.0, 5e-324, 1e-310, np.inf, -np.inf, np.nan, -1.0, 1e300]
    v = np.concatenate(
        [np.exp(gen.uniform(-700, 700, 20_000)), special, below.reshape(-1)]
    )
    v = np.concatenate([v, np.nextafter(v, np.inf), np.nextafter(v, -np.inf)])
    bits = v.view(np.uint64)
    top = (bits >> np.uint64(52)).astype(np.int64)
    for r in range(c2.size):
        with np.errstate(all="ignore"):
            step = lr / (np.sqrt(v / c2[r]) + eps)
        exact = torch_rule.octave_bins(torch.from_numpy(step)).numpy()
        table = bins[r, top]
        ours = table - (bits >= cuts[r, top])
        tabled = table >= 0
        np.testing.assert_array_equal(ours[tabled], exact[tabled])
        assert tabled.mean() > 0.99  # the formula is the rare fallback


@pytest.mark.parametrize("lr, eps", [(1e-3, 1e-8), (0.1, 0.0), (1.0, 1e-3), (0.0, 0.0)])
def test_step_thresholds_are_the_least_v_that_cross(lr, eps) -> None:
    """Each threshold's predicate holds at it and fails one ulp below, with the
    oracle's float64 operations."""
    c2 = np.array([1e-3, 0.3, 1.0])
    below = tables.step_thresholds(lr, eps, c2)
    edges = 2.0 ** (np.arange(layout.HIST_BINS) - 1 + layout.HIST_MIN_EXP)

    def holds(v, r):
        with np.errstate(all="ignore"):
            root = np.sqrt(v / c2[r])
            return np.where(
                np.arange(layout.HIST_BINS) == 0, root >= eps, lr / (root + eps) < edges
            )

    for r in range(c2.size):
        assert holds(below[r], r).all()
        under = np.nextafter(below[r], -np.inf)
        assert not holds(under, r)[below[r] > 0].any()


SIZES = [150_001, 1, 65_536, 65_537, 7, 12]


def signed_small_integers(gen: torch.Generator) -> list[torch.Tensor]:
    """±1 or ±2 (float32): values whose float32 sums of squares are exact."""
    return [
        (torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1)
        * torch.randint(1, 3, (n,), generator=gen).float()
        for n in SIZES
    ]


def test_float32_sums_count_every_element_once() -> None:
    """On values whose float32 sums are exact, the kernel's sums equal the
    float64 oracle's exactly: no element lost or counted twice, across chunks
    and tensors, and whatever is left over after a chunk's three parts (0, 1
    or 2 elements: sizes 150,001 in 3 chunks, then 1, 65,536, 65,537, 7, 12)."""
    grads = signed_small_integers(torch.Generator().manual_seed(0))
    params = [torch.zeros(n) for n in SIZES]
    buffers = [torch.zeros(n) for n in SIZES]
    rows = np.zeros((len(SIZES), len(layout.MOMENTUM)))
    # m = g/2, θ = -g/32 exactly: every square is a multiple of 2**-10 below 4.
    hyper = momentum_hyper(config("momentum"))._replace(lr=2.0**-4, momentum=0.5)
    cpu.momentum_(MomentumBatch(params, grads, buffers), hyper, rows)
    for row, g in zip(rows, grads, strict=True):
        grad_sq = float(g.double().pow(2).sum())
        assert row.tolist() == [
            g.numel(),
            grad_sq,
            grad_sq / 1024,
            grad_sq / 1024,
            0,
            0,
            grad_sq / 4,
        ]


def test_float32_adam_sums_count_every_element_once() -> None:
    """Adam's loop over a chunk's three parts, as the momentum test above: on
    values whose float32 sums are exact, the sums and extrema equal the
    hand-computed ones exactly. With β1 = 1/2, β2 = 1 - 2**-4, ε = 0 at step 1,
    every update is exactly ``-lr·sign(g)`` and the effective step of a
    coordinate is ``lr/|g|``."""
    grads = signed_small_integers(torch.Generator().manual_seed(1))
    params = [torch.zeros(n) for n in SIZES]
    m = [torch.zeros(n) for n in SIZES]
    v = [torch.zeros(n) for n in SIZES]
    rows = np.zeros((len(SIZES), len(layout.ADAM)))
    rows[:, EXTREMA] = [np.inf, -np.inf]
    lr = 2.0**-4
    hyper = adam_hyper(config("adam"))._replace(
        lr=lr, beta1=0.5, beta2=1 - 2.0**-4, eps=0.0
    )
    cpu.adam_(adam_batch(hyper, 1, (params, grads, m, v, None)), hyper, rows)
    for row, g, p in zip(rows, grads, params, strict=True):
        np.testing.assert_array_equal(p, -lr * g.sign())
        n = g.numel()
        got = row[: len(layout.COMMON)].tolist()
        assert got == [n, float(g.double().pow(2).sum()), n * lr**2, n * lr**2, 0]
        assert row[EXTREMA].tolist() == [lr / g.abs().max(), lr / g.abs().min()]
        assert row[layout.ADAM.index("eps_dominated")] == 0


def test_float32_update_sum_keeps_its_documented_range() -> None:
    """Σ(Δθ)² has no float64 second pass: below float32's normal range each
    term keeps an absolute 2**-150, and a change of 2**64 or more overflows."""
    n = 1000
    tiny = torch.full((n,), 1e-21)  # Δθ = -lr·m = -1e-23 · g / 2: squares ~1e-47
    grads = [torch.linspace(1.0, 2.0, n)]
    for params, expect_inf in (
        ([tiny.clone()], False),
        ([torch.full((n,), 3e19)], True),
    ):
        before = params[0].clone()
        rows = np.zeros((1, len(layout.MOMENTUM)))
        lr = 1e-23 if not expect_inf else 1e20
        hyper = momentum_hyper(config("momentum"))._replace(lr=lr, momentum=0.5)
        cpu.momentum_(MomentumBatch(params, grads, [torch.zeros(n)]), hyper, rows)
        exact = float((params[0].double() - before.double()).pow(2).sum())
        got = rows[0, layout.MOMENTUM.index("sum_update_sq")]
        if expect_inf:
            assert np.isinf(got) and np.isfinite(exact)
        else:
            assert abs(got - exact) <= n * 2.0**-150
        # Σθ² left float32's range in both cases, and was redone in float64.
        param_sq = float(params[0].double().pow(2).sum())
        assert rows[0, 3] == pytest.approx(param_sq, rel=1e-12)


def test_negative_zero_v_is_ordered_as_zero_and_matches_the_oracle() -> None:
    """A stored -0.0 in amsgrad's running max (the update keeps it: 0 > -0.0 is
    false) is ordered by the bits of |v|, as +0.0: its step, lr/eps, is the
    largest, as the oracle's."""
    cfg = config("adam-l2-amsgrad")
    params, grads, m, v, vmax = make(torch.float32)
    # Three of seven coordinates: the others keep positive v, so the loop's
    # extrema alone would be wrong at both ends.
    grads[1][:3] = 0.0
    params[1][:3] = 0.0  # no weight-decay gradient either
    v[1][:3] = 0.0
    vmax[1][:3] = -0.0
    rows, expected = probed_step(
        cfg, torch.float32, 1, (params, grads, m, v, vmax), oracle=True
    )
    assert torch.signbit(vmax[1][:3]).all() and (vmax[1][3:] > 0).all()
    np.testing.assert_allclose(rows[1, EXTREMA], expected[1][0][EXTREMA], rtol=1e-12)
    assert rows[1, EXTREMA[1]] == pytest.approx(cfg.options["lr"] / cfg.options["eps"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_zero_denominator_gives_an_infinite_step_not_an_error(dtype) -> None:
    """ε = 0 and a coordinate whose gradient has always been 0: √v̂ + ε = 0, its
    effective step lr/0 is +inf (as the oracle's) and the update is zero."""
    cfg = config("adam-seed-rule")  # eps = 0
    params, grads, m, v, vmax = make(dtype)
    grads[1][:2], m[1][:2], v[1][:2] = 0.0, 0.0, 0.0
    start = params[1][:2].clone()
    rows, expected = probed_step(
        cfg, dtype, 1, (params, grads, m, v, vmax), oracle=True
    )
    assert torch.equal(params[1][:2], start)
    assert rows[1, EXTREMA[1]] == np.inf == expected[1][0][EXTREMA[1]]
    last = layout.HIST_START + layout.HIST_BINS - 1
    assert rows[1, last] == expected[1][0][last] >= 1  # element 0 is sampled

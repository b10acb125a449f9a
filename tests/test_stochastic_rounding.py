"""Stochastic rounding of bfloat16 moments (``stochastic_rounding=True``):
exact against the NumPy oracle on every CPU path, unbiased within a CLT bound,
the same at every thread count, kept by ``state_dict``, refused where the
moments are not bfloat16."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from configs import adam_hyper, config, corrections

import optiscope
from optiscope import reference, rules
from optiscope.kernels import cpu, philox, torch_rule
from optiscope.kernels.cpu.threads import CHUNK
from optiscope.kernels.records import AdamBatch, StochasticRounding

BF16 = torch.bfloat16
SEED = 1234
#: Over a chunk (65,536) with a tail that is not a multiple of 4.
NUMEL = 70_001
#: beta1 = 1/2 and beta2 = 3/4 make the first step exact in float32 for a
#: gradient of at most 12 significant bits: m = g/2, v = g²/4. The value that
#: is rounded is then the oracle's own, and the stored bits must match exactly.
EXACT = dict(lr=1e-3, betas=(0.5, 0.75), state_dtype=BF16)


def exact_gradient(numel: int, seed: int = 0) -> torch.Tensor:
    """Integers below 2^12 times 2^-10: 12 significant bits at most."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-4095, 4096, (numel,), generator=gen).float() / 1024


def expected_moments(g: torch.Tensor, stream: int, step: int = 1):
    """The oracle's first-step m and v, stochastically rounded with the words of
    ``(SEED, stream, step)``: low 16 bits for m, high 16 for v."""
    words = philox.random_words(g.numel(), SEED, rules.rounding_offset(stream, step))
    g64 = g.double().numpy()
    m = reference.stochastic_round_bfloat16(0.5 * g64, words)
    v = reference.stochastic_round_bfloat16(0.25 * g64 * g64, words >> 16)
    return m, v


@pytest.mark.parametrize("cls", [optiscope.Adam, optiscope.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_first_step_is_the_oracles_rounding_bit_for_bit(cls, amsgrad) -> None:
    """Two parameters (streams 0 and 1): each moment is exactly the oracle's
    value rounded with its Philox words; amsgrad's max keeps v as stored."""
    params = [torch.nn.Parameter(torch.randn(NUMEL)) for _ in range(2)]
    grads = [exact_gradient(NUMEL, seed) for seed in (1, 2)]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt = cls(
        params, **EXACT, amsgrad=amsgrad, stochastic_rounding=True, rounding_seed=SEED
    )
    opt.step()
    for stream, (p, g) in enumerate(zip(params, grads, strict=True)):
        m, v = expected_moments(g, stream)
        state = opt.state[p]
        np.testing.assert_array_equal(state["exp_avg"].double().numpy(), m)
        np.testing.assert_array_equal(state["exp_avg_sq"].double().numpy(), v)
        if amsgrad:
            np.testing.assert_array_equal(state["max_exp_avg_sq"].double().numpy(), v)


@pytest.mark.parametrize("backend", [cpu, torch_rule], ids=["cpu", "torch_rule"])
def test_each_cpu_backend_rounds_as_the_oracle(backend) -> None:
    """The numba kernel and the per-tensor torch rule, called as the dispatcher
    calls them, store the same bits as the oracle (stream 3, step 1)."""
    hyper = adam_hyper(config("adam"))._replace(beta1=0.5, beta2=0.75)
    g = exact_gradient(NUMEL)
    m, v = torch.zeros(NUMEL, dtype=BF16), torch.zeros(NUMEL, dtype=BF16)
    batch = AdamBatch(
        [torch.randn(NUMEL)],
        [g],
        [m],
        [v],
        None,
        corrections(hyper, [1]),
        StochasticRounding(SEED, [rules.rounding_offset(3, 1)]),
    )
    backend.adam_(batch, hyper, None)
    expected_m, expected_v = expected_moments(g, stream=3)
    np.testing.assert_array_equal(m.double().numpy(), expected_m)
    np.testing.assert_array_equal(v.double().numpy(), expected_v)


def test_rounding_is_unbiased_within_a_clt_bound() -> None:
    """One value between two bfloat16 neighbours, rounded in N = 2^18 elements
    with independent words: each stored value is lo + s·B, B ~ Bernoulli(q) with
    q = (x − lo)/s, so the mean's error has standard deviation
    s·sqrt(q(1−q)/N). The test allows 5 of them (a false failure has
    probability 6e-7; the seed is fixed, so it cannot flake). Rounding to
    nearest misses by s·q ≈ 2.3e-3 here, over 300 standard deviations."""
    numel = 1 << 18
    x = 1.0 + 0.3 * 2.0**-7  # q = 0.3 of the spacing s = 2^-7 above lo = 1
    x32 = float(np.float32(x))
    s, q = 2.0**-7, (x32 - 1.0) / 2.0**-7
    bound = 5 * s * np.sqrt(q * (1 - q) / numel)
    means = {}
    for rounding in (True, False):
        w = torch.nn.Parameter(torch.zeros(numel))
        w.grad = torch.full((numel,), 2 * x32)  # m = g/2 = x, exactly
        opt = optiscope.Adam(
            [w], **EXACT, stochastic_rounding=rounding, rounding_seed=SEED
        )
        opt.step()
        means[rounding] = opt.state[w]["exp_avg"].double().mean().item()
    assert abs(means[True] - x32) <= bound, (means[True] - x32, bound)
    assert abs(means[False] - x32) > 50 * bound  # the bound can fail


def run(threads: int, steps: int = 3) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(300_001, generator=gen))
    opt = optiscope.AdamW(
        [w], state_dtype=BF16, stochastic_rounding=True, rounding_seed=SEED
    )
    for _ in range(steps):
        w.grad = torch.randn(w.shape, generator=gen)
        opt.step()
    return {"param": w.detach().clone(), **opt.state[w]}


def test_the_same_bits_at_every_thread_count() -> None:
    """Words depend on (seed, parameter, step, element) only: 1, 2 and 3
    threads (5 chunks claimed in any order) store the same bits."""
    before = torch.get_num_threads()
    try:
        results = [run(threads) for threads in (1, 2, 3)]
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for name, value in results[0].items():
            assert torch.equal(value, other[name]), name


def test_state_dict_keeps_the_seed_and_the_stream() -> None:
    """An optimizer built with another seed and loaded from a checkpoint
    continues bit for bit."""
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(1000, generator=gen) for _ in range(4)]
    w = torch.nn.Parameter(torch.randn(1000, generator=gen))
    opt = optiscope.Adam(
        [w], state_dtype=BF16, stochastic_rounding=True, rounding_seed=SEED
    )
    for g in grads[:2]:
        w.grad = g
        opt.step()
    w2 = torch.nn.Parameter(w.detach().clone())
    restored = optiscope.Adam(
        [w2], state_dtype=BF16, stochastic_rounding=True, rounding_seed=SEED + 1
    )
    checkpoint = io.BytesIO()
    torch.save(opt.state_dict(), checkpoint)
    checkpoint.seek(0)
    restored.load_state_dict(torch.load(checkpoint))
    assert restored.param_groups[0]["rounding_seed"] == SEED
    for g in grads[2:]:
        w.grad, w2.grad = g, g.clone()
        opt.step()
        restored.step()
    assert torch.equal(w, w2)
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[w][name], restored.state[w2][name])


def test_the_seed_comes_from_torchs_generator_only_when_asked() -> None:
    """Drawn at construction from the default generator (so ``manual_seed``
    fixes it); without stochastic rounding nothing is drawn, as in torch.optim."""
    w = torch.nn.Parameter(torch.zeros(3, dtype=BF16))
    seeds = []
    for _ in range(2):
        torch.manual_seed(7)
        opt = optiscope.Adam([w], stochastic_rounding=True)
        seeds.append(opt.param_groups[0]["rounding_seed"])
    assert seeds[0] == seeds[1] and 0 <= seeds[0] < 2**63
    torch.manual_seed(7)
    state = torch.get_rng_state()
    optiscope.Adam([w])
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("options", "dtype", "error", "message"),
    [
        (
            {"state_dtype": torch.float32},
            torch.float32,
            ValueError,
            "stochastic_rounding=True needs bfloat16 moments (state_dtype="
            "torch.bfloat16, or bfloat16 parameters with state_dtype=None), got "
            "state dtypes torch.float32",
        ),
        (
            {},
            torch.float32,
            ValueError,
            "stochastic_rounding=True needs bfloat16 moments (state_dtype="
            "torch.bfloat16, or bfloat16 parameters with state_dtype=None), got "
            "state dtypes torch.float32",
        ),
        (
            {"state_dtype": BF16, "rounding_seed": -1},
            torch.float32,
            ValueError,
            "rounding_seed must be an int in [0, 2**63) (or None to draw one) with "
            "stochastic_rounding=True, got -1",
        ),
        (
            {"state_dtype": BF16, "rounding_seed": 1.5},
            torch.float32,
            ValueError,
            "rounding_seed must be an int in [0, 2**63) (or None to draw one) with "
            "stochastic_rounding=True, got 1.5",
        ),
    ],
)
def test_bad_options_are_refused(options, dtype, error, message) -> None:
    w = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    with pytest.raises(error) as caught:
        optiscope.Adam([w], stochastic_rounding=True, **options)
    assert str(caught.value) == message


def test_a_float32_group_added_later_is_refused_at_the_step() -> None:
    """The check runs again when a step sees the group's parameters; nothing moves."""
    w = torch.nn.Parameter(torch.zeros(3, dtype=BF16))
    opt = optiscope.Adam([w], stochastic_rounding=True, rounding_seed=SEED)
    v = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [v]})
    w.grad, v.grad = torch.ones(3, dtype=BF16), torch.ones(3)
    with pytest.raises(ValueError, match="needs bfloat16 moments"):
        opt.step()
    assert torch.equal(v, torch.ones(3)) and not opt.state


def test_a_probe_changes_no_value_and_measures_the_step() -> None:
    """With a probe the stochastic loop also sums: the step writes the same bits
    as unprobed, and grad_rms / update_rms / param_rms are those of the tensors.
    The sums are float32 per chunk, one term per element; even added one by
    one in a single lane (CHUNK terms) with 3 roundings per term, a sum of
    squares is within (CHUNK + 3)·2^-24 relative, its root within half that."""
    gen = torch.Generator().manual_seed(8)
    start = torch.randn(NUMEL, generator=gen)
    g = torch.randn(NUMEL, generator=gen)
    results = {}
    for probe in (False, True):
        w = torch.nn.Parameter(start.clone())
        w.grad = g
        opt = optiscope.Adam(
            [w],
            state_dtype=BF16,
            amsgrad=True,
            stochastic_rounding=True,
            rounding_seed=SEED,
            probe=probe,
        )
        opt.step()
        results[probe] = (w.detach().clone(), dict(opt.state[w]), opt.probes)
    (w0, s0, _), (w1, s1, record) = results[False], results[True]
    assert torch.equal(w0, w1)
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert torch.equal(s0[name], s1[name]), name
    row = record["params"]["group0.param0"]

    def rms(t: torch.Tensor) -> float:
        return t.double().pow(2).mean().sqrt().item()

    tolerance = (CHUNK + 3) * 2.0**-24 / 2
    assert row["grad_rms"] == pytest.approx(rms(g), rel=tolerance)
    assert row["update_rms"] == pytest.approx(rms(w1 - start), rel=tolerance)
    assert row["param_rms"] == pytest.approx(rms(w1), rel=tolerance)


def test_the_kernels_refuse_a_seed_with_float32_moments() -> None:
    """Called directly, ``kernels.adam_`` refuses before changing anything."""
    from optiscope import kernels

    p, g = torch.zeros(4), torch.ones(4)
    m, v, step = torch.zeros(4), torch.zeros(4), torch.zeros(())
    with pytest.raises(TypeError) as caught:
        kernels.adam_(
            [p],
            [g],
            [m],
            [v],
            None,
            [step],
            lr=0.1,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            decoupled_weight_decay=False,
            amsgrad=False,
            maximize=False,
            bias_correction=True,
            rounding_seed=SEED,
            rounding_streams=[0],
        )
    assert str(caught.value) == (
        "stochastic rounding (a rounding_seed) needs bfloat16 moments, got "
        "torch.float32"
    )
    assert step.item() == 0.0 and torch.equal(p, torch.zeros(4))

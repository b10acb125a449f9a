"""Inverted dropout against its equations: values, expectation (CLT bounds), mask, modes."""

from __future__ import annotations

import math

import pytest
import torch
from configs import DTYPES, randn
from tests_helpers import DEVICES

import optiscope
from optiscope.bench import saved_bytes
from optiscope.functional import dropout

PS = [0.1, 0.5, 0.9]


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16]
)
@pytest.mark.parametrize("device", DEVICES)
def test_every_output_is_zero_or_scaled_input(p, dtype, device) -> None:
    h = torch.randn(10_000, dtype=dtype, device=device)
    y = dropout(h, p)
    assert y.dtype == dtype and y.device == h.device and y.shape == h.shape
    scaled = h * (1.0 / (1.0 - p))
    assert bool(((y == 0) | (y == scaled)).all())


@pytest.mark.parametrize("p", PS)
def test_mean_over_a_million_draws_is_within_4_standard_errors(p) -> None:
    """CLT: each h_drop = h·d/(1-p) has mean h and variance h²·p/(1-p), so the mean of
    n i.i.d. draws has standard error |h|·sqrt(p / ((1-p)·n)). 4 SE is a 6e-5 two-sided
    false-alarm rate per case, with the seed fixed."""
    n, h = 1_000_000, 1.7
    y = dropout(
        torch.full((n,), h, dtype=torch.float64),
        p,
        generator=torch.Generator().manual_seed(1234),
    )
    standard_error = h * math.sqrt(p / ((1 - p) * n))
    assert abs(y.mean().item() - h) <= 4 * standard_error


@pytest.mark.parametrize("p", PS)
def test_keep_rate_is_within_4_sigma_of_1_minus_p(p) -> None:
    """The kept count is Binomial(n, 1-p): sigma of the rate is sqrt(p(1-p)/n)."""
    n = 1_000_000
    y = dropout(torch.ones(n), p, generator=torch.Generator().manual_seed(99))
    keep_rate = (y != 0).double().mean().item()
    assert abs(keep_rate - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n)


def test_gradient_flows_through_the_same_mask() -> None:
    h = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    y = dropout(h, 0.3)
    y.backward(torch.ones_like(y))
    kept = y != 0
    assert torch.equal(h.grad, kept.double() / 0.7)


def test_evaluation_is_identity_and_draws_no_random_numbers() -> None:
    h = torch.randn(100)
    generator = torch.Generator().manual_seed(5)
    state, global_state = generator.get_state(), torch.get_rng_state()
    layer = optiscope.Dropout(0.5, generator=generator).eval()
    assert torch.equal(layer(h), h) and torch.equal(dropout(h, 0.5, training=False), h)
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_module_honours_train_and_eval() -> None:
    layer = optiscope.Dropout(0.5)
    h = torch.ones(1000)
    assert (layer(h) == 0).any()
    layer.eval()
    assert torch.equal(layer(h), h)
    layer.train()
    assert (layer(h) == 0).any()
    assert repr(layer) == "Dropout(p=0.5, inplace=False)"


def test_p_zero_is_identity_without_randomness() -> None:
    h = torch.randn(100)
    state = torch.get_rng_state()
    assert torch.equal(dropout(h, 0.0), h)
    assert torch.equal(torch.get_rng_state(), state)


def test_p_one_is_all_zeros_without_division_by_zero() -> None:
    h = torch.tensor([1.0, -2.0, float("inf"), float("nan")], requires_grad=True)
    y = dropout(h, 1.0)
    assert torch.equal(y, torch.zeros(4))
    y.sum().backward()
    assert torch.equal(h.grad, torch.zeros(4))


def test_generator_makes_the_mask_reproducible() -> None:
    h = torch.randn(1000)
    a = dropout(h, 0.5, generator=torch.Generator().manual_seed(7))
    b = dropout(h, 0.5, generator=torch.Generator().manual_seed(7))
    c = dropout(h, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (4, 5)])
def test_shapes_including_empty_and_scalar(shape) -> None:
    h = torch.randn(shape)
    assert dropout(h, 0.5).shape == h.shape


def test_non_contiguous_input() -> None:
    h = torch.randn(64, 32).t()
    y = dropout(h, 0.5)
    assert y.shape == h.shape
    assert bool(((y == 0) | (y == h * 2.0)).all())


# -- torch.nn.Dropout parity: repr, inplace, strides ----------------------------------
def gen(seed: int = 21) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("p", [0.5, 0.25])
@pytest.mark.parametrize("inplace", [False, True])
def test_repr_is_torch_dropouts(p, inplace) -> None:
    ours, theirs = optiscope.Dropout(p, inplace), torch.nn.Dropout(p, inplace)
    assert repr(ours) == repr(theirs) == f"Dropout(p={p}, inplace={inplace})"
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(torch.nn.Sequential(ours)) == repr(torch.nn.Sequential(theirs))


def test_inplace_must_be_a_bool() -> None:
    message = "inplace must be True or False, got 'yes'"
    with pytest.raises(TypeError, match=message):
        optiscope.Dropout(0.5, inplace="yes")
    with pytest.raises(TypeError, match=message):
        dropout(torch.ones(3), 0.5, inplace="yes")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_overwrites_the_input_with_the_out_of_place_result(dtype) -> None:
    x = randn((40, 30), dtype=dtype)
    copy = x.clone()
    expected = dropout(x, 0.3, generator=gen())
    y = dropout(x, 0.3, inplace=True, generator=gen())
    assert y is x and torch.equal(x, expected)
    layer = optiscope.Dropout(0.3, inplace=True, generator=gen())
    assert layer(copy) is copy and torch.equal(copy, expected)


def test_inplace_without_randomness_returns_the_input_untouched() -> None:
    x = randn((5,))
    before = x.clone()
    assert dropout(x, 0.5, training=False, inplace=True) is x
    assert dropout(x, 0.0, inplace=True) is x
    assert torch.equal(x, before)
    assert optiscope.Dropout(0.5, inplace=True).eval()(x) is x


def test_inplace_p_one_zeroes_the_input_and_its_gradient() -> None:
    leaf = torch.tensor([1.0, float("inf"), float("nan")], requires_grad=True)
    x = leaf * 1.0
    assert dropout(x, 1.0, inplace=True) is x and torch.equal(x, torch.zeros(3))
    x.sum().backward()
    assert torch.equal(leaf.grad, torch.zeros(3))


def test_inplace_gradient_is_the_stored_mask_gradient_with_nothing_saved() -> None:
    """y = γ·d∘h in place: ∂h = γ·d∘g, with d read off y (h has no zeros)."""
    p, leaf = 0.6, (torch.rand(64, 9, dtype=torch.float64) + 0.5).requires_grad_()
    g = randn((64, 9), dtype=torch.float64)
    h = leaf * 1.0
    y = dropout(h, p, inplace=True)
    y.backward(g)
    assert torch.equal(leaf.grad, torch.where(y != 0, g * (1 / (1 - p)), 0.0))
    assert saved_bytes(lambda t: dropout(t * 1.0, p, inplace=True), leaf) == 0


def test_inplace_follows_autograds_rules_for_in_place_ops() -> None:
    """As torch.nn.functional.dropout(inplace=True): a leaf that requires grad is
    refused, and a tensor saved before the write is detected as stale."""
    leaf = torch.ones(4, requires_grad=True)
    for fn in (torch.nn.functional.dropout, dropout):
        with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
            fn(leaf, 0.5, inplace=True)
        with pytest.raises(RuntimeError, match="a view of a leaf Variable"):
            fn(leaf[1:], 0.5, inplace=True)
        assert torch.equal(leaf, torch.ones(4))  # refused before any write
        h = leaf * 2.0
        stale = h.sin()  # sin saves h for its backward
        fn(h, 0.5, inplace=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            stale.sum().backward()


def _layouts() -> dict[str, torch.Tensor]:
    base = randn((4, 6, 5, 3))
    return {
        "contiguous": base,
        "transposed": base.transpose(1, 3),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "sliced": base[:, ::2, 1:],
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_output_has_torchs_strides_and_the_mask_of_logical_order(layout) -> None:
    """Element i of the mask is the i-th in row-major (logical) order, so every
    layout of the same values gets the same output; the strides are those
    torch.nn.functional.dropout returns (the input's, for a dense input)."""
    x = _layouts()[layout]
    y = dropout(x, 0.5, generator=gen())
    assert y.stride() == torch.nn.functional.dropout(x, 0.5).stride()
    if layout != "sliced":
        assert y.stride() == x.stride()
    assert torch.equal(y, dropout(x.contiguous(), 0.5, generator=gen()))


@pytest.mark.parametrize("layout", list(_layouts()))
def test_inplace_on_every_layout(layout) -> None:
    x = _layouts()[layout]
    expected = dropout(x.contiguous(), 0.5, generator=gen())
    strides = x.stride()
    assert dropout(x, 0.5, inplace=True, generator=gen()) is x
    assert x.stride() == strides and torch.equal(x, expected)


def test_channels_last_gradient_is_the_stored_mask_gradient() -> None:
    leaf = torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.5
    leaf = leaf.contiguous(memory_format=torch.channels_last).requires_grad_()
    g = randn((2, 3, 4, 5), dtype=torch.float64)
    y = dropout(leaf, 0.5)
    y.backward(g)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(leaf.grad, torch.where(y != 0, g * 2.0, 0.0))


# -- DTensor activations on two gloo processes -----------------------------------------
WORLD = 2
#: (5, 7) shards unevenly over 2 ranks: rows 3 + 2, columns 4 + 3.
WHOLE_SHAPE = (5, 7)


def _whole() -> tuple[torch.Tensor, torch.Tensor]:
    """The unsharded activation (no zeros) and upstream gradient."""
    gen = torch.Generator().manual_seed(3)
    h = torch.rand(WHOLE_SHAPE, generator=gen, dtype=torch.float64) + 0.5
    return h, torch.randn(WHOLE_SHAPE, generator=gen, dtype=torch.float64)


def _dtensor_ranks(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: dropout of the same activation under each placement, seeded
    alike on both ranks; saves the full outputs and gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import (
        DTensor,
        Partial,
        Replicate,
        Shard,
        distribute_tensor,
    )

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        h, upstream = _whole()
        results = {}
        for placement in (Shard(0), Shard(1), Replicate()):
            x = distribute_tensor(h, mesh, [placement]).requires_grad_()
            torch.manual_seed(11)
            y = optiscope.Dropout(0.4)(x)
            y.backward(distribute_tensor(upstream, mesh, [placement]))
            torch.manual_seed(11)
            # A clone: a replicated DTensor may share h's memory.
            z = dropout(
                distribute_tensor(h.clone(), mesh, [placement]), 0.4, inplace=True
            )
            results[str(placement)] = {
                "placements": [str(q) for q in y.placements],
                "output": y.full_tensor(),
                "grad": x.grad.full_tensor(),
                "inplace": z.full_tensor(),
            }
        # Partial(sum): each rank holds half of h; the mask commutes with the sum.
        partial = DTensor.from_local(h / WORLD, mesh, [Partial()], run_check=False)
        torch.manual_seed(11)
        y = dropout(partial, 0.4)
        results[str(Partial())] = {
            "placements": [str(q) for q in y.placements],
            "output": y.full_tensor(),
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        # Both ranks done before either tears gloo down: a rank that destroys
        # its group while the other still talks to it aborts the process.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_dtensor_shards_get_exactly_the_unsharded_mask(tmp_path) -> None:
    """Each shard is masked by its elements' global indices, so the sharded
    result is the unsharded one bit for bit, in forward and backward, for even
    and uneven shards, with the placement kept."""
    torch.multiprocessing.spawn(
        _dtensor_ranks,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    h, upstream = _whole()
    leaf = h.clone().requires_grad_()
    torch.manual_seed(11)
    expected = optiscope.Dropout(0.4)(leaf)
    expected.backward(upstream)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(results) == 4  # Shard(0), Shard(1), Replicate(), Partial()
        for placement, found in results.items():
            assert found["placements"] == [placement], (rank, placement)
            assert torch.equal(found["output"], expected.detach()), (rank, placement)
            if "grad" in found:
                assert torch.equal(found["grad"], leaf.grad), (rank, placement)
                assert torch.equal(found["inplace"], expected.detach())

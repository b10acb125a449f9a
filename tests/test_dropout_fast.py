"""The Philox dropout: the CPU backend's mask is the reference stream, bit for
bit; the dropout op's backward saves nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from configs import DTYPES, randn

from optiscope.functional import dropout
from optiscope.kernels import cpu, philox

SEED = (123 << 32) | 456  # both key words non-zero


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 3, 4, 1001, 3 * (1 << 16) + 7])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_is_the_philox_reference_bit_for_bit(dtype, numel, p) -> None:
    x = randn((numel,), dtype=dtype)
    y = cpu.dropout_forward(x, p, SEED, offset=(1 << 32) + 5)
    keep = torch.from_numpy(philox.keep_mask(numel, p, SEED, (1 << 32) + 5))
    assert torch.equal(y, torch.where(keep, x * (1.0 / (1.0 - p)), 0.0))


def test_bitwise_identical_across_thread_counts() -> None:
    x = randn((5 * (1 << 16) + 3,))
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(cpu.dropout_forward(x, 0.3, SEED, 0))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outputs[0], outputs[1])


def stored_mask_gradient(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, p: float):
    """What a dropout that saved its mask would return: g·γ where kept, else 0."""
    kept = y != 0  # x has no zeros, so a zero output means dropped
    return torch.where(kept, g * (1.0 / (1.0 - p)), 0.0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gradient_equals_the_stored_mask_gradient(compiled) -> None:
    p = 0.4
    x = (torch.rand(64, 33) + 0.5).requires_grad_()
    g = randn((64, 33))
    fn = (
        torch.compile(dropout, backend="aot_eager", fullgraph=True)
        if compiled
        else dropout
    )
    torch.manual_seed(3)
    y = fn(x, p)
    y.backward(g)
    assert torch.equal(x.grad, stored_mask_gradient(x, y.detach(), g, p))


def test_manual_seed_and_generator_reproduce_the_mask() -> None:
    x = randn((1000,))
    torch.manual_seed(11)
    a = dropout(x, 0.5)
    torch.manual_seed(11)
    b = dropout(x, 0.5)
    c = dropout(x, 0.5, generator=torch.Generator().manual_seed(11))
    d = dropout(x, 0.5, generator=torch.Generator().manual_seed(11))
    assert (
        torch.equal(a, b) and torch.equal(c, d) and not torch.equal(a, dropout(x, 0.5))
    )


def saved_bytes(fn, x: torch.Tensor) -> int:
    """Bytes of every tensor autograd saves for backward while ``fn(x)`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() != x.data_ptr():  # the input itself costs nothing extra
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


def test_backward_saves_zero_bytes_where_torch_saves_a_mask() -> None:
    x = randn((1024,)).requires_grad_()
    assert saved_bytes(lambda h: dropout(h, 0.5), x) == 0
    assert saved_bytes(lambda h: torch.nn.functional.dropout(h, 0.5), x) >= 1024


def test_numpy_reference_matches_the_kernel_on_odd_offsets() -> None:
    words = philox.random_words(9, seed=7, offset=2**40 + 1)
    cut = philox.threshold(0.5)
    y = cpu.dropout_forward(torch.ones(9), 0.5, 7, 2**40 + 1)
    assert np.array_equal((y != 0).numpy(), words >= cut)


@pytest.mark.parametrize("numel", [1, 3, 5, 1001, 3 * (1 << 16) + 7, 5 * (1 << 16) + 2])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, SEED])
def test_count_kept_is_the_reference_mask_sum(numel, p, seed) -> None:
    """count_kept counts the very mask that dropout_forward applies."""
    offset = (1 << 32) + 5
    expected = philox.keep_mask(numel, p, seed, offset).sum()
    assert cpu.count_kept(numel, p, seed, offset) == expected


def test_count_kept_is_identical_across_thread_counts() -> None:
    before = torch.get_num_threads()
    try:
        counts = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            counts.append(cpu.count_kept(5 * (1 << 16) + 3, 0.3, SEED, 9))
    finally:
        torch.set_num_threads(before)
    assert counts[0] == counts[1]


def test_count_kept_edge_cases() -> None:
    assert cpu.count_kept(0, 0.5, SEED, 0) == 0
    assert cpu.count_kept(1001, 0.0, SEED, 0) == 1001
    assert cpu.count_kept(1001, 1.0, SEED, 0) == 0

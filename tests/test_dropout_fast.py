"""The Philox dropout: the CPU backend's mask is the reference stream, bit for
bit; the dropout op's backward saves nothing; under torch.compile it is one
graph with no break that never recompiles on the seed and equals eager mode;
the operators pass torch.library.opcheck; a block of a larger tensor (a
DTensor shard) gets the larger tensor's mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from configs import DTYPES, randn
from torch._dynamo.testing import CompileCounterWithBackend

import optiscope
from optiscope import kernels
from optiscope.functional import dropout
from optiscope.kernels import cpu, ops, philox, torch_rule

SEED = (123 << 32) | 456  # both key words non-zero
BACKENDS = ["aot_eager", "inductor"]
# Inductor's own import of torch.jit warns; that is torch's, not ours.
INDUCTOR_WARNING = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated"
)


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 3, 4, 1001, 3 * (1 << 16) + 7])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_is_the_philox_reference_bit_for_bit(dtype, numel, p, inplace) -> None:
    """Out of place and written over its input (the kernel's own loop for that)."""
    x = randn((numel,), dtype=dtype)
    expected = x.clone()
    keep = torch.from_numpy(philox.keep_mask(numel, p, SEED, (1 << 32) + 5))
    y = cpu.dropout_forward(x, p, SEED, (1 << 32) + 5, out=x if inplace else None)
    assert (y is x) == inplace
    assert torch.equal(y, torch.where(keep, expected * (1.0 / (1.0 - p)), 0.0))


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_bitwise_identical_across_thread_counts(inplace) -> None:
    x = randn((5 * (1 << 16) + 3,))
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            h = x.clone()
            outputs.append(
                cpu.dropout_forward(h, 0.3, SEED, 0, out=h if inplace else None)
            )
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], x)  # the mask was applied at all


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


# -- torch.compile --------------------------------------------------------------------
# The seed is drawn as a tensor inside the graph: no Tensor.item() to break it,
# and no Python int for dynamo to guard on.
def _mlp(layer: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), layer, torch.nn.Linear(32, 4)
    )


@pytest.mark.parametrize(
    "layer",
    [optiscope.Dropout(0.3), torch.nn.Dropout(0.3)],
    ids=["optiscope", "torch"],
)
def test_model_compiles_in_one_graph_without_breaks(layer) -> None:
    """The same counts as torch.nn.Dropout: one graph, no break."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_mlp(layer))(randn((8, 16)))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@INDUCTOR_WARNING
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_dropout_never_recompiles_and_draws_a_fresh_mask(backend) -> None:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    fn = torch.compile(lambda h: dropout(h, 0.5), backend=counter, fullgraph=True)
    masks = [fn(torch.ones(1000)) != 0 for _ in range(5)]
    assert counter.frame_count == 1
    # Two independent masks of 1000 units agree on all of them with chance 2^-1000.
    assert all(
        not torch.equal(a, b) for i, a in enumerate(masks) for b in masks[i + 1 :]
    )


@INDUCTOR_WARNING
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_trains_without_recompiling(backend) -> None:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    model = _mlp(optiscope.Dropout(0.5))
    compiled = torch.compile(model, backend=counter)
    for _ in range(4):
        compiled(randn((8, 16))).square().mean().backward()
    assert counter.frame_count == 1


@INDUCTOR_WARNING
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_compiled_equals_eager_from_the_same_seed(backend, inplace) -> None:
    """Inductor draws random numbers with its own generator unless
    ``fallback_random``; with it, the graph draws the seed eager mode draws."""
    torch._dynamo.reset()

    def forward(h: torch.Tensor) -> torch.Tensor:
        return dropout(h * 1.0, 0.4, inplace=inplace)

    def run(fn) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(5)
        h = randn((33, 17), generator=torch.Generator().manual_seed(0))
        h.requires_grad_()
        y = fn(h)
        y.backward(g)
        return y.detach(), h.grad

    g = randn((33, 17))
    with torch._inductor.config.patch(fallback_random=True):
        counter = CompileCounterWithBackend(backend)
        ours = run(torch.compile(forward, backend=counter, fullgraph=True))
    eager = run(forward)
    assert counter.frame_count == 1
    assert torch.equal(ours[0], eager[0]) and torch.equal(ours[1], eager[1])
    assert torch.equal(eager[1], stored_mask_gradient(None, eager[0], g, 0.4))


@INDUCTOR_WARNING
def test_compiled_output_keeps_channels_last() -> None:
    torch._dynamo.reset()
    x = randn((2, 3, 5, 4)).to(memory_format=torch.channels_last)
    y = torch.compile(lambda h: dropout(h, 0.5), fullgraph=True)(x)
    assert y.stride() == x.stride()


@INDUCTOR_WARNING
def test_explicit_generator_under_compile_matches_eager_without_recompiling() -> None:
    """Dynamo cannot put a torch.Generator in a graph: with ``generator=`` the
    seed draw runs eagerly (one graph break; torch.nn.Dropout has no
    ``generator=`` at all), and the masks are still the generator's."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    ours = optiscope.Dropout(0.5, generator=torch.Generator().manual_seed(4))
    eager = optiscope.Dropout(0.5, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(ours, backend=counter)
    x = randn((64,))
    outputs = [compiled(x) for _ in range(4)]
    frames = counter.frame_count
    outputs += [compiled(x) for _ in range(4)]
    assert counter.frame_count == frames  # nothing recompiles after the first call
    assert all(torch.equal(y, eager(x)) for y in outputs)
    assert not torch.equal(outputs[0], outputs[1])


# -- the operators ----------------------------------------------------------------------
LAYOUTS = {
    "contiguous": lambda: randn((5, 7), dtype=torch.float64),
    "transposed": lambda: randn((7, 5)).t(),
    "channels_last": lambda: randn((2, 3, 4, 5)).to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_operators_pass_torch_library_opcheck(layout) -> None:
    """Schema (what each op writes), fake tensors (shape and strides) and the
    autograd registration, checked by torch itself."""
    seed = torch.tensor(SEED, dtype=torch.int64)
    x = LAYOUTS[layout]()
    for op in (ops.philox_dropout, ops.philox_dropout_backward):
        torch.library.opcheck(op, (x.clone().requires_grad_(), 0.3, seed, 0))
    torch.library.opcheck(ops.philox_dropout_, (x.clone(), 0.3, seed, 0))


def test_operator_refuses_a_seed_that_is_not_one_int64() -> None:
    x = torch.ones(4)
    with pytest.raises(TypeError, match="seed must be a one-element int64 tensor, got"):
        ops.philox_dropout(x, 0.5, torch.tensor(3.0), 0)
    with pytest.raises(ValueError, match=r"got shape \(2,\)"):
        ops.philox_dropout(x, 0.5, torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got -1"):
        kernels.dropout_forward(x, 0.5, -1)


# -- blocks of a larger tensor (DTensor shards) --------------------------------------
def test_words_at_indices_are_the_reference_stream() -> None:
    index = np.array([0, 1, 2, 3, 4, 7, 9, 1000, 1001], dtype=np.uint64)
    stream = philox.random_words(1002, SEED, offset=2**40 + 1)
    assert np.array_equal(
        torch_rule.words_at(index, SEED, 2**40 + 1), stream[index.astype(np.intp)]
    )
    # Past 2^34 elements the block number needs its high counter word.
    far = np.uint64(2**34 + 5)
    # Block (2^34 + 5) >> 2 = 2^32 + 1: counter words (1, 1); the element is word 1.
    block = np.array([[1, 1, 0, 0]], dtype=np.uint32)
    expected = philox.philox4x32(block, (SEED & 0xFFFFFFFF, SEED >> 32))[0, 1]
    assert torch_rule.words_at(np.array([far]), SEED, 0)[0] == expected


BLOCKS = {
    "rows": (slice(1, 4), slice(None), slice(None)),
    "columns": (slice(None), slice(2, 7), slice(None)),
    "inner": (slice(None), slice(None), slice(1, 3)),
    "corner": (slice(3, 5), slice(5, 7), slice(2, 3)),
    "empty": (slice(2, 2), slice(None), slice(None)),
}


@pytest.mark.parametrize("block", list(BLOCKS))
def test_a_block_gets_the_whole_tensors_mask_and_gradient(block) -> None:
    whole = torch.rand(5, 7, 3, dtype=torch.float64) + 0.5
    g = randn((5, 7, 3), dtype=torch.float64)
    seed = torch.tensor(SEED, dtype=torch.int64)
    expected = ops.philox_dropout(whole, 0.3, seed, 0)
    index = BLOCKS[block]
    start = [s.indices(n)[0] for s, n in zip(index, whole.shape, strict=True)]
    x = whole[index].clone().requires_grad_()
    y = ops.philox_dropout_box(x, 0.3, seed, 0, list(whole.shape), start)
    y.backward(g[index])
    assert torch.equal(y, expected[index])
    assert torch.equal(x.grad, stored_mask_gradient(x, y.detach(), g[index], 0.3))


def test_a_block_must_fit_its_tensor() -> None:
    seed = torch.tensor(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"block of shape \(3, 2\) must fit in"):
        ops.philox_dropout_box(torch.ones(3, 2), 0.5, seed, 0, [4, 4], [2, 0])

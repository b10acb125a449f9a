"""The NumPy Philox4x32-10 that every backend is checked against, against Random123's
known-answer vectors, and its keep mask against the CLT."""

import math

import numpy as np
import pytest

from optiscope.kernels import philox

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF,) * 4,
        (0xFFFFFFFF,) * 2,
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_known_answer_vectors(counter, key, expected) -> None:
    out = philox.philox4x32(np.array([counter], dtype=np.uint32), key)
    assert tuple(int(x) for x in out[0]) == expected


def test_stream_layout_is_four_words_per_counter() -> None:
    words = philox.random_words(10, seed=(7 << 32) | 3, offset=(5 << 32) | 9)
    block2 = philox.philox4x32(np.array([[2, 0, 9, 5]], dtype=np.uint32), (3, 7))[0]
    assert np.array_equal(words[8:10], block2[:2])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_4_sigma(p) -> None:
    """Kept count ~ Binomial(n, 1-p): the rate's sigma is sqrt(p(1-p)/n)."""
    n = 1_000_000
    rate = philox.keep_mask(n, p, seed=2024).mean()
    assert abs(rate - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n)


def test_threshold_edges() -> None:
    assert philox.threshold(0.0) == 0
    assert philox.threshold(0.5) == 2**31
    assert philox.threshold(np.nextafter(1.0, 0.0)) == 2**32 - 1


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_cpu_kernel_generator_gives_the_known_answers(counter, key, expected) -> None:
    """The numba generator behind the CPU dropout and stochastic rounding, on
    Random123's vectors too."""
    from optiscope.kernels.cpu import philox_words

    words = philox_words.philox4x32_10(*(np.uint64(x) for x in (*counter, *key)))
    assert tuple(int(w) for w in words) == expected

"""Dropout under every autograd mode, against the stored-mask formula.

A dropout that stored its mask ``d`` would compute ``y = γ·d∘h`` and pass
``γ·d∘g`` back and ``γ·d∘t`` forward. Here ``d`` is recovered independently
of the kernels: the seed is the generator's next ``randint(2^63 - 1)``, and
``d = philox.keep_mask(numel, p, seed)`` in row-major order (the NumPy
reference), so each test checks the transform and the mask at once.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.func
from configs import DTYPES, randn

from optiscope.functional import dropout
from optiscope.kernels import philox

# torch's forward-mode AD scripts its decompositions on first use, and
# torch.jit.script warns that it is deprecated: torch's warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

P = 0.4
GAMMA = 1.0 / (1.0 - P)
STATE = 2024  # the generator's seed; the Philox seed is drawn from it


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(STATE)


def philox_seeds(count: int) -> list[int]:
    """The Philox seeds ``count`` dropout calls (or vmapped samples) draw from
    :func:`gen`: its next ``count`` draws of ``randint(2^63 - 1)``."""
    return torch.randint(2**63 - 1, (count,), generator=gen()).tolist()


def gamma_d(shape: tuple[int, ...], seed: int, dtype=torch.float64) -> torch.Tensor:
    """``γ·d`` of a tensor of ``shape`` from the NumPy Philox reference."""
    numel = int(torch.Size(shape).numel())
    keep = torch.from_numpy(philox.keep_mask(numel, P, seed)).reshape(shape)
    return keep.to(dtype) * GAMMA


def f(h: torch.Tensor) -> torch.Tensor:
    return dropout(h, P, generator=gen())


def test_the_seed_is_the_generators_next_draw() -> None:
    """The premise of every test below, checked on the output itself."""
    (seed,) = philox_seeds(1)
    h = randn((50,), dtype=torch.float64) + 5.0  # no zeros: y == 0 means dropped
    assert torch.equal(f(h), gamma_d((50,), seed) * h)


def test_grad_is_gamma_d_times_the_weights() -> None:
    h, w = randn((7, 9), dtype=torch.float64), randn((7, 9), dtype=torch.float64)
    (seed,) = philox_seeds(1)
    grad = torch.func.grad(lambda x: (f(x) * w).sum())(h)
    assert torch.equal(grad, gamma_d((7, 9), seed) * w)


def test_vjp_returns_the_primal_and_gamma_d_times_the_cotangent() -> None:
    h, v = randn((5, 6), dtype=torch.float64), randn((5, 6), dtype=torch.float64)
    (seed,) = philox_seeds(1)
    y, vjp_fn = torch.func.vjp(f, h)
    (grad,) = vjp_fn(v)
    assert torch.equal(y, gamma_d((5, 6), seed) * h)
    assert torch.equal(grad, gamma_d((5, 6), seed) * v)


def test_jacrev_is_the_diagonal_gamma_d() -> None:
    h = randn((12,), dtype=torch.float64)
    (seed,) = philox_seeds(1)
    jacobian = torch.func.jacrev(f)(h)
    assert torch.equal(jacobian, torch.diag(gamma_d((12,), seed)))


def test_jvp_tangent_uses_the_primals_mask() -> None:
    h, t = randn((4, 8), dtype=torch.float64), randn((4, 8), dtype=torch.float64)
    (seed,) = philox_seeds(1)
    y, y_t = torch.func.jvp(f, (h,), (t,))
    assert torch.equal(y, gamma_d((4, 8), seed) * h)
    assert torch.equal(y_t, gamma_d((4, 8), seed) * t)


def test_jacfwd_with_one_mask_for_all_columns_is_the_diagonal() -> None:
    """jacfwd vmaps over tangents: randomness="same" keeps one mask for every
    column, as torch.nn.functional.dropout needs too."""
    h = randn((10,), dtype=torch.float64)
    (seed,) = philox_seeds(1)
    jacobian = torch.func.jacfwd(f, randomness="same")(h)
    assert torch.equal(jacobian, torch.diag(gamma_d((10,), seed)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_ad_dual_tensor(dtype) -> None:
    h, t = randn((3, 5), dtype=dtype), randn((3, 5), dtype=dtype)
    (seed,) = philox_seeds(1)
    with fwAD.dual_level():
        y = f(fwAD.make_dual(h, t))
        primal, tangent = fwAD.unpack_dual(y)
    # γ rounded to the compute dtype, as y = x * γ rounds it in torch.
    expected = gamma_d((3, 5), seed, dtype=torch.float64) != 0
    assert torch.equal(primal, torch.where(expected, h * GAMMA, 0.0))
    assert torch.equal(tangent, torch.where(expected, t * GAMMA, 0.0))


def test_vmap_different_gives_each_sample_its_own_seed() -> None:
    batch, shape = 6, (3, 7)
    h = randn((batch, *shape), dtype=torch.float64)
    y = torch.func.vmap(f, randomness="different")(h)
    seeds = philox_seeds(batch)
    assert len(set(seeds)) == batch
    for b, seed in enumerate(seeds):
        assert torch.equal(y[b], gamma_d(shape, seed) * h[b])


def test_vmap_same_gives_every_sample_one_mask() -> None:
    batch, shape = 5, (4, 6)
    h = randn((batch, *shape), dtype=torch.float64)
    y = torch.func.vmap(f, randomness="same")(h)
    (seed,) = philox_seeds(1)
    assert torch.equal(y, gamma_d(shape, seed) * h)


def test_vmap_different_masks_unbatched_input_per_sample() -> None:
    """An input from outside vmap still gets one mask per sample."""
    h = randn((9,), dtype=torch.float64)
    y = torch.func.vmap(lambda _: f(h), randomness="different")(torch.zeros(3))
    for b, seed in enumerate(philox_seeds(3)):
        assert torch.equal(y[b], gamma_d((9,), seed) * h)


def test_vmap_error_raises_as_torch_dropout_does() -> None:
    h = randn((3, 4))
    message = "called random operation while in randomness error mode"
    with pytest.raises(RuntimeError, match=message):
        torch.func.vmap(lambda x: torch.nn.functional.dropout(x, P))(h)
    with pytest.raises(RuntimeError, match=message):
        torch.func.vmap(f)(h)
    # No randomness, no error: eval mode and p = 0 are the identity.
    assert torch.equal(torch.func.vmap(lambda x: dropout(x, P, training=False))(h), h)


def test_per_sample_gradients_vmap_of_grad() -> None:
    batch = 4
    h, w = randn((batch, 8), dtype=torch.float64), randn((8,), dtype=torch.float64)
    grads = torch.func.vmap(
        torch.func.grad(lambda x: (f(x) * w).sum()), randomness="different"
    )(h)
    for b, seed in enumerate(philox_seeds(batch)):
        assert torch.equal(grads[b], gamma_d((8,), seed) * w)


def test_grad_of_vmap() -> None:
    batch = 3
    h, w = (
        randn((batch, 5), dtype=torch.float64),
        randn((batch, 5), dtype=torch.float64),
    )
    grad = torch.func.grad(
        lambda x: (torch.func.vmap(f, randomness="different")(x) * w).sum()
    )(h)
    expected = torch.stack([gamma_d((5,), s) for s in philox_seeds(batch)]) * w
    assert torch.equal(grad, expected)


def test_double_backward_with_create_graph() -> None:
    """L = Σ y², y = γ·d∘h: ∂L/∂h = 2γ²·d∘h, and ∂(Σ ∂L/∂h)/∂h = 2γ²·d."""
    h = randn((6, 5), dtype=torch.float64).requires_grad_()
    (seed,) = philox_seeds(1)
    gd = gamma_d((6, 5), seed)
    y = f(h)
    (grad,) = torch.autograd.grad(y.square().sum(), h, create_graph=True)
    assert torch.allclose(grad, 2 * gd * gd * h, rtol=1e-15, atol=0)
    (second,) = torch.autograd.grad(grad.sum(), h)
    assert torch.allclose(second, 2 * gd * gd, rtol=1e-15, atol=0)


def test_gradient_of_the_backward_with_respect_to_the_cotangent() -> None:
    """The vjp γ·d∘v is linear in v: its gradient with respect to v is γ·d."""
    h = randn((10,), dtype=torch.float64).requires_grad_()
    v = randn((10,), dtype=torch.float64).requires_grad_()
    (seed,) = philox_seeds(1)
    (grad,) = torch.autograd.grad(f(h), h, v, create_graph=True)
    (dv,) = torch.autograd.grad(grad.sum(), v)
    assert torch.equal(dv, gamma_d((10,), seed))


def test_torch_autograd_gradcheck_and_gradgradcheck() -> None:
    """Numerical derivatives, with the generator reset before every call."""
    h = randn((3, 4), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(f, (h,))
    assert torch.autograd.gradgradcheck(f, (h,))
    assert torch.autograd.gradcheck(
        f, (h,), check_forward_ad=True, check_batched_grad=True
    )


def test_inplace_under_torch_func_grad() -> None:
    h, w = randn((4, 4), dtype=torch.float64), randn((4, 4), dtype=torch.float64)
    (seed,) = philox_seeds(1)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (dropout(x * 1.0, P, inplace=True, generator=gen()) * w).sum()

    assert torch.equal(torch.func.grad(loss)(h), gamma_d((4, 4), seed) * w)


def test_inplace_forward_ad_updates_primal_and_tangent() -> None:
    h, t = randn((2, 9), dtype=torch.float64), randn((2, 9), dtype=torch.float64)
    (seed,) = philox_seeds(1)
    with fwAD.dual_level():
        dual = fwAD.make_dual(h.clone(), t.clone())
        y = dropout(dual, P, inplace=True, generator=gen())
        primal, tangent = fwAD.unpack_dual(y)
    assert y is dual
    assert torch.equal(primal, gamma_d((2, 9), seed) * h)
    assert torch.equal(tangent, gamma_d((2, 9), seed) * t)

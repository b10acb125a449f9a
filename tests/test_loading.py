"""The first steps of a process: the NumPy twin is bitwise the CPU Adam kernel, a
fresh process steps through it while the kernels load, and numba's disk cache
works from a read-only install and under two processes compiling at once.

The fresh-process tests start Python with torch (about 2 s each) and compile
the plain float32 Adam kernel where the cache is empty (a few seconds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from configs import adam_hyper, config

import optiscope
from optiscope.kernels import cpu, loading, numpy_twin
from optiscope.kernels.records import AdamBatch, AdamHyper, MomentumBatch, MomentumHyper
from optiscope.rules import bias_corrections

SRC = Path(optiscope.__file__).resolve().parents[1]

#: Values that take every branch of the update: specials, huge, tiny, subnormal.
SPECIAL = [np.nan, np.inf, -np.inf, 1e20, -3e19, 0.0, -0.0, 1.0, -1e-3, 1e-40, 3e-45]

OPTIONS = {
    "adam": {},
    "adamw": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "l2-maximize": dict(weight_decay=0.1, maximize=True),
    "amsgrad": dict(amsgrad=True, beta2=0.9),
    "eps-0-no-correction": dict(eps=0.0, bias_correction=False),
    "beta1-below-half": dict(beta1=0.3),  # lerp's other branch
}


def hyper(**options) -> AdamHyper:
    """Plain Adam at lr 1e-2, with ``options`` changed."""
    plain = {"lr": 1e-2, "weight_decay": 0.0, **options}
    return adam_hyper(config("adam"))._replace(**plain)


def rows(dtype: torch.dtype, amsgrad: bool, seed: int) -> list[list[torch.Tensor]]:
    """Two rows (θ, g, m, v[, v_max]) of random values with the specials mixed in."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in (200_003, 37):  # several chunks, and a tail
        row = [
            torch.randn(n, generator=gen, dtype=dtype) * 10.0 ** (k - 2)
            for k in range(5)
        ]
        row[1][: len(SPECIAL)] = torch.tensor(SPECIAL, dtype=dtype)
        row[3].abs_()
        row[4].abs_()
        out.append(row if amsgrad else row[:4])
    return out


def columns_of(row_list: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [list(c) for c in zip(*row_list, strict=True)]


def step(backend, row_list, h: AdamHyper, t: int) -> None:
    cols = columns_of(row_list)
    vmax = cols[4] if h.amsgrad else None
    c = bias_corrections(h.beta1, h.beta2, t, h.bias_correction)
    batch = AdamBatch(*cols[:4], vmax, [c] * len(row_list))
    if backend is cpu:
        cpu.adam_(batch, h, None)
    else:
        numpy_twin.adam_(batch, h)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every bit equal, except that a NaN may be any NaN."""
    both_nan = a.isnan() & b.isnan()
    ints = torch.int64 if a.dtype == torch.float64 else torch.int32
    return bool(((a.view(ints) == b.view(ints)) | both_nan).all())


@pytest.mark.parametrize("dtype", numpy_twin.DTYPES)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_numpy_twin_takes_the_kernels_steps_bit_for_bit(name, dtype) -> None:
    h = hyper(**OPTIONS[name])
    kernel_rows = rows(dtype, h.amsgrad, seed=len(name))
    twin_rows = [[t.clone() for t in row] for row in kernel_rows]
    for t in range(1, 4):
        step(cpu, kernel_rows, h, t)
        step(numpy_twin, twin_rows, h, t)
        for a_row, b_row in zip(kernel_rows, twin_rows, strict=True):
            for a, b in zip(a_row, b_row, strict=True):
                assert same_bits(a, b), (name, t)


MOMENTUM = {
    "momentum": MomentumHyper(0.05, 0.9, 0.0, False),
    "sgd": MomentumHyper(0.05, 0.0, 0.0, False),
    "l2-maximize": MomentumHyper(0.03, 0.5, 0.1, True),
}


@pytest.mark.parametrize("dtype", numpy_twin.DTYPES)
@pytest.mark.parametrize("name", list(MOMENTUM))
def test_numpy_twin_takes_the_momentum_kernels_steps_bit_for_bit(name, dtype) -> None:
    h = MOMENTUM[name]
    kernel_rows = [row[:3] for row in rows(dtype, False, seed=len(name))]
    twin_rows = [[t.clone() for t in row] for row in kernel_rows]
    for t in range(3):
        cpu.momentum_(MomentumBatch(*columns_of(kernel_rows)), h, None)
        numpy_twin.momentum_(MomentumBatch(*columns_of(twin_rows)), h)
        for a_row, b_row in zip(kernel_rows, twin_rows, strict=True):
            for a, b in zip(a_row, b_row, strict=True):
                assert same_bits(a, b), (name, t)


def test_the_twin_takes_one_float_dtype_only() -> None:
    def columns(*dtypes):
        return [[torch.zeros(2, dtype=d)] for d in dtypes]

    assert numpy_twin.takes(columns(*[torch.float32] * 4))
    assert numpy_twin.takes(columns(*[torch.float64] * 3))
    assert not numpy_twin.takes(columns(*[torch.bfloat16] * 4))
    mixed = [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    assert not numpy_twin.takes(columns(*mixed))


def test_the_twin_takes_no_step_larger_than_its_limit() -> None:
    """Beyond it, waiting for the kernel is sooner (no memory: expanded views)."""
    one = torch.zeros(1)
    at_limit = [[one.expand(numpy_twin.MAX_ELEMENTS - 1), one]] * 4
    assert numpy_twin.takes(at_limit)
    assert not numpy_twin.takes([[*row, one] for row in at_limit])


def spy(monkeypatch, name: str) -> list[int]:
    """Count the calls of ``numpy_twin.<name>`` (which still runs)."""
    calls: list[int] = []
    real = getattr(numpy_twin, name)
    monkeypatch.setattr(numpy_twin, name, lambda *a: calls.append(1) or real(*a))
    return calls


def one_step(cls, dtype=torch.float32, shape=(3,), **options) -> None:
    p = torch.nn.Parameter(torch.ones(shape, dtype=dtype))
    p.grad = torch.full_like(p, 0.5)
    cls([p], **options).step()


def test_plain_steps_take_the_twin_while_the_kernels_load(monkeypatch) -> None:
    """And every other step waits for the load (here: the thread ends first)."""
    release = threading.Event()
    load = threading.Thread(target=release.wait)
    load.start()
    monkeypatch.setattr(loading, "_ready", None)
    monkeypatch.setattr(loading, "_thread", load)
    adam, momentum = spy(monkeypatch, "adam_"), spy(monkeypatch, "momentum_")
    try:
        one_step(optiscope.Adam)
        one_step(optiscope.AdamW, torch.float64)
        one_step(optiscope.Adam, shape=())
        one_step(optiscope.Momentum)
        assert (len(adam), len(momentum)) == (3, 1)
    finally:
        release.set()
    one_step(optiscope.Adam, torch.bfloat16)  # waits, then imports here
    assert loading.ready() is cpu and len(adam) == 3


def test_after_a_failed_load_steps_take_the_kernels(monkeypatch) -> None:
    """A load that failed on its thread is retried by the next step, in its
    own thread, which gets any error: no step falls back for ever."""
    failed = threading.Thread(target=lambda: None)
    failed.start()
    failed.join()
    monkeypatch.setattr(loading, "_ready", None)
    monkeypatch.setattr(loading, "_thread", failed)
    adam = spy(monkeypatch, "adam_")
    one_step(optiscope.Adam)
    assert not adam and loading.ready() is cpu


TESTS = Path(__file__).resolve().parent


def python(script: str, src: Path = SRC, **env: str) -> subprocess.Popen:
    """``script`` in a fresh Python that imports optiscope from ``src`` and this
    module from ``tests/``; ``env`` overrides, an empty value unsets."""
    merged = {**os.environ, "PYTHONPATH": str(src), **env}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={k: v for k, v in merged.items() if v},
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return out, err


FIRST_STEPS = """
    import torch, optiscope
    from optiscope.kernels import loading, numpy_twin

    twin_calls = []
    adam_ = numpy_twin.adam_
    numpy_twin.adam_ = lambda *a: twin_calls.append(1) or adam_(*a)
    torch.manual_seed(0)
    models = [torch.nn.Linear(64, 32) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(8, 64)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    opt = optiscope.Adam(models[0].parameters(), lr=1e-2)
    train(models[0], opt, 1)
    first_through_twin = twin_calls == [1]
    steps = 1
    while loading.ready() is None:
        train(models[0], opt, 1)
        steps += 1
    train(models[0], opt, 3)  # through the kernel
    through_twin = len(twin_calls)
    numpy_twin.adam_ = None  # the kernel only, from here
    train(models[1], optiscope.Adam(models[1].parameters(), lr=1e-2), steps + 3)
    same = all(torch.equal(a, b) for a, b in
               zip(models[0].parameters(), models[1].parameters()))
    print(first_through_twin, through_twin, steps, same)
"""


def test_a_fresh_process_steps_through_the_twin_until_the_kernel_is_ready() -> None:
    """The first step does not wait for numba; the run is the kernel-only run."""
    out, _ = finish(python(FIRST_STEPS))
    first_through_twin, through_twin, steps, same = out.split()
    assert first_through_twin == "True"
    # The last twin step may be the one during which the kernel became ready.
    assert int(steps) - 1 <= int(through_twin) <= int(steps)
    assert same == "True"


KERNEL_STEP = """
    import torch
    from optiscope.kernels import cpu, loading, numpy_twin
    from optiscope.kernels.cpu.adam import adam_kernel
    from test_loading import hyper, rows, same_bits, step

    loading.backend()  # the kernel, not the twin, in this process
    h = hyper()
    kernel_rows = rows(torch.float32, False, seed=1)
    twin_rows = [[t.clone() for t in row] for row in kernel_rows]
    step(cpu, kernel_rows, h, 1)
    step(numpy_twin, twin_rows, h, 1)
    same = all(same_bits(a, b) for r, s in zip(kernel_rows, twin_rows)
               for a, b in zip(r, s))
    locator = adam_kernel._cache._impl.locator
    print(same, adam_kernel.stats.cache_hits.total(),
          getattr(locator, "optiscope", False), type(locator._inner).__name__)
"""


COMPILING = "optiscope: compiling its numba CPU kernels"


def test_two_cold_processes_compile_at_once_and_a_third_is_warm(tmp_path) -> None:
    cache = str(tmp_path / "cache")
    both = [python(KERNEL_STEP, NUMBA_CACHE_DIR=cache) for _ in range(2)]
    for process in both:
        out, err = finish(process)
        same, _, ours, _ = out.split()
        assert same == "True" and ours == "True"
        assert err.count(COMPILING) == 1  # announced, in one line
    out, err = finish(python(KERNEL_STEP, NUMBA_CACHE_DIR=cache))
    same, hits, _, _ = out.split()
    assert same == "True" and int(hits) >= 1
    assert COMPILING not in err


def _freeze(path: Path, frozen: bool) -> bool:
    """Make ``path`` a directory nobody may write to (root included: the
    immutable attribute); False where this machine cannot."""
    if os.geteuid() != 0:
        path.chmod(0o555 if frozen else 0o755)
        return True
    flag = "+i" if frozen else "-i"
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True)
    return done.returncode == 0


def test_a_read_only_install_caches_in_the_user_cache_and_is_warm_next_time(
    tmp_path,
) -> None:
    """numba falls back from the package's __pycache__ to the user-wide cache;
    our locator still wraps it (the package-wide stamp), and it is reused."""
    site = tmp_path / "site"
    shutil.copytree(
        SRC / "optiscope", site / "optiscope", ignore=shutil.ignore_patterns("*.nb*")
    )
    pycache = site / "optiscope" / "kernels" / "cpu" / "__pycache__"
    pycache.mkdir(exist_ok=True)
    user_cache = tmp_path / "user-cache"
    if not _freeze(pycache, True):
        pytest.skip("cannot make a directory read-only here (root without chattr)")
    try:
        env = dict(NUMBA_CACHE_DIR="", XDG_CACHE_HOME=str(user_cache))
        first = finish(python(KERNEL_STEP, site, **env))
        second = finish(python(KERNEL_STEP, site, **env))
    finally:
        _freeze(pycache, False)
    (out, err), (out2, err2) = first, second
    same, _, ours, inner = out.split()
    assert (
        same == "True"
        and ours == "True"
        and inner.lstrip("_") == "UserWideCacheLocator"
    )
    assert COMPILING in err
    assert not list(pycache.glob("*.nb*"))
    assert list((user_cache / "numba").rglob("*.nbi"))
    same, hits, _, _ = out2.split()
    assert same == "True" and int(hits) >= 1 and COMPILING not in err2

"""The CPU kernels' threads: torch's own OpenMP team, or a pool of ours where
that team can't be reached; the same results either way."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import optiscope
from optiscope.kernels.cpu import threads

OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _names_of_workers() -> set[str]:
    """The threads that ran a 4-chunk job, as Python names them."""
    names: set[str] = set()
    ready = threading.Barrier(2, timeout=10)

    def kernel(chunks: threads.Chunks) -> None:
        names.add(threading.current_thread().name)
        ready.wait()  # both threads in the job at once, so each is counted

    threads.run(kernel, threads.chunk_table(np.array([4 * threads.CHUNK], np.int64)))
    return names


@pytest.mark.skipif(not OPENMP, reason="torch is built without OpenMP")
def test_the_work_runs_on_torchs_openmp_team(two_threads) -> None:
    assert threads.openmp_team() is not None
    names = _names_of_workers()
    # The caller, and a thread Python didn't start: one of OpenMP's.
    assert len(names) == 2 and threading.current_thread().name in names
    assert not any(name.startswith("optiscope") for name in names)


def test_without_the_team_a_pool_of_ours_runs_it(two_threads, monkeypatch) -> None:
    monkeypatch.setattr(threads, "openmp_team", lambda: None)
    names = _names_of_workers()
    assert len(names) == 2 and any(name.startswith("optiscope") for name in names)


@pytest.mark.parametrize("team", [True, False], ids=["openmp", "pool"])
def test_an_error_on_a_worker_reaches_the_caller(
    two_threads, monkeypatch, team
) -> None:
    if not team:
        monkeypatch.setattr(threads, "openmp_team", lambda: None)
    elif not OPENMP:
        pytest.skip("torch is built without OpenMP")
    caller = threading.current_thread()

    def kernel(chunks: threads.Chunks) -> None:
        if threading.current_thread() is not caller:
            raise ValueError("raised on a worker")

    with pytest.raises(ValueError, match="raised on a worker"):
        threads.run(
            kernel, threads.chunk_table(np.array([4 * threads.CHUNK], np.int64))
        )
    assert not threads._jobs  # nothing left behind for the next call


def test_team_and_pool_give_bitwise_the_same_step(two_threads, monkeypatch) -> None:
    def train(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (300_001, 70_000, 5)]
        opt = optiscope.Adam(params, lr=1e-2)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return params + [opt.state[p]["exp_avg_sq"] for p in params]

    team = train(0)
    monkeypatch.setattr(threads, "openmp_team", lambda: None)
    pool = train(0)
    torch.set_num_threads(1)
    alone = train(0)
    for a, b, c in zip(team, pool, alone, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_step_from_another_python_thread(two_threads) -> None:
    """A thread other than the one torch's ops ran on gets a team of its own
    from the runtime (or the pool): the same step, bitwise."""

    def train(results: list) -> None:
        torch.manual_seed(1)
        p = torch.nn.Parameter(torch.randn(300_001))
        opt = optiscope.Momentum([p], lr=0.1)
        for _ in range(2):
            p.grad = torch.randn_like(p)
            opt.step()
        results.append(p.detach().clone())

    here: list[torch.Tensor] = []
    there: list[torch.Tensor] = []
    train(here)
    worker = threading.Thread(target=train, args=(there,))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and torch.equal(here[0], there[0])

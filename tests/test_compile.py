"""torch.compile sees each fused step as one operator: it compiles once, never
guards on the step count, and takes the same steps as eager mode."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from configs import config
from torch._dynamo.testing import CompileCounter

import optiscope

CASES = [config("adam"), config("adamw-amsgrad"), config("momentum")]


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)  # the layers' initial weights
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    )
    batches = [torch.randn(8, 6, generator=gen) for _ in range(8)]
    return model, batches


def _train(cfg, step_fn_of, *, probe: bool = False):
    model, batches = _model_and_data()
    opt = cfg.cls(model.parameters(), **cfg.options, probe=probe)
    step = step_fn_of(opt)
    for x in batches:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("probe", [False, True], ids=["plain", "probed"])
@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_step_compiles_at_most_twice_and_never_after_step_two(cfg, probe) -> None:
    """Step 1 creates the state, step 2 finds it: two frames at most; then none."""
    torch._dynamo.reset()
    counter = CompileCounter()
    frames = []

    def compiled(opt):
        fn = torch.compile(opt.step, backend=counter)

        def step():
            fn()
            frames.append(counter.frame_count)

        return step

    _, opt = _train(cfg, compiled, probe=probe)
    assert frames[1] <= 2
    assert frames[-1] == frames[1], f"recompiled after step 2: {frames}"
    if probe:
        assert opt.probes is not None and opt.probes["step"] == len(frames)


@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_fullgraph_compiles(cfg) -> None:
    torch._dynamo.reset()
    counter = CompileCounter()
    _train(cfg, lambda opt: torch.compile(opt.step, backend=counter, fullgraph=True))
    assert counter.frame_count == 2


# Inductor's own import of torch.jit warns; that is torch's, not ours.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("cfg", CASES, ids=str)
def test_compiled_steps_equal_eager_steps_bitwise(cfg, backend) -> None:
    """Functionalization and re-inplacing keep the operator's writes."""
    torch._dynamo.reset()
    eager, _ = _train(cfg, lambda opt: opt.step)
    compiled, _ = _train(cfg, lambda opt: torch.compile(opt.step, backend=backend))
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


def test_first_ever_step_under_dynamo_in_a_fresh_process() -> None:
    """The kernels are first loaded inside a compiled step, in a new process."""
    code = (
        "import torch, optiscope\n"
        "m = torch.nn.Linear(4, 3)\n"
        "opt = optiscope.Adam(m.parameters(), lr=0.1)\n"
        "step = torch.compile(opt.step, fullgraph=True)\n"
        "before = m.weight.detach().clone()\n"
        "for _ in range(3):\n"
        "    m(torch.ones(2, 4)).sum().backward(); step()\n"
        "assert not torch.equal(before, m.weight), 'no step taken'\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_operators_are_registered_with_their_mutations() -> None:
    schema = str(torch.ops.optiscope.adam_.default._schema)
    for written in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
        assert f"!)[] {written}" in schema
    assert "Tensor[] grads" in schema  # read only
    schema = str(torch.ops.optiscope.momentum_.default._schema)
    assert "!)[] params" in schema and "!)[] momentum_buffers" in schema


def test_optimizer_steps_under_fake_tensors_use_the_fake_implementation() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p = torch.nn.Parameter(torch.randn(3, 2))
        p.grad = torch.randn(3, 2)
        opt = optiscope.Adam([p])
        opt.step()
        opt.step()
        state = opt.state[p]
    assert isinstance(state["exp_avg"], torch._subclasses.fake_tensor.FakeTensor)
    assert isinstance(state["step"], torch._subclasses.fake_tensor.FakeTensor)

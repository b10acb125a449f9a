"""optiscope on two gloo processes: FSDP2 (``fully_shard``), tensor parallelism,
DCP, DDP, ZeroRedundancyOptimizer and Dropout on DTensor activations, each
against torch.optim (or unsharded optiscope) in the same setup.

Starting two Python processes that import torch costs more than all the checks
together, so one spawn runs every check: :func:`_worker` measures and writes
its numbers to one JSON file per rank after each check, and the tests below
hold them to the tolerances. A check that raises fails only its own test; a
process that dies (the SIGSEGV that FSDP2 used to cause) fails the check it
was in and every check after it, with the exit status.

Parity is ``max |θ − θ_ref|`` over every parameter element (``max_abs``) and
that over ``max |θ_ref|`` (``max_rel``), after :data:`STEPS` steps of a small
MLP whose layers shard unevenly: dim 0 of sizes 16, 5 and 1 over 2 ranks gives
shards of 8/8, 3/2 and 1/0 elements, so rank 1 holds an empty shard of the
last layer.
"""

from __future__ import annotations

import copy
import json
import math
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from configs import config
from torch import nn

import optiscope

WORLD = 2
STEPS = 20
#: The issue's bound for FSDP2 against torch.optim after 20 steps.
TOLERANCE = 1e-6
#: Whole-spawn limit; the spawn takes 13–30 s on the project's 2-core machine.
SPAWN_TIMEOUT_S = 240
#: Collectives give up after this (a check that fails on one rank only leaves
#: the other waiting in a collective).
COLLECTIVE_TIMEOUT = timedelta(seconds=60)

FSDP_CONFIGS = ["adam", "adamw", "momentum", "adamw-amsgrad", "momentum-l2-max"]
DCP_CONFIGS = ["adam", "adamw", "momentum"]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


# -- the model, data and measurements shared by every check ------------------------
def _mlp(seed: int = 0, out: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)  # the layers' initial weights
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, out)
    )


def _batch(step: int, rank: int, out: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 8, generator=gen), torch.randn(4, out, generator=gen)


def _train(model, opt, steps, rank: int, out: int = 1) -> None:
    for step in steps:
        x, y = _batch(step, rank, out)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def _full(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter as a whole tensor (DTensors gathered: a collective)."""
    from torch.distributed.tensor import DTensor

    return [
        p.full_tensor() if isinstance(p, DTensor) else p.detach()
        for p in model.parameters()
    ]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t.detach()


def _parity(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> dict:
    diff = max((a - b).abs().max().item() for a, b in zip(ours, ref, strict=True))
    scale = max(b.abs().max().item() for b in ref)
    bitwise = all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    return {"max_abs": diff, "max_rel": diff / scale, "bitwise": bitwise}


def _rms(t: torch.Tensor) -> float:
    t = t.detach().double()
    return math.sqrt((t * t).sum().item() / t.numel()) if t.numel() else math.nan


def _same_state(a: dict, b: dict) -> bool:
    """Two optimizer state dicts with the same keys, values and bits."""
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, dict):
            if not isinstance(other, dict) or not _same_state(value, other):
                return False
        elif isinstance(value, torch.Tensor):
            if not isinstance(other, torch.Tensor):
                return False
            x, y = _local(value), _local(other)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif value != other:
            return False
    return True


# -- checks: each runs on both ranks and returns what rank measured ---------------
def _fsdp_mlp(mesh, seed: int = 0) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _mlp(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def check_fsdp(ctx, name: str) -> dict:
    cfg = config(name)
    torch_cls, torch_options = cfg.torch_equivalent
    ours, ref = _fsdp_mlp(ctx.mesh), _fsdp_mlp(ctx.mesh)
    _train(ours, cfg.cls(ours.parameters(), **cfg.options), range(STEPS), ctx.rank)
    _train(ref, torch_cls(ref.parameters(), **torch_options), range(STEPS), ctx.rank)
    local_numels = [p.to_local().numel() for p in ours.parameters()]
    return {**_parity(_full(ours), _full(ref)), "local_numels": local_numels}


def check_fsdp_dcp(ctx, name: str) -> dict:
    """Save after 5 steps with DCP, load into a model and optimizer built from
    another seed, and continue both for 5 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    cfg = config(name)
    model = _fsdp_mlp(ctx.mesh)
    opt = cfg.cls(model.parameters(), **cfg.options)
    _train(model, opt, range(5), ctx.rank)
    saved = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt),
    }
    checkpoint = ctx.out / f"dcp-fsdp-{name}"
    dcp.save(saved, checkpoint_id=checkpoint)

    resumed = _fsdp_mlp(ctx.mesh, seed=1)
    resumed_opt = cfg.cls(resumed.parameters(), **cfg.options)
    # get_optimizer_state_dict of a fresh optimizer makes its state with a
    # zero-gradient step at lr=0; the load then overwrites it.
    target = {
        "model": get_model_state_dict(resumed),
        "optim": get_optimizer_state_dict(resumed, resumed_opt),
    }
    dcp.load(target, checkpoint_id=checkpoint)
    set_model_state_dict(resumed, target["model"])
    set_optimizer_state_dict(resumed, resumed_opt, target["optim"])
    round_trip = _same_state(
        get_optimizer_state_dict(resumed, resumed_opt),
        get_optimizer_state_dict(model, opt),
    )
    state_keys = sorted(next(iter(saved["optim"]["state"].values())))

    _train(model, opt, range(5, 10), ctx.rank)
    _train(resumed, resumed_opt, range(5, 10), ctx.rank)
    locals_equal = all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(model.parameters(), resumed.parameters(), strict=True)
    )
    states_equal = _same_state(opt.state_dict(), resumed_opt.state_dict())
    return {
        "state_round_trip_bitwise": round_trip,
        "resume_params_bitwise": locals_equal,
        "resume_state_bitwise": states_equal,
        **_parity(_full(model), _full(resumed)),
        "state_keys": state_keys,
    }


def check_fsdp_probes(ctx) -> dict:
    """What ``optimizer.probes`` reports on each rank, next to the same numbers
    computed from the rank's shard and from the whole parameter."""
    out = {}
    for name in ("adam", "momentum"):
        cfg = config(name)
        model = _fsdp_mlp(ctx.mesh)
        opt = cfg.cls(model.named_parameters(), **cfg.options, probe=True)
        _train(model, opt, range(3), ctx.rank)
        record = opt.probes
        params = {}
        for pname, p in model.named_parameters():
            probed = record["params"][pname]
            params[pname] = {
                "local_numel": p.to_local().numel(),
                "full_numel": p.numel(),
                "probe_grad_rms": probed["grad_rms"],
                "probe_param_rms": probed["param_rms"],
                "probe_update_to_weight": probed["update_to_weight"],
                "shard_grad_rms": _rms(p.grad.to_local()),
                "shard_param_rms": _rms(p.to_local()),
                "full_grad_rms": _rms(p.grad.full_tensor()),
                "full_param_rms": _rms(p.full_tensor()),
            }
        group = record["groups"][0]
        out[name] = {
            "params": params,
            "group_grad_rms": group["grad_rms"],
            "shard_group_grad_rms": _rms(
                torch.cat([p.grad.to_local().flatten() for p in model.parameters()])
            ),
        }
    return out


def check_tensor_parallel(ctx, name: str) -> dict:
    """Colwise then rowwise Linear (Megatron-style): Shard(0), Shard(1) and
    Replicate parameters; every rank sees the same batch."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        return parallelize_module(model, ctx.mesh, plan)

    cfg = config(name)
    torch_cls, torch_options = cfg.torch_equivalent
    ours, ref = build(), build()
    opts = cfg.cls(ours.parameters(), **cfg.options)
    _train(ours, opts, range(STEPS), rank=0, out=3)
    _train(ref, torch_cls(ref.parameters(), **torch_options), range(STEPS), 0, 3)
    placements = sorted({str(p.placements[0]) for p in ours.parameters()})
    return {**_parity(_full(ours), _full(ref)), "placements": placements}


def check_ddp(ctx, name: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = config(name)
    torch_cls, torch_options = cfg.torch_equivalent
    ours, ref = DDP(_mlp()), DDP(_mlp())
    _train(ours, cfg.cls(ours.parameters(), **cfg.options), range(STEPS), ctx.rank)
    _train(ref, torch_cls(ref.parameters(), **torch_options), range(STEPS), ctx.rank)
    return _parity(_full(ours), _full(ref))


def check_ddp_dcp(ctx) -> dict:
    """DCP's state_dict API on a DDP model: round trip, then resume."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_mlp())
    opt = optiscope.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, range(5), ctx.rank)
    resumed = DDP(_mlp())
    resumed.load_state_dict(model.state_dict())
    resumed_opt = optiscope.Adam(resumed.parameters(), lr=1e-2)
    # A copy, as a checkpoint would be: an optimizer's load_state_dict keeps
    # the very tensors it is given (torch.optim's too), and two optimizers
    # sharing their moments would both update them.
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    set_optimizer_state_dict(resumed, resumed_opt, saved)
    round_trip = _same_state(opt.state_dict(), resumed_opt.state_dict())
    _train(model, opt, range(5, 10), ctx.rank)
    _train(resumed, resumed_opt, range(5, 10), ctx.rank)
    return {
        "state_round_trip_bitwise": round_trip,
        **_parity(_full(model), _full(resumed)),
    }


def check_zero(ctx) -> dict:
    """ZeroRedundancyOptimizer around optiscope.Adam: each rank steps its
    partition and broadcasts it; then the state consolidated on rank 0."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    runs = {}
    for label, cls in (("ours", optiscope.Adam), ("ref", torch.optim.Adam)):
        model = DDP(_mlp())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=1e-2)
        _train(model, opt, range(STEPS), ctx.rank)
        opt.consolidate_state_dict(to=0)
        state = opt.state_dict()["state"] if ctx.rank == 0 else None
        runs[label] = (model, state)
    out = _parity(_full(runs["ours"][0]), _full(runs["ref"][0]))
    if ctx.rank == 0:
        ours, ref = runs["ours"][1], runs["ref"][1]
        out["state_keys_equal"] = ours.keys() == ref.keys() and all(
            ours[k].keys() == ref[k].keys() for k in ours
        )
        out["state_max_abs"] = max(
            (ours[k][n] - ref[k][n]).abs().max().item()
            for k in ours
            for n in ("exp_avg", "exp_avg_sq")
        )
    return out


def check_dtensor_dropout(ctx) -> dict:
    """optiscope.Dropout on a DTensor activation: the mask must be that of the
    unsharded tensor from the same seed, in forward and backward. A (5, 7)
    tensor shards unevenly along both dims (3/2 rows, 4/3 columns)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(3)
    full = torch.randn(5, 7, generator=gen)
    upstream = torch.randn(5, 7, generator=gen)
    layer = optiscope.Dropout(0.5)
    x_ref = full.clone().requires_grad_()
    torch.manual_seed(7)
    y_ref = layer(x_ref)
    y_ref.backward(upstream)
    out = {}
    for placement in (Shard(0), Shard(1), Replicate()):
        x = distribute_tensor(full, ctx.mesh, [placement]).requires_grad_()
        torch.manual_seed(7)  # the same seed on every rank, as for unsharded dropout
        y = layer(x)
        y.backward(distribute_tensor(upstream, ctx.mesh, [placement]))
        out[str(placement)] = {
            "placement_kept": list(map(str, y.placements)) == [str(placement)],
            "output_equal": torch.equal(y.full_tensor(), y_ref.detach()),
            "grad_equal": torch.equal(x.grad.full_tensor(), x_ref.grad),
        }
    return out


CHECKS = [
    *((f"fsdp:{n}", check_fsdp, (n,)) for n in FSDP_CONFIGS),
    *((f"fsdp-dcp:{n}", check_fsdp_dcp, (n,)) for n in DCP_CONFIGS),
    ("fsdp-probes", check_fsdp_probes, ()),
    *((f"tp:{n}", check_tensor_parallel, (n,)) for n in ("adam", "momentum")),
    *((f"ddp:{n}", check_ddp, (n,)) for n in ("adam", "adamw", "momentum")),
    ("ddp-dcp", check_ddp_dcp, ()),
    ("zero", check_zero, ()),
    ("dtensor-dropout", check_dtensor_dropout, ()),
]


class _Context:
    def __init__(self, rank: int, out: Path) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.out = rank, out
        self.mesh = init_device_mesh("cpu", (WORLD,))


def _worker(rank: int, out_dir: str) -> None:
    out = Path(out_dir)
    torch.set_num_threads(1)  # two processes on two cores
    store = dist.FileStore(str(out / "store"), WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT
    )
    ctx = _Context(rank, out)
    results: dict[str, dict] = {}
    path = out / f"rank{rank}.json"
    for name, check, args in CHECKS:
        results[name] = {"status": "started"}
        path.write_text(json.dumps(results))
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                results[name] = {"status": "ok", "value": check(ctx, *args)}
            except Exception:
                results[name] = {"status": "error", "error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
        results[name]["warnings"] = sorted(
            {f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught}
        )
        path.write_text(json.dumps(results))
    # Both ranks done before either tears gloo down: a rank that destroys its
    # group while the other still talks to it aborts the process.
    dist.barrier()
    dist.destroy_process_group()


# -- the tests -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Spawn the two ranks once; each test reads its check's results."""
    out = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _worker, args=(str(out),), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    crash = None
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                crash = f"the ranks ran past {SPAWN_TIMEOUT_S} s"
                break
    except mp.ProcessExitedException as error:  # a signal or a non-zero exit
        crash = str(error)
    except mp.ProcessRaisedException as error:
        crash = str(error)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = []
    for rank in range(WORLD):
        path = out / f"rank{rank}.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else {})
    return {"ranks": ranks, "crash": crash}


def _value(runs: dict, name: str, rank: int = 0) -> dict:
    """The value ``rank``'s check ``name`` returned; fails with its error."""
    result = runs["ranks"][rank].get(name)
    if result is None or result["status"] == "started":
        where = "ran" if result else "was not reached"
        pytest.fail(f"check {name!r} {where} when the ranks stopped: {runs['crash']}")
    if result["status"] != "ok":
        pytest.fail(f"check {name!r} raised on rank {rank}:\n{result['error']}")
    own = [w for w in result["warnings"] if "optiscope" in w]
    assert not own, f"optiscope warned during {name!r}: {own}"
    return result["value"]


def _record(record_property, value: dict) -> None:
    for key in ("max_abs", "max_rel"):
        record_property(key, value[key])


@pytest.mark.parametrize("name", FSDP_CONFIGS)
def test_fsdp2_steps_match_torch_optim(runs, name, record_property) -> None:
    """fully_shard per layer and at the root; Momentum against the SGD mapping."""
    value = _value(runs, f"fsdp:{name}")
    _record(record_property, value)
    assert value["max_abs"] <= TOLERANCE, value
    # rank 1's shards of the 1-output layer (weight (1, 5), bias (1,)) are empty
    assert _value(runs, f"fsdp:{name}", rank=1)["local_numels"][-2:] == [0, 0]


@pytest.mark.parametrize("name", DCP_CONFIGS)
def test_fsdp2_dcp_round_trip_and_resume_are_bit_identical(runs, name) -> None:
    for rank in range(WORLD):
        value = _value(runs, f"fsdp-dcp:{name}", rank)
        assert value["state_round_trip_bitwise"], value
        assert value["resume_params_bitwise"], value
        assert value["resume_state_bitwise"], value
        assert value["bitwise"] and value["max_abs"] == 0.0, value
    assert value["state_keys"] == sorted(config(name).state_keys)


@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_fsdp2_probes_report_the_ranks_own_shard(runs, name) -> None:
    """Each rank's probes are sums over its local shard, not the whole parameter
    (the README says so); an empty shard reports zero RMS."""
    for rank in range(WORLD):
        value = _value(runs, "fsdp-probes", rank)[name]
        for pname, p in value["params"].items():
            if p["local_numel"] == 0:
                assert p["probe_grad_rms"] == 0.0 and p["probe_param_rms"] == 0.0
                assert p["probe_update_to_weight"] == math.inf
                continue
            # float32 sums in the kernel against float64 here
            assert p["probe_grad_rms"] == pytest.approx(p["shard_grad_rms"], rel=1e-5)
            assert p["probe_param_rms"] == pytest.approx(
                p["shard_param_rms"], rel=1e-5
            ), pname
        assert value["group_grad_rms"] == pytest.approx(
            value["shard_group_grad_rms"], rel=1e-5
        )
    # The whole parameter's RMS is the numel-weighted mean square over ranks.
    first = _value(runs, "fsdp-probes", 0)[name]["params"]
    for pname, p in first.items():
        shards = [_value(runs, "fsdp-probes", r)[name]["params"][pname] for r in (0, 1)]
        mean_square = sum(s["local_numel"] * s["probe_grad_rms"] ** 2 for s in shards)
        combined = math.sqrt(mean_square / p["full_numel"])
        assert combined == pytest.approx(p["full_grad_rms"], rel=1e-5), pname


@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_tensor_parallel_steps_match_torch_optim(runs, name, record_property) -> None:
    value = _value(runs, f"tp:{name}")
    _record(record_property, value)
    assert value["placements"] == ["R", "S(0)", "S(1)"]
    assert value["max_abs"] <= TOLERANCE, value


@pytest.mark.parametrize("name", ["adam", "adamw", "momentum"])
def test_ddp_steps_match_torch_optim(runs, name, record_property) -> None:
    value = _value(runs, f"ddp:{name}")
    _record(record_property, value)
    assert value["max_abs"] <= TOLERANCE, value


def test_ddp_dcp_state_dict_round_trip_and_resume(runs) -> None:
    for rank in range(WORLD):
        value = _value(runs, "ddp-dcp", rank)
        assert value["state_round_trip_bitwise"] and value["bitwise"], value


def test_zero_redundancy_optimizer_wraps_optiscope_adam(runs, record_property) -> None:
    value = _value(runs, "zero")
    _record(record_property, value)
    assert value["max_abs"] <= TOLERANCE, value
    assert value["state_keys_equal"], value
    assert value["state_max_abs"] <= TOLERANCE, value


def test_dropout_on_a_dtensor_masks_by_global_index(runs) -> None:
    for rank in range(WORLD):
        for placement, v in _value(runs, "dtensor-dropout", rank).items():
            assert v == {
                "placement_kept": True,
                "output_equal": True,
                "grad_equal": True,
            }, (rank, placement)

"""Copies of optimizers and probed models: ``copy.deepcopy``, ``pickle`` and
``torch.save``/``torch.load(weights_only=False)`` give objects that step bit
for bit as the original; probes travel with them (configuration and records),
open files do not (a file sink in a copy is detached until reopened)."""

from __future__ import annotations

import copy
import csv
import io
import json
import pickle
import warnings

import pytest
import torch
from configs import CONFIGS, Config, config

import optiscope
from optiscope.probes import (
    CallbackSink,
    CSVSink,
    DetachedSinkWarning,
    JSONLSink,
    TensorBoardSink,
)

HOW = ("deepcopy", "pickle", "torch.save")


@pytest.fixture
def closing():
    """``closing(x)`` closes ``x`` (a probe or sink) when the test ends: an open
    file left to the garbage collector is a ResourceWarning, an error here."""
    opened = []
    yield opened.append
    for thing in opened:
        thing.close()


def copied(obj, how: str):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def make(cfg: Config, **extra) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    return model, cfg.cls(model.named_parameters(), **cfg.options, **extra)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    """Fixed data, so two bit-identical models get bit-identical gradients."""
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def records_text(probe) -> str:
    return json.dumps(probe.history.records, allow_nan=True, sort_keys=True)


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key, entry in sa["state"].items():
        assert entry.keys() == sb["state"][key].keys()
        for name, value in entry.items():
            other = sb["state"][key][name]
            assert value.dtype == other.dtype and torch.equal(value, other), name


@pytest.mark.parametrize("probed", [False, True], ids=["plain", "probed"])
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_a_copy_steps_bit_for_bit_like_the_original(cfg, how, probed) -> None:
    model, opt = make(cfg, probe=probed)
    train(model, opt, 3)
    model2, opt2 = copied((model, opt), how)
    assert opt2.param_groups[0]["params"][0] is model2[0].weight
    train(model, opt, 4)
    train(model2, opt2, 4)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same_state(opt, opt2)
    if probed:
        assert records_text(opt._probe) == records_text(opt2._probe)
        assert len(opt2._probe.history.records) == 7
        assert json.dumps(opt2.probes, allow_nan=True) == json.dumps(
            opt.probes, allow_nan=True
        )
    else:
        assert opt2.probes is None


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", ["momentum", "adam-l2-amsgrad"])
def test_an_optimizer_copied_alone_steps_its_own_parameters(name, how) -> None:
    """Without the model, the copy holds copies of the parameters: stepping it
    leaves the model alone and matches the original's steps."""
    model, opt = make(config(name), probe=True)
    train(model, opt, 2)
    clone = copied(opt, how)
    theirs = [p for g in clone.param_groups for p in g["params"]]
    ours = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        clone.step()
    for p, q in zip(ours, theirs, strict=True):
        assert q is not p and torch.equal(p, q)
    assert clone._probe.optimizer is clone and opt._probe.optimizer is opt


@pytest.mark.parametrize("how", HOW)
def test_probe_configuration_is_kept_and_state_dict_has_no_probe(how) -> None:
    model, opt = make(config("adam"))
    optiscope.probe(opt, every=3)
    train(model, opt, 4)  # measured at calls 1 and 4
    model2, opt2 = copied((model, opt), how)
    assert opt2._probe.every == 3 and opt2._probe.calls == 4
    assert [r["step"] for r in opt2._probe.history.records] == [1, 4]
    train(model2, opt2, 3)  # measures call 7 only, as the original would
    assert [r["step"] for r in opt2._probe.history.records] == [1, 4, 7]
    assert len(opt._probe.history.records) == 2  # the original's own history
    assert set(opt2.state_dict()) == {"state", "param_groups"}
    for entry in opt2.state_dict()["state"].values():
        assert set(entry) == set(config("adam").state_keys)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_file_sink_in_a_copy_is_detached_until_reopened(tmp_path, closing, kind, how):
    path = tmp_path / f"run.{kind}"
    sink = JSONLSink(path) if kind == "jsonl" else CSVSink(path)
    closing(sink)
    model, opt = make(config("momentum"))
    optiscope.probe(opt, sinks=[sink])

    def lines() -> list[str]:
        return path.read_text().splitlines()

    train(model, opt, 2)
    written = len(lines())
    model2, opt2 = copied((model, opt), how)
    copy_sink = opt2._probe.sinks[1]
    assert copy_sink is not sink and copy_sink.detached and not sink.detached
    assert copy_sink.path == sink.path
    with pytest.warns(DetachedSinkWarning, match=r"reopen\(\)"):
        train(model2, opt2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per sink, not at every step
        train(model2, opt2, 1)
    assert len(lines()) == written  # the copy wrote nothing
    assert len(opt2._probe.history.records) == 4  # but kept its records
    train(model, opt, 1)  # the original still writes
    assert len(lines()) > written
    written = len(lines())
    opt2._probe.close()  # closing the detached copy closes nothing of the original
    train(model, opt, 1)
    assert len(lines()) > written
    closing(copy_sink.reopen())
    before = len(lines())
    train(model2, opt2, 1)
    if kind == "jsonl":
        assert json.loads(lines()[-1])["step"] == 5  # calls 3 and 4 went nowhere
    else:
        rows = list(csv.reader(lines()))
        assert sum(row[0] == "step" for row in rows) == 1  # no second header
        assert rows[-1][0] == "5"
    assert len(lines()) > before


def test_reopen_on_an_open_sink_changes_nothing(tmp_path, closing) -> None:
    sink = JSONLSink(tmp_path / "run.jsonl")
    closing(sink)
    handle = sink.handle
    assert sink.reopen() is sink and sink.handle is handle


@pytest.mark.parametrize("how", HOW)
def test_a_model_with_dropout_probed_into_a_file_copies(tmp_path, closing, how):
    path = tmp_path / "dropout.jsonl"
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        optiscope.Dropout(0.5),
        torch.nn.Linear(8, 2),
        optiscope.Dropout(0.25),
    )
    sink = JSONLSink(path)
    closing(sink)
    optiscope.probe(model, sinks=[sink])
    model(torch.ones(3, 4))
    twin = copied(model, how)
    first, second = twin[1]._probe, twin[3]._probe
    assert first.sinks[1] is second.sinks[1]  # one copied sink, shared as before
    assert len(first.history.records) == 1 and first.name == "1"
    with pytest.warns(DetachedSinkWarning):
        twin(torch.ones(3, 4))
    assert len(path.read_text().splitlines()) == 2  # the original's two layers
    assert len(first.history.records) == 2 and first.calls == 2
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q) and p is not q


def test_a_callback_sink_keeps_its_function_in_a_deep_copy() -> None:
    seen: list[int] = []

    def note(record) -> None:
        seen.append(record["step"])

    model, opt = make(config("adam"))
    optiscope.probe(opt, sinks=[CallbackSink(note)])
    train(model, opt, 1)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2._probe.sinks[1].fn is note
    train(model2, opt2, 1)
    assert seen == [1, 2]


def test_a_tensorboard_sink_in_a_copy_is_detached(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    model, opt = make(config("adam"))
    optiscope.probe(opt, sinks=[TensorBoardSink(tmp_path)])
    train(model, opt, 1)
    model2, opt2 = copied((model, opt), "pickle")
    assert opt2._probe.sinks[1].detached
    with pytest.warns(DetachedSinkWarning):
        train(model2, opt2, 1)
    opt2._probe.sinks[1].reopen()
    train(model2, opt2, 1)
    opt._probe.close()
    opt2._probe.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2


def test_a_pickle_without_a_probe_entry_loads_unprobed() -> None:
    """What torch's own __getstate__ keeps (no ``_probe``) still makes an
    optimizer that steps: the probe is off."""
    model, opt = make(config("adam"), probe=True)
    train(model, opt, 1)
    bare = optiscope.Adam.__new__(optiscope.Adam)
    bare.__setstate__(copy.deepcopy(torch.optim.Optimizer.__getstate__(opt)))
    assert bare.probes is None
    for p in (p for g in bare.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    bare.step()
    assert all(int(s["step"]) == 2 for s in bare.state.values())


def test_load_state_dict_keeps_the_probe() -> None:
    """load_state_dict calls __setstate__ without a probe entry; the probe stays."""
    model, opt = make(config("adam"), probe=True)
    train(model, opt, 1)
    probe = opt._probe
    opt.load_state_dict(opt.state_dict())
    assert opt._probe is probe
    train(model, opt, 1)
    assert len(probe.history.records) == 2

"""Probes left on for a long run: bounded memory, parameters that change
mid-run, sinks that behave like files, run ids, the variance-ratio warm-up,
and the warning that points at the user's line."""

from __future__ import annotations

import csv
import gc
import json
import math
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch

import optiscope
from optiscope.probes import (
    MAX_PENDING,
    CallbackSink,
    CSVSink,
    ForgottenEvalWarning,
    History,
    JSONLSink,
    remove,
)
from optiscope.probes.plot import series
from optiscope.probes.sinks import TruncatedRecordWarning, read_jsonl

OPTIMIZERS = [optiscope.Momentum, optiscope.Adam]


def step(opt, params, gen) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


# -- History ------------------------------------------------------------------------------
def test_history_is_a_bounded_sequence() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = optiscope.Momentum([w], probe=True)
    history = opt._probe.history
    assert history.maxlen == 100 and len(history) == 0
    for _ in range(150):
        w.grad = torch.ones(3)
        opt.step()
    assert len(history) == 100
    assert history[0]["step"] == 51 and history[-1]["step"] == 150
    assert [r["step"] for r in history[:2]] == [51, 52]
    assert [r["step"] for r in history][-1] == 150
    assert (
        len(history.records) == 100 and len(history.series("group0", "grad_rms")) == 100
    )


@pytest.mark.parametrize(("history", "kept"), [(None, 150), (0, 0), (7, 7)])
def test_history_length_is_configurable(history, kept) -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = optiscope.Adam([w])
    probe = optiscope.probe(opt, history=history)
    for _ in range(150):
        w.grad = torch.ones(3)
        opt.step()
    assert len(probe.history) == kept
    assert probe.latest["step"] == 150  # the newest record is always there


def test_history_rejects_bad_lengths() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="history must be None or an integer"):
            History(bad)


def test_pending_steps_do_not_pile_up() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = optiscope.Adam([w], probe=True)
    for _ in range(10 * MAX_PENDING):
        w.grad = torch.ones(3)
        opt.step()
        assert len(opt._probe._pending) < MAX_PENDING


def test_memory_is_flat_with_a_jsonl_sink(tmp_path) -> None:
    """The short version of benchmarks/probe_memory.py: a 100-tensor Adam model
    with a JSONL sink allocates nothing that stays, once the history is full."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, generator=gen)) for _ in range(100)]
    opt = optiscope.Adam(params, lr=1e-3)
    with JSONLSink(tmp_path / "run.jsonl") as sink:
        optiscope.probe(opt, sinks=[sink])
        tracemalloc.start()  # before the history fills: it frees what it traced
        try:
            for _ in range(150):  # fills the history (100 records, ~13 MB)
                step(opt, params, gen)
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(300):
                step(opt, params, gen)
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        remove(opt)
    assert growth < 512 * 1024, growth  # bytes; one record is about 135 KB
    assert sum(1 for _ in read_jsonl(tmp_path / "run.jsonl")) == 450


# -- parameters that change mid-run ----------------------------------------------------
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
@pytest.mark.parametrize("with_sink", [False, True], ids=["lazy", "sink"])
def test_parameters_appended_and_groups_added_mid_run(cls, named, with_sink) -> None:
    """The issue's case: after parameters are appended to a group, no exception
    and all 6 records (the lazy path once lost 3 of them)."""
    gen = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.nn.Parameter(torch.randn(4, generator=gen)) for _ in range(4))
    opt = cls([("a", a)] if named else [a], lr=1e-2)
    seen: list = []
    probe = optiscope.probe(opt, sinks=[CallbackSink(seen.append)] if with_sink else [])
    step(opt, [a], gen)
    step(opt, [a], gen)
    opt.param_groups[0]["params"].append(b)
    if named:
        opt.param_groups[0]["param_names"].append("b")
    step(opt, [a, b], gen)
    names = {"param_names": ["c"]} if named else {}
    opt.add_param_group({"params": [c], "lr": 1e-3, **names})
    step(opt, [a, b, c], gen)
    opt.param_groups[1]["params"].append(d)
    if named:
        opt.param_groups[1]["param_names"].append("d")
    step(opt, [a, b, c, d], gen)
    step(opt, [a, b, c, d], gen)
    records = probe.history.records
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    labels = (
        ["a", "b", "c", "d"]
        if named
        else [
            "group0.param0",
            "group0.param1",
            "group1.param0",
            "group1.param1",
        ]
    )
    assert list(records[1]["params"]) == labels[:1]
    assert list(records[2]["params"]) == labels[:2]
    assert list(records[5]["params"]) == labels
    assert [g["group"] for g in records[5]["groups"]] == [0, 1]
    assert opt.probes["params"][labels[1]]["grad_rms"] > 0
    if with_sink:
        assert json.dumps(seen) == json.dumps(records)


def test_appended_parameter_gets_its_own_variance_warm_up() -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.nn.Parameter(torch.zeros(1000)) for _ in range(2))
    opt = optiscope.Momentum([a], lr=1e-3, momentum=0.5, probe=True)  # warm-up 4
    for _ in range(6):
        step(opt, [a], gen)
    opt.param_groups[0]["params"].append(b)
    step(opt, [a, b], gen)
    params = opt.probes["params"]
    assert math.isfinite(params["group0.param0"]["variance_ratio"])
    assert math.isnan(params["group0.param1"]["variance_ratio"])
    for _ in range(4):
        step(opt, [a, b], gen)
    assert math.isfinite(opt.probes["params"]["group0.param1"]["variance_ratio"])


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_parameters_that_lose_their_gradient(cls) -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(2))
    opt = cls([a, b], lr=1e-2, probe=True)
    step(opt, [a, b], gen)
    b.grad = None
    a.grad = torch.ones(5)
    opt.step()  # b has no gradient: left out of this record
    a.grad = None
    opt.step()  # no parameter has one: the record has no groups
    step(opt, [a, b], gen)
    records = opt._probe.history.records
    assert [sorted(r["params"]) for r in records] == [
        ["group0.param0", "group0.param1"],
        ["group0.param0"],
        [],
        ["group0.param0", "group0.param1"],
    ]


def test_a_parameter_replaced_by_one_of_another_size_starts_over() -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.nn.Parameter(torch.zeros(100))
    opt = optiscope.Momentum([a], lr=1e-3, momentum=0.5, probe=True)
    for _ in range(8):
        step(opt, [a], gen)
    bigger = torch.nn.Parameter(torch.zeros(300))
    opt.param_groups[0]["params"][0] = bigger
    step(opt, [bigger], gen)
    assert math.isnan(opt.probes["params"]["group0.param0"]["variance_ratio"])


def test_csv_columns_stay_fixed_when_parameters_are_added(tmp_path) -> None:
    gen = torch.Generator().manual_seed(5)
    a, b = (torch.nn.Parameter(torch.randn(3, generator=gen)) for _ in range(2))
    opt = optiscope.Adam([("a", a)])
    path = tmp_path / "run.csv"
    with CSVSink(path) as sink:
        optiscope.probe(opt, sinks=[sink], run="r1")
        step(opt, [a], gen)
        opt.add_param_group({"params": [b], "param_names": ["b"]})
        step(opt, [a, b], gen)
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows[0] == ["step", "run", "source", "scope", "metric", "value"]
    assert all(len(row) == 6 for row in rows)
    assert {row[3] for row in rows[1:] if row[0] == "2"} >= {"a", "b", "group1"}
    assert {row[1] for row in rows[1:]} == {"r1"}


def test_csv_append_refuses_another_header(tmp_path) -> None:
    path = tmp_path / "old.csv"
    path.write_text("step,source,scope,metric,value\n")
    with pytest.raises(ValueError, match="cannot append"):
        CSVSink(path, append=True)
    with CSVSink(path) as sink:  # a new file replaces it
        pass
    assert path.read_text() == "step,run,source,scope,metric,value\n"
    assert sink.closed


# -- sinks that behave like files ------------------------------------------------------
def train_into(sink, steps: int = 3, **options) -> optiscope.Adam:
    w = torch.nn.Parameter(torch.ones(4))
    opt = optiscope.Adam([w])
    optiscope.probe(opt, sinks=[sink], **options)
    for _ in range(steps):
        w.grad = torch.ones(4)
        opt.step()
    return opt


def test_jsonl_starts_a_new_file_unless_appending(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    with JSONLSink(path) as sink:
        train_into(sink, 3, run="first")
    with JSONLSink(path) as sink:
        train_into(sink, 2, run="second")
    assert [r["run"] for r in read_jsonl(path)] == ["second"] * 2
    with JSONLSink(path, append=True) as sink:
        train_into(sink, 4, run="third")
    assert [r["run"] for r in read_jsonl(path)] == ["second"] * 2 + ["third"] * 4


def test_closed_sinks_refuse_writes_and_close_twice(tmp_path) -> None:
    with JSONLSink(tmp_path / "run.jsonl") as sink:
        opt = train_into(sink, 1)
    assert sink.closed
    sink.close()  # again: nothing
    w = opt.param_groups[0]["params"][0]
    w.grad = torch.ones(4)
    with pytest.raises(ValueError, match="closed sink"):
        opt.step()
    sink.reopen()  # a closed sink reopens, appending
    opt.step()
    sink.close()
    assert len(list(read_jsonl(tmp_path / "run.jsonl"))) == 2  # not the refused one


def test_remove_and_replacing_a_probe_close_its_sinks(tmp_path) -> None:
    first, second = JSONLSink(tmp_path / "a.jsonl"), JSONLSink(tmp_path / "b.jsonl")
    opt = train_into(first, 1)
    optiscope.probe(opt, sinks=[second])  # replaces the probe writing to first
    assert first.closed and not second.closed
    optiscope.probe(opt, sinks=[second])  # the same sink again: kept open
    assert not second.closed
    remove(opt)
    assert second.closed


def test_a_dropped_sink_closes_without_a_resource_warning(tmp_path) -> None:
    opt = train_into(JSONLSink(tmp_path / "run.jsonl"), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del opt
        gc.collect()
    assert len(list(read_jsonl(tmp_path / "run.jsonl"))) == 2


def test_sinks_are_closed_at_exit(tmp_path) -> None:
    script = f"""
import torch, optiscope
from optiscope.probes import JSONLSink, CSVSink
w = torch.nn.Parameter(torch.ones(2))
opt = optiscope.Momentum([w])
keep = optiscope.probe(opt, sinks=[JSONLSink({str(tmp_path / "r.jsonl")!r}),
                                   CSVSink({str(tmp_path / "r.csv")!r})])
w.grad = torch.ones(2)
opt.step()
"""
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", script],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1


def test_every_record_carries_its_run_id(tmp_path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), optiscope.Dropout(0.5), optiscope.Dropout(0.1)
    )
    opt = optiscope.Adam(model.parameters())
    one, two = optiscope.probe(model), optiscope.probe(opt, run="mine")
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert one[0].run == one[1].run != "mine"  # one call, one run
    assert {r["run"] for p in one for r in p.history} == {one[0].run}
    assert two.latest["run"] == "mine"
    assert optiscope.probe(opt).run != optiscope.probe(opt).run
    with pytest.raises(TypeError, match="run must be a string"):
        optiscope.probe(opt, run=3)


# -- optiscope plot: runs apart, truncated lines ------------------------------------------
def test_plot_series_keeps_runs_apart(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    for name in ("one", "two"):
        with JSONLSink(path, append=True) as sink:
            train_into(sink, 4, run=name)
    lines = series(list(read_jsonl(path)), "grad_rms")
    assert sorted(lines) == ["Adam group0 [run one]", "Adam group0 [run two]"]
    assert all(steps == [1, 2, 3, 4] for steps, _ in lines.values())
    # Records without a run id (older files): a new part where the step goes back.
    bare = [{k: v for k, v in r.items() if k != "run"} for r in read_jsonl(path)]
    assert sorted(series(bare, "grad_rms")) == [
        "Adam group0 [part 1]",
        "Adam group0 [part 2]",
    ]
    single = series(bare[:4], "grad_rms")
    assert list(single) == ["Adam group0"]


def test_a_truncated_last_line_is_skipped_with_a_warning(tmp_path) -> None:
    path = tmp_path / "run.jsonl"
    with JSONLSink(path) as sink:
        train_into(sink, 3)
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:40])  # a write cut short
    with pytest.warns(TruncatedRecordWarning, match="line 4"):
        assert len(list(read_jsonl(path))) == 3
    result = subprocess.run(
        [sys.executable, "-m", "optiscope", "plot", str(path), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "line 4" in result.stderr
    assert (tmp_path / "grad_rms.png").exists()
    path.write_text("{cut\n" + text)  # not the last line: an error
    with pytest.raises(ValueError, match="line 1: not JSON"):
        list(read_jsonl(path))


# -- Momentum's variance ratio: warm-up, smoothed and raw ----------------------------
def test_variance_ratio_is_nan_during_warm_up_then_near_theory() -> None:
    """Both estimates on i.i.d. noise around a mean, on a large tensor: the raw
    one (this step alone) and the smoothed one, which starts after
    ⌈2/(1−β)⌉ = 20 steps."""
    beta, n = 0.9, 20_000
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = optiscope.Momentum([w], lr=1e-3, momentum=beta, probe=True)
    smoothed, raw = [], []
    for _ in range(400):
        w.grad = mean + torch.randn(n, generator=gen, dtype=torch.float64)
        opt.step()
        group = opt.probes["groups"][0]
        smoothed.append(group["variance_ratio"])
        raw.append(group["variance_ratio_raw"])
    theory = (1 - beta) / (1 + beta)
    assert group["variance_ratio_warmup"] == 20
    assert all(math.isnan(v) for v in smoothed[:20])
    assert all(math.isfinite(v) for v in smoothed[20:])
    assert smoothed[-1] == pytest.approx(theory, rel=0.05)
    late_raw = sorted(raw[100:])
    assert late_raw[len(late_raw) // 2] == pytest.approx(theory, rel=0.05)


# -- ForgottenEvalWarning points at the user's line ----------------------------------
def test_forgotten_eval_warning_points_at_the_callers_line() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), optiscope.Dropout(0.5))
    optiscope.probe(model)

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.ReLU(), optiscope.Dropout(0.5))

        def forward(self, x):
            return self.inner(x)  # the user's own line inside a module

    outer = Outer()
    optiscope.probe(outer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            line = sys._getframe().f_lineno + 1
            model(torch.ones(2, 4))
            outer(torch.ones(2, 4))
    assert [w.category for w in caught] == [ForgottenEvalWarning] * 2
    assert caught[0].filename == __file__ and caught[0].lineno == line
    assert caught[1].filename == __file__
    source = Path(__file__).read_text().splitlines()
    assert "self.inner(x)" in source[caught[1].lineno - 1]


def test_forgotten_eval_calls_are_recorded_whatever_every_says() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), optiscope.Dropout(0.5))
    (probe,) = optiscope.probe(model, every=100)
    model(torch.ones(2, 4))  # call 1: measured
    model(torch.ones(2, 4))  # call 2: not
    with torch.no_grad(), pytest.warns(ForgottenEvalWarning):
        model(torch.ones(2, 4))  # call 3: recorded all the same
    entries = [(r["step"], r["modules"]["1"]["grad_enabled"]) for r in probe.history]
    assert entries == [(1, True), (3, False)]

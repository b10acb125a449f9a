"""Probes: hand-computed values, a separate plain-torch computation, the momentum
variance estimate against theory, the torch contract, sinks, dropout, and plots."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import optiscope
from optiscope.probes import (
    CallbackSink,
    CSVSink,
    ForgottenEvalWarning,
    JSONLSink,
    TensorBoardSink,
    layout,
)

OPTIMIZERS = [
    (optiscope.Momentum, dict(lr=0.05, momentum=0.9)),
    (optiscope.Adam, dict(lr=1e-2)),
    (optiscope.AdamW, dict(lr=1e-2, amsgrad=True)),
]


def test_adam_values_by_hand() -> None:
    """First Adam step: m̂ = g, v̂ = g², so each step is α·g/(|g|+ε), effective α/(|g|+ε)."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = optiscope.Adam([w], lr=0.1, probe=True)
    w.grad = torch.tensor([0.1, -0.2], dtype=torch.float64)
    opt.step()
    p = opt.probes["params"]["group0.param0"]
    update = [0.1 * 0.1 / (0.1 + 1e-8), 0.1 * 0.2 / (0.2 + 1e-8)]
    after = [1.0 - update[0], 2.0 + update[1]]
    assert p["grad_rms"] == pytest.approx(math.sqrt((0.01 + 0.04) / 2), rel=1e-12)
    assert p["update_rms"] == pytest.approx(
        math.sqrt((update[0] ** 2 + update[1] ** 2) / 2)
    )
    assert p["param_rms"] == pytest.approx(
        math.sqrt((after[0] ** 2 + after[1] ** 2) / 2)
    )
    assert p["update_to_weight"] == pytest.approx(p["update_rms"] / p["param_rms"])
    assert p["step_min"] == pytest.approx(0.1 / (0.2 + 1e-8), rel=1e-12)
    assert p["step_max"] == pytest.approx(0.1 / (0.1 + 1e-8), rel=1e-12)
    assert p["bias_correction1"] == pytest.approx(0.1)
    assert p["bias_correction2"] == pytest.approx(1 - 0.999)
    assert p["eps_dominated_fraction"] == 0.0 and p["nonfinite_grads"] == 0
    # The histogram samples every hist_stride(2)-th coordinate, so of two only
    # coordinate 0 is binned: its step 0.1/(0.1+1e-8) lies in the octave [0.5, 1).
    hist = p["step_histogram"]
    assert sum(hist) == 1
    assert hist[layout.octave_bin(0.99999)] == 1


def test_momentum_values_by_hand() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    opt = optiscope.Momentum([w], lr=0.5, momentum=0.5, probe=True)
    w.grad = torch.tensor([2.0, 4.0], dtype=torch.float64)
    opt.step()  # m = 0.5·g = [1, 2]; θ = [0.5, -2]
    p = opt.probes["params"]["group0.param0"]
    assert p["grad_rms"] == pytest.approx(math.sqrt(10))
    assert p["update_rms"] == pytest.approx(math.sqrt((0.25 + 1.0) / 2))
    assert p["param_rms"] == pytest.approx(math.sqrt((0.25 + 4.0) / 2))
    # One step: g·m_prev = 0, so this step's ratio is Σm²/Σg² = 5/20; the
    # smoothed one waits for the buffer's warm-up of ⌈2/(1−β)⌉ = 4 steps.
    assert p["variance_ratio_raw"] == pytest.approx(0.25)
    assert math.isnan(p["variance_ratio"])
    assert opt.probes["groups"][0]["variance_ratio_warmup"] == 4
    assert p["predicted_variance_ratio"] == pytest.approx(1 / 3)
    assert p["numel"] == 2


def _plain_torch(before, after, grad) -> dict[str, float]:
    """The common measurements written out again in plain torch, from snapshots."""
    g, d = grad.double(), (after.double() - before.double())
    n = g.numel()
    return {
        "grad_rms": g.pow(2).sum().div(n).sqrt().item(),
        "update_rms": d.pow(2).sum().div(n).sqrt().item(),
        "param_rms": after.double().pow(2).sum().div(n).sqrt().item(),
        "nonfinite_grads": int((~torch.isfinite(g)).sum()),
    }


@pytest.mark.parametrize(("cls", "options"), OPTIMIZERS)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16]
)
def test_matches_a_separate_torch_computation(cls, options, dtype) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )
    model.to(dtype)
    opt = cls(model.named_parameters(), **options, probe=True)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(32, 8, generator=gen).to(dtype)
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for name, p in model.named_parameters():
            expected = _plain_torch(before[name], p.detach(), p.grad)
            got = opt.probes["params"][name]
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (
                    name,
                    key,
                )
        if cls is not optiscope.Momentum:
            for name, p in model.named_parameters():
                state = opt.state[p]
                t = int(state["step"])
                v = (
                    state["max_exp_avg_sq"]
                    if "max_exp_avg_sq" in state
                    else state["exp_avg_sq"]
                )
                step = 1e-2 / ((v.double() / (1 - 0.999**t)).sqrt() + 1e-8)
                got = opt.probes["params"][name]
                assert got["step_min"] == pytest.approx(step.min().item(), rel=1e-5)
                assert got["step_max"] == pytest.approx(step.max().item(), rel=1e-5)
                # The histogram, so the median estimate, is of the sample.
                sample = step.flatten()[:: layout.hist_stride(step.numel())]
                true_median = sample.sort().values[(sample.numel() - 1) // 2].item()
                assert true_median / 2 <= got["step_median"] <= true_median * 2


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_momentum_variance_estimate_recovers_theory_on_iid_noise(beta) -> None:
    """g_t = μ + σ·ξ_t, i.i.d.: the in-pass estimate tends to (1−β)/(1+β) (5%)."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(20_000, generator=gen, dtype=torch.float64)
    scale = torch.rand(20_000, generator=gen, dtype=torch.float64) + 0.5
    w = torch.nn.Parameter(torch.zeros(20_000, dtype=torch.float64))
    opt = optiscope.Momentum([w], lr=1e-3, momentum=beta, probe=True)
    for _ in range(1500):
        w.grad = mean + scale * torch.randn(20_000, generator=gen, dtype=torch.float64)
        opt.step()
    estimate = opt.probes["groups"][0]["variance_ratio"]
    assert estimate == pytest.approx((1 - beta) / (1 + beta), rel=0.05)


def test_named_parameters_groups_and_closure() -> None:
    model = torch.nn.Linear(3, 2)
    opt = optiscope.Adam(
        [{"params": [model.weight], "lr": 1e-2}, {"params": [model.bias], "lr": 1e-3}],
        probe=True,
    )

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(4, 3)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    groups = opt.probes["groups"]
    assert [g["group"] for g in groups] == [0, 1] and [g["lr"] for g in groups] == [
        1e-2,
        1e-3,
    ]
    assert set(opt.probes["params"]) == {"group0.param0", "group1.param0"}
    named = optiscope.Momentum(model.named_parameters(), probe=True)
    closure()
    named.step()
    assert set(named.probes["params"]) == {"weight", "bias"}


def test_probe_state_is_not_checkpointed_and_survives_a_round_trip() -> None:
    model = torch.nn.Linear(3, 2)
    opt = optiscope.Adam(model.parameters(), probe=True)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    assert "probe" not in json.dumps(opt.state_dict()["param_groups"], default=str)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    opt.step()
    assert opt.probes["step"] == 2


def test_probes_off_cost_nothing_and_report_none() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = optiscope.Adam([w])
    w.grad = torch.ones(3)
    opt.step()
    assert opt.probes is None and opt._probe is None


def test_every_k_steps_and_sinks(tmp_path) -> None:
    w = torch.nn.Parameter(torch.ones(5))
    opt = optiscope.Momentum([w], lr=0.1)
    seen = []
    probe = optiscope.probe(
        opt,
        sinks=[
            JSONLSink(tmp_path / "run.jsonl"),
            CSVSink(tmp_path / "run.csv"),
            CallbackSink(seen.append),
        ],
        every=3,
    )
    for _ in range(7):
        w.grad = torch.ones(5)
        opt.step()
    probe.close()
    assert [r["step"] for r in seen] == [1, 4, 7]
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 4, 7]
    rows = list(csv.DictReader((tmp_path / "run.csv").read_text().splitlines()))
    assert {r["metric"] for r in rows} >= {"grad_rms", "update_rms", "variance_ratio"}
    assert probe.history.series("group0", "grad_rms") == [1.0, 1.0, 1.0]


def test_tensorboard_sink(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    w = torch.nn.Parameter(torch.ones(2))
    opt = optiscope.Adam([w])
    probe = optiscope.probe(opt, sinks=[TensorBoardSink(tmp_path)])
    w.grad = torch.ones(2)
    opt.step()
    probe.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_nonfinite_gradients_are_counted() -> None:
    w = torch.nn.Parameter(torch.zeros(4))
    opt = optiscope.Momentum([w], lr=0.1, probe=True)
    w.grad = torch.tensor([1.0, float("nan"), float("inf"), 0.0])
    opt.step()
    assert opt.probes["params"]["group0.param0"]["nonfinite_grads"] == 2


def test_eps_dominated_fraction() -> None:
    """√v̂ < ε exactly where |g| < ε on the first step."""
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = optiscope.Adam([w], lr=1e-3, eps=1e-3, probe=True)
    w.grad = torch.tensor([1e-5, 1e-4, 1e-2, 1.0], dtype=torch.float64)
    opt.step()
    assert opt.probes["params"]["group0.param0"]["eps_dominated_fraction"] == 0.5


def test_probe_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="got SGD"):
        optiscope.probe(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    with pytest.raises(ValueError, match=r"no optiscope\.Dropout layer"):
        optiscope.probe(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every must be an integer >= 1, got 0"):
        optiscope.probe(optiscope.Adam([torch.nn.Parameter(torch.ones(1))]), every=0)


def test_dropout_keep_rate_within_4_sigma() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), optiscope.Dropout(0.3))
    (probe,) = optiscope.probe(model)
    model(torch.randn(50_000, 4))
    observed = probe.latest["modules"]["1"]
    n = observed["numel"]
    assert abs(observed["keep_rate"] - 0.7) <= 4 * math.sqrt(0.3 * 0.7 / n)


def test_forgotten_eval_warns_once() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), optiscope.Dropout(0.5))
    optiscope.probe(model)
    with torch.no_grad(), pytest.warns(ForgottenEvalWarning, match="forget model.eval"):
        model(torch.ones(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            model(torch.ones(2, 4))  # once only
        model.eval()
        with torch.no_grad():
            model(torch.ones(2, 4))


def test_plot_renders_one_png_per_question(tmp_path) -> None:
    run = tmp_path / "run.jsonl"
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), optiscope.Dropout(0.2), torch.nn.Linear(8, 2)
    )
    for opt in (
        optiscope.Adam(model.parameters()),
        optiscope.Momentum(model.parameters()),
    ):
        probe = optiscope.probe(opt, sinks=[JSONLSink(run, append=True)])
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(16, 4)).pow(2).mean().backward()
            opt.step()
        probe.close()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "optiscope",
            "plot",
            str(run),
            "--out",
            str(tmp_path / "plots"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert {"update_to_weight.png", "momentum_variance.png", "adam_step.png"} <= names


def test_plot_errors(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{not json\n{"step": 1}\n')
    for args, message in (
        (["missing.jsonl"], "no such file"),
        ([str(bad)], "line 1: not JSON"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "optiscope", "plot", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert result.returncode == 2 and message in result.stderr


def test_histogram_quantile_is_within_an_octave() -> None:
    from optiscope.probes.measure import histogram_quantile

    values = np.exp(np.random.default_rng(0).normal(size=10_000) * 3)
    counts = np.zeros(layout.HIST_BINS)
    for v in values:
        counts[layout.octave_bin(float(v))] += 1
    median = float(np.median(values))
    assert median / 2 <= histogram_quantile(counts, 0.5) <= median * 2


def test_histogram_sample_does_not_alias_with_rows() -> None:
    """A (256, 64) weight whose first 8 columns never see a gradient: the sampled
    histogram must see them in proportion (1/8), not as every sampled coordinate."""
    w = torch.nn.Parameter(torch.zeros(256, 64))
    opt = optiscope.Adam([w], lr=1e-3, probe=True)
    grad = torch.ones(256, 64)
    grad[:, ::8] = 0.0  # columns 0, 8, ..., 56 get no gradient: step α/ε
    w.grad = grad
    opt.step()
    hist = opt.probes["params"]["group0.param0"]["step_histogram"]
    dead = hist[layout.octave_bin(1e-3 / 1e-8)]
    assert abs(dead / sum(hist) - 1 / 8) < 0.03


@pytest.mark.parametrize("cls", [optiscope.Momentum, optiscope.Adam])
def test_records_built_when_read_equal_records_built_at_each_step(cls) -> None:
    """Without a sink a step only keeps its rows; the records built later, in
    order, are the ones a sink gets at each step, learning rate changes by a
    scheduler and momentum's running estimate included."""

    def run(sinks):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        opt = cls(model.named_parameters(), lr=0.1)
        probe = optiscope.probe(opt, sinks=sinks, run="same")
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.step()
            schedule.step()
        return probe

    eager_records: list = []
    eager = run([CallbackSink(eager_records.append)])
    lazy = run([])
    assert lazy._pending  # nothing built yet
    text = [
        json.dumps(r, allow_nan=True)  # NaN (a smoothed ratio in warm-up) != NaN
        for r in (lazy.history.records, eager.history.records, eager_records)
    ]
    assert text[0] == text[1] == text[2]
    assert [r["groups"][0]["lr"] for r in eager_records] == [
        0.1,
        0.1,
        0.05,
        0.05,
        0.025,
    ]
    assert json.dumps(lazy.latest) == json.dumps(eager_records[-1])
    assert not lazy._pending

"""``optiscope.probes.diagnose`` and ``optiscope doctor`` on real runs: the
digits MLP of the lab (64-256-256-10, ReLU, dropout 0.5, batch 32) at its
defaults must raise no alarm, and each injected pathology must be found."""

from __future__ import annotations

import argparse
import functools
import json
import math
import warnings

import pytest
import torch

import optiscope
from optiscope.lab import data
from optiscope.probes import Finding, ForgottenEvalWarning, JSONLSink, diagnose
from optiscope.probes.doctor import add_doctor_parser, to_json

STEPS = 300
ALARM = ("warning", "error")


@functools.cache
def digits() -> data.Dataset:
    return data.load(None, 0)


@pytest.fixture(autouse=True)
def _one_thread():
    """These nets are small: on a shared 2-core machine two threads run them
    about 15× slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(n_in: int, n_out: int, hidden: int = 256, p: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden),
        torch.nn.ReLU(),
        optiscope.Dropout(p),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        optiscope.Dropout(p),
        torch.nn.Linear(hidden, n_out),
    )


@functools.cache
def run(
    optimizer: str = "Adam",
    *,
    steps: int = STEPS,
    batch: int = 32,
    every: int = 1,
    zero_column: int | None = None,
    kill: bool = False,
    nan_at: int | None = None,
    forget_eval: bool = False,
    gaussian: bool = False,
    p: float = 0.5,
    **options: float,
) -> tuple[dict, ...]:
    """Train the digits MLP with probes on; return every record (optimizer
    and dropout), as a tuple so the runs can be cached between tests."""
    if gaussian:  # inputs that are never exactly zero
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(2000, 64, generator=gen)
        y = (x[:, :10] @ torch.randn(10, 5, generator=gen)).argmax(1)
    else:
        x, y = digits().x_train.clone(), digits().y_train
    if zero_column is not None:
        x[:, zero_column] = 0.0
    model = mlp(x.shape[1], int(y.max()) + 1, p=p)
    if kill:
        with torch.no_grad():
            model[0].bias.fill_(-10.0)
    opt = getattr(optiscope, optimizer)(model.named_parameters(), **options)
    probes = [
        optiscope.probe(opt, history=None, every=every, run="r"),
        *optiscope.probe(model, history=None, run="r"),
    ]
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        model.train()
        rows = torch.randint(0, len(y), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        if step == nan_at:
            model[3].weight.grad[5, 7] = math.nan
        opt.step()
        if step % 100 == 0:  # evaluate
            if not forget_eval:
                model.eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", ForgottenEvalWarning)
                model(x[:200])
    return tuple(r for p in probes for r in p.history.records)


def codes(findings: list[Finding], severities=("info", "warning", "error")) -> set:
    return {f.code for f in findings if f.severity in severities}


def by_code(findings: list[Finding], code: str) -> list[Finding]:
    return [f for f in findings if f.code == code]


def assert_well_formed(findings: list[Finding]) -> None:
    for f in findings:
        assert f.severity in ("info", "warning", "error")
        assert f.scope and f.parameters and f.threshold and f.basis and f.action
        assert f.steps[0] <= f.steps[1] and f.evidence and f.run == "r"
    json.loads(to_json(findings))


# -- healthy runs: no alarm --------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["Adam", "Momentum"])
def test_healthy_runs_raise_no_alarm(optimizer) -> None:
    findings = diagnose(list(run(optimizer)))
    assert_well_formed(findings)
    assert not [f for f in findings if f.severity in ALARM], [str(f) for f in findings]


def test_healthy_adam_reports_never_lit_pixels_as_info() -> None:
    """The digits' border pixels are never lit, so Adam's v stays 0 for the
    weights that read them: a fact about the data, at most info."""
    findings = diagnose(list(run("Adam")))
    (inputs,) = [f for f in by_code(findings, "zero_inputs") if f.scope == "0.weight"]
    assert inputs.severity == "info"
    assert 3 <= inputs.evidence["zero_input_columns"] <= 8  # 3 never lit, 7 rarely
    (dead,) = by_code(findings, "dead_units")
    assert dead.severity == "info" and dead.evidence["dead_fraction"] < 0.1


def test_healthy_run_measured_every_10_steps_raises_no_alarm() -> None:
    findings = diagnose(list(run("Adam", steps=1000, every=10)))
    assert not codes(findings, ALARM), [str(f) for f in findings]


# -- pathologies ------------------------------------------------------------------------------
def test_learning_rate_x100() -> None:
    findings = diagnose(list(run("Adam", lr=1e-1)))
    high = by_code(findings, "lr_too_high")
    assert {f.scope for f in high} == {
        "0.weight",
        "0.bias",
        "3.weight",
        "3.bias",
        "6.weight",
        "6.bias",
    }
    f = high[0]
    assert f.severity == "warning" and f.evidence["max_update_to_weight"] > 0.1
    assert f.evidence["lr"] == 0.1 and "lower the learning rate" in f.action


@pytest.mark.parametrize(("optimizer", "lr"), [("Adam", 1e-6), ("Momentum", 1e-5)])
def test_learning_rate_divided_by_1000(optimizer, lr) -> None:
    findings = diagnose(list(run(optimizer, lr=lr)))
    low = by_code(findings, "lr_too_low")
    assert len(low) == 6 and all(f.severity == "warning" for f in low)
    assert all(f.evidence["median_update_to_weight"] < 3e-5 for f in low)
    assert codes(findings, ALARM) == {"lr_too_low"}


def test_eps_too_large() -> None:
    findings = diagnose(list(run("Adam", eps=1e-1)))
    eps = by_code(findings, "eps_dominates")
    assert len(eps) == 6
    f = eps[0]
    assert f.severity == "warning" and f.evidence["eps_dominated_fraction"] > 0.9
    assert f.evidence["eps"] == 0.1 and f.evidence["grad_rms"] < 0.1
    # ε explains the small steps: no learning-rate or never-updated finding besides.
    assert codes(findings) == {"eps_dominates"}


def test_a_constant_zero_input_column_is_found_as_info() -> None:
    """On inputs that are never exactly zero, one zeroed column is exactly one
    never-updated column of the first layer; on the digits it adds about one
    to the never-lit pixels."""
    clean = diagnose(list(run("Adam", gaussian=True)))
    assert not by_code(clean, "zero_inputs"), [str(f) for f in clean]
    zeroed = diagnose(list(run("Adam", gaussian=True, zero_column=20)))
    (f,) = by_code(zeroed, "zero_inputs")
    assert f.scope == "0.weight" and f.severity == "info"
    assert f.evidence["zero_input_columns"] == pytest.approx(1.0, abs=0.1)
    assert not codes(zeroed, ALARM)

    def columns(findings):
        (f,) = [f for f in by_code(findings, "zero_inputs") if f.scope == "0.weight"]
        return f.evidence["zero_input_columns"]

    # pixel 20 is lit in 75% of the digits
    on_digits = diagnose(list(run("Adam", zero_column=20)))
    assert columns(on_digits) - columns(diagnose(list(run("Adam")))) >= 0.5
    assert not codes(on_digits, ALARM)


@pytest.mark.parametrize("optimizer", ["Adam", "Momentum"])
def test_a_relu_layer_killed_by_a_large_negative_bias(optimizer) -> None:
    findings = diagnose(list(run(optimizer, kill=True)))
    zero = {f.scope: f for f in by_code(findings, "zero_gradient")}
    layer = zero["0.weight, 0.bias"]
    assert layer.severity == "error" and layer.steps == (1, STEPS)
    assert layer.evidence["zero_gradient_records"] == STEPS
    # The next layer's weight sees only zeros: a consequence, named as such.
    assert zero["3.weight"].severity == "warning"
    assert "layer before it is dead" in zero["3.weight"].basis
    if optimizer == "Adam":  # v = 0 also shows the units of layer 3 its bias killed
        (dead,) = by_code(findings, "dead_units")
        assert dead.scope == "3.weight, 3.bias" and dead.severity == "warning"
        assert 0.3 < dead.evidence["dead_fraction"] < 0.7


@pytest.mark.parametrize("optimizer", ["Adam", "Momentum"])
def test_a_nan_injected_at_step_k(optimizer) -> None:
    findings = diagnose(list(run(optimizer, nan_at=120)))
    (f,) = by_code(findings, "nonfinite_gradients")
    assert f.severity == "error" and f.scope == "3.weight" and f.steps[0] == 120
    assert f.evidence["entries_at_first_step"] == 1
    assert f.evidence["parameters_affected"] == 6  # it spreads from there
    (params,) = by_code(findings, "nonfinite_parameters")
    assert params.evidence["first_step"] == 120
    assert findings[0].severity == "error"


def test_eval_forgotten() -> None:
    findings = diagnose(list(run("Adam", forget_eval=True)))
    forgotten = by_code(findings, "forgotten_eval")
    assert {f.scope for f in forgotten} == {"2", "5"}
    f = forgotten[0]
    assert f.severity == "warning" and f.source == "Dropout"
    assert f.evidence["calls"] == 3  # one evaluation every 100 steps
    assert "model.eval()" in f.action
    assert not by_code(diagnose(list(run("Adam"))), "forgotten_eval")


def test_exploding_gradients() -> None:
    """A tanh MLP regressing 10·one-hot with Momentum at lr 2: the gradients
    grow by many orders of magnitude before they overflow."""
    x, y = digits().x_train, digits().y_train
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.Tanh(),
        torch.nn.Linear(256, 256),
        torch.nn.Tanh(),
        torch.nn.Linear(256, 10),
    )
    opt = optiscope.Momentum(model.named_parameters(), lr=2.0)
    probe = optiscope.probe(opt, history=None, run="r")
    gen = torch.Generator().manual_seed(1)
    target = 10 * torch.nn.functional.one_hot(y, 10).float()
    for _ in range(60):
        rows = torch.randint(0, len(y), (32,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x[rows]), target[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    findings = diagnose(probe)
    exploding = by_code(findings, "exploding_gradients")
    assert {f.scope for f in exploding} >= {"4.weight", "4.bias"}
    assert all(f.evidence["factor"] >= 1e4 and f.severity == "error" for f in exploding)
    (nonfinite,) = by_code(findings, "nonfinite_gradients")
    assert nonfinite.steps[0] > max(f.steps[1] for f in exploding)


def test_momentum_variance_ratio_far_from_theory_with_full_batches() -> None:
    """Full-batch gradients drift instead of scattering around a mean: the
    estimate leaves (1−β)/(1+β) far behind, a fact reported as info."""
    findings = diagnose(list(run("Momentum", batch=1000, steps=200, p=0.0)))
    (f,) = by_code(findings, "variance_ratio")
    assert f.severity == "info" and f.scope == "group0"
    ratio, predicted = f.evidence["variance_ratio"], f.evidence["predicted"]
    assert not predicted / 3 <= ratio <= predicted * 3


# -- pathologies made by hand (records) ------------------------------------------------------
def dropout_records(rates: list[float], numel: int = 10_000, p: float = 0.5):
    return [
        {
            "run": "r",
            "step": i + 1,
            "source": "Dropout",
            "modules": {
                "drop": {
                    "keep_rate": rate,
                    "expected_keep_rate": 1 - p,
                    "numel": numel,
                    "grad_enabled": True,
                }
            },
        }
        for i, rate in enumerate(rates)
    ]


def test_keep_rate_outside_its_binomial_bounds() -> None:
    # σ = √(0.25/10⁴) = 0.005: 100 calls at +0.001 are z = 2 pooled; at +0.003, 6.
    assert not diagnose(dropout_records([0.501] * 100))
    (f,) = diagnose(dropout_records([0.503] * 100))
    assert f.code == "keep_rate" and f.severity == "error"
    assert f.evidence["z"] == pytest.approx(6.0, rel=1e-6)
    (single,) = diagnose(dropout_records([0.5] * 99 + [0.535]))  # one call, 7σ
    assert single.evidence["worst_call"] == 100
    assert single.evidence["worst_call_z"] == pytest.approx(7.0)


def test_keep_rate_of_real_runs_is_within_bounds() -> None:
    assert not by_code(diagnose(list(run("Adam"))), "keep_rate")


def optimizer_records(grad_rms: list[float]):
    return [
        {
            "run": "r",
            "step": i + 1,
            "source": "Momentum",
            "groups": [{"group": 0, "lr": 0.01}],
            "params": {
                "w": {
                    "numel": 100,
                    "grad_rms": g,
                    "update_rms": 1e-3,
                    "param_rms": 1.0,
                    "update_to_weight": 1e-3,
                    "nonfinite_grads": 0,
                }
            },
        }
        for i, g in enumerate(grad_rms)
    ]


def test_vanishing_gradients() -> None:
    falling = [10 ** (-6 * i / 199) for i in range(200)]  # 1 down to 1e-6
    (f,) = diagnose(optimizer_records(falling))
    assert f.code == "vanishing_gradients" and f.evidence["factor"] < 1e-3
    assert not diagnose(optimizer_records([1.0 + 0.1 * (i % 3) for i in range(200)]))


# -- input forms, files and the command ------------------------------------------------------
def test_diagnose_reads_files_probes_and_histories(tmp_path) -> None:
    records = list(run("Adam", lr=1e-6))
    path = tmp_path / "run.jsonl"
    with JSONLSink(path) as sink:
        for record in records:
            sink.write(record)
    from_file = diagnose(path)
    assert to_json(from_file) == to_json(diagnose(records))
    assert to_json(diagnose(str(path), severity="warning")) == to_json(
        [f for f in from_file if f.severity != "info"]
    )
    w = torch.nn.Parameter(torch.ones(10))
    opt = optiscope.Adam([w], lr=1e-8, probe=True)
    for _ in range(50):
        w.grad = torch.randn(10)
        opt.step()
    assert codes(diagnose(opt._probe)) == codes(diagnose(opt._probe.history))
    with pytest.raises(ValueError, match="severity must be one of"):
        diagnose([], severity="fatal")


def test_runs_in_one_file_are_diagnosed_apart() -> None:
    healthy = [dict(r, run="healthy") for r in run("Adam")]
    slow = [dict(r, run="slow") for r in run("Adam", lr=1e-6)]
    findings = diagnose(healthy + slow)
    assert {f.run for f in findings if f.severity in ALARM} == {"slow"}


def doctor(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="optiscope")
    add_doctor_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *argv])
    return args.handler(args)


def test_doctor_command_table_json_and_exit_status(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps to the terminal's width
    path = tmp_path / "run.jsonl"
    with JSONLSink(path) as sink:
        for record in run("Adam", kill=True):
            sink.write(record)
    assert doctor(str(path)) == 0
    out = capsys.readouterr().out
    assert "gradient exactly zero" in out and "0.weight, 0.bias" in out
    assert "1 error" in out
    assert doctor(str(path), "--json") == 0
    findings = json.loads(capsys.readouterr().out)
    assert findings[0]["code"] == "zero_gradient" and findings[0]["severity"] == "error"
    assert findings[0]["steps"] == [1, STEPS]
    assert doctor(str(path), "--fail-on", "warning") == 1
    capsys.readouterr()
    assert doctor(str(tmp_path / "missing.jsonl")) == 2
    assert "no such file" in capsys.readouterr().err
    text = path.read_text()
    path.write_text(text + text[:50])  # a truncated last line
    assert doctor(str(path), "--severity", "error") == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "not a whole record" in captured.err

"""optiscope lab: every claim's verdict and numbers in --quick mode, determinism, resume
after a kill, atomic outputs, every error case, and the report in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from optiscope.lab import claims, runner

LAB = [sys.executable, "-m", "optiscope", "lab"]


def run_lab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAB, *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lab")
    result = run_lab("--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def results(quick_run: Path) -> dict:
    return json.loads((quick_run / "results.json").read_text())["claims"]


def test_claim_keys_match_the_cli() -> None:
    assert tuple(claims.CLAIMS) == runner.CLAIM_KEYS


@pytest.mark.parametrize("key", runner.CLAIM_KEYS)
def test_every_claim_holds_in_quick_mode(results, key) -> None:
    assert results[key]["verdict"] == "holds", results[key]["numbers"]


def test_c1_variance_ratios_match_theory(results) -> None:
    n = results["C1"]["numbers"]
    beta = n["beta"]
    assert n["frozen_variance_ratio_ema"] == pytest.approx(
        (1 - beta) / (1 + beta), rel=0.15
    )
    assert n["frozen_variance_ratio_torch_sgd_buffer"] == pytest.approx(
        1 / (1 - beta**2), rel=0.15
    )
    assert 0 < n["training_variance_ratio"] < 1
    # The in-pass probe assumes i.i.d. noise; in training it stays within a factor 2.
    predicted = (1 - beta) / (1 + beta)
    assert predicted / 2 < n["training_variance_ratio_probe"] < 2 * predicted


def test_c2_momentum_is_smoother_and_never_significantly_worse(results) -> None:
    n = results["C2"]["numbers"]
    assert n["roughness_momentum"] < n["roughness_sgd"]
    assert all(
        row["momentum_better"] != "does not hold" for row in n["by_learning_rate"]
    )
    for fraction in (
        n["global_basin_fraction_sgd"],
        n["global_basin_fraction_momentum"],
    ):
        assert 0 <= fraction <= 1


def test_c3_effective_step_is_alpha_over_sqrt_v(results) -> None:
    n = results["C3"]["numbers"]
    assert n["spearman_v_hat_vs_effective_step"] < -0.99
    assert n["median_relative_deviation_from_alpha_over_sqrt_v_plus_eps"] < 1e-3
    assert (
        n["movement_ratio_rare_over_common_adam"]
        > 2 * n["movement_ratio_rare_over_common_sgd"]
    )
    # The probe measured the same final step in-pass: same extremes as α/(√v̂+ε).
    for end in ("min", "max"):
        assert n[f"probe_effective_step_{end}"] == pytest.approx(
            n[f"predicted_effective_step_{end}"], rel=1e-4
        )
    assert n["probe_effective_step_min"] <= n["probe_effective_step_median"]


def test_c4_expectation_within_clt_bounds(results) -> None:
    n = results["C4"]["numbers"]
    for row in n["by_p"]:
        se = row["aggregate_standard_error"]
        assert abs(row["mean_ratio_inverted"] - 1) <= 4 * se
        # γ = 1 shrinks the mean by (1 − p); same draws, so the same relative error.
        assert abs(row["mean_ratio_gamma_one"] - (1 - row["p"])) <= 4 * se * (
            1 - row["p"]
        )
    assert n["gamma_one_eval_over_train_activation"] == pytest.approx(2.0, rel=0.05)
    assert (
        abs(n["probe_keep_rate_in_training_p0.5"] - 0.5)
        <= 4 * n["probe_keep_rate_sigma"]
    )


def test_c5_eval_is_deterministic(results) -> None:
    n = results["C5"]["numbers"]
    assert n["eval_outputs_bitwise_equal"] and n["eval_rng_state_untouched"]
    assert 0 < n["train_mode_disagreement_rate_p0.5"] < 0.5


def test_c6_weight_scaling_matches_the_ensemble(results) -> None:
    n = results["C6"]["numbers"]
    det = n["val_accuracy_deterministic"]
    assert abs(det - n["val_accuracy_mc_k50"]) <= n["tolerance"]
    assert n["val_accuracy_mc_k1"] <= det


def test_outputs_are_complete(quick_run: Path) -> None:
    document = json.loads((quick_run / "results.json").read_text())
    assert list(document["claims"]) == list(runner.CLAIM_KEYS)
    header, *rows = (quick_run / "metrics.csv").read_text().splitlines()
    assert header == "claim,series,step,value" and len(rows) > 100
    assert not list(quick_run.glob(".*.tmp")), "temporary files were left behind"


def test_same_seed_gives_identical_results_json(tmp_path) -> None:
    for name in ("a", "b"):
        assert (
            run_lab(
                "--quick", "--only", "C1", "C5", "--out", str(tmp_path / name)
            ).returncode
            == 0
        )
    first, second = ((tmp_path / n / "results.json").read_bytes() for n in ("a", "b"))
    assert first == second


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_interruption_gives_the_same_results(
    tmp_path, quick_run, how
) -> None:
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [*LAB, "--quick", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    finished = out / ".lab-partial" / "C2.json"
    deadline = time.monotonic() + 120
    while (
        not finished.exists() and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert finished.exists(), "the run never finished C2"
    process.send_signal(how)
    process.wait(timeout=60)
    assert not (out / "results.json").exists()
    kept = sorted(p.name for p in (out / ".lab-partial").glob("C*.json"))
    assert kept[:2] == ["C1.json", "C2.json"]

    resumed = run_lab("--quick", "--resume", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "(resumed)" in resumed.stderr
    assert (out / "results.json").read_bytes() == (
        quick_run / "results.json"
    ).read_bytes()


def test_resume_with_another_seed_starts_over(tmp_path) -> None:
    out = str(tmp_path)
    assert run_lab("--quick", "--only", "C5", "--out", out).returncode == 0
    again = run_lab("--quick", "--only", "C5", "--seed", "1", "--resume", "--out", out)
    assert again.returncode == 0 and "(resumed)" not in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "abc"], "invalid int value: 'abc'"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["--only"], "expected at least one argument"),
    ],
)
def test_bad_arguments_exit_2_with_usage(args, message) -> None:
    result = run_lab(*args)
    assert result.returncode == 2
    assert "usage: optiscope lab" in result.stderr and message in result.stderr


def test_unknown_claim_is_named(tmp_path) -> None:
    result = run_lab("--only", "C9", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "unknown claim C9; choose from C1, C2, C3, C4, C5, C6" in result.stderr


def test_unwritable_out_is_named(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_lab("--out", str(blocker / "report"))
    assert result.returncode == 2
    assert f"cannot write to --out {blocker / 'report'}" in result.stderr


def _digits_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    from importlib import resources

    raw = resources.files("optiscope.lab").joinpath("data/digits.npz")
    with raw.open("rb") as handle:
        archive = np.load(handle)
        return archive["X"][:n], archive["y"][:n]


def _write_csv(path: Path, x: np.ndarray, y, header=None) -> Path:
    header = header or [f"f{i}" for i in range(x.shape[1])] + ["label"]
    lines = [",".join(header)] + [
        ",".join([*map(str, row), str(label)]) for row, label in zip(x, y, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda d, x, y: _write_csv(d / "a.csv", x, y, [f"f{i}" for i in range(65)]),
            "missing label column 'label'",
        ),
        (
            lambda d, x, y: _write_csv(d / "a.csv", x, np.zeros_like(y)),
            "a single class",
        ),
        (
            lambda d, x, y: _write_csv(d / "a.csv", x[:40], y[:40]),
            "40 rows; the lab needs at least 50",
        ),
        (
            lambda d, x, y: (np.savez(d / "a.npz", X=x), d / "a.npz")[1],
            "missing array(s) ['y']",
        ),
        (
            lambda d, x, y: (d / "a.txt").write_text("x") and d / "a.txt",
            "expected a .csv or .npz",
        ),
    ],
)
def test_malformed_data_gets_a_clear_error(tmp_path, make, message) -> None:
    x, y = _digits_rows(200)
    path = make(tmp_path, x, y)
    result = run_lab("--data", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr and "optiscope lab: error:" in result.stderr


def test_non_numeric_csv_value_is_located(tmp_path) -> None:
    x, y = _digits_rows(200)
    cells = x.astype(object)
    cells[3, 5] = "n/a"
    path = _write_csv(tmp_path / "a.csv", cells, y)
    result = run_lab("--data", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "a.csv, line 5, column 'f5': non-numeric value 'n/a'" in result.stderr


def test_user_data_runs_claims_3_to_6(tmp_path) -> None:
    x, y = _digits_rows(600)
    path = _write_csv(tmp_path / "mine.csv", x, [f"class-{v}" for v in y])
    out = tmp_path / "out"
    result = run_lab(
        "--data", str(path), "--quick", "--only", "C3", "C5", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "results.json").read_text())
    assert document["config"]["data"] == "mine.csv"
    assert list(document["claims"]) == ["C3", "C5"]
    assert (
        "C1"
        not in run_lab("--data", str(path), "--only", "C1", "--out", str(out)).stdout
    )


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", loaded + "/" + images.length);
});
</script>"""


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)"
)
def test_report_renders_in_headless_chromium(quick_run, tmp_path) -> None:
    page = tmp_path / "report-check.html"
    page.write_text(
        (quick_run / "report.html").read_text().replace("</body>", CHECK + "</body>")
    )
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    images = dom.count("<img ")
    assert images >= 8 and f'data-images="{images}/{images}"' in dom
    for key in runner.CLAIM_KEYS:
        assert f'<section class="claim" id="{key}">' in dom
    screenshot = quick_run / "report.png"
    subprocess.run(
        [
            *flags,
            "--window-size=1200,3000",
            f"--screenshot={screenshot}",
            (quick_run / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert screenshot.stat().st_size > 10_000
    shutil.copy(
        screenshot, os.environ.get("OPTISCOPE_SCREENSHOT", tmp_path / "report.png")
    )

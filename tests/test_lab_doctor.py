"""The lab's "Doctor" section: optiscope doctor's findings on the lab's own
probed Adam and Momentum runs, in results.json and in report.html, with
--quick and --resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from optiscope.lab import cache
from optiscope.lab.files import MANIFEST, PARTIAL

LAB = [sys.executable, "-m", "optiscope", "lab"]


def run_lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAB, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lab-doctor") / "out"
    result = run_lab("--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_results_json_holds_the_doctor_findings(quick_run) -> None:
    doctor = json.loads((quick_run / "results.json").read_text())["doctor"]
    assert [r["optimizer"] for r in doctor["runs"]] == ["Adam", "Momentum"]
    assert all(r["steps"] >= 100 for r in doctor["runs"])
    findings = doctor["findings"]
    assert set(doctor["counts"]) == {"info", "warning", "error"}
    assert sum(doctor["counts"].values()) == len(findings)
    # Healthy runs: nothing above info.
    assert doctor["counts"]["warning"] == doctor["counts"]["error"] == 0
    assert all(f["severity"] == "info" for f in findings)
    for f in findings:
        assert {"code", "title", "scope", "steps", "evidence", "threshold"} <= set(f)
        assert {"basis", "action"} <= set(f)


def test_report_has_the_doctor_section(quick_run) -> None:
    page = (quick_run / "report.html").read_text()
    assert "<section id='doctor'><h2>Doctor</h2>" in page
    assert "A healthy run should show at most <b>info</b> findings" in page
    findings = json.loads((quick_run / "results.json").read_text())["doctor"]
    for f in findings["findings"]:
        assert f"<code>{f['scope']}</code>" in page
    # The resume cache, the doctor's included, is gone after success.
    assert not (quick_run / PARTIAL).exists()
    manifest = json.loads((quick_run / MANIFEST).read_text())["files"]
    assert not any(f.startswith(PARTIAL) for f in manifest)


def test_a_resumed_run_without_the_doctor_computes_it(quick_run, tmp_path) -> None:
    """An interrupted run's cache holds C2b but no doctor: --resume reuses C2b and
    computes the doctor, with the same findings (one seed, one result)."""
    out = tmp_path / "out"
    shutil.copytree(quick_run, out)
    document = json.loads((out / "results.json").read_text())
    (out / PARTIAL).mkdir()
    entry = f"{PARTIAL}/C2b.json"
    (out / entry).write_text(cache.entry(document["config"], document["claims"]["C2b"]))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].append(entry)
    (out / MANIFEST).write_text(json.dumps(manifest))
    result = run_lab("--quick", "--only", "C2b", "--resume", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "C2b (resumed)" in result.stderr
    assert "doctor (resumed)" not in result.stderr
    again = json.loads((out / "results.json").read_text())
    assert again["doctor"] == document["doctor"]
    assert "<section id='doctor'>" in (out / "report.html").read_text()
    assert not (out / PARTIAL).exists()

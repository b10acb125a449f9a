"""optiscope lab end to end (subprocesses): one --quick run shared by the module,
its verdicts re-derived from its own numbers, interruption and resume, stale
files, hostile text, a data set that cannot test every claim, and the report in
headless Chromium at two widths. Set OPTISCOPE_SLOW=1 for full runs on three
scikit-learn data sets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from optiscope.lab import cache, claims
from optiscope.lab.claims import CLAIMS, KEYS
from optiscope.lab.data import load
from optiscope.lab.files import LOCK, MANIFEST, PARTIAL, Folder
from optiscope.lab.verdicts import (
    NOT_APPLICABLE,
    Check,
    combine,
    criterion,
    decide,
)

LAB = [sys.executable, "-m", "optiscope", "lab"]
SLOW = pytest.mark.skipif(
    not os.environ.get("OPTISCOPE_SLOW"), reason="slow: set OPTISCOPE_SLOW=1"
)


def run_lab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAB, *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lab") / "out"
    result = run_lab("--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "optiscope lab: the study sheet's claims" in result.stdout  # table: stdout
    assert "report:" in result.stderr and "report:" not in result.stdout
    return out


@pytest.fixture(scope="module")
def document(quick_run: Path) -> dict:
    return json.loads((quick_run / "results.json").read_text())


def claims_of(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["claims"]


def test_claim_keys_come_from_the_registry() -> None:
    modules = sorted(p.stem for p in Path(claims.__file__).parent.glob("c[0-9]*_*.py"))
    assert tuple(CLAIMS) == KEYS
    assert len(modules) == len(KEYS)  # one module per claim, each registered
    assert sorted(KEYS) == list(KEYS)


@pytest.mark.parametrize("key", KEYS)
def test_verdict_and_criterion_follow_from_the_recorded_checks(document, key) -> None:
    """The criterion text and the verdict are re-derived here from the numbers
    each check recorded: text and code cannot disagree."""
    result = document["claims"][key]
    checks = [Check.from_json(c) for c in result["checks"]]
    for check, record in zip(checks, result["checks"], strict=True):
        assert decide(check) == record["outcome"]
        assert check.describe() == record["text"]
        if check.rule != "true":
            assert f"{check.threshold:.4g}" in record["text"]
    assert result["verdict"] == combine(checks)
    assert result["criterion"] == criterion(checks)
    assert cache.problems(result, key) == []


def test_every_claim_is_tested_on_the_digits(document) -> None:
    for key, result in document["claims"].items():
        assert result["verdict"] != NOT_APPLICABLE, key
        assert any(c["role"] == "evidence" for c in result["checks"]), key
        assert result["note"] and result["headline"]


def test_exact_claims_hold_and_the_identity_is_an_instrument(document) -> None:
    verdicts = {k: r["verdict"] for k, r in document["claims"].items()}
    assert verdicts["C1"] == verdicts["C4"] == verdicts["C5"] == "holds"
    identity = document["claims"]["C3"]["checks"][0]
    assert identity["role"] == "instrument" and identity["outcome"] == "holds"
    assert identity["interval"]["estimate"] < 1e-3
    gamma_one = document["claims"]["C4"]["checks"][-1]
    assert gamma_one["role"] == "instrument" and gamma_one["interval"]["high"] < 0.99
    # The big rock: at the same learning rate the EMA buffer is no heavier rock.
    assert verdicts["C2b"] != "holds"


def test_results_json_records_the_run(document) -> None:
    run = document["run"]
    assert set(run["versions"]) >= {"optiscope", "torch", "numpy", "python"}
    assert datetime.fromisoformat(run["started"]).tzinfo is not None
    assert 0 < run["wall_time_s"] < 600
    assert run["machine"]["cpus"] >= 1 and run["machine"]["torch_threads"] == 1
    assert document["data"]["preprocessing"].startswith(
        "pixel intensities divided by 16"
    )
    assert "study sheet" in document["source"]


def test_outputs_are_complete_and_owned(quick_run, document) -> None:
    figures = sorted(
        f"{k}-{i}.png"
        for k, r in document["claims"].items()
        for i in range(1, len(r["figures"]) + 1)
    )
    assert sorted(p.name for p in (quick_run / "figures").iterdir()) == figures
    header, *rows = (quick_run / "metrics.csv").read_text().splitlines()
    assert header == "claim,series,step,value" and len(rows) > 100
    present = sorted(
        str(p.relative_to(quick_run)) for p in quick_run.rglob("*") if p.is_file()
    )
    manifest = json.loads((quick_run / MANIFEST).read_text())["files"]
    assert present == sorted([*manifest, MANIFEST])  # nothing unlisted, no lock, no tmp
    assert not (quick_run / PARTIAL).exists() and not (quick_run / LOCK).exists()


def test_claims_give_the_same_numbers_alone_as_together(quick_run, tmp_path) -> None:
    result = run_lab("--quick", "--only", "c2b,C5", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    alone, together = claims_of(tmp_path), claims_of(quick_run)
    assert list(alone) == ["C2b", "C5"]
    for key in alone:
        assert alone[key] == together[key]


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_interrupt_then_resume_gives_the_same_results(quick_run, tmp_path, how) -> None:
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [*LAB, "--quick", "--only", "C1,C2b", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    finished = out / PARTIAL / "C1.json"
    deadline = time.monotonic() + 120
    while (
        not finished.exists() and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert finished.exists(), "the run never finished C1"
    process.send_signal(how)
    _, err = process.communicate(timeout=60)
    assert not (out / "results.json").exists()
    if how == signal.SIGINT:  # Ctrl-C: one line that names --resume, status 130
        assert process.returncode == 130
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("optiscope lab: interrupted") and "--resume" in last
    resumed = run_lab("--quick", "--only", "C1,C2b", "--resume", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "C1 (resumed)" in resumed.stderr
    document = json.loads((out / "results.json").read_text())
    assert document["run"]["resumed"][0] == "C1"
    for key in ("C1", "C2b"):
        assert document["claims"][key] == claims_of(quick_run)[key]


def test_a_new_run_removes_its_stale_figures_and_keeps_yours(
    quick_run, tmp_path
) -> None:
    out = tmp_path / "again"
    shutil.copytree(quick_run, out)
    (out / "figures" / "my-plot.png").write_bytes(b"mine")
    result = run_lab("--quick", "--only", "C2b", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "C2b-1.png",
        "my-plot.png",
    ]


HOSTILE = "<script>alert(1)</script>"


def test_hostile_text_in_data_and_resumed_records_is_escaped(tmp_path) -> None:
    from importlib import resources

    with resources.files("optiscope.lab").joinpath("data/digits.npz").open("rb") as f:
        archive = np.load(f)
        x, y = archive["X"][:300], archive["y"][:300]
    name = tmp_path / "<img src=x onerror=alert(1)>.csv"
    lines = [",".join([*(f"f{i}" for i in range(64)), "label"])]
    lines += [
        ",".join([*map(str, r.tolist()), f"<b>{v}</b>"])
        for r, v in zip(x, y, strict=True)
    ]
    name.write_text("\n".join(lines) + "\n")
    import torch

    import optiscope

    data = load(str(name), 0)
    config = {
        "seed": 0,
        "quick": True,
        "data": data.name,
        "data_sha256": data.sha256,
        "label_column": "label",
        "optiscope": optiscope.__version__,
        "torch": torch.__version__,
    }
    record = {
        "key": "C2b",
        "title": HOSTILE,
        "quote": f"</blockquote>{HOSTILE}",
        "method": "<b onmouseover=alert(1)>",
        "verdict": "inconclusive",
        "criterion": criterion([]),
        "checks": [],
        "headline": HOSTILE,
        "note": "'\"><svg onload=alert(1)>",
        "numbers": [{"label": HOSTILE, "value": "<img src=x>", "unit": "<u>"}],
        "tables": [
            {
                "title": HOSTILE,
                "columns": [{"key": "a", "label": HOSTILE}],
                "rows": [{"a": HOSTILE}],
            }
        ],
        "series": {},
        "figures": [],
    }
    out = tmp_path / "out"
    folder = Folder(out)
    folder.open()
    folder.write(f"{PARTIAL}/C2b.json", cache.entry(config, record))
    folder.close()
    result = run_lab(
        "--data", str(name), "--quick", "--resume", "--only", "C2b", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    page = (out / "report.html").read_text()
    lowered = page.lower()
    for raw in (
        "<script",
        "<img src=x",
        "<svg",
        "<b onmouseover",
        "<u>",
        "</blockquote><",
    ):
        assert raw not in lowered, raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;.csv" in page


def test_data_that_cannot_test_a_claim_says_why(tmp_path) -> None:
    from sklearn.datasets import load_iris

    iris = load_iris()
    path = tmp_path / "iris.csv"
    header = [*iris.feature_names, "label"]
    rows = [
        ",".join([*map(str, r), str(v)])
        for r, v in zip(iris.data, iris.target, strict=True)
    ]
    path.write_text("\n".join([",".join(header), *rows]) + "\n")
    out = tmp_path / "out"
    result = run_lab(
        "--data", str(path), "--quick", "--only", "C3,C8,C2b", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "results.json").read_text())
    for key in ("C3", "C8"):
        claim = document["claims"][key]
        assert claim["verdict"] == NOT_APPLICABLE
        assert (
            "needs at least 8 weights in each of the small-v and large-v"
            in claim["reason"]
        )
    assert document["data"]["preprocessing"].startswith("each feature standardised")
    page = (out / "report.html").read_text()
    assert "Claims not tested" in page and "C3</a> Adam gives larger steps" in page
    assert "C1: not run (--only)" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  const over = [];
  for (const section of document.querySelectorAll("main > section")) {
    const edge = section.getBoundingClientRect().right + 1;
    for (const el of section.querySelectorAll("*")) {
      const r = el.getBoundingClientRect();
      if (r.width > 0 && r.right > edge) over.push(section.id + ":" + el.tagName);
    }
  }
  for (const box of document.querySelectorAll(".scroll")) {
    if (box.scrollWidth > box.clientWidth + 1) over.push("scrolls:" + box.parentElement.id);
  }
  const ids = [...document.querySelectorAll("section[id]")].map(s => s.id);
  document.body.setAttribute("data-check", JSON.stringify({
    width: window.innerWidth, images: decoded + "/" + images.length,
    page: document.documentElement.scrollWidth <= window.innerWidth,
    over: over.slice(0, 8), sections: ids}));
});
</script>"""


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)"
)
@pytest.mark.parametrize("width", [1280, 700])
def test_report_in_headless_chromium(quick_run, document, tmp_path, width) -> None:
    page = tmp_path / "report-check.html"
    page.write_text(
        (quick_run / "report.html").read_text().replace("</body>", CHECK + "</body>")
    )
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={width},2000",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    start = dom.index("data-check=") + len("data-check=") + 1
    check = json.loads(
        dom[start : dom.index('"', dom.index("}", start))].replace("&quot;", '"')
    )
    figures = sum(len(r["figures"]) for r in document["claims"].values())
    assert check["width"] == width
    assert check["images"] == f"{figures}/{figures}", "an image did not decode"
    assert check["page"] and check["over"] == [], check["over"]
    assert set(check["sections"]) >= {"run", "summary", *KEYS}
    screenshot = tmp_path / f"report-{width}.png"
    subprocess.run(
        [*flags, f"--screenshot={screenshot}", (quick_run / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("OPTISCOPE_SCREENSHOT"):
        shutil.copy(
            screenshot, Path(os.environ["OPTISCOPE_SCREENSHOT"]) / screenshot.name
        )


@SLOW
@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer"])
def test_full_run_on_scikit_learn_data(tmp_path, name) -> None:
    """--data on three small tables: every verdict follows from its checks."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    np.savez(tmp_path / f"{name}.npz", X=bunch.data, y=bunch.target)
    result = run_lab(
        "--data",
        str(tmp_path / f"{name}.npz"),
        "--out",
        str(tmp_path / "out"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    for key, claim in document["claims"].items():
        checks = [Check.from_json(c) for c in claim["checks"]]
        if claim["verdict"] == NOT_APPLICABLE:
            assert claim["reason"], key
        else:
            assert claim["verdict"] == combine(checks), key
        assert cache.problems(claim, key) == [], key

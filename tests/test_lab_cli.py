"""``optiscope lab`` refuses bad input with one line and exit status 2, before it
runs anything: options, folders, broken data, and resume caches it cannot trust.
These run in-process (no claim runs), so they are fast."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import numpy as np
import pytest

import optiscope
from optiscope import cli
from optiscope.lab import cache
from optiscope.lab.claims import KEYS
from optiscope.lab.data import load
from optiscope.lab.files import PARTIAL, Folder
from optiscope.lab.runner import select


def lab(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(["lab", *args])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert lines == [
        f"optiscope lab: error: {lines[0].removeprefix('optiscope lab: error: ')}"
    ]
    assert message in lines[0], lines[0]


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(
        f"optiscope {optiscope.__version__} (torch "
    )


@pytest.mark.parametrize(
    ("tokens", "keys"),
    [
        (["C3,C4"], ["C3", "C4"]),
        (["c4", "C3"], ["C3", "C4"]),
        (["c2"], ["C2a", "C2b"]),
        (["C7B, c1"], ["C1", "C7b"]),
        (None, list(KEYS)),
    ],
)
def test_only_is_case_insensitive_and_takes_lists(tokens, keys) -> None:
    assert select(tokens) == keys


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--seed", "-1"],
            "argument --seed: must be an integer from 0 to 2147483647, got -1",
        ),
        (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
        (["--only"], "expected at least one argument"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_bad_options_exit_2_with_usage(capsys, args, message) -> None:
    code, out, err = lab(capsys, *args)
    assert code == 2 and out == ""
    assert "usage: optiscope lab" in err and message in err


def test_unknown_claim_is_named(capsys, tmp_path) -> None:
    code, _, err = lab(capsys, "--only", "C3,C9", "--out", str(tmp_path))
    assert code == 2
    one_error_line(err, f"unknown claim C9; choose from {', '.join(KEYS)}")


def test_foreign_folder_is_refused(capsys, tmp_path) -> None:
    (tmp_path / "thesis.tex").write_text("mine")
    code, _, err = lab(capsys, "--out", str(tmp_path))
    assert code == 2
    one_error_line(
        err, "is not empty and was not made by optiscope lab (it holds thesis.tex)"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_out_below_a_file_is_named(capsys, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = lab(capsys, "--out", str(blocker / "report"))
    assert code == 2
    one_error_line(err, f"cannot write to --out {blocker / 'report'}")


def test_figures_that_cannot_be_written_are_found_before_any_work(
    capsys, tmp_path
) -> None:
    (tmp_path / "figures").write_text("not a folder")
    code, _, err = lab(capsys, "--out", str(tmp_path), "--force")
    assert code == 2
    one_error_line(err, "figures: it exists and is not a folder")


def test_a_second_run_on_the_same_out_is_refused(capsys, tmp_path) -> None:
    running = Folder(tmp_path)
    running.open()
    try:
        code, _, err = lab(capsys, "--out", str(tmp_path))
    finally:
        running.close()
    assert code == 2
    one_error_line(err, "another optiscope lab (pid ")


def digits_rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    from importlib import resources

    with resources.files("optiscope.lab").joinpath("data/digits.npz").open("rb") as f:
        archive = np.load(f)
        return archive["X"][:n], archive["y"][:n]


def write_csv(
    path: Path, x: np.ndarray, y, header=None, encoding="utf-8", bom=b""
) -> Path:
    header = header or [f"f{i}" for i in range(x.shape[1])] + ["label"]
    lines = [",".join(header)] + [
        ",".join([*map(str, row.tolist()), str(label)])
        for row, label in zip(x, y, strict=True)
    ]
    path.write_bytes(bom + ("\n".join(lines) + "\n").encode(encoding))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda d, x, y: write_csv(d / "a.csv", x, y, [f"f{i}" for i in range(65)]),
            "missing label column 'label'",
        ),
        (
            lambda d, x, y: write_csv(d / "a.csv", x, np.zeros_like(y)),
            "a single class ('0')",
        ),
        (
            lambda d, x, y: write_csv(d / "a.csv", x[:40], y[:40]),
            "40 rows; the lab needs at least 50",
        ),
        (
            lambda d, x, y: write_csv(d / "a.csv", x[:, :0], y, ["label"]),
            "only the label column 'label'",
        ),
        (lambda d, x, y: write_csv(d / "a.csv", 0 * x, y), "every feature is constant"),
        (
            lambda d, x, y: (np.savez(d / "a.npz", X=x), d / "a.npz")[1],
            "missing array(s) ['y']",
        ),
        (
            lambda d, x, y: (
                np.savez(d / "a.npz", X=x.astype(object), y=y),
                d / "a.npz",
            )[1],
            "X is an object array",
        ),
        (
            lambda d, x, y: (d / "a.txt").write_text("x") and d / "a.txt",
            "expected a .csv or .npz",
        ),
        (lambda d, x, y: d / "missing.csv", "no such file"),
    ],
)
def test_malformed_data_gets_one_line(capsys, tmp_path, make, message) -> None:
    x, y = digits_rows(200)
    path = make(tmp_path, x, y)
    code, _, err = lab(capsys, "--data", str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    one_error_line(err, message)


def test_non_numeric_csv_value_is_located(capsys, tmp_path) -> None:
    x, y = digits_rows(200)
    cells = x.astype(object)
    cells[3, 5] = "n/a"
    lines = ["label," + ",".join(f"f{i}" for i in range(64))]
    lines += [
        f"{label}," + ",".join(map(str, row))
        for row, label in zip(cells, y, strict=True)
    ]
    path = tmp_path / "a.csv"
    path.write_text("\n".join(lines))
    code, _, err = lab(capsys, "--data", str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    one_error_line(err, "a.csv, line 5, column 'f5': non-numeric value 'n/a'")


@pytest.mark.parametrize(
    ("encoding", "bom", "expected"),
    [("utf-8", codecs.BOM_UTF8, "utf-8-sig"), ("latin-1", b"", "latin-1")],
)
def test_bom_and_latin_1_csv_load(tmp_path, encoding, bom, expected) -> None:
    x, y = digits_rows(200)
    path = write_csv(
        tmp_path / "a.csv", x, [f"chiffre-{v}-é" for v in y], encoding=encoding, bom=bom
    )
    data = load(str(path), seed=0)
    assert data.encoding == expected and data.n_classes == 10


# -- resume caches -------------------------------------------------------------------------


def digits_config(seed: int = 0, quick: bool = True) -> dict:
    import torch

    data = load(None, seed)
    return {
        "seed": seed,
        "quick": quick,
        "data": data.name,
        "data_sha256": data.sha256,
        "label_column": None,
        "optiscope": optiscope.__version__,
        "torch": torch.__version__,
    }


def plant(out: Path, key: str, text: str) -> None:
    """A cache file where an interrupted run of the lab would have left it."""
    folder = Folder(out)
    folder.open()
    folder.write(f"{PARTIAL}/{key}.json", text)
    folder.close()


def test_corrupt_cache_is_refused_on_resume(capsys, tmp_path) -> None:
    plant(tmp_path, "C5", '{"schema": 2, "config": ')
    code, _, err = lab(
        capsys, "--quick", "--resume", "--only", "C5", "--out", str(tmp_path)
    )
    assert code == 2
    one_error_line(
        err, "C5.json is not valid JSON (line 1: Expecting value); run without --resume"
    )


def test_cache_from_another_seed_is_refused_saying_what_differs(
    capsys, tmp_path
) -> None:
    plant(tmp_path, "C5", cache.entry(digits_config(seed=1), {"key": "C5"}))
    code, _, err = lab(
        capsys,
        "--quick",
        "--seed",
        "2",
        "--resume",
        "--only",
        "C5",
        "--out",
        str(tmp_path),
    )
    assert code == 2
    one_error_line(
        err, "C5.json was made with seed 1 (this run: 2); resume with the same options"
    )


def test_cache_with_other_options_is_refused(capsys, tmp_path) -> None:
    plant(tmp_path, "C5", cache.entry(digits_config(quick=False), {"key": "C5"}))
    code, _, err = lab(
        capsys, "--quick", "--resume", "--only", "C5", "--out", str(tmp_path)
    )
    assert code == 2
    one_error_line(err, "made with quick False (this run: True)")


def test_edited_cache_fails_its_hash(capsys, tmp_path) -> None:
    document = json.loads(cache.entry(digits_config(), {"key": "C5"}))
    document["config"]["seed"] = 0  # unchanged value, but hash recomputed below is not
    document["config_hash"] = "0" * 64
    plant(tmp_path, "C5", json.dumps(document))
    code, _, err = lab(
        capsys, "--quick", "--resume", "--only", "C5", "--out", str(tmp_path)
    )
    assert code == 2
    one_error_line(err, "does not match its own configuration hash")


def test_cache_failing_the_schema_is_refused(capsys, tmp_path) -> None:
    plant(tmp_path, "C5", cache.entry(digits_config(), {"key": "C5", "title": 3}))
    code, _, err = lab(
        capsys, "--quick", "--resume", "--only", "C5", "--out", str(tmp_path)
    )
    assert code == 2
    one_error_line(err, "fails the schema (field 'title' is missing or not text)")


def test_after_a_ctrl_c_only_compiler_finalizer_noise_is_dropped(monkeypatch) -> None:
    """An interrupted compile leaves LLVM objects whose finalizers raise at exit;
    the lab drops those, and still reports any other unraisable exception."""
    import sys
    from types import SimpleNamespace

    import llvmlite.binding.ffi as ffi

    from optiscope.lab.runner import _quiet_compiler_finalizers

    reported = []
    monkeypatch.setattr(sys, "__unraisablehook__", reported.append)
    compiler = SimpleNamespace(object=ffi.ObjectRef.__del__)
    other = SimpleNamespace(
        object=test_after_a_ctrl_c_only_compiler_finalizer_noise_is_dropped
    )
    _quiet_compiler_finalizers(compiler)
    _quiet_compiler_finalizers(other)
    assert reported == [other]

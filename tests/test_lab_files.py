"""The lab's output folder: it writes only files it owns, one run at a time, with
the umask's modes, and cleans up only after itself."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from optiscope.lab.files import LOCK, MANIFEST, PARTIAL, Folder, OutputError


def opened(path, force=False) -> Folder:
    folder = Folder(path, force=force)
    folder.open()
    return folder


def test_a_new_folder_is_made_owned_and_listed(tmp_path) -> None:
    folder = opened(tmp_path / "out")
    folder.write("results.json", "{}")
    folder.write(f"{PARTIAL}/C1.json", "{}")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["files"] == [f"{PARTIAL}/C1.json", "results.json"]
    folder.finish()
    folder.close()
    assert not (tmp_path / "out" / PARTIAL).exists()
    assert not (tmp_path / "out" / LOCK).exists()
    assert (tmp_path / "out" / "results.json").exists()


def test_a_foreign_folder_is_refused_unless_forced(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(
        OutputError,
        match=r"not empty and was not made by optiscope lab \(it holds notes.txt\)",
    ):
        opened(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no lock left
    folder = opened(tmp_path, force=True)
    folder.write("results.json", "{}")
    folder.finish()
    folder.close()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_only_owned_files_are_removed(tmp_path) -> None:
    folder = opened(tmp_path)
    folder.write("figures/C1-1.png", b"png")
    folder.write(f"{PARTIAL}/C1.json", "{}")
    (tmp_path / "figures" / "mine.png").write_bytes(b"user")
    (tmp_path / PARTIAL / "keep.txt").write_text("user")
    folder.remove("figures/mine.png")  # not the lab's: untouched
    folder.remove("figures/C1-1.png")
    folder.finish()
    folder.close()
    assert (tmp_path / "figures" / "mine.png").exists()
    assert not (tmp_path / "figures" / "C1-1.png").exists()
    assert (tmp_path / PARTIAL / "keep.txt").exists()  # its folder stays for it
    assert not (tmp_path / PARTIAL / "C1.json").exists()


def test_a_manifest_cannot_reach_outside_the_folder(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "victim.txt").write_text("x")
    document = {
        "tool": "optiscope lab",
        "files": ["../victim.txt", "/etc/passwd", "ok.json"],
    }
    (tmp_path / "out" / MANIFEST).write_text(json.dumps(document))
    folder = opened(tmp_path / "out")
    assert folder.owned == {"ok.json"}
    folder.remove("../victim.txt")
    folder.close()
    assert (tmp_path / "victim.txt").exists()


def test_an_unreadable_manifest_needs_force(tmp_path) -> None:
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(OutputError, match="unreadable"):
        opened(tmp_path)
    opened(tmp_path, force=True).close()


def test_a_second_run_on_the_same_folder_is_refused(tmp_path) -> None:
    first = opened(tmp_path)
    with pytest.raises(
        OutputError, match=rf"another optiscope lab \(pid {os.getpid()}\)"
    ):
        opened(tmp_path)
    first.close()
    opened(tmp_path).close()  # free again once the first is done


def test_figures_that_are_not_a_folder_are_refused_before_any_work(tmp_path) -> None:
    (tmp_path / "figures").write_text("a file")
    with pytest.raises(OutputError, match="figures: it exists and is not a folder"):
        opened(tmp_path, force=True)


def test_files_follow_the_umask(tmp_path) -> None:
    masks = (0o022, 0o027, 0o077)
    script = (
        "import os, pathlib; from optiscope.lab.files import Folder\n"
        f"for mask in {masks!r}:\n"
        f"    os.umask(mask); f = Folder(pathlib.Path({str(tmp_path)!r}) / oct(mask))\n"
        "    f.open(); f.write('results.json', '{}'); f.write('figures/a.png', b'x')\n"
        "    f.close()"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    for mask in masks:
        out = tmp_path / oct(mask)
        for name in ("results.json", "figures/a.png", MANIFEST):
            mode = stat.S_IMODE((out / name).stat().st_mode)
            assert mode == 0o666 & ~mask, f"{name}: {oct(mode)}"
        assert stat.S_IMODE((out / "figures").stat().st_mode) == 0o777 & ~mask

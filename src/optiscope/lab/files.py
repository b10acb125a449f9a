"""The lab's output folder: which files it owns, a lock, and writes that land whole.

The lab writes only files it owns. It lists them in ``.lab-manifest.json``
(written before the file itself, so a crash never leaves an unlisted file),
removes only listed files, and refuses a non-empty folder that has no manifest
unless ``--force``. A lock (``flock`` on ``.lab.lock``, released by the kernel
when the process dies) refuses a second run on the same folder. Files are
written to a temporary name, synced and renamed, with the mode the umask
gives a new file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path

LOCK = ".lab.lock"
MANIFEST = ".lab-manifest.json"
PARTIAL = ".lab-partial"
TOOL = "optiscope lab"


class OutputError(Exception):
    """A folder the lab will not or cannot write to; the message is one line."""


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: str | bytes, mode: int) -> None:
    """Write to a temporary file beside ``path``, fsync, chmod ``mode``, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)  # mkstemp makes 0600 whatever the umask
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Folder:
    """``--out``: opened (checked, locked) before any work, closed after success."""

    def __init__(self, root: Path, force: bool = False) -> None:
        self.root = root
        self.force = force
        self.mode = 0o666 & ~umask()
        self.owned: set[str] = set()  # paths relative to root, as in the manifest
        self._lock: int | None = None

    # -- opening ----------------------------------------------------------------------
    def open(self) -> None:
        """Create or adopt the folder and lock it; refuse one that is not the lab's."""
        try:
            self._open()
        except OutputError:
            self.close()
            raise

    def _open(self) -> None:
        root = self.root
        try:
            root.mkdir(parents=True, exist_ok=True)
            if not root.is_dir():
                raise NotADirectoryError(20, "Not a directory")
        except OSError as error:
            raise OutputError(
                f"cannot write to --out {root}: {error.strerror or error}"
            ) from None
        self._take_lock()
        manifest = root / MANIFEST
        if manifest.exists():
            owned = self._read_manifest(manifest)
            if owned is None and not self.force:
                raise OutputError(
                    f"--out {root}: {MANIFEST} is unreadable, so the lab cannot tell "
                    "its files from yours; pass --force to write there anyway, or "
                    "choose another folder"
                )
            self.owned = owned or set()
        else:
            foreign = sorted(
                p.name for p in root.iterdir() if p.name not in (LOCK, MANIFEST)
            )
            if foreign and not self.force:
                shown = ", ".join(foreign[:5]) + (" …" if len(foreign) > 5 else "")
                raise OutputError(
                    f"--out {root} is not empty and was not made by {TOOL} "
                    f"(it holds {shown}); choose another folder, or pass --force to "
                    "write the lab's files there (yours are left alone)"
                )
        self._save_manifest()
        self._check_writable(root / "figures", root / PARTIAL)

    def _take_lock(self) -> None:
        path = self.root / LOCK
        try:
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, self.mode)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 64).decode(errors="replace").strip()
                    os.close(fd)
                    raise OutputError(
                        f"another {TOOL} (pid {holder or '?'}) is writing to --out "
                        f"{self.root}; wait for it to finish or choose another folder"
                    ) from None
                # The holder before us may have removed the file after we opened it.
                if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as error:
            raise OutputError(
                f"cannot write to --out {self.root}: {error.strerror or error}"
            ) from None
        self._lock = fd

    def _read_manifest(self, path: Path) -> set[str] | None:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(document, dict) or document.get("tool") != TOOL:
            return None
        files = document.get("files")
        if not isinstance(files, list):
            return None
        return {f for f in files if isinstance(f, str) and _inside(f)}

    def _check_writable(self, *folders: Path) -> None:
        for folder in folders:
            try:
                if folder.exists() and not folder.is_dir():
                    raise OutputError(
                        f"cannot write to {folder}: it exists and is not a folder"
                    )
                folder.mkdir(exist_ok=True)
                fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
                os.close(fd)
                os.unlink(probe)
            except OSError as error:
                raise OutputError(
                    f"cannot write to {folder}: {error.strerror or error}"
                ) from None

    # -- writing ----------------------------------------------------------------------
    def write(self, relative: str, data: str | bytes) -> Path:
        """Write a file the lab owns (listed in the manifest before it exists)."""
        if relative not in self.owned:
            self.owned.add(relative)
            self._save_manifest()
        path = self.root / relative
        atomic_write(path, data, self.mode)
        return path

    def remove(self, relative: str) -> None:
        """Remove a file the lab owns; files it does not own are never touched."""
        if relative in self.owned:
            (self.root / relative).unlink(missing_ok=True)
            self.owned.discard(relative)
            self._save_manifest()

    def owned_under(self, folder: str) -> list[str]:
        return sorted(f for f in self.owned if f.startswith(folder + "/"))

    def _save_manifest(self) -> None:
        document = {"tool": TOOL, "files": sorted(self.owned)}
        atomic_write(
            self.root / MANIFEST, json.dumps(document, indent=1) + "\n", self.mode
        )

    # -- closing ----------------------------------------------------------------------
    def finish(self) -> None:
        """After success: drop the resume cache (only the lab's files in it)."""
        for relative in self.owned_under(PARTIAL):
            self.remove(relative)
        with contextlib.suppress(OSError):  # a user's file in it keeps it
            (self.root / PARTIAL).rmdir()

    def close(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.root / LOCK)
            os.close(self._lock)
            self._lock = None


def _inside(relative: str) -> bool:
    """A manifest entry names a file inside the folder, never ``..`` or absolute."""
    parts = Path(relative).parts
    return bool(parts) and not Path(relative).is_absolute() and ".." not in parts

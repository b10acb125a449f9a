"""numba options of the CPU kernels, and the one source stamp their disk cache uses.

numba's disk cache (``cache=True``) checks only the file that defines a
function: a kernel in :mod:`.adam` would keep its cached machine code after an
edit to :mod:`.bits`, which it inlines, or to a constant of
:mod:`optiscope.kernels.rows`, which numba freezes into it. So every kernel of
this package is stamped with a hash of all the package's sources plus
``rows.py`` and ``philox.py``: an edit to any of them recompiles them all.
Importing this module installs that stamp; the ``@njit`` lines of the package
must come after it (each module imports :data:`JIT` from here first).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

#: Every kernel: no GIL (the thread pool runs it in parallel), cached on disk.
JIT: dict[str, Any] = dict(nogil=True, cache=True)
#: Host-side helpers (tables, folds): ``x/0`` is inf, as in numpy.
HOST_JIT: dict[str, Any] = dict(cache=True, error_model="numpy")

_HERE = Path(__file__).resolve().parent
_SOURCES = (
    *sorted(_HERE.glob("*.py")),
    _HERE.parent / "rows.py",
    _HERE.parent / "philox.py",
)


@functools.cache
def package_stamp() -> bytes:
    """A hash of every source the kernels are compiled from."""
    digest = hashlib.sha256()
    for path in _SOURCES:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.digest()


def _install() -> None:
    """Put a locator in front of numba's own: for a function of this package it
    wraps the locator numba would have picked and replaces the per-file stamp
    by :func:`package_stamp`. Where numba's (private) caching internals differ,
    nothing is installed and the per-file stamp stays."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover
        return
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    classes = getattr(impl, "_locator_classes", None)
    if not isinstance(classes, list) or any(
        getattr(c, "optiscope", False) for c in classes
    ):
        return

    class PackageLocator:
        optiscope = True

        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def get_source_stamp(self) -> bytes:
            return package_stamp()

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if Path(py_file).resolve().parent != _HERE:
                return None
            for other in classes:
                if other is not cls:
                    inner = other.from_function(py_func, py_file)
                    if inner is not None:
                        return cls(inner)
            return None

    classes.insert(0, PackageLocator)


_install()

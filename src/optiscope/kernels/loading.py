"""Loading the CPU backend: on a thread where a step need not wait for it.

Before the first call of a numba kernel a process imports numba, sets up its
CPU target (which imports scipy.linalg) and loads the kernel from numba's
disk cache: about half a second of Python work, which torch's fused step does
not pay. A kernel not in the cache (a fresh install, or any edit to the
kernels' sources: :mod:`.cpu.jit`) compiles for seconds more.

So the first plain step of a process (Adam, AdamW or Momentum, no probe,
float32 or float64) starts that load on a thread (:func:`start`) and computes
itself with :mod:`.numpy_twin`, whose results are bitwise the kernels'; later
such steps do the same until the kernels are ready (:func:`ready`). Every
other CPU call (probes, float16 and bfloat16, dropout) waits for the load
(:func:`backend`). While the thread works it shares the GIL with the steps,
so both go slower than alone; it is still sooner than waiting. The thread is
not a daemon: a process that ends while it runs waits for it, so numba
finishes writing its cache.

The first kernel of ours that compiles in a process (not found in the cache)
logs one line, WARNING, on the ``optiscope`` logger: what is compiling and
that it happens once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

_log = logging.getLogger("optiscope")

_lock = threading.Lock()
_ready: ModuleType | None = None
_thread: threading.Thread | None = None


def ready() -> ModuleType | None:
    """The CPU backend if it is loaded and its first kernels are ready, else None."""
    return _ready


def pending() -> bool:
    """Whether the CPU backend is not ready but may still get ready without a
    wait: no load has started, or one is running. False once a load on the
    thread has failed: the next call of :func:`backend` then fails in its
    caller, rather than every step falling back for ever."""
    thread = _thread
    return _ready is None and (thread is None or thread.is_alive())


def backend() -> ModuleType:
    """The CPU backend, waiting for a load in progress or loading it here."""
    global _ready
    if _ready is None:
        thread = _thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if _ready is None:  # no load started, or it failed: fail here, if at all
            _ready = _import()
    return _ready


def start(warm: Callable[[ModuleType], None]) -> None:
    """Load the CPU backend on a thread, then ``warm(backend)`` there (one call
    of each kernel the coming steps take, which compiles or loads it); the
    backend is :func:`ready` after that. Once per process: later calls do nothing."""
    global _thread
    with _lock:
        if _thread is not None or _ready is not None:
            return
        _thread = threading.Thread(
            target=_load, args=(warm,), name="optiscope-load-kernels"
        )
        _thread.start()


def _load(warm: Callable[[ModuleType], None]) -> None:
    global _ready
    try:
        module = _import()
        warm(module)
    except Exception:
        # Not ready, then: the next call of backend() imports and calls the
        # kernel in the caller's thread, where the error is raised.
        _log.debug("loading the CPU kernels on a thread failed", exc_info=True)
        return
    _ready = module


def _import() -> ModuleType:
    from . import cpu

    _announce_compiles()
    return cpu


_announced = threading.Event()
_listening = threading.Lock()
_listener: object | None = None


def _announce_compiles() -> None:
    """Log one line when the first kernel of :mod:`.cpu` starts compiling."""
    from numba.core import event

    package = str(Path(__file__).resolve().parent / "cpu")

    class Announce(event.Listener):
        def on_start(self, ev: event.Event) -> None:
            func = getattr(ev.data.get("dispatcher"), "py_func", None)
            code = getattr(func, "__code__", None)
            if code is None or not code.co_filename.startswith(package):
                return
            if not _announced.is_set():
                _announced.set()
                _log.warning(
                    "optiscope: compiling its numba CPU kernels (%s first); this "
                    "takes seconds per kernel, once: they are cached on disk",
                    func.__name__,
                )

        def on_end(self, ev: event.Event) -> None:
            pass

    global _listener
    with _listening:
        if _listener is None:
            _listener = Announce()
            event.register("numba:compile", _listener)

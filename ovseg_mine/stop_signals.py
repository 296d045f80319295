"""SIGINT and SIGTERM stop a mining run the same way: no new work, committed shards kept, a readable manifest.

SIGTERM is what Slurm, Kubernetes and spot preemption send before they kill; SIGINT is Ctrl-C. The CLI installs
:func:`install` before a run; Ray's ``init`` replaces the SIGTERM handler with its own (``sys.exit(signum)`` in
``ray/_private/worker.py``), so the driver calls :func:`reinstall` once Ray is up. A signal raises
:class:`StopRequested` in the main thread, except inside :func:`critical` sections (a shard's commit, the manifest
write, Ray's shutdown), where it is held and raised when the section ends: a stop never leaves a half-committed
shard or a folder without its manifest.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["StopRequested", "critical", "hold", "install", "installed", "reinstall", "uninstall"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """A stop signal arrived. A :class:`KeyboardInterrupt`, so code that cleans up on Ctrl-C cleans up on it too.

    Attributes:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        exit_code: the shell's code for a process ended by that signal, ``128 + signum`` (130, 143).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum

    @property
    def name(self) -> str:
        """``SIGINT`` or ``SIGTERM``."""
        return signal.Signals(self.signum).name


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.depth = 0  # nesting of critical sections
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}


_state = _State()


def _handler(signum: int, frame: Any) -> None:
    if _state.depth:
        if _state.pending is None:
            _state.pending = signum
        return
    raise StopRequested(signum)


def install() -> None:
    """Handle SIGINT and SIGTERM in this process (main thread only) by raising :class:`StopRequested`.

    Raises:
        ValueError: called from a thread other than the main thread (Python's rule for signal handlers).
    """
    for signum in _SIGNALS:
        current = signal.getsignal(signum)
        if current is not _handler:
            _state.previous.setdefault(signum, current)
        signal.signal(signum, _handler)
    _state.installed = True


def installed() -> bool:
    """True between :func:`install` and :func:`uninstall`."""
    return _state.installed


def reinstall() -> None:
    """Put the handlers back after a library (Ray's ``init``) replaced them; does nothing unless :func:`install` was
    called (a library caller of :func:`ovseg_mine.mine.run.driver.mine` keeps its own handlers)."""
    if _state.installed and threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            signal.signal(signum, _handler)


def uninstall() -> None:
    """Restore the handlers that :func:`install` replaced."""
    if not _state.installed:
        return
    for signum, previous in _state.previous.items():
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    _state.previous.clear()
    _state.installed = False
    _state.pending = None


def hold(signum: int) -> None:
    """Record ``signum`` as arrived inside the current critical section (for a signal that another library's
    handler took: Ray's ``sys.exit(SIGTERM)`` during its ``init``); raised as the section ends.

    Raises:
        StopRequested: called outside a critical section (the stop is then raised at once).
    """
    if not _state.depth:
        raise StopRequested(signum)
    if _state.pending is None:
        _state.pending = signum


@contextmanager
def critical() -> Iterator[None]:
    """Hold stop signals while the block runs; a signal that arrived meanwhile raises :class:`StopRequested` as the
    outermost section ends (after the block's own work is done, even when the block raised)."""
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if not _state.depth and _state.pending is not None:
            signum, _state.pending = _state.pending, None
            raise StopRequested(signum)

"""Stop signals in this very process (real signals sent with os.kill): SIGTERM and SIGINT raise StopRequested with
the shell's exit code, a signal inside a critical section waits for its end, and the previous handlers come back."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ovseg_mine import stop_signals
from ovseg_mine.stop_signals import StopRequested, critical


@pytest.fixture
def installed():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop_signals.install()
    yield
    stop_signals.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.2)  # the handler runs in the main thread at the next bytecode boundary


@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_raises_stop_requested_with_the_shells_exit_code(installed, signum, code, name):
    with pytest.raises(StopRequested) as caught:
        _deliver(signum)
    assert caught.value.exit_code == code and caught.value.name == name
    assert isinstance(caught.value, KeyboardInterrupt)  # code that cleans up on Ctrl-C cleans up on SIGTERM too


def test_a_signal_inside_a_critical_section_waits_for_its_end(installed):
    steps = []
    with pytest.raises(StopRequested) as caught:
        with critical():
            _deliver(signal.SIGTERM)
            steps.append("after the signal")
            with critical():  # nested: still held
                _deliver(signal.SIGINT)
                steps.append("nested")
            steps.append("end of the section")
    assert steps == ["after the signal", "nested", "end of the section"]
    assert caught.value.name == "SIGTERM"  # the first signal is the one reported
    # Nothing is left pending: the next section ends quietly.
    with critical():
        pass


def test_reinstall_undoes_a_library_that_replaced_the_handler(installed):
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # what Ray's init does, in effect
    stop_signals.reinstall()
    with pytest.raises(StopRequested):
        _deliver(signal.SIGTERM)


def test_reinstall_does_nothing_for_a_library_caller():
    def own(signum, frame):
        return None

    previous = signal.signal(signal.SIGTERM, own)
    try:
        stop_signals.reinstall()
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)

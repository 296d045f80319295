"""One run per folder: a lock on local disks, a lease object on object stores (a local moto S3 server)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ovseg_mine.mine.run import run_lock
from ovseg_mine.mine.run.run_lock import LEASE_FILE, Holder, RunInUse, hold_run
from ovseg_mine.storage import resolve


def test_a_held_local_folder_is_refused_at_once_naming_the_holder(tmp_path):
    run = resolve(tmp_path / "run")
    with hold_run(run) as holder:
        with pytest.raises(RunInUse) as info:
            with hold_run(run):
                pass
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message and holder.started in message
        assert "\n" not in message
    with hold_run(run):  # released
        pass


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    code = (
        "import sys, time; from ovseg_mine.mine.run.run_lock import hold_run; from ovseg_mine.storage import resolve\n"
        "with hold_run(resolve(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunInUse, match=f"pid {proc.pid}"):
            with hold_run(resolve(tmp_path / "run")):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with hold_run(resolve(tmp_path / "run")):  # the kernel released the dead run's lock
        pass


@pytest.fixture
def fast_lease(monkeypatch):
    """Settle and renewal short enough for a test (the protocol is the same). The lease itself stays long: on a
    loaded machine a test may pause for seconds, and a lease that expired meanwhile would fail it by timing."""
    monkeypatch.setattr(run_lock, "SETTLE_S", 0.2)
    monkeypatch.setattr(run_lock, "RENEW_S", 0.3)
    monkeypatch.setattr(run_lock, "LEASE_S", 30.0)


def _lease(s3_run) -> Holder:
    return Holder.parse(s3_run.join(LEASE_FILE).read_bytes())


def test_a_lease_on_an_object_store_is_held_renewed_refused_and_released(s3, fast_lease):
    run = resolve(f"{s3}/run")
    with hold_run(run) as holder:
        first = _lease(run)
        assert first.token == holder.token and first.expires > time.time()
        with pytest.raises(RunInUse, match=f"pid {os.getpid()}"):
            with hold_run(run):
                pass
        time.sleep(1.0)
        assert _lease(run).expires > first.expires  # renewed while the run works
    assert not run.join(LEASE_FILE).exists()  # released


def test_stale_leases_are_taken_over(s3, fast_lease):
    run = resolve(f"{s3}/run")
    lease = run.join(LEASE_FILE)
    # A run on this host whose process is gone (killed): its lease is stale at once, even before it expires.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease.write_bytes(Holder(socket.gethostname(), int(dead.stdout), "t0", "a" * 32, time.time() + 3600).to_bytes())
    with hold_run(run) as holder:
        assert _lease(run).token == holder.token
    # A run on another host: its lease counts until it expires.
    other = Holder("other-host", 1, "t0", "b" * 32, time.time() + 3600)
    lease.write_bytes(other.to_bytes())
    with pytest.raises(RunInUse, match="host other-host, pid 1, started t0"):
        with hold_run(run):
            pass
    lease.write_bytes(Holder("other-host", 1, "t0", "b" * 32, time.time() - 1).to_bytes())
    with hold_run(run):
        pass


def test_of_two_runs_that_write_their_lease_at_once_one_goes_on(s3, fast_lease, monkeypatch):
    """The race the settle time is for: another run's lease lands after ours was written, before we read it back."""
    run = resolve(f"{s3}/run")
    rival = Holder("other-host", 2, "t1", "c" * 32, time.time() + 3600)
    sleep = time.sleep

    def rival_writes_during_settle(seconds: float) -> None:
        run.join(LEASE_FILE).write_bytes(rival.to_bytes())
        sleep(seconds)

    monkeypatch.setattr(run_lock.time, "sleep", rival_writes_during_settle)
    with pytest.raises(RunInUse, match="host other-host, pid 2"):
        with hold_run(run):
            pass
    assert json.loads(run.join(LEASE_FILE).read_bytes())["token"] == rival.token  # the winner's lease is untouched

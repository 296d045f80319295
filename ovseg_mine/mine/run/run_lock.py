"""One run per folder: a second ``mine`` into a run folder in use stops at once and names the run that holds it.

Two runs in one folder would each mine every image and race on the same shards. So a run holds its folder
while it works:

* **local disks** (and shared file systems with POSIX locks): an exclusive ``flock`` on ``RUN/.lock``, whose
  content names the holder. The kernel releases the lock when the holder exits in any way (SIGKILL, OOM, power
  cut of the process), so a killed run never blocks its resume.
* **object stores** (no locks): a lease object ``RUN/.lease.json`` that names the holder and an expiry
  (:data:`LEASE_S` ahead), renewed every :data:`RENEW_S` by a thread while the run works and deleted when it
  ends. A lease that has expired, or whose holder is a process on this host that is no longer running, is
  stale and taken over, so a run killed on this host resumes at once, and one killed elsewhere after at most
  :data:`LEASE_S`. Object stores have no compare-and-swap that works everywhere, so taking a lease is: read
  it, write ours, wait :data:`SETTLE_S`, read it back; two runs started within the same instant both see the
  last writer's lease after the wait, and only that one goes on (strong read-after-write consistency, as S3
  and GCS give). Hosts' clocks must agree to well within :data:`LEASE_S`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from ovseg_mine.mine.errors import RunError
from ovseg_mine.storage import Location, StorageError

log = logging.getLogger("ovseg_mine")

#: The lock file of a run folder on a local disk.
LOCK_FILE = ".lock"
#: The lease object of a run folder on an object store.
LEASE_FILE = ".lease.json"
#: Seconds a lease lasts without renewal.
LEASE_S = 60.0
#: Seconds between renewals of a held lease.
RENEW_S = 15.0
#: Seconds between writing a lease and reading it back to see who won.
SETTLE_S = 2.0


class RunInUse(RunError):
    """The run folder is held by another run; the message names it (host, pid, start time)."""


@dataclass(frozen=True)
class Holder:
    """The run that holds a folder.

    Attributes:
        host: its machine's host name.
        pid: its driver's process id on that host.
        started: when it took the folder (ISO 8601, UTC).
        token: unique per run, to tell two runs of the same process apart.
        expires: lease expiry (seconds since the epoch); 0 for a local lock.
    """

    host: str
    pid: int
    started: str
    token: str
    expires: float = 0.0

    @classmethod
    def this_run(cls) -> "Holder":
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), started, uuid.uuid4().hex)

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        """The holder a lock or lease names, None if it names none (empty, or not ours)."""
        try:
            fields = json.loads(data)
            return cls(
                host=str(fields["host"]),
                pid=int(fields["pid"]),
                started=str(fields["started"]),
                token=str(fields["token"]),
                expires=float(fields.get("expires", 0.0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    def running(self, now: float) -> bool:
        """Whether this holder's lease still counts: not expired, and (on this host) its process is alive."""
        if self.expires <= now:
            return False
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            return True
        return True


def _in_use(run: Location, holder: Holder | None) -> RunInUse:
    who = holder.describe() if holder else "holder unknown"
    return RunInUse(f"{run} is in use by another ovseg-mine run ({who}); wait for it to end or stop it")


@contextlib.contextmanager
def hold_run(run: Location) -> Iterator[Holder]:
    """Hold the run folder ``run`` for the block: a lock on a local disk, a lease on an object store.

    Yields:
        This run's :class:`Holder`.

    Raises:
        RunInUse: another run holds the folder (at once, without waiting).
        RunError: a local folder cannot be written (a full disk: one line, :func:`cannot_write`).
        ovseg_mine.storage.StorageError: an object store folder cannot be written.
    """
    holder = Holder.this_run()
    hold = _local_lock if run.is_local else _lease
    with hold(run, holder):
        yield holder


def cannot_write(run: Location, what: str, exc: OSError) -> RunError:
    """The one-line error of a run folder that cannot be written (a full disk, a read-only file system, no
    permission): names the folder, what was being written and the system's reason."""
    reason = "no space left on the device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
    return RunError(f"cannot write {what} in the run folder {run}: {reason}")


@contextlib.contextmanager
def _local_lock(run: Location, holder: Holder) -> Iterator[None]:
    import fcntl

    path = os.path.join(run.path, LOCK_FILE)
    try:
        run.makedirs()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (O_CLOEXEC)
    except OSError as exc:
        raise cannot_write(run, LOCK_FILE, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run, Holder.parse(os.pread(fd, 4096, 0))) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.to_bytes(), 0)
        except OSError as exc:  # e.g. ENOSPC: the disk is full before the run has written anything
            raise cannot_write(run, LOCK_FILE, exc) from exc
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_lease(lease: Location) -> Holder | None:
    try:
        return Holder.parse(lease.read_bytes()) if lease.is_file() else None
    except StorageError:
        return None


@contextlib.contextmanager
def _lease(run: Location, holder: Holder) -> Iterator[None]:
    lease = run.join(LEASE_FILE)
    current = _read_lease(lease)
    if current is not None and current.running(time.time()):
        raise _in_use(run, current)
    mine = Holder(holder.host, holder.pid, holder.started, holder.token, time.time() + LEASE_S)
    lease.write_bytes(mine.to_bytes())
    time.sleep(SETTLE_S)
    winner = _read_lease(lease)
    if winner is None or winner.token != holder.token:
        raise _in_use(run, winner)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lease, mine, stop), name="ovseg-mine-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        current = _read_lease(lease)
        if current is not None and current.token == holder.token:
            with contextlib.suppress(StorageError):
                lease.delete()


def _renew(lease: Location, holder: Holder, stop: threading.Event) -> None:
    """Push the lease's expiry forward every RENEW_S until ``stop``; a failed renewal is logged and retried."""
    while not stop.wait(RENEW_S):
        try:
            current = _read_lease(lease)
            if current is not None and current.token != holder.token:
                log.warning("the lease of %s was taken by another run (%s)", lease.parent, current.describe())
                return
            lease.write_bytes(Holder(**{**asdict(holder), "expires": time.time() + LEASE_S}).to_bytes())
        except StorageError as exc:
            log.warning("could not renew the lease %s: %s", lease, exc)

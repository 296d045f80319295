"""The driver's watch over the Ray graph's results: a stall after a lost node becomes a resumable stop.

Ray Data's iterator blocks for as long as Ray has nothing to give. When a node dies, Ray resubmits the tasks whose
outputs were on it and restarts its actors elsewhere; where the cluster left has no room for them (a mask/match
actor needs a GPU or a CPU that no node has free), the resubmitted work waits forever and so would the driver.
:func:`watched` passes the results through in the calling (main) thread, so a stop signal or an error unwinds Ray
Data's iterator, which shuts its execution down before Ray itself is shut down; a watchdog thread looks at the
cluster's nodes while the driver waits, and once a node that was alive at the start is gone and no result has come
for ``stall_s`` seconds it interrupts the wait (a ``SIGUSR1`` to the main thread, whose handler raises
:class:`NodeLostError`). Shards committed by then are kept; a rerun resumes on the nodes there are.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ovseg_mine.mine.errors import RunError

__all__ = ["NodeLostError", "alive_nodes", "watched"]

#: Seconds between two looks at the cluster's nodes while the driver waits for a result.
POLL_S = 1.0
#: The signal the watchdog sends the main thread to end a stalled wait.
WAKE = signal.SIGUSR1


class NodeLostError(RunError):
    """A node of the cluster died and the run made no progress for the stall limit after it."""


def alive_nodes() -> dict[str, str]:
    """The cluster's live nodes, ``{node id: address}`` (``ray.nodes()``; Ray must be initialised)."""
    import ray

    return {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in ray.nodes() if node.get("Alive")}


class _Watchdog:
    """Looks at the nodes while the main thread waits; sends it :data:`WAKE` once a loss has stalled the run."""

    def __init__(self, stall_s: float, nodes: Callable[[], dict[str, str]], at_start: dict[str, str], poll_s: float):
        self.stall_s, self.nodes, self.at_start, self.poll_s = stall_s, nodes, at_start, poll_s
        self.waiting_since: float | None = None  # set while the main thread waits for the next result
        self.lost: dict[str, str] = {}
        self.lost_since: float | None = None
        self.message = ""
        self.done = threading.Event()
        self.main = threading.main_thread().ident

    def run(self) -> None:
        while not self.done.wait(self.poll_s):
            since = self.waiting_since
            if since is None:
                continue
            try:
                now_alive = self.nodes()
            except Exception:  # noqa: BLE001 - the GCS may be busy; look again at the next poll
                continue
            now = time.monotonic()
            gone = {i: a for i, a in self.at_start.items() if i not in now_alive}
            if gone and self.lost_since is None:
                self.lost, self.lost_since = gone, now
            if self.lost_since is not None and now - max(self.lost_since, since) >= self.stall_s:
                where = ", ".join(f"{address} ({node_id[:8]})" for node_id, address in sorted(self.lost.items()))
                self.message = (
                    f"lost Ray node(s) {where} and no image finished in the {self.stall_s:.0f} s since: the nodes left "
                    "cannot take over their work; finished shards are kept: rerun the same command to resume"
                )
                if self.waiting_since is not None:  # sent again at each poll until the wait ends
                    signal.pthread_kill(self.main, WAKE)

    def wake(self, signum: int, frame: Any) -> None:
        """The :data:`WAKE` handler, in the main thread."""
        if self.message and self.waiting_since is not None:
            raise NodeLostError(self.message)


def watched(
    results: Iterable[Any],
    *,
    stall_s: float,
    nodes: Callable[[], dict[str, str]] = alive_nodes,
    at_start: dict[str, str] | None = None,
    poll_s: float = POLL_S,
) -> Iterator[Any]:
    """Yield the items of ``results``, ending the wait for one with :class:`NodeLostError` when a node loss stalls
    the run. Call it from the main thread (signal handlers live there); elsewhere it only passes items through.

    Args:
        results: the iterator to drain (Ray Data's rows); its exceptions come through unchanged.
        stall_s: after a node loss, seconds without an item before giving up.
        nodes: the live nodes now, ``{id: address}`` (default: Ray's); called every ``poll_s`` seconds while the
            caller waits for an item.
        at_start: the nodes a loss is counted against (default: ``nodes()`` now); a driver that starts its graph
            again after a loss passes the run's first set, so a stall of the new graph is seen as one.
        poll_s: seconds between two calls of ``nodes`` while waiting.

    Raises:
        NodeLostError: a node alive at the start is gone and no item came for ``stall_s`` seconds since it was
            seen gone (or since the last item, whichever is later). The message names the node(s).
    """
    if threading.current_thread() is not threading.main_thread():
        yield from results
        return
    watchdog = _Watchdog(stall_s, nodes, nodes() if at_start is None else at_start, poll_s)
    previous = signal.signal(WAKE, watchdog.wake)
    thread = threading.Thread(target=watchdog.run, name="ovseg-mine-node-watch", daemon=True)
    thread.start()
    iterator = iter(results)
    try:
        while True:
            watchdog.waiting_since = time.monotonic()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                watchdog.waiting_since = None
            yield item
    finally:
        watchdog.done.set()
        thread.join()
        signal.signal(WAKE, previous)

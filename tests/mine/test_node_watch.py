"""The driver's watch over the results: items pass through in order, a stall after a node loss ends the run with a
NodeLostError naming the node, a run that keeps making progress after a loss goes on, errors come through unchanged,
and the main thread stays free for stop signals while Ray has nothing to give. (The real node loss, on a real
two-node Ray cluster, is tests/e2e/test_cluster.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from ovseg_mine import stop_signals
from ovseg_mine.mine.errors import RunError
from ovseg_mine.mine.run.node_watch import NodeLostError, watched


class Cluster:
    """Live nodes as a test sets them: ``{id: address}``."""

    def __init__(self) -> None:
        self.nodes = {"a" * 16: "10.0.0.1", "b" * 16: "10.0.0.2"}

    def __call__(self) -> dict[str, str]:
        return dict(self.nodes)

    def lose(self, node_id: str) -> None:
        self.nodes.pop(node_id)


def test_items_pass_through_in_order():
    assert list(watched(iter(range(1000)), stall_s=1, nodes=Cluster())) == list(range(1000))


def test_a_stall_after_a_node_loss_stops_the_run_naming_the_node():
    cluster = Cluster()

    def results():
        yield 1
        cluster.lose("b" * 16)
        time.sleep(60)  # Ray waiting forever for work that was on the lost node
        yield 2

    got, started = [], time.monotonic()
    with pytest.raises(NodeLostError) as caught:
        for item in watched(results(), stall_s=1.5, nodes=cluster, poll_s=0.1):
            got.append(item)
    assert got == [1]
    assert 1.5 <= time.monotonic() - started < 10
    assert isinstance(caught.value, RunError)
    assert "10.0.0.2 (bbbbbbbb)" in str(caught.value) and "rerun the same command to resume" in str(caught.value)


def test_a_run_that_goes_on_after_a_node_loss_is_not_stopped():
    cluster = Cluster()

    def results():
        cluster.lose("b" * 16)
        for item in range(12):
            time.sleep(0.2)  # each item well within the stall limit, all of them together well past it
            yield item

    assert list(watched(results(), stall_s=1.0, nodes=cluster, poll_s=0.05)) == list(range(12))


def test_a_slow_run_without_a_node_loss_is_not_stopped():
    def results():
        time.sleep(1.0)
        yield "late"

    assert list(watched(results(), stall_s=0.2, nodes=Cluster(), poll_s=0.05)) == ["late"]


def test_errors_of_the_results_come_through_unchanged():
    def results():
        yield 1
        raise ValueError("a Ray task failed")

    got = []
    with pytest.raises(ValueError, match="a Ray task failed"):
        for item in watched(results(), stall_s=1, nodes=Cluster()):
            got.append(item)
    assert got == [1]


def test_a_stop_signal_is_taken_while_ray_has_nothing_to_give():
    def results():
        time.sleep(60)
        yield 1

    stop_signals.install()
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        with pytest.raises(stop_signals.StopRequested):
            list(watched(results(), stall_s=100, nodes=Cluster(), poll_s=0.1))
        assert time.monotonic() - started < 5
    finally:
        stop_signals.uninstall()

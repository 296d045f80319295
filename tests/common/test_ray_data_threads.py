"""shutdown_ray's wait for Ray Data's threads (ovseg_mine.ray_session.join_ray_data_threads), with real threads named
as Ray Data names them: a thread that touches Ray after ray.shutdown ends the whole process with exit code 1."""

from __future__ import annotations

import threading
import time

from ovseg_mine.ray_session import join_ray_data_threads, ray_data_threads


def _thread(name: str, until: threading.Event | None = None, seconds: float = 0.0) -> threading.Thread:
    def run() -> None:
        if until is not None:
            until.wait(30)
        time.sleep(seconds)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def test_ray_datas_threads_are_waited_for_and_others_are_not():
    finish, release = threading.Event(), threading.Event()
    prefetcher = _thread("Prefetcher", until=finish, seconds=0.5)  # a block prefetcher finishing its ray.wait
    pool = _thread("map_tp_transforming_worker-3-0", until=finish, seconds=0.3)
    other = _thread("someone-elses-thread", until=release)
    try:
        found = ray_data_threads()
        assert prefetcher in found and pool in found and other not in found
        finish.set()
        started = time.monotonic()
        assert join_ray_data_threads(10) == []
        assert not prefetcher.is_alive() and not pool.is_alive() and other.is_alive()
        assert 0.4 < time.monotonic() - started < 5
    finally:
        finish.set()
        release.set()


def test_a_thread_that_does_not_end_is_returned_after_the_timeout():
    release = threading.Event()
    stuck = _thread("iter_threaded", until=release)
    try:
        started = time.monotonic()
        assert join_ray_data_threads(0.3) == [stuck]
        assert 0.25 < time.monotonic() - started < 5
    finally:
        release.set()
        stuck.join(5)


def test_a_parked_block_prefetcher_is_stopped_and_its_thread_ends():
    """Ray Data's own prefetcher (no Ray needed while it has no block to fetch): its iterator closed early leaves it
    parked until garbage collection; the wait stops it, so its thread ends and never wakes after Ray's shutdown."""
    from ray.data._internal.block_batching.util import WaitBlockPrefetcher

    prefetcher = WaitBlockPrefetcher()
    thread = prefetcher._thread
    assert thread.is_alive() and thread in ray_data_threads()
    started = time.monotonic()
    assert join_ray_data_threads(10) == []
    assert not thread.is_alive() and time.monotonic() - started < 5

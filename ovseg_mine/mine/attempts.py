"""Poison-image detection across worker deaths: which image was a mask/match actor on when it died?

A Python exception inside an actor is caught per image and listed. A *death* (the kernel's OOM killer, a
segfault in a native library, a fatal GPU error) is not: Ray restarts the actor and retries its whole batch
(``max_restarts`` / ``max_task_retries``). If one image in the batch is what kills the worker, that retry
loops forever. So each actor reports ``begin(image_id)`` before an image and ``end(image_id)`` after it to
one small :class:`AttemptTracker` actor owned by the driver. An image that was begun but never ended was on
a worker that died; after ``max_attempts`` such deaths the image is listed as failed and skipped, so the
retried batch completes and the run goes on. State lives in the tracker, not in the dying worker, and the
tracker is a Ray actor, so this also works across the nodes of a cluster.
"""

from __future__ import annotations


class AttemptTracker:
    """Counts, per image id, how many times a worker began the image and did not end it.

    Used as a Ray actor (``ray.remote(num_cpus=0)(AttemptTracker).remote()``); plain methods, so it is also
    testable as a Python object.
    """

    def __init__(self) -> None:
        self._open: dict[int, int] = {}

    def begin(self, image_id: int) -> int:
        """Record a start on ``image_id``; returns the number of earlier starts that never ended (deaths)."""
        deaths = self._open.get(image_id, 0)
        self._open[image_id] = deaths + 1
        return deaths

    def end(self, image_id: int) -> None:
        """Record that ``image_id`` finished (with a result row, whatever its status)."""
        self._open.pop(image_id, None)


def worker_death_reason(deaths: int) -> str:
    """The reject reason of an image skipped after ``deaths`` worker deaths."""
    return (
        f"the worker process died {deaths} times while mining this image (out of memory, a GPU fault or a "
        "crash in a native library); skipped so that the run goes on"
    )

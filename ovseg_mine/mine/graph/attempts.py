"""Poison-image detection across worker deaths: which image was a mask/match actor on when it died?

A Python exception inside an actor is caught per image and listed. A *death* (the kernel's OOM killer, a
segfault in a native library, a fatal GPU error) is not: Ray restarts the actor and retries its whole batch
(``max_restarts`` / ``max_task_retries``). If one image in the batch is what kills the worker, that retry
loops forever. So each actor reports ``begin(image_ids)`` before a batch and ``end(image_ids)`` after it to
one small :class:`AttemptTracker` actor owned by the driver. An image that was begun but never ended was on
a worker that died; a batch that comes back after a death is mined one image at a time, and after
``max_attempts`` deaths an image is listed as failed and skipped, so the retried batch completes and the run
goes on. State lives in the tracker, not in the dying worker, and the
tracker is a Ray actor, so this also works across the nodes of a cluster.
"""

from __future__ import annotations


class AttemptTracker:
    """Counts, per image id, how many times a worker began the image and never ended it (a death).

    Used as a Ray actor (``ray.remote(num_cpus=0)(AttemptTracker).remote()``); plain methods, so it is also
    testable as a Python object. A GPU actor calls :meth:`begin` once per batch (one ``ray.get``) and
    :meth:`end` without waiting. When a batch comes back after a death (some image has deaths > 0), the actor
    ends the whole batch and begins and ends its images one at a time, so that the next death is counted on the
    one image that was running: the image that kills the worker reaches ``max_image_attempts`` while the others
    of its batch are mined.
    """

    def __init__(self) -> None:
        self._open: set[int] = set()
        self._deaths: dict[int, int] = {}

    def begin(self, image_ids: list[int]) -> list[int]:
        """Record a start on each image; returns each image's deaths (starts that never ended), in order."""
        deaths = []
        for image_id in image_ids:
            if image_id in self._open:
                self._deaths[image_id] = self._deaths.get(image_id, 0) + 1
            self._open.add(image_id)
            deaths.append(self._deaths.get(image_id, 0))
        return deaths

    def end(self, image_ids: list[int]) -> None:
        """Record that these images finished (with a result row, whatever its status)."""
        self._open.difference_update(image_ids)


def worker_death_reason(deaths: int) -> str:
    """The reject reason of an image skipped after ``deaths`` worker deaths."""
    return (
        f"the worker process died {deaths} times while mining this image (out of memory, a GPU fault or a "
        "crash in a native library); skipped so that the run goes on"
    )

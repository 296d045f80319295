"""Failed images: their tracebacks in the run's log, counts by exception type, and a stop when the same
exception keeps coming.

The mask/match stage isolates images: an exception while mining one image makes that image a reject with stage
``error`` (:func:`ovseg_mine.mine.graph.stages.error_row`) and the run goes on, because one odd input must not stop a
118K-image run. But a bug of ours raises on every image, and a run that "completes" with every image rejected
hides it. So the driver passes every result through a :class:`FailureWatch`: it writes each failure's traceback
to the run's log (``RUN/mine.log``), and raises :class:`~ovseg_mine.mine.errors.RunError` when
``ray.max_consecutive_errors`` results in a row failed with the same exception type. The manifest counts
failures by type (``counts.errors_by_type``, from the shards' done records).
"""

from __future__ import annotations

import logging

from ovseg_mine.mine.errors import RunError
from ovseg_mine.mine.graph.rows import ImageResult

log = logging.getLogger("ovseg_mine")


class FailureWatch:
    """Watches per-image results (:class:`~ovseg_mine.mine.graph.rows.ImageResult`) as they arrive.

    Args:
        limit: stop after this many consecutive results that failed with the same ``error_type``.
        log_path: where tracebacks go, named in the stop message.
    """

    def __init__(self, limit: int, log_path: str) -> None:
        self.limit = limit
        self.log_path = log_path
        self._type = ""
        self._streak = 0

    def observe(self, result: ImageResult) -> None:
        """Log a failed result's traceback and track the streak of the same failure.

        Raises:
            RunError: the last ``limit`` results all failed with this result's exception type.
        """
        error_type = result.error_type or ""
        if result.status != "error" or not error_type:
            self._type, self._streak = "", 0
            return
        # INFO: into the run's log (RUN/mine.log), not onto the console, which shows the counts.
        log.info("image %s failed: %s\n%s", result.image_id, result.reason, result.traceback or "")
        self._streak = self._streak + 1 if error_type == self._type else 1
        self._type = error_type
        if self._streak >= self.limit:
            raise RunError(
                f"the last {self._streak} images all failed with {error_type} ({result.reason}): this looks like "
                f"a bug or a broken setup, not bad input; tracebacks are in {self.log_path}. Finished shards are "
                "kept: fix the cause and rerun the same command to resume"
            )

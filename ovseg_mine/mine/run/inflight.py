"""The shards in flight: per-image results gathered by shard until each shard is complete.

Ray yields results in any order, and a retried batch (a restarted actor, a re-run read task) can yield rows
twice. Every result carries its ``shard``, ``shard_size`` and ``shard_row`` (stamped by the read step), so a
shard is complete when ``shard_size`` distinct ``shard_row`` values have arrived. Only shards that have started
and not finished are held, never anything per image of the whole dataset.
"""

from __future__ import annotations

from ovseg_mine.mine.graph.rows import ImageResult


class InFlightShards:
    """Results of unfinished shards.

    Args:
        closed: shard indices already done (their late duplicates are ignored).
    """

    def __init__(self, closed: set[int] | None = None) -> None:
        self._results: dict[int, dict[int, ImageResult]] = {}
        self._sizes: dict[int, int] = {}
        self._closed: set[int] = set(closed or ())

    def add(self, result: ImageResult) -> bool:
        """Keep ``result``; False when it is a duplicate (its row already arrived, or its shard is done)."""
        shard, row = result.shard, result.shard_row
        if shard in self._closed:
            return False
        rows = self._results.setdefault(shard, {})
        if row in rows:
            return False
        rows[row] = result
        self._sizes[shard] = result.shard_size
        return True

    def pop_complete(self, shard: int) -> list[ImageResult] | None:
        """The results of ``shard`` in shard order, when all of them have arrived (the shard is then closed);
        else None."""
        rows = self._results.get(shard, {})
        if len(rows) < self._sizes.get(shard, -1) or shard not in self._sizes:
            return None
        del self._results[shard], self._sizes[shard]
        self._closed.add(shard)
        return [rows[i] for i in sorted(rows)]

    def reopen(self, shard: int, size: int) -> None:
        """Take ``shard`` back in flight with ``size`` rows expected (``mine --retry-failed``: a done shard whose
        failed images are mined again; its other rows are then added back as results)."""
        self._closed.discard(shard)
        self._results.setdefault(shard, {})
        self._sizes[shard] = size

    def close(self, shard: int) -> None:
        """Mark ``shard`` done without results (e.g. an input shard with no sample)."""
        self._closed.add(shard)

    def started(self, shard: int) -> bool:
        """True when a result of ``shard`` arrived or it is closed."""
        return shard in self._results or shard in self._closed

    def unfinished(self) -> dict[int, tuple[int, int]]:
        """Shards with some results but not all: ``{shard: (received, expected)}``."""
        return {shard: (len(rows), self._sizes[shard]) for shard, rows in self._results.items()}

    def __len__(self) -> int:
        """Results held."""
        return sum(len(rows) for rows in self._results.values())

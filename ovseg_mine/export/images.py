"""A run's images, found from its manifest, for exports that need pixels.

Two ways, as the rest of ovseg-mine reads a run's images:

* sources whose images are files under a folder (COCO, ``folder:``, img2dataset ``files``): the manifest's
  ``source.image_root`` (or ``--images``) joined with the pair's ``file_name``, as ``inspect``'s report,
  ``publish --embed crops`` and ``finetune`` do;
* sources whose images live inside other files (webdataset tars, Hugging Face Parquet/Arrow rows, img2dataset
  ``parquet``): the run's source is rebuilt from the manifest (its config and ``source.location``) and the input of
  one output shard is read again with mining's own read step (:meth:`ovseg_mine.mine.sources.base.Source.read_shard`),
  one shard at a time, keeping only the images of the pairs asked for.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import numpy as np

from ovseg_mine.images import ImageDecodeError, load_rgb
from ovseg_mine.storage import StorageError, resolve


def pa_array(values: list[int]) -> Any:
    """An int64 Arrow array (``pyarrow.compute.is_in``'s value set)."""
    import pyarrow as pa

    return pa.array(values, type=pa.int64())


class ImageLookupError(ValueError):
    """The run's images cannot be found at all (no image root and a source that cannot be read again)."""


class RunImages:
    """Decoded images of a run's pairs.

    Args:
        manifest: the run's ``manifest.json``.
        images: an image root that replaces the manifest's ``source.image_root`` (a path or a URI).

    Use :meth:`shard_images` with the image ids of one shard's pairs: it yields ``(image_id, pixels or None,
    reason)`` with pixels uint8 ``[H, W, 3]`` RGB (EXIF orientation applied, as mined).
    """

    def __init__(self, manifest: dict[str, Any], images: str | os.PathLike[str] | None = None) -> None:
        source = manifest.get("source", {}) or {}
        root = os.fspath(images) if images is not None else source.get("image_root")
        self.root = resolve(root) if root else None
        self._manifest = manifest
        self._source: Any = None
        self._tasks: dict[int, Any] | None = None
        if self.root is None and not source.get("location"):
            raise ImageLookupError("the run's manifest names no image root and no source location: pass --images")

    def _reread(self) -> tuple[Any, dict[int, Any]]:
        """The run's source rebuilt from its manifest, and its shard tasks by output shard index."""
        if self._source is None:
            from ovseg_mine.config import MineConfig
            from ovseg_mine.mine.sources import MineInput, SourceError, build_source

            try:
                cfg = MineConfig(**self._manifest["config"])
                what = MineInput(cfg.source.kind, self._manifest["source"]["location"])
                self._source = build_source(cfg, what)
                plan = self._source.plan(cfg.shards.images_per_shard)
            except (SourceError, KeyError, ValueError, StorageError) as exc:
                raise ImageLookupError(f"cannot read the run's source again ({exc}): pass --images") from exc
            self._tasks = {t.index: t for t in plan.tasks}
        return self._source, self._tasks or {}

    def shard_images(
        self, shard_index: int, wanted: Iterable[tuple[int, str]]
    ) -> Iterator[tuple[int, np.ndarray | None, str]]:
        """Decode the images ``wanted`` (``(image_id, file_name)`` pairs) of output shard ``shard_index``.

        Yields:
            ``(image_id, pixels, reason)``: pixels uint8 ``[H, W, 3]``, or None with the reason (file missing,
            corrupt, not in the shard's input).
        """
        wanted = dict(wanted)
        if self.root is not None:
            for image_id, file_name in wanted.items():
                yield (image_id, *self._decode(self.root.join(file_name).uri))
            return
        source, tasks = self._reread()
        task = tasks.get(shard_index)
        found: set[int] = set()
        if task is not None:
            for row in self._rows(source, task, set(wanted)):
                found.add(row["image_id"])
                data = row.get("image_bytes") or row.get("path")
                yield (row["image_id"], *self._decode(data)) if data else (row["image_id"], None, "no image in the row")
                if len(found) == len(wanted):
                    break
        for image_id in wanted:
            if image_id not in found:
                yield image_id, None, f"not found in the input of shard {shard_index}"

    @staticmethod
    def _rows(source: Any, task: Any, wanted: set[int]) -> Iterator[dict[str, Any]]:
        """Record rows of ``wanted`` images from the task's read step (Arrow batches, as mining's read step)."""
        import pyarrow.compute as pc

        seen: set[int] = set()
        for table in source.read_shard(task):
            table = table.filter(pc.is_in(table["image_id"], value_set=pa_array(sorted(wanted))))
            for row in table.to_pylist():
                if row["image_id"] not in seen and row.get("status") == "ok":
                    seen.add(row["image_id"])
                    yield row

    @staticmethod
    def _decode(data: Any) -> tuple[np.ndarray | None, str]:
        try:
            return load_rgb(data), ""
        except ImageDecodeError as exc:
            return None, str(exc)

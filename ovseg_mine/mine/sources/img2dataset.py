"""``img2dataset:DIR``: the output folder of img2dataset, in any of its three image formats, one output shard per
img2dataset shard.

img2dataset writes shard ``NNNNN`` of its output as:

* ``webdataset``: ``NNNNN.tar`` (``KEY.jpg``, ``KEY.txt``, ``KEY.json``): read as ``webdataset:DIR``;
* ``parquet``: ``NNNNN.parquet`` with the image bytes in a ``jpg`` (or ``png``, ``webp``) column, the caption in
  ``txt`` (or ``caption``), the sample ``key``, and the download ``status`` and ``error_message``;
* ``files``: ``NNNNN/KEY.jpg`` (and ``KEY.txt``, ``KEY.json``) with the shard's metadata in ``NNNNN.parquet``
  (``key``, ``caption``, ``status``, ``error_message``...).

In every format img2dataset also writes ``NNNNN.parquet`` (in the ``webdataset`` format beside the tar: its metadata
table) with one row per URL of the shard, downloaded or not (``key``, ``url``, ``caption``, ``status``:
``success``, ``failed_to_download``, ``failed_to_resize``; ``error_message``...), and ``NNNNN_stats.json``
(``count``, ``successes``, ``failed_to_download``, ``failed_to_resize``...). A sample whose ``status`` is not
``success`` is a listed reject (stage ``source``, with img2dataset's error message); in the ``webdataset`` format
those rows are read from the metadata table (the tar holds only the downloaded samples), a downloaded sample the tar
does not hold is a reject too, and the stats' ``count`` is the progress bar's total. ``file_name`` is
``NNNNN.parquet/KEY`` (parquet), ``NNNNN/KEY.jpg`` (files) or ``NNNNN.tar/KEY.jpg`` (webdataset); the id is
``--id-column`` (an integer column, e.g. one kept with img2dataset's ``--save_additional_columns``), else the 63-bit
hash of that ``file_name``'s key part.

An interrupted img2dataset run leaves a shard's ``.parquet`` cut short (no footer): that shard is listed as rejects,
one per URL its stats file counts (one reject of the file when there is none), and the other shards are mined.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from ovseg_mine.mine.sources.base import ShardTask, SourceError, SourcePlan, limit_tasks
from ovseg_mine.mine.sources.records import IMAGE_EXTENSIONS, as_caption_list, image_row, reject_row, stable_id
from ovseg_mine.mine.sources.tables import Columns, TableFile, TableSource, check_id_column, find_columns
from ovseg_mine.mine.sources.webdataset import TarSample, WebDatasetSource
from ovseg_mine.storage import Location, StorageError, resolve

_IMAGE_COLUMNS = ("jpg", "png", "webp")
_STATUS_COLUMNS = ("status", "error_message")


class Img2DatasetSource(TableSource):
    """img2dataset output (see the module docstring)."""

    kind = "img2dataset"

    def plan(self, images_per_shard: int) -> SourcePlan:
        try:
            root = resolve(self.location)
            if not root.is_dir():
                raise SourceError(f"img2dataset:{self.location} is not a folder")
            files = root.list_files()
        except StorageError as exc:
            raise SourceError(f"img2dataset:{self.location} cannot be listed: {exc}") from exc
        if any(f.path.endswith(".tar") for f in files):
            plan = self._tars(root).plan(images_per_shard)
            plan.tasks = [
                ShardTask(
                    t.index,
                    t.input,
                    t.size,
                    {**t.payload, "layout": "webdataset"},
                    expected=stats_count(resolve(t.payload["file"])) if self._announced(t) else None,
                )
                for t in plan.tasks
            ]
            plan.info.update(kind=self.kind, format="webdataset", location=root.uri)
            return plan
        parquets = [f for f in files if f.path.endswith(".parquet")]
        if not parquets:
            raise SourceError(f"img2dataset:{self.location}: no .tar or .parquet shard found")
        tables: dict[str, TableFile | str] = {}
        for parquet in parquets:
            try:
                tables[parquet.uri] = TableFile(parquet)
            except SourceError as exc:  # cut short by an interrupted img2dataset run: listed, the others mined
                tables[parquet.uri] = str(exc)
        readable = [p for p in parquets if isinstance(tables[p.uri], TableFile)]
        if not readable:
            raise SourceError(f"img2dataset:{self.location}: no .parquet shard can be read ({tables[parquets[0].uri]})")
        first = readable[0]
        schema = tables[first.uri].schema
        layout = "parquet" if any(c in schema.names for c in _IMAGE_COLUMNS) else "files"
        if layout == "files" and not root.join(first.name[: -len(".parquet")]).is_dir():
            raise SourceError(
                f"img2dataset:{self.location}: {first.name} holds no image column (jpg, png, webp) and its "
                f"folder {first.name[: -len('.parquet')]}/ is missing: not an img2dataset output"
            )
        tasks = []
        columns = None
        for index, parquet in enumerate(parquets):
            table = tables[parquet.uri]
            if isinstance(table, str):
                task = self.unreadable_task(index, parquet, parquet.name, table, stats_count(parquet))
                tasks.append(
                    ShardTask(
                        task.index, task.input, task.size, {**task.payload, "layout": layout}, expected=task.expected
                    )
                )
                continue
            columns = self._columns(table, parquet, layout)
            task = self.file_task(index, parquet, parquet.name, columns, table.num_rows)
            tasks.append(ShardTask(task.index, task.input, task.size, {**task.payload, "layout": layout}))
        tasks = limit_tasks(tasks, self.cfg.limit, self.count)
        info = {"kind": self.kind, "format": layout, "location": root.uri, "files": len(parquets)}
        info["columns"] = columns.to_dict() if columns else None
        return SourcePlan(tasks, info, image_root=root.uri if layout == "files" else None)

    def _announced(self, task: ShardTask) -> bool:
        """Whether the stats' count is the task's row count to expect: its size is unknown and no id selection
        makes it smaller."""
        return task.size is None and self.cfg.image_ids is None

    def _tars(self, root: Location | str) -> WebDatasetSource:
        return _Img2DatasetTars(str(root), self.cfg, self.screening)

    def read_shard(self, task: ShardTask):
        if task.payload.get("layout") == "webdataset":
            return self._tars(task.payload["file"]).read_shard(task)
        return super().read_shard(task)

    def count(self, task: ShardTask) -> int:
        if task.payload.get("layout") == "webdataset":
            return self._tars(task.payload["file"]).count(task)
        return super().count(task)

    def _columns(self, table: TableFile, parquet: Location, layout: str) -> Columns:
        where = f"img2dataset:{self.location} ({parquet.name})"
        if "key" not in table.schema.names:
            raise SourceError(f"{where} has no 'key' column: not an img2dataset shard")
        if layout == "parquet":
            found = find_columns(
                table.schema,
                where,
                image=self.cfg.image_column,
                caption=self.cfg.caption_column,
                id_column=self.cfg.id_column,
                image_names=_IMAGE_COLUMNS,
                caption_names=("txt", "caption"),
            )
            image, caption = found.image, found.caption
        else:
            image = None
            caption = self.cfg.caption_column or ("caption" if "caption" in table.schema.names else None)
            if caption is not None and caption not in table.schema.names:
                raise SourceError(f"{where} has no column {caption!r} (--caption-column)")
            check_id_column(table.schema, where, self.cfg.id_column)
        extra = ("key", *(c for c in _STATUS_COLUMNS if c in table.schema.names))
        return Columns(image, caption, self.cfg.id_column, extra)

    def keys(self, task: ShardTask, table: TableFile) -> list[str]:
        stem = task.payload["name"][: -len(".parquet")]
        keys = [str(k) for k in table.column("key")]
        if task.payload["layout"] == "parquet":
            return [f"{task.payload['name']}/{key}" for key in keys]
        return [f"{stem}/{key}" for key in keys]

    def rows(self, task: ShardTask, samples: list[tuple[int, Any, str]]):
        if task.payload["layout"] == "files":
            folder = resolve(task.payload["file"][: -len(".parquet")])
            try:
                self._images = {
                    posixpath.splitext(f.name)[0]: f
                    for f in folder.list_files()
                    if posixpath.splitext(f.name)[1][1:].lower() in IMAGE_EXTENSIONS
                }
            except StorageError:
                self._images = {}
        yield from super().rows(task, samples)

    def row(self, key: str, values: dict[str, Any], image_id: Any, columns: Columns, base: Location) -> dict[str, Any]:
        status = values.get("status", "success")
        if status not in (None, "success"):
            reason = f"img2dataset status {status}"
            if values.get("error_message"):
                reason += f": {values['error_message']}"
            return reject_row(image_id if image_id is not None else stable_id(key), key, "source", reason)
        if columns.image is not None:
            return super().row(key, values, image_id, columns, base)
        image = self._images.get(posixpath.basename(key))
        file_name = f"{key}{posixpath.splitext(image.name)[1]}" if image is not None else key
        if image_id is None:
            return super().row(key, values, image_id, columns, base)
        if image is None:
            return reject_row(image_id, file_name, "source", "image file missing from the shard folder")
        texts = as_caption_list(values.get(columns.caption)) if columns.caption else None
        if texts is None:
            text = image.parent.join(posixpath.basename(key) + ".txt")
            try:
                texts = as_caption_list(text.read_text()) if text.is_file() else None
            except (StorageError, UnicodeDecodeError):
                texts = None
        return image_row(image_id, file_name, texts, path=image.uri, **self.screening.kwargs())


def stats_count(shard: Location) -> int | None:
    """``count`` (URLs of the shard, downloaded or not) from img2dataset's ``NNNNN_stats.json`` beside the shard
    file ``shard`` (``NNNNN.tar`` or ``NNNNN.parquet``); None when there is no readable stats file."""
    stem = shard.name.rsplit(".", 1)[0]
    try:
        stats = json.loads(shard.parent.join(f"{stem}_stats.json").read_bytes())
    except (StorageError, ValueError):
        return None
    count = stats.get("count") if isinstance(stats, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


class _Img2DatasetTars(WebDatasetSource):
    """img2dataset's ``webdataset`` format: the tars, plus what the metadata table beside each tar lists that the
    tar does not hold (failed downloads; downloaded samples missing from a cut tar)."""

    def extra(self, task: ShardTask, samples: list[TarSample], files: list[TarSample]) -> list[TarSample]:
        tar = resolve(task.payload["file"])
        name = task.payload["name"]
        meta = tar.parent.join(tar.name[: -len(".tar")] + ".parquet")
        try:
            if not meta.is_file():
                return []
            table = TableFile(meta)
            keys = [str(k) for k in table.column("key")]
            status = table.column("status") if "status" in table.schema.names else ["success"] * len(keys)
            errors = table.column("error_message") if "error_message" in table.schema.names else [None] * len(keys)
            ids = self._ids(table, len(keys))
        except (SourceError, StorageError, KeyError) as exc:
            files.append(
                TarSample("", problem=f"{meta.name}, img2dataset's list of {name}'s URLs, cannot be read: {exc}")
            )
            return []
        held = {posixpath.basename(s.key) for s in samples}
        cut = f"{name} does not hold it" + (" (the tar is cut or unreadable)" if files else "")
        extra = []
        for key, state, error, image_id in zip(keys, status, errors, ids, strict=True):
            if key in held:
                continue
            if state in (None, "success"):
                problem = f"img2dataset downloaded it ({meta.name}), but {cut}"
            else:
                problem = f"img2dataset status {state}" + (f": {error}" if error else "")
            sample = TarSample(key, problem=problem, image_id=stable_id(f"{name}/{key}"))
            if image_id is not None:
                sample.image_id = image_id
            extra.append(sample)
        return extra

    def _ids(self, table: TableFile, count: int) -> list[Any]:
        """The ``--id-column`` values of the metadata rows (None where absent or not an integer)."""
        column = self.cfg.id_column
        if column is None or column not in table.schema.names:
            return [None] * count
        return [v if isinstance(v, int) and not isinstance(v, bool) else None for v in table.column(column)]

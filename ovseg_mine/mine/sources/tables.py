"""Sources stored as tables: Parquet files and Arrow files (``datasets``' ``save_to_disk`` and cache files), read
with pyarrow, one output shard per input file.

A table file is opened through :mod:`ovseg_mine.storage` (a local file is memory-mapped, so listing a shard's
rows costs no copy) and read batch by batch with the needed columns only. Row counts come from the Parquet
footer, or from the Arrow batches' lengths. :class:`TableSource` is the shared read step of the ``hf`` and
``img2dataset`` kinds: the subclass lists the files and says which columns hold the image, the captions and
the id.

One unreadable file never stops a run: a file that cannot be opened (a Parquet file cut short by an interrupted
writer has no footer, so neither its rows nor their count can be known) is one *file reject* (``file_name`` the
file, no image id, not counted as an image), or one reject per row where the count is known from elsewhere
(img2dataset's stats); rows that cannot be read from a file that opens (a corrupt page) are rejects each, with
the cause. The other files are mined.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ovseg_mine.mine.sources.base import ShardTask, Source, SourceError
from ovseg_mine.mine.sources.records import (
    READ_BATCH_ROWS,
    as_caption_list,
    file_reject_row,
    image_row,
    reject_row,
    stable_id,
)
from ovseg_mine.storage import Location, StorageError, first_line, resolve

if TYPE_CHECKING:
    import pyarrow as pa

#: Column names tried, in order, when ``--image-column`` is not given (after any column that ``datasets``
#: declares as an ``Image`` feature).
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
#: Column names tried, in order, when ``--caption-column`` is not given.
CAPTION_COLUMNS = ("caption", "captions", "text", "txt", "sentences", "sentence")


class TableFile:
    """One Parquet or Arrow (IPC stream or file) table: its schema, row count and batches.

    Raises:
        SourceError: the file is not readable as Parquet or Arrow.
    """

    def __init__(self, location: Location) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.location = location
        self._parquet = None
        self._arrow: Any = None
        try:
            if location.path.endswith(".parquet"):
                self._parquet = pq.ParquetFile(location.open_input())
                self.schema = self._parquet.schema_arrow
            else:
                source = pa.memory_map(location.path) if location.is_local else location.open_input()
                try:
                    self._arrow = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    source.seek(0)
                    self._arrow = pa.ipc.open_file(source).read_all()
                self.schema = self._arrow.schema
        except (OSError, StorageError, pa.ArrowException) as exc:
            raise SourceError(f"{location.name} is not a readable Parquet or Arrow file: {exc}") from exc

    @property
    def num_rows(self) -> int:
        """Rows in the file (Parquet: from its footer)."""
        return self._parquet.metadata.num_rows if self._parquet is not None else self._arrow.num_rows

    def column(self, name: str) -> list[Any]:
        """One column as Python values."""
        if self._parquet is not None:
            return self._parquet.read(columns=[name]).column(name).to_pylist()
        return self._arrow.column(name).to_pylist()

    def batches(self, columns: list[str], batch_size: int = READ_BATCH_ROWS) -> Iterator["pa.RecordBatch"]:
        """The file's rows in order, ``columns`` only, in batches of about ``batch_size`` rows (Parquet: row group
        by row group, so a corrupt row group fails after the rows of the ones before it)."""
        if self._parquet is not None:
            for group in range(self._parquet.num_row_groups):
                yield from self._parquet.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns)
        else:
            yield from self._arrow.select(columns).to_batches(max_chunksize=batch_size)


def hf_features(schema: "pa.Schema") -> dict[str, Any]:
    """The ``datasets`` features stored in a file's schema metadata (``{}`` when there are none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("info", {}).get("features", {}) or {}
    except (ValueError, AttributeError):
        return {}


@dataclass(frozen=True)
class Columns:
    """The columns a table source reads: ``image``, ``caption``, ``id`` (None: hashed sample keys) and ``extra``
    ones a layout needs (img2dataset's ``key``, ``status``...)."""

    image: str | None
    caption: str | None
    id: str | None
    extra: tuple[str, ...] = ()

    def names(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.image, self.caption, self.id, *self.extra) if c))

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "caption": self.caption, "id": self.id, "extra": list(self.extra)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Columns":
        return cls(data["image"], data["caption"], data["id"], tuple(data.get("extra", ())))


def find_columns(
    schema: "pa.Schema",
    where: str,
    *,
    image: str | None,
    caption: str | None,
    id_column: str | None,
    image_names: tuple[str, ...] = IMAGE_COLUMNS,
    caption_names: tuple[str, ...] = CAPTION_COLUMNS,
) -> Columns:
    """Check the asked columns against ``schema`` or find them by name.

    Raises:
        SourceError: a column is missing (the message lists the file's columns and the option to pass), or
            the id column is not an integer column.
    """
    names = list(schema.names)
    listed = ", ".join(names) or "none"

    def pick(asked: str | None, candidates: tuple[str, ...], option: str, what: str) -> str:
        if asked is not None:
            if asked not in names:
                raise SourceError(f"{where} has no column {asked!r} ({option}); its columns: {listed}")
            return asked
        found = next((c for c in candidates if c in names), None)
        if found is None:
            raise SourceError(
                f"{where}: no {what} column found (tried {', '.join(candidates)}); pass {option} (columns: {listed})"
            )
        return found

    features = hf_features(schema)
    declared = tuple(n for n in names if isinstance(features.get(n), dict) and features[n].get("_type") == "Image")
    image_col = pick(image, declared + image_names, "--image-column", "image")
    caption_col = pick(caption, caption_names, "--caption-column", "caption")
    check_id_column(schema, where, id_column)
    return Columns(image_col, caption_col, id_column)


def check_id_column(schema: "pa.Schema", where: str, id_column: str | None) -> None:
    """Raise SourceError unless ``id_column`` is None or an integer column of ``schema``."""
    import pyarrow as pa

    if id_column is None:
        return
    if id_column not in schema.names:
        raise SourceError(f"{where} has no column {id_column!r} (--id-column); its columns: {', '.join(schema.names)}")
    if not pa.types.is_integer(schema.field(id_column).type):
        raise SourceError(
            f"{where}: id column {id_column!r} holds {schema.field(id_column).type} values, not integers; "
            "pass an integer column as --id-column, or leave it out to use hashed sample keys"
        )


def image_cell(value: Any, base: Location) -> tuple[bytes | None, str | None]:
    """An image cell as ``(bytes, None)`` or ``(None, path)``: ``datasets``' Image struct ``{bytes, path}``
    (bytes win; a relative path is relative to the table file's folder ``base``), raw bytes, or a path/URI
    string. ``(None, None)``: no image."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), None
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return (bytes(value), None) if value else (None, None)
    if isinstance(value, str) and value:
        if "://" in value or posixpath.isabs(value):
            return None, value
        return None, base.join(value).uri
    return None, None


class TableSample(NamedTuple):
    """One sample of a table file: its ``row``, ``image_id`` (None: the id cell is empty) and ``key``; or, with a
    ``problem``, a row that cannot be read (``row`` None: the file itself, whose rows are unknown)."""

    row: int | None
    image_id: Any
    key: str
    problem: str | None = None


class TableSource(Source):
    """Shared read step of table sources. A task's payload names its file (``file``: URI, ``name``: its name in
    ``file_name``) and the :class:`Columns`, or why the file cannot be read (``unreadable``, with ``rows`` when
    their count is known); subclasses may override :meth:`row` to read other layouts."""

    def file_task(self, index: int, location: Location, name: str, columns: Columns, size: int) -> ShardTask:
        """The task of one input file: identity = name, byte size and modification time."""
        info = location.fs.get_file_info(location.path)
        mtime = info.mtime.isoformat() if info.mtime is not None else None
        identity = {"file": name, "bytes": info.size, "mtime": mtime}
        payload = {"file": location.uri, "name": name, "columns": columns.to_dict()}
        return ShardTask(index, identity, self.sized(size), payload)

    def unreadable_task(
        self, index: int, location: Location, name: str, problem: str, rows: int | None = None
    ) -> ShardTask:
        """The task of an input file that cannot be read: ``rows`` rejects (when the count is known from
        elsewhere), else one file reject. Its identity is the file's size and time, as for a readable file, so
        a file replaced by a good copy is mined on resume."""
        try:
            info = location.fs.get_file_info(location.path)
            identity = {"file": name, "bytes": info.size, "mtime": info.mtime.isoformat() if info.mtime else None}
        except (OSError, StorageError):
            identity = {"file": name, "bytes": None, "mtime": None}
        payload = {"file": location.uri, "name": name, "columns": None, "unreadable": problem, "rows": rows}
        size = self.sized(rows) if rows is not None else None
        return ShardTask(index, identity, size, payload, expected=1 if rows is None else None)

    def _open(self, task: ShardTask) -> TableFile:
        return TableFile(resolve(task.payload["file"]))

    def keys(self, task: ShardTask, table: TableFile) -> list[str]:
        """The sample key of every row of the file, in order: ``NAME/ROW`` (a layout may use a key column)."""
        return [f"{task.payload['name']}/{row}" for row in range(table.num_rows)]

    def samples(self, task: ShardTask) -> list[TableSample]:
        """The selected rows (:class:`TableSample`), then the file's problem when it cannot be read."""
        name = task.payload["name"]
        problem = task.payload.get("unreadable")
        if problem is None:
            try:
                table = self._open(task)
                keys = self.keys(task, table)
                id_column = task.payload["columns"]["id"]
                ids = table.column(id_column) if id_column else [stable_id(key) for key in keys]
            except (SourceError, OSError, KeyError) as exc:  # changed since the plan
                problem = str(exc)
            else:
                samples = [TableSample(*sample) for sample in zip(range(len(keys)), ids, keys, strict=True)]
                return self.select(samples, task, lambda s: s.image_id if s.image_id is not None else -1)
        count = task.payload.get("rows")
        if count is None:
            reason = f"{problem}; the rows it held are unknown (listed as one reject of the file)"
            return self.select([], task, None, [TableSample(None, None, name, reason)])
        keys = [f"{name}/#{row}" for row in range(count)]
        samples = [
            TableSample(row, stable_id(key), key, f"{problem} (row {row} of {count})") for row, key in enumerate(keys)
        ]
        return self.select(samples, task, lambda s: s.image_id)

    def rows(self, task: ShardTask, samples: list[TableSample]) -> Iterator[dict[str, Any]]:
        wanted = {s.row: s for s in samples if s.problem is None}
        if wanted:
            yield from self._read_rows(task, wanted)
        for sample in samples:
            if sample.row is None:
                yield file_reject_row(sample.key, sample.problem or "")
            elif sample.problem is not None:
                yield reject_row(sample.image_id, sample.key, "source", sample.problem)

    def _read_rows(self, task: ShardTask, wanted: dict[int, TableSample]) -> Iterator[dict[str, Any]]:
        """The record rows of the ``wanted`` rows of the task's file, in row order; rows that cannot be read (the
        file fails part way) are rejects naming the file and the cause."""
        import pyarrow as pa

        columns = Columns.from_dict(task.payload["columns"])
        base = resolve(task.payload["file"]).parent
        row = 0
        try:
            table = self._open(task)
            for batch in table.batches(columns.names()):
                if not wanted:
                    break
                for values in batch.to_pylist():
                    if row in wanted:
                        sample = wanted.pop(row)
                        yield self.row(sample.key, values, sample.image_id, columns, base)
                    row += 1
        except (SourceError, OSError, pa.ArrowException) as exc:
            cause = f"{task.payload['name']} cannot be read from row {row}: {first_line(exc)}"
            for sample in sorted(wanted.values()):
                image_id = sample.image_id if sample.image_id is not None else stable_id(sample.key)
                yield reject_row(image_id, sample.key, "source", cause)

    def row(self, key: str, values: dict[str, Any], image_id: Any, columns: Columns, base: Location) -> dict[str, Any]:
        """The record row of one table row (``values``: its cells by column name; ``key``: its sample key, also
        its ``file_name``)."""
        if image_id is None:
            return reject_row(stable_id(key), key, "source", f"id column {columns.id!r} is empty")
        data, path = image_cell(values.get(columns.image), base)
        if data is None and path is None:
            return reject_row(image_id, key, "source", f"no image in column {columns.image!r}")
        return image_row(
            image_id,
            key,
            as_caption_list(values.get(columns.caption)),
            path=path,
            image_bytes=data,
            **self.screening.kwargs(),
        )

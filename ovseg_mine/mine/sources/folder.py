"""``folder:DIR``: a folder of images with a captions file, ``captions.jsonl`` or ``captions.csv``.

One line (JSONL) or row (CSV, with a header line) per image: ``file_name`` (relative to DIR), and ``caption`` (a
string) or ``captions`` (JSONL: a list of strings; CSV: a string, or a JSON list in the cell); ``--caption-column``
and ``--id-column`` name other fields. LOCATION may also be the captions file itself (DIR is then its folder).
The id is ``--id-column`` (an integer field), else the 63-bit hash of ``file_name``.

The driver reads the captions file once, as a stream, to cut it into shards of ``shards.images_per_shard`` lines
(it keeps the byte offset where each shard starts, and the file's sha256); each read task then reads its byte
range only. Listed rejects (stage ``source``): a line that is not valid JSON (or CSV), without ``file_name``, a
``file_name`` outside DIR or whose path cannot be resolved (a symlink loop), a ``file_name`` already seen in the
same shard, an id field that is not an integer.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any

from ovseg_mine.mine.sources.base import ShardTask, Source, SourceError, SourcePlan, limit_tasks
from ovseg_mine.mine.sources.coco import PathProblem, safe_child
from ovseg_mine.mine.sources.records import as_caption_list, image_row, reject_row, stable_id
from ovseg_mine.storage import Location, StorageError, resolve

CAPTION_FILES = ("captions.jsonl", "captions.csv")


def _records(handle: Any, csv_quotes: bool, line: int = 1) -> Iterator[tuple[int, int, bytes]]:
    """``(byte offset, line number, record bytes)`` of each non-empty record of a captions file, numbering lines
    from ``line``; a CSV record ends at a newline outside quotes (an even number of ``"`` so far: RFC 4180
    doubles the quotes inside a field)."""
    offset = start = first = 0
    pending = b""
    quotes = 0
    for text in iter(handle.readline, b""):
        if not pending:
            start, first = offset, line
        pending += text
        offset += len(text)
        line += 1
        if csv_quotes:
            quotes += text.count(b'"')
            if quotes % 2:
                continue
            quotes = 0
        if pending.strip():
            yield start, first, pending
        pending = b""
    if pending.strip():
        yield start, first, pending


class FolderSource(Source):
    """Images in a folder with a captions file (see the module docstring)."""

    kind = "folder"

    def _captions_file(self) -> tuple[Location, Location]:
        try:
            location = resolve(self.location)
            if location.is_file():
                return location.parent, location
            if not location.is_dir():
                raise SourceError(f"folder:{self.location} not found")
            found = [location.join(name) for name in CAPTION_FILES if location.join(name).is_file()]
        except StorageError as exc:
            raise SourceError(f"folder:{self.location} cannot be read: {exc}") from exc
        if not found:
            raise SourceError(f"folder:{self.location} has no {' or '.join(CAPTION_FILES)}")
        if len(found) > 1:
            raise SourceError(f"folder:{self.location} has both {' and '.join(CAPTION_FILES)}: keep one")
        return location, found[0]

    def plan(self, images_per_shard: int) -> SourcePlan:
        root, captions = self._captions_file()
        is_csv = captions.path.endswith(".csv")
        digest = hashlib.sha256()
        tasks: list[ShardTask] = []
        header: list[str] | None = None
        bounds: list[tuple[int, int, int]] = []  # (byte offset, first record, its line number) of each shard
        count = end = 0
        with captions.open_input() as handle:
            reader = io.BufferedReader(_Hashing(handle, digest), buffer_size=1 << 20)
            for start, line, record in _records(reader, is_csv):
                end = start + len(record)
                if is_csv and header is None:
                    header = next(csv.reader([record.decode("utf-8", "replace")]), [])
                    continue
                if count % images_per_shard == 0:
                    bounds.append((start, count, line))
                count += 1
        if is_csv and "file_name" not in (header or []):
            raise SourceError(f"{captions} has no file_name column (header: {', '.join(header or []) or 'empty'})")
        for index, (start, first, line) in enumerate(bounds):
            stop = bounds[index + 1][0] if index + 1 < len(bounds) else end
            size = min(images_per_shard, count - first)
            identity = {"file": captions.name, "sha256": digest.hexdigest(), "records": [first, first + size]}
            payload = {"file": captions.uri, "root": root.uri, "start": start, "end": stop, "line": line}
            payload["header"] = header
            tasks.append(ShardTask(index, identity, self.sized(size), payload))
        tasks = limit_tasks(tasks, self.cfg.limit, self.count)
        info = {
            "kind": self.kind,
            "location": root.uri,
            "captions": captions.uri,
            "captions_sha256": digest.hexdigest(),
            "image_root": root.uri,
            "images_in_file": count,
            "columns": {"caption": self.cfg.caption_column or "caption|captions", "id": self.cfg.id_column},
        }
        return SourcePlan(tasks, info, image_root=root.uri)

    def _parse(self, record: bytes, header: list[str] | None) -> dict[str, Any] | str:
        """One captions record as a dict, or the reason it cannot be read."""
        text = record.decode("utf-8", "replace")
        if header is None:
            try:
                value = json.loads(text)
            except ValueError as exc:
                return f"not valid JSON: {exc}"
            return value if isinstance(value, dict) else "not a JSON object"
        cells = next(csv.reader([text]), [])
        if len(cells) != len(header):
            return f"{len(cells)} CSV cells, the header has {len(header)}"
        row: dict[str, Any] = dict(zip(header, cells, strict=True))
        for column in ("captions", self.cfg.caption_column):
            cell = row.get(column) if column else None
            if isinstance(cell, str) and cell.startswith("["):
                try:
                    row[column] = json.loads(cell)
                except ValueError:
                    pass
        if self.cfg.id_column and isinstance(row.get(self.cfg.id_column), str):
            cell = row[self.cfg.id_column].strip()
            row[self.cfg.id_column] = int(cell) if cell.lstrip("-").isdigit() else cell
        return row

    def samples(self, task: ShardTask) -> list[dict[str, Any]]:
        """One dict per record: ``line`` (its number in the file), ``image_id``, ``file_name``, ``fields`` or
        ``problem``."""
        payload = task.payload
        captions = resolve(payload["file"])
        with captions.open_input() as handle:
            handle.seek(payload["start"])
            data = handle.read(payload["end"] - payload["start"])
        header = payload["header"]
        samples: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _, line, record in _records(io.BytesIO(data), header is not None, payload["line"]):
            where = f"{captions.name}:{line}"
            fields = self._parse(record, header)
            sample: dict[str, Any] = {"file_name": where, "image_id": stable_id(where)}
            if isinstance(fields, str):
                sample["problem"] = f"line {line}: {fields}"
            elif not isinstance(fields.get("file_name"), str) or not fields["file_name"]:
                sample["problem"] = f"line {line} has no file_name"
            else:
                sample.update(file_name=fields["file_name"], image_id=stable_id(fields["file_name"]), fields=fields)
                if fields["file_name"] in seen:
                    sample["problem"] = f"duplicate file_name (again at line {line})"
                seen.add(fields["file_name"])
                self._id(sample, fields)
            samples.append(sample)
        return self.select(samples, task, lambda s: s["image_id"])

    def _id(self, sample: dict[str, Any], fields: dict[str, Any]) -> None:
        column = self.cfg.id_column
        if column is None or "problem" in sample:
            return
        value = fields.get(column)
        if isinstance(value, int) and not isinstance(value, bool):
            sample["image_id"] = value
        else:
            sample["problem"] = f"id field {column!r} is not an integer: {str(value)[:40]!r}"

    def rows(self, task: ShardTask, samples: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        root = resolve(task.payload["root"])
        column = self.cfg.caption_column
        for sample in samples:
            if "problem" in sample:
                yield reject_row(sample["image_id"], sample["file_name"], "source", sample["problem"])
                continue
            fields = sample["fields"]
            try:
                path = safe_child(root, sample["file_name"])
            except PathProblem as exc:
                yield reject_row(sample["image_id"], sample["file_name"], "source", str(exc))
                continue
            if path is None:
                yield reject_row(sample["image_id"], sample["file_name"], "source", "file_name escapes the folder")
                continue
            texts = fields.get(column) if column else fields.get("captions", fields.get("caption"))
            yield image_row(
                sample["image_id"],
                sample["file_name"],
                as_caption_list(texts),
                path=path,
                width=_int(fields.get("width")),
                height=_int(fields.get("height")),
                **self.screening.kwargs(),
            )


def _int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


class _Hashing(io.RawIOBase):
    """A readable raw stream over ``handle`` that feeds every byte read to ``digest``."""

    def __init__(self, handle: Any, digest: Any) -> None:
        self.handle = handle
        self.digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.handle.read(len(buffer))
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)

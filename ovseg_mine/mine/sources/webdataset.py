"""``webdataset:PATHS``: tar shards laid out as webdataset and img2dataset write them, one output shard per tar.

PATHS is a tar file, a folder (every ``*.tar`` under it), a brace pattern (``shards/{00000..00099}.tar``,
``{a,b}.tar``) or a glob (``shards/*.tar``). In a tar, the members of one sample share a key: the member's path up
to the first dot of its base name (``000000000790.jpg``, ``000000000790.txt`` and ``000000000790.json`` are
sample ``000000000790``). Each sample becomes one record:

* image: the member with an image extension (``jpg``, ``jpeg``, ``png``, ``webp``...);
* captions: ``--caption-column`` names a member extension (``txt``) or a field of the sample's ``.json`` (a string or
  a list of strings); by default the ``.txt`` member, else the JSON's ``caption`` or ``captions`` field;
* id: ``--id-column`` names an integer field of the ``.json``; by default the 63-bit hash of ``TAR/KEY``;
* ``file_name``: ``TAR/MEMBER``, e.g. ``00000.tar/000000000790.jpg`` (``TAR`` relative to the folder or pattern).

Tars are read with Python's ``tarfile`` (headers first, seeking over the data, then the members each sample needs),
through :mod:`ovseg_mine.storage`. Listed rejects (stage ``source``): a sample without an image member (a member that
is not an image), without a caption, with a key that occurs twice, with an id field that is not an integer, a member
cut short. Listed as *file rejects* (``file_name`` the tar, no image id, not counted as images; the samples before
are mined): a tar that cannot be opened, the unreadable rest of a cut tar, and a tar that ends without its end
marker (the two 512-byte zero blocks POSIX tar writes after the last member; ``tarfile`` reads a tar cut cleanly
between two members as a whole one).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ovseg_mine.mine.sources.base import ShardTask, Source, SourceError, SourcePlan, limit_tasks
from ovseg_mine.mine.sources.records import (
    IMAGE_EXTENSIONS,
    as_caption_list,
    batches,
    file_reject_row,
    image_row,
    reject_row,
    stable_id,
)
from ovseg_mine.storage import Location, StorageError, resolve

if TYPE_CHECKING:
    import pyarrow as pa

#: The end-of-archive marker of a tar: two 512-byte blocks of zeros after the last member (POSIX.1-1988 ustar).
END_MARKER = bytes(1024)

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00009}`` (numeric, zero-padded like its first bound) and ``{a,b}`` groups, leftmost first."""
    found = [m for m in (_RANGE.search(pattern), _LIST.search(pattern)) if m]
    if not found:
        return [pattern]
    match = min(found, key=lambda m: m.start())
    if match.re is _RANGE:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        values = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        values = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for value in values for expanded in expand_braces(head + value + tail)]


def list_tars(location: str) -> tuple[Location, list[Location]]:
    """The root (what tar names are relative to) and the tar files of ``location``, sorted.

    Raises:
        SourceError: nothing matches, or a named file is missing.
    """
    try:
        if any(c in location for c in "{*?["):
            wild = min((location.find(c) for c in "{*?[" if c in location))
            root = resolve(location[:wild].rsplit("/", 1)[0] if "/" in location[:wild] else ".")
            patterns = expand_braces(location)
            if "{" in location and not any(c in location for c in "*?["):
                tars = [resolve(p) for p in patterns]
                missing = [t.uri for t in tars if not t.is_file()]
                if missing:
                    raise SourceError(f"webdataset:{location}: {len(missing)} tar files not found, e.g. {missing[0]}")
            else:
                resolved = [resolve(p).path for p in patterns]
                tars = [f for f in root.list_files(recursive=True) if any(fnmatch.fnmatch(f.path, p) for p in resolved)]
        else:
            root = resolve(location)
            if root.is_file():
                return root.parent, [root]
            if not root.is_dir():
                raise SourceError(f"webdataset:{location} not found")
            tars = [f for f in root.list_files(recursive=True) if f.path.endswith(".tar")]
    except StorageError as exc:
        raise SourceError(f"webdataset:{location} cannot be listed: {exc}") from exc
    if not tars:
        raise SourceError(f"webdataset:{location}: no .tar file found")
    return root, sorted(tars, key=lambda t: t.path)


def split_key(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member name (webdataset's rule: the key ends at the first dot of the base name)."""
    name = name[2:] if name.startswith("./") else name
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower() if dot else ""


@dataclass
class TarSample:
    """One sample of a tar as the scan finds it: its ``key`` (path without extension), its members by extension,
    the id and metadata read from its ``.json`` (when there is one), and the ``problem`` that makes it a reject
    (a duplicate key, an unreadable member, a cut tar)."""

    key: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    duplicate: str | None = None
    image_id: int | None = None
    meta: dict[str, Any] | None = None
    problem: str | None = None


class WebDatasetSource(Source):
    """Tar shards (see the module docstring)."""

    kind = "webdataset"

    def plan(self, images_per_shard: int) -> SourcePlan:
        root, tars = list_tars(self.location)
        tasks = []
        for index, tar in enumerate(tars):
            info = tar.fs.get_file_info(tar.path)
            name = posixpath.relpath(tar.path, root.path)
            identity = {"file": name, "bytes": info.size, "mtime": info.mtime.isoformat() if info.mtime else None}
            tasks.append(ShardTask(index, identity, None, {"file": tar.uri, "name": name}))
        tasks = limit_tasks(tasks, self.cfg.limit, self.count)
        info = {
            "kind": self.kind,
            "location": self.location,
            "root": root.uri,
            "files": len(tars),
            "columns": {
                "image": "|".join(IMAGE_EXTENSIONS),
                "caption": self.cfg.caption_column or "txt|json.caption",
                "id": self.cfg.id_column,
            },
        }
        return SourcePlan(tasks, info)

    def _scan(self, tar: tarfile.TarFile | None, task: ShardTask, problem: str | None = None) -> list[TarSample]:
        """The samples of the tar (members grouped by key, headers only) and those :meth:`extra` adds, selection
        applied, then the tar's file problems (image id None): it cannot be opened, its rest cannot be read, it
        has no end marker."""
        samples, files = self._list(tar, task, problem)
        samples += self.extra(task, samples, files)
        return self.select(samples, task, lambda s: s.image_id, files)

    def extra(self, task: ShardTask, samples: list[TarSample], files: list[TarSample]) -> list[TarSample]:
        """Samples the tar does not hold but the shard lists (img2dataset's failed downloads); none here."""
        return []

    def _list(self, tar: tarfile.TarFile | None, task: ShardTask, problem: str | None) -> tuple[list, list]:
        """``(samples, file problems)`` of the tar, no selection."""
        name = task.payload["name"]
        if tar is None:
            return [], [TarSample("", problem=f"{name}: {problem}")]
        files: list[TarSample] = []
        samples: dict[str, TarSample] = {}
        size = tar.fileobj.seek(0, 2)
        try:
            while (member := tar.next()) is not None:  # headers only: the data of each member is skipped
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                sample = samples.setdefault(key, TarSample(key))
                if ext in sample.members:
                    sample.duplicate = f"{key}.{ext}"
                sample.members[ext] = member
                if member.offset_data + member.size > size:
                    sample.problem = (
                        f"the tar is truncated: {member.name} has {max(0, size - member.offset_data)} of its "
                        f"{member.size} bytes"
                    )
        except tarfile.TarError as exc:
            files.append(
                TarSample("", problem=f"{name}: the rest of the tar cannot be read after {len(samples)} samples: {exc}")
            )
        else:
            missing = self._end_missing(tar, size)
            if missing:
                files.append(TarSample("", problem=f"{name}: {missing}"))
        for sample in samples.values():
            sample.image_id = stable_id(f"{name}/{sample.key}")
            if self.cfg.id_column and sample.duplicate is None:
                self._read_id(tar, sample)
        return list(samples.values()), files

    @staticmethod
    def _end_missing(tar: tarfile.TarFile, size: int) -> str | None:
        """Why the tar's end marker is missing after its last member (None: it is there). ``tarfile`` stops
        without error at a clean cut between members, or at a header cut short, so the end is checked here."""
        tar.fileobj.seek(tar.offset)
        tail = tar.fileobj.read(len(END_MARKER))
        if tail == END_MARKER:
            return None
        at = f"after byte {tar.offset} of {size}"
        if len(tail) < len(END_MARKER) and not tail.strip(b"\0"):
            return f"no end-of-archive marker (two 512-byte zero blocks) {at}: the tar was cut, members may be missing"
        return f"unreadable data instead of the end-of-archive marker {at}: the tar was cut or is corrupt"

    def _meta(self, tar: tarfile.TarFile, sample: TarSample) -> dict[str, Any] | None:
        if sample.meta is None and "json" in sample.members:
            try:
                meta = json.loads(tar.extractfile(sample.members["json"]).read())
            except (ValueError, UnicodeDecodeError) as exc:
                sample.problem = f"{sample.key}.json is not valid JSON: {exc}"
                meta = {}
            sample.meta = meta if isinstance(meta, dict) else {}
        return sample.meta

    def _read_id(self, tar: tarfile.TarFile, sample: TarSample) -> None:
        meta = self._meta(tar, sample)
        value = (meta or {}).get(self.cfg.id_column)
        if meta is None:
            sample.problem = f"no .json member holding the id field {self.cfg.id_column!r}"
        elif sample.problem is None and (not isinstance(value, int) or isinstance(value, bool)):
            sample.problem = f"id field {self.cfg.id_column!r} is not an integer: {str(value)[:40]!r}"
        else:
            sample.image_id = value

    def _captions(self, tar: tarfile.TarFile, sample: TarSample) -> list[Any] | None:
        column = self.cfg.caption_column
        if column is not None and column.lower() in sample.members:
            return [tar.extractfile(sample.members[column.lower()]).read().decode("utf-8", "replace")]
        if column is None and "txt" in sample.members:
            return [tar.extractfile(sample.members["txt"]).read().decode("utf-8", "replace")]
        meta = self._meta(tar, sample) or {}
        if column is not None:
            return as_caption_list(meta.get(column))
        return as_caption_list(meta.get("caption", meta.get("captions")))

    def _row(self, tar: tarfile.TarFile | None, sample: TarSample, name: str) -> dict[str, Any]:
        if sample.image_id is None:  # a problem of the tar file itself
            return file_reject_row(name, sample.problem or "")
        try:
            return self._sample_row(tar, sample, name)
        except (tarfile.TarError, OSError) as exc:  # a member whose data cannot be read
            return reject_row(sample.image_id, f"{name}/{sample.key}", "source", f"cannot read the sample: {exc}")

    def _sample_row(self, tar: Any, sample: TarSample, name: str) -> dict[str, Any]:
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample.members), None)
        file_name = f"{name}/{sample.members[image_ext].name if image_ext else sample.key}".rstrip("/")
        if sample.duplicate:
            return reject_row(sample.image_id, file_name, "source", f"duplicate key in the tar: {sample.duplicate}")
        if sample.problem:
            return reject_row(sample.image_id, file_name, "source", sample.problem)
        if image_ext is None:
            found = ", ".join(f".{ext}" if ext else "(no extension)" for ext in sorted(sample.members))
            return reject_row(sample.image_id, file_name, "source", f"no image member in the sample (members: {found})")
        captions = self._captions(tar, sample)
        if sample.problem:
            return reject_row(sample.image_id, file_name, "source", sample.problem)
        data = tar.extractfile(sample.members[image_ext]).read()
        return image_row(sample.image_id, file_name, captions, image_bytes=data, **self.screening.kwargs())

    @contextlib.contextmanager
    def _open(self, task: ShardTask) -> Iterator[tuple[tarfile.TarFile | None, str | None]]:
        """``(tar, None)``, or ``(None, why)`` when the file cannot be opened as a tar."""
        location = resolve(task.payload["file"])
        try:
            handle = location.open_input()
        except StorageError as exc:
            yield None, f"the tar file cannot be read: {exc}"
            return
        with handle:
            try:
                tar = tarfile.open(fileobj=handle, mode="r:*")
            except (tarfile.TarError, OSError) as exc:
                yield None, f"not a readable tar file: {exc}"
                return
            with tar:
                yield tar, None

    def count(self, task: ShardTask) -> int:
        with self._open(task) as (tar, problem):
            return len(self._scan(tar, task, problem))

    def read_shard(self, task: ShardTask) -> Iterator["pa.Table"]:
        only = task.payload.get("only_ids")
        keep = frozenset(only) if only is not None else None
        with self._open(task) as (tar, problem):
            samples = self._scan(tar, task, problem)
            rows = (self._row(tar, sample, task.payload["name"]) for sample in samples)
            yield from batches(rows, task.index, len(samples), keep=keep)

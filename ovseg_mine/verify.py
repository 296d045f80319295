"""The verified read of a run folder: every shard file checked against its done marker before a reader trusts it.

``inspect``, ``finetune``, ``publish`` and ``export`` read a run through :func:`verify_shards` (directly, or
through :func:`shard_files` and :func:`read_pairs`, which call it). The done
marker of a shard (:mod:`ovseg_mine.shards`: ``done/shard-N.json``, or ``shards/shard-N.done.json`` in the legacy
layout) records the sha256 of the file as it was committed; a file whose bytes differ (changed, truncated,
replaced by a copy of another shard), a file without a marker, a marker without its file, or a marker that names
another file is *damaged*. It is refused by name in one line, or, when the user asks (``--skip-damaged``), left
out and listed. ``mine`` redoes damaged shards when it resumes the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from ovseg_mine.done_record import DoneRecord
from ovseg_mine.shards import (
    DONE_DIR,
    SHARDS_DIR,
    ShardError,
    Where,
    list_markers,
    load_marker,
    pair_schema,
    read_table,
    shard_index,
    shard_name,
)
from ovseg_mine.storage import Location, StorageError, resolve, sha256_file

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("ovseg_mine")

#: The flag of ``inspect`` and ``finetune`` that goes on without damaged shards.
SKIP_HINT = "--skip-damaged"


class DamagedShardError(ShardError):
    """Shards whose file and done marker do not agree (:func:`verify_shards`); ``damaged`` lists them all and
    ``str(error)`` names the first in one line."""

    def __init__(self, message: str, damaged: list["DamagedShard"]):
        super().__init__(message)
        self.damaged = damaged


@dataclass(frozen=True)
class Shard:
    """A shard whose file and done marker agree (:func:`verify_shards`).

    Attributes:
        index: shard index (``shard-00042.parquet`` -> 42).
        file: the Parquet file (a Location; a local one works wherever a path does).
        record: its done marker's record (``file``, ``rows``, ``sha256``, image ids, per-image status...).
        sha256: hex sha256 of the file's bytes as read now (equal to the marker's).
    """

    index: int
    file: Location
    record: DoneRecord
    sha256: str


@dataclass(frozen=True)
class DamagedShard:
    """A shard whose file and done marker do not agree.

    Attributes:
        name: the shard's file name (``shard-00001.parquet``).
        kind: ``mismatch`` (the file's sha256 is not the marker's: changed, truncated, replaced), ``missing``
            (a marker without its file), ``uncommitted`` (a file without a marker: the run stopped between the
            two, or the file was put there by hand), ``marker`` (a marker that is not a readable done record: not
            JSON, or values of the wrong kind; or one that names another file).
        reason: one line saying what differs.
    """

    name: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


@dataclass
class VerifiedShards:
    """What :func:`verify_shards` found in a run folder.

    Attributes:
        run_dir: the run folder (resolved).
        shards: the shards whose file's sha256 is their marker's, in index order.
        damaged: the others, in index order (empty unless skipping was asked for).
    """

    run_dir: Location
    shards: list[Shard] = field(default_factory=list)
    damaged: list[DamagedShard] = field(default_factory=list)

    @property
    def files(self) -> list[Location]:
        """The verified shard files, in index order."""
        return [s.file for s in self.shards]

    @property
    def records(self) -> dict[int, DoneRecord]:
        """The verified shards' done records, by shard index."""
        return {s.index: s.record for s in self.shards}


def _short(digest: Any) -> str:
    return f"{str(digest)[:12]}..." if digest else "none"


def _check(index: int, file: Location | None, marker: Location | None) -> Shard | DamagedShard:
    """One shard's file against its marker; the file's sha256 is streamed once."""
    name = f"{shard_name(index)}.parquet"
    expected = f"{SHARDS_DIR}/{name}"
    if marker is None:
        return DamagedShard(name, "uncommitted", "no done marker: not committed")
    label = f"{marker.parent.name}/{marker.name}"
    record = load_marker(marker)
    if record is None:
        return DamagedShard(name, "marker", f"its done marker {label} is not a readable done record")
    if record.file != expected:
        return DamagedShard(name, "marker", f"its done marker {label} names {record.file!r}")
    if file is None:
        return DamagedShard(name, "missing", f"the file is missing; its done marker {label} lists it")
    try:
        digest = sha256_file(file)
    except StorageError as exc:
        return DamagedShard(name, "missing", f"the file cannot be read: {exc}")
    if digest != record.sha256:
        return DamagedShard(name, "mismatch", f"sha256 {_short(digest)} != its done marker's {_short(record.sha256)}")
    return Shard(index, file, record, digest)


def damaged_message(damaged: list[DamagedShard], hint: str | None = SKIP_HINT) -> str:
    """One line naming the first damaged shard, what to do, and how many there are.

    Args:
        damaged: at least one shard.
        hint: the flag that goes on without them (``--skip-damaged``), or None where there is none.
    """
    first = damaged[0]
    more = f" ({len(damaged)} damaged: {', '.join(d.name for d in damaged[:5])}{', ...' if len(damaged) > 5 else ''})"
    todo = "rerun ovseg-mine mine with the same --out to redo it" + (
        f", or pass {hint} to go on without it" if hint else ""
    )
    return f"{first.name} is damaged: {first.reason}; {todo}" + (more if len(damaged) > 1 else "")


def verify_shards(run_dir: Where, *, skip_damaged: bool = False, hint: str | None = SKIP_HINT) -> VerifiedShards:
    """Check every shard of a run folder against its done marker: the one verified-read path of every reader.

    Each shard file's sha256 is streamed once (4 MiB chunks, never the whole file in memory) and compared with
    the marker's (``done/shard-N.json``, or a legacy ``shards/shard-N.done.json``); the marker must name the
    file. Shards are the union of the ``shards/shard-*.parquet`` files and the markers.

    Args:
        run_dir: the run folder, a local path or a URI.
        skip_damaged: leave damaged shards out, listed in the result's ``damaged`` (for the caller to show),
            instead of raising.
        hint: the flag named in the error as the way to go on (None: no such flag).

    Returns:
        A :class:`VerifiedShards`.

    Raises:
        ShardError: not a run folder (neither ``shards/`` nor ``done/`` in it), or it cannot be listed.
        DamagedShardError: a damaged shard (without ``skip_damaged``): a file whose sha256 differs from its
            marker's, a file without a marker, a marker without its file, or a marker that is not readable or
            names another file; the message names the first one and counts them all.
    """
    run = resolve(run_dir)
    shard_dir = run.join(SHARDS_DIR)
    try:
        if not shard_dir.is_dir() and not run.join(DONE_DIR).is_dir():
            raise ShardError(f"{run} is not an ovseg-mine run folder (no {SHARDS_DIR}/ in it)")
        files = {}
        if shard_dir.is_dir():
            for f in shard_dir.list_files():
                index = shard_index(f.name, ".parquet")
                if index is not None:
                    files[index] = f
        markers = list_markers(run)
    except StorageError as exc:
        raise ShardError(str(exc)) from exc
    result = VerifiedShards(run)
    for index in sorted(files.keys() | markers.keys()):
        checked = _check(index, files.get(index), markers.get(index))
        if isinstance(checked, Shard):
            result.shards.append(checked)
        else:
            result.damaged.append(checked)
    if result.damaged and not skip_damaged:
        raise DamagedShardError(damaged_message(result.damaged, hint), result.damaged)
    return result


def shard_files(run_dir: Where, *, skip_damaged: bool = False) -> list[Location]:
    """The run's shard files in index order (Locations; a local one works wherever a path does), each checked
    against its done marker first (:func:`verify_shards`).

    Args:
        run_dir: the run folder, a local path or a URI.
        skip_damaged: leave damaged shards out (logged as warnings) instead of raising.

    Raises:
        ShardError: the folder is not a run folder, or cannot be listed.
        DamagedShardError: a damaged shard (see :func:`verify_shards`), unless ``skip_damaged``.
    """
    checked = verify_shards(run_dir, skip_damaged=skip_damaged)
    for damaged in checked.damaged:
        log.warning("skipping damaged shard %s", damaged)
    return checked.files


def read_pairs(run_dir: Where, columns: Iterable[str] | None = None, *, skip_damaged: bool = False) -> "pa.Table":
    """All pairs of a run as one Arrow table (for small runs, tests and inspection), its shards verified first
    (:func:`verify_shards`; ``skip_damaged`` leaves damaged ones out, logged).

    Raises:
        ShardError, DamagedShardError: as :func:`verify_shards`.
    """
    import pyarrow as pa

    tables = [read_table(f, columns) for f in shard_files(run_dir, skip_damaged=skip_damaged)]
    if not tables:
        return pair_schema().empty_table()
    return pa.concat_tables(tables).replace_schema_metadata(None)

"""Shards: the Parquet files of a run, their done markers, the run manifest, and the verified read of them all.

Layout of a run folder::

    RUN/
      config.json                   resolved config + config_hash, written when the run starts
      manifest.json                 schema version, config, models, counts, rejects, timings (schemas/)
      shards/shard-00000.parquet    pairs of the images of shard 0 (schemas/pairs-v1.json); nothing else is
                                    left in shards/ once a run has finished or stopped and resumed
      done/shard-00000.json         its done marker: row count, sha256, image ids, per-image status and rejects
                                    (ovseg_mine.done_record.DoneRecord)

``shards/`` holds only the pairs, so that standard readers take the folder as one dataset (pyarrow.dataset,
``datasets.load_dataset("parquet", data_dir=...)``, DuckDB's ``read_parquet('RUN/shards/*')``). Earlier
versions kept the markers there, as ``shards/shard-00000.done.json`` (the *legacy layout*): they are read from
both places, and :func:`move_legacy_markers`, which ``mine`` calls before it resumes a run, moves
them to ``done/``.

The run folder is a local path or a URI (``s3://``, ``gs://``, ``file://``; :mod:`ovseg_mine.storage`). A shard is
committed in two steps, then checked against each other when read:

1. the shard file is put in place whole: on a local disk written to ``RUN/.partial/shard-N.parquet.tmp``, fsynced
   and renamed into ``shards/`` (so ``shards/`` never holds a part-written file, even after a crash); on an object
   store (no rename) written as one object, which is visible only once its upload completes;
2. its done marker ``done/shard-NNNNN.json`` (rows, sha256 of the file, image ids, per-image status) is written
   the same way.

A shard is done only when both are there and agree: the file's sha256 is the marker's. ``mine`` redoes a shard
whose file has no marker, whose bytes no longer match it, or whose file is gone (:func:`read_done`). Every
reader of a run (``inspect``, ``finetune``, ``publish``, ``export``) goes through
:func:`ovseg_mine.verify.verify_shards` (or :func:`~ovseg_mine.verify.shard_files` /
:func:`~ovseg_mine.verify.read_pairs`, which call it): each file's
sha256 is streamed once and compared with its marker, and a damaged shard is refused by name or, when the user
asks, skipped and listed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Union

from ovseg_mine.done_record import DoneRecord
from ovseg_mine.faults import failpoint
from ovseg_mine.resources import schemas_dir
from ovseg_mine.storage import Location, StorageError, resolve, sha256_file

if TYPE_CHECKING:
    import pyarrow as pa

SCHEMA_VERSION = 1
METADATA_KEY = b"ovseg_mine"
SHARDS_DIR = "shards"
DONE_DIR = "done"
PARTIAL_DIR = ".partial"  # shard files being written (local disks), kept out of shards/, which readers glob
MANIFEST = "manifest.json"
MARKER_SUFFIX = ".json"  # done/shard-00042.json
LEGACY_MARKER_SUFFIX = ".done.json"  # shards/shard-00042.done.json, the layout of earlier runs

log = logging.getLogger(__name__)

__all__ = ["sha256_file"]  # re-exported: shards are checked by their sha256

#: A run folder or file: a local path or a URI (str or PathLike), or a resolved Location.
Where = Union[str, "os.PathLike[str]", Location]


class ShardError(ValueError):
    """A shard or run folder that does not follow the contract (unknown schema version, bad layout)."""


def arrow_type(spec: Any) -> "pa.DataType":
    """The Arrow type of a type spec as ``schemas/pairs-v1.json`` writes it: a name (``string``, ``bool``,
    ``int16``, ``int32``, ``int64``, ``float32``, ``float64``), ``{"list": SPEC}`` (``"size"``: fixed size) or
    ``{"struct": [FIELD, ...]}``.

    Raises:
        ShardError: an unknown type.
    """
    import pyarrow as pa

    if isinstance(spec, str):
        try:
            return {
                "string": pa.string(),
                "bool": pa.bool_(),
                "int16": pa.int16(),
                "int32": pa.int32(),
                "int64": pa.int64(),
                "float32": pa.float32(),
                "float64": pa.float64(),
            }[spec]
        except KeyError as exc:
            raise ShardError(f"unknown type {spec!r} in schema") from exc
    if "list" in spec:
        return pa.list_(arrow_type(spec["list"]), spec.get("size", -1))
    if "struct" in spec:
        return pa.struct([_arrow_field(f) for f in spec["struct"]])
    raise ShardError(f"unknown type {spec!r} in schema")


def _arrow_field(spec: dict[str, Any]) -> "pa.Field":
    import pyarrow as pa

    metadata = {"description": spec["description"]} if "description" in spec else None
    return pa.field(spec["name"], arrow_type(spec["type"]), nullable=spec.get("nullable", False), metadata=metadata)


def schema_spec(version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The JSON contract ``schemas/pairs-v{version}.json`` as a dict.

    Raises:
        ShardError: no contract of that version ships with this package.
    """
    path = schemas_dir() / f"pairs-v{version}.json"
    if not path.is_file():
        known = sorted(p.stem for p in schemas_dir().glob("pairs-v*.json"))
        raise ShardError(f"unknown shard schema version {version}; this ovseg-mine knows {known}")
    return json.loads(path.read_text(encoding="utf-8"))


def pair_schema(version: int = SCHEMA_VERSION) -> "pa.Schema":
    """The Arrow schema of a pairs shard, built from ``schemas/pairs-v{version}.json``."""
    import pyarrow as pa

    spec = schema_spec(version)
    return pa.schema([_arrow_field(f) for f in spec["fields"]])


def shard_name(index: int) -> str:
    """``shard-00042`` for index 42."""
    return f"shard-{index:05d}"


def write_json_atomic(path: Where, data: Any) -> None:
    """Write JSON to ``path`` (a local path or a URI) whole: readers see the old file or the new, never a part
    (:meth:`ovseg_mine.storage.Location.write_bytes`).

    Raises:
        ovseg_mine.storage.StorageError: not writable.
    """
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    resolve(path).write_bytes(text.encode("utf-8"))


def write_shard(
    run_dir: Where,
    index: int,
    table: "pa.Table",
    *,
    file_metadata: dict[str, Any],
    done_record: DoneRecord,
    row_group_size: int,
) -> DoneRecord:
    """Write one shard and mark it done (the commit protocol of this module's docstring).

    Args:
        run_dir: the run folder (a local path or a URI).
        index: shard index.
        table: rows that follow :func:`pair_schema` (cast to it; extra columns are an error).
        file_metadata: JSON-able dict stored under the ``ovseg_mine`` key of the Parquet file metadata
            (no timings or paths that vary between identical runs: shards must be byte-identical).
        done_record: the done marker's record (image ids, per-image status, rejects); its ``file``, ``rows`` and
            ``sha256`` are set here.
        row_group_size: rows per Parquet row group.

    Returns:
        The done record as written: ``done_record`` with ``file``, ``rows``, ``sha256``.

    Raises:
        ovseg_mine.storage.StorageError: the run folder is not writable.
    """
    import pyarrow.parquet as pq

    schema = pair_schema()
    meta = {METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **file_metadata}, sort_keys=True).encode()}
    table = table.select(schema.names).cast(schema).replace_schema_metadata(meta)
    shard_dir = resolve(run_dir).join(SHARDS_DIR)
    final = shard_dir.join(f"{shard_name(index)}.parquet")
    try:
        if final.is_local:
            partial = resolve(run_dir).join(PARTIAL_DIR)
            shard_dir.makedirs()
            partial.makedirs()
            tmp = Path(partial.path, final.name + ".tmp")
            pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            failpoint("shard.before_rename", index)
            os.replace(tmp, final.path)
        else:  # one object: absent until the upload completes, then whole
            failpoint("shard.before_rename", index)
            pq.write_table(table, final.path, filesystem=final.fs, row_group_size=row_group_size, compression="zstd")
    except OSError as exc:
        raise StorageError(f"cannot write {final.uri}: {exc}") from exc
    failpoint("shard.after_rename", index)
    file = f"{SHARDS_DIR}/{final.name}"
    record = replace(done_record, file=file, rows=table.num_rows, sha256=sha256_file(final))
    write_json_atomic(marker_location(run_dir, index), record.to_json())
    failpoint("shard.after_done", index)
    return record


def marker_location(run_dir: Where, index: int) -> Location:
    """Where the done marker of shard ``index`` goes: ``RUN/done/shard-00042.json``."""
    return resolve(run_dir).join(DONE_DIR, f"{shard_name(index)}{MARKER_SUFFIX}")


def remove_partial_writes(run_dir: Where) -> list[str]:
    """Delete the ``*.tmp`` files an interrupted shard or marker write left in ``RUN/.partial`` (shard files),
    ``RUN/done`` (markers) and ``RUN/shards`` (where earlier versions wrote them).

    A ``.tmp`` file is never a committed shard (commit is the rename), so removing it loses nothing. Object
    stores have none: an interrupted upload leaves no object.

    Returns:
        The removed files as ``FOLDER/NAME``, sorted.
    """
    removed = []
    for folder in (PARTIAL_DIR, SHARDS_DIR, DONE_DIR):
        where = resolve(run_dir).join(folder)
        if not where.is_local or not where.is_dir():
            continue
        for f in where.list_files():
            if f.name.endswith(".tmp"):
                f.delete()
                removed.append(f"{folder}/{f.name}")
    return sorted(removed)


def shard_index(name: str, suffix: str) -> int | None:
    """Shard index of a file name ``shard-00042{suffix}`` (42), None for other names."""
    if not (name.startswith("shard-") and name.endswith(suffix)):
        return None
    digits = name[len("shard-") : -len(suffix)]
    return int(digits) if digits.isdigit() else None


def list_markers(run: Location) -> dict[int, Location]:
    """Every done marker of a run by shard index: ``done/`` and the legacy ``shards/*.done.json``; where both
    hold one (a move that was interrupted), ``done/``'s.

    Raises:
        StorageError: a folder cannot be listed.
    """
    found: dict[int, Location] = {}
    for folder, suffix in ((SHARDS_DIR, LEGACY_MARKER_SUFFIX), (DONE_DIR, MARKER_SUFFIX)):
        where = run.join(folder)
        if where.is_dir():
            for f in where.list_files():
                index = shard_index(f.name, suffix)
                if index is not None:
                    found[index] = f
    return found


def load_marker(marker: Location) -> DoneRecord | None:
    """A done marker's record, or None when it is absent, unreadable, not JSON or not a done record's JSON object
    (:meth:`DoneRecord.from_json`)."""
    try:
        return DoneRecord.from_json(json.loads(marker.read_bytes()))
    except (StorageError, ValueError):
        return None


def read_done(run_dir: Where, *, verify: bool = True, only: Iterable[int] | None = None) -> dict[int, DoneRecord]:
    """Done records of a run's shards, by shard index (``done/``, else the legacy ``shards/*.done.json``).

    This is the resume check of ``mine``: with ``verify``, a record whose Parquet file is missing or whose
    sha256 differs is left out (its shard will be redone). Malformed done files are left out too. ``only``:
    read just these shard indices. Readers of a run use :func:`ovseg_mine.verify.verify_shards`, which names
    what it leaves out.
    """
    run = resolve(run_dir)
    if only is None:
        markers = list_markers(run)
    else:
        markers = {}
        for i in sorted(only):
            new, legacy = marker_location(run, i), run.join(SHARDS_DIR, f"{shard_name(i)}{LEGACY_MARKER_SUFFIX}")
            markers[i] = new if new.is_file() or not legacy.is_file() else legacy
    records: dict[int, DoneRecord] = {}
    for index, marker in sorted(markers.items()):
        record = load_marker(marker)
        if record is None:  # absent, unreadable or not JSON: not done
            continue
        if verify:
            try:
                if sha256_file(run.join(record.file or "")) != record.sha256:
                    continue
            except StorageError:
                continue
        records[index] = record
    return records


def move_legacy_markers(run_dir: Where) -> list[str]:
    """Move the done markers of a run in the legacy layout (``shards/shard-N.done.json``) to ``done/shard-N.json``,
    so that ``shards/`` holds only Parquet files. ``mine`` calls this before it resumes a run.

    Each marker is written to its new place whole, then the old one deleted: a stop in between leaves both, with
    the same content, and the next call finishes the move. A marker already in ``done/`` is kept.

    Returns:
        The names of the moved markers (as they were in ``shards/``), sorted.

    Raises:
        ovseg_mine.storage.StorageError: the run folder cannot be listed or written.
    """
    run = resolve(run_dir)
    shard_dir = run.join(SHARDS_DIR)
    if not shard_dir.is_dir():
        return []
    moved = []
    for old in shard_dir.list_files():
        index = shard_index(old.name, LEGACY_MARKER_SUFFIX)
        if index is None:
            continue
        new = marker_location(run, index)
        if not new.is_file():
            new.write_bytes(old.read_bytes())
        old.delete()
        moved.append(old.name)
    return sorted(moved)


def read_file_metadata(path: Where) -> dict[str, Any]:
    """The ``ovseg_mine`` metadata of a shard file (a local path or a URI).

    Raises:
        ShardError: not a Parquet file, no ovseg_mine metadata, or an unknown schema version.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = resolve(path)
    try:
        schema = pq.read_schema(path.path, filesystem=path.fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardError(f"{path} is not a readable Parquet file: {exc}") from exc
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardError(f"{path} has no ovseg_mine metadata: not an ovseg-mine shard")
    meta = json.loads(raw)
    version = meta.get("schema_version")
    known = sorted(int(p.stem.split("-v")[1]) for p in schemas_dir().glob("pairs-v*.json"))
    if version not in known:
        raise ShardError(f"{path} uses shard schema version {version!r}; this ovseg-mine reads versions {known}")
    return meta


def validate_shard(path: Where) -> list[str]:
    """Problems of one shard against its declared contract (empty list: valid).

    Checks the schema version, that every contract column is present with the contract's type, and that
    non-nullable columns hold no nulls.
    """
    import pyarrow.parquet as pq

    try:
        meta = read_file_metadata(path)
    except ShardError as exc:
        return [str(exc)]
    expected = pair_schema(meta["schema_version"])
    path = resolve(path)
    table = pq.read_table(path.path, filesystem=path.fs)
    problems = []
    for field in expected:
        if field.name not in table.schema.names:
            problems.append(f"missing column {field.name}")
            continue
        actual = table.schema.field(field.name)
        if actual.type != field.type:
            problems.append(f"column {field.name}: type {actual.type}, contract says {field.type}")
        if not field.nullable and table[field.name].null_count:
            problems.append(f"column {field.name}: {table[field.name].null_count} nulls in a non-nullable column")
    extra = set(table.schema.names) - set(expected.names)
    if extra:
        problems.append(f"columns not in the contract: {sorted(extra)}")
    return problems


def read_manifest(run_dir: Where) -> dict[str, Any]:
    """The run manifest (``RUN/manifest.json``, ``schemas/manifest-v1.schema.json``) as a dict.

    Raises:
        ShardError: the folder is not a run folder (missing, or no manifest in it), or the manifest is not
            readable JSON; the message says which, in one line.
    """
    run = resolve(run_dir)
    path = run.join(MANIFEST)
    try:
        if not run.is_dir():
            raise ShardError(f"{run} is not a folder")
        if not path.is_file():
            raise ShardError(f"{run} is not an ovseg-mine run folder (no {MANIFEST} in it)")
        manifest = json.loads(path.read_bytes())
    except (StorageError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path} is not a readable manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ShardError(f"{path} is not a manifest: a JSON object was expected")
    return manifest


def read_table(path: Where, columns: Iterable[str] | None = None) -> "pa.Table":
    """One shard file (a local path or a URI) as an Arrow table, ``columns`` only if given."""
    import pyarrow.parquet as pq

    path = resolve(path)
    return pq.read_table(path.path, filesystem=path.fs, columns=list(columns) if columns else None)

"""Shards: the Parquet files of a run, their done markers, and the run manifest.

Layout of a run folder::

    RUN/
      config.json                   resolved config + config_hash, written when the run starts
      manifest.json                 schema version, config, models, counts, rejects, timings (schemas/)
      shards/shard-00000.parquet    pairs of the images of shard 0 (schemas/pairs-v1.json)
      shards/shard-00000.done.json  row count, sha256, image ids, per-image status and rejects

The run folder is a local path or a URI (``s3://``, ``gs://``, ``file://``; :mod:`ovseg_mine.storage`). A shard is
committed in two steps, then checked against each other when read:

1. the shard file is put in place whole: on a local disk written to ``*.parquet.tmp``, fsynced and renamed; on an
   object store (no rename) written as one object, which is visible only once its upload completes;
2. its done marker ``.done.json`` (rows, sha256 of the file, image ids, per-image status) is written the same way.

A shard is done only when both are there and agree: the file's sha256 is the marker's. A file without a marker,
or one whose bytes no longer match it, is redone on resume; so is a marker without its file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Union

from ovseg_mine.faults import failpoint
from ovseg_mine.resources import schemas_dir
from ovseg_mine.storage import Location, StorageError, resolve, sha256_file

if TYPE_CHECKING:
    import pyarrow as pa

SCHEMA_VERSION = 1
METADATA_KEY = b"ovseg_mine"
SHARDS_DIR = "shards"
MANIFEST = "manifest.json"

__all__ = ["sha256_file"]  # re-exported: shards are checked by their sha256

#: A run folder or file: a local path or a URI (str or PathLike), or a resolved Location.
Where = Union[str, "os.PathLike[str]", Location]


class ShardError(ValueError):
    """A shard or run folder that does not follow the contract (unknown schema version, bad layout)."""


def _arrow_type(spec: Any) -> "pa.DataType":
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
        return pa.list_(_arrow_type(spec["list"]), spec.get("size", -1))
    if "struct" in spec:
        return pa.struct([_arrow_field(f) for f in spec["struct"]])
    raise ShardError(f"unknown type {spec!r} in schema")


def _arrow_field(spec: dict[str, Any]) -> "pa.Field":
    import pyarrow as pa

    metadata = {"description": spec["description"]} if "description" in spec else None
    return pa.field(spec["name"], _arrow_type(spec["type"]), nullable=spec.get("nullable", False), metadata=metadata)


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
    done_record: dict[str, Any],
    row_group_size: int,
) -> dict[str, Any]:
    """Write one shard and mark it done (the commit protocol of this module's docstring).

    Args:
        run_dir: the run folder (a local path or a URI).
        index: shard index.
        table: rows that follow :func:`pair_schema` (cast to it; extra columns are an error).
        file_metadata: JSON-able dict stored under the ``ovseg_mine`` key of the Parquet file metadata
            (no timings or paths that vary between identical runs: shards must be byte-identical).
        done_record: extra JSON-able fields for the done marker (image ids, per-image status, rejects).
        row_group_size: rows per Parquet row group.

    Returns:
        The done record as written: ``done_record`` plus ``file``, ``rows``, ``sha256``.

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
            shard_dir.makedirs()
            tmp = Path(final.path + ".tmp")
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
    record = {**done_record, "file": f"{SHARDS_DIR}/{final.name}", "rows": table.num_rows, "sha256": sha256_file(final)}
    write_json_atomic(shard_dir.join(f"{shard_name(index)}.done.json"), record)
    failpoint("shard.after_done", index)
    return record


def remove_partial_writes(run_dir: Where) -> list[str]:
    """Delete the ``*.tmp`` files an interrupted shard or marker write left in ``run_dir/shards``.

    A ``.tmp`` file is never a committed shard (commit is the rename), so removing it loses nothing. Object
    stores have none: an interrupted upload leaves no object.

    Returns:
        The names of the removed files, sorted.
    """
    shard_dir = resolve(run_dir).join(SHARDS_DIR)
    if not shard_dir.is_local or not shard_dir.is_dir():
        return []
    removed = sorted(f.name for f in shard_dir.list_files() if f.name.endswith(".tmp"))
    for name in removed:
        shard_dir.join(name).delete()
    return removed


def _done_index(name: str) -> int | None:
    """Shard index of a done marker's file name (``shard-00042.done.json`` -> 42), None for other files."""
    if not (name.startswith("shard-") and name.endswith(".done.json")):
        return None
    try:
        return int(name[len("shard-") : -len(".done.json")])
    except ValueError:
        return None


def read_done(run_dir: Where, *, verify: bool = True, only: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
    """Done records of a run's shards, by shard index.

    With ``verify``, a record whose Parquet file is missing or whose sha256 differs is left out (its shard
    will be redone). Malformed done files are left out too. ``only``: read just these shard indices.
    """
    run = resolve(run_dir)
    shard_dir = run.join(SHARDS_DIR)
    if only is None:
        markers = [f for f in shard_dir.list_files() if _done_index(f.name) is not None] if shard_dir.is_dir() else []
    else:
        markers = [shard_dir.join(f"{shard_name(i)}.done.json") for i in sorted(only)]
    records: dict[int, dict[str, Any]] = {}
    for marker in markers:
        try:
            record = json.loads(marker.read_bytes())
        except (StorageError, ValueError):  # absent, unreadable or not JSON: not done
            continue
        if not isinstance(record, dict):
            continue
        parquet = run.join(record.get("file", ""))
        if verify:
            try:
                if sha256_file(parquet) != record.get("sha256"):
                    continue
            except StorageError:
                continue
        records[_done_index(marker.name)] = record
    return records


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


def shard_files(run_dir: Where) -> list[Location]:
    """The run's shard files in index order (Locations; a local one works wherever a path does).

    Raises:
        ShardError: the folder is not a run folder (no ``shards/`` folder in it), or cannot be listed.
    """
    shard_dir = resolve(run_dir).join(SHARDS_DIR)
    try:
        if not shard_dir.is_dir():
            raise ShardError(f"{resolve(run_dir)} is not an ovseg-mine run folder (no {SHARDS_DIR}/ in it)")
        files = shard_dir.list_files()
    except StorageError as exc:
        raise ShardError(str(exc)) from exc
    return [f for f in files if f.name.startswith("shard-") and f.name.endswith(".parquet")]


def read_table(path: Where, columns: Iterable[str] | None = None) -> "pa.Table":
    """One shard file (a local path or a URI) as an Arrow table, ``columns`` only if given."""
    import pyarrow.parquet as pq

    path = resolve(path)
    return pq.read_table(path.path, filesystem=path.fs, columns=list(columns) if columns else None)


def read_pairs(run_dir: Where, columns: Iterable[str] | None = None) -> "pa.Table":
    """All pairs of a run as one Arrow table (for small runs, tests and inspection)."""
    import pyarrow as pa

    tables = [read_table(f, columns) for f in shard_files(run_dir)]
    if not tables:
        return pair_schema().empty_table()
    return pa.concat_tables(tables).replace_schema_metadata(None)

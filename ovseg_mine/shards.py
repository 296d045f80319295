"""Shards: the Parquet files of a run, their done markers, and the run manifest.

Layout of a run folder::

    RUN/
      config.json                   resolved config + config_hash, written when the run starts
      manifest.json                 schema version, config, models, counts, rejects, timings (schemas/)
      shards/shard-00000.parquet    pairs of the images of shard 0 (schemas/pairs-v1.json)
      shards/shard-00000.done.json  row count, sha256, image ids, per-image status and rejects

A shard is written to ``*.parquet.tmp``, fsynced, renamed, and only then marked done (its ``.done.json``
written the same way). A shard without a valid done marker is redone on resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ovseg_mine.faults import failpoint
from ovseg_mine.resources import schemas_dir
from ovseg_mine.storage import sha256_file

if TYPE_CHECKING:
    import pyarrow as pa

SCHEMA_VERSION = 1
METADATA_KEY = b"ovseg_mine"
SHARDS_DIR = "shards"
MANIFEST = "manifest.json"

__all__ = ["sha256_file"]  # re-exported: shards are checked by their sha256


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


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to ``path`` through a temporary file, fsync and rename (readers never see a partial file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_shard(
    run_dir: str | os.PathLike[str],
    index: int,
    table: "pa.Table",
    *,
    file_metadata: dict[str, Any],
    done_record: dict[str, Any],
    row_group_size: int,
) -> dict[str, Any]:
    """Write one shard atomically and mark it done.

    Args:
        run_dir: the run folder.
        index: shard index.
        table: rows that follow :func:`pair_schema` (cast to it; extra columns are an error).
        file_metadata: JSON-able dict stored under the ``ovseg_mine`` key of the Parquet file metadata
            (no timings or paths that vary between identical runs: shards must be byte-identical).
        done_record: extra JSON-able fields for the done marker (image ids, per-image status, rejects).
        row_group_size: rows per Parquet row group.

    Returns:
        The done record as written: ``done_record`` plus ``file``, ``rows``, ``sha256``.
    """
    import pyarrow.parquet as pq

    schema = pair_schema()
    meta = {METADATA_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **file_metadata}, sort_keys=True).encode()}
    table = table.select(schema.names).cast(schema).replace_schema_metadata(meta)
    shard_dir = Path(run_dir) / SHARDS_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    final = shard_dir / f"{shard_name(index)}.parquet"
    tmp = final.with_name(final.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    failpoint("shard.before_rename", index)
    os.replace(tmp, final)
    failpoint("shard.after_rename", index)
    record = {**done_record, "file": f"{SHARDS_DIR}/{final.name}", "rows": table.num_rows, "sha256": sha256_file(final)}
    write_json_atomic(shard_dir / f"{shard_name(index)}.done.json", record)
    failpoint("shard.after_done", index)
    return record


def remove_partial_writes(run_dir: str | os.PathLike[str]) -> list[str]:
    """Delete the ``*.tmp`` files an interrupted shard or marker write left in ``run_dir/shards``.

    A ``.tmp`` file is never a committed shard (commit is the rename), so removing it loses nothing.

    Returns:
        The names of the removed files, sorted.
    """
    shard_dir = Path(run_dir) / SHARDS_DIR
    removed = sorted(p.name for p in shard_dir.glob("*.tmp")) if shard_dir.is_dir() else []
    for name in removed:
        (shard_dir / name).unlink(missing_ok=True)
    return removed


def read_done(
    run_dir: str | os.PathLike[str], *, verify: bool = True, only: Iterable[int] | None = None
) -> dict[int, dict[str, Any]]:
    """Done records of a run's shards, by shard index.

    With ``verify``, a record whose Parquet file is missing or whose sha256 differs is left out (its shard
    will be redone). Malformed done files are left out too. ``only``: read just these shard indices.
    """
    shard_dir = Path(run_dir) / SHARDS_DIR
    records: dict[int, dict[str, Any]] = {}
    paths = (
        sorted(shard_dir.glob("shard-*.done.json"))
        if only is None
        else [p for p in (shard_dir / f"{shard_name(i)}.done.json" for i in sorted(only)) if p.is_file()]
    )
    for path in paths:
        try:
            index = int(path.name[len("shard-") :].split(".")[0])
            record = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, json.JSONDecodeError):
            continue
        parquet = Path(run_dir) / record.get("file", "")
        if verify and (not parquet.is_file() or sha256_file(parquet) != record.get("sha256")):
            continue
        records[index] = record
    return records


def read_file_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``ovseg_mine`` metadata of a shard file.

    Raises:
        ShardError: not a Parquet file, no ovseg_mine metadata, or an unknown schema version.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
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


def validate_shard(path: str | os.PathLike[str]) -> list[str]:
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
    table = pq.read_table(path)
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


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run manifest (``RUN/manifest.json``, ``schemas/manifest-v1.schema.json``) as a dict.

    Raises:
        ShardError: the folder is not a run folder (missing, or no manifest in it), or the manifest is not
            readable JSON; the message says which, in one line.
    """
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise ShardError(f"{run_dir} is not a folder")
    if not path.is_file():
        raise ShardError(f"{run_dir} is not an ovseg-mine run folder (no {MANIFEST} in it)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path} is not a readable manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ShardError(f"{path} is not a manifest: a JSON object was expected")
    return manifest


def shard_files(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The run's shard files in index order.

    Raises:
        ShardError: the folder is not a run folder (no ``shards/`` folder or no shard in it).
    """
    shard_dir = Path(run_dir) / SHARDS_DIR
    if not shard_dir.is_dir():
        raise ShardError(f"{run_dir} is not an ovseg-mine run folder (no {SHARDS_DIR}/ in it)")
    return sorted(shard_dir.glob("shard-*.parquet"))


def read_pairs(run_dir: str | os.PathLike[str], columns: Iterable[str] | None = None) -> "pa.Table":
    """All pairs of a run as one Arrow table (for small runs, tests and inspection)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = shard_files(run_dir)
    tables = [pq.read_table(f, columns=list(columns) if columns else None) for f in files]
    if not tables:
        return pair_schema().empty_table()
    return pa.concat_tables(tables).replace_schema_metadata(None)

"""The rows that travel between the Ray stages of mining: the image's row (:class:`ImageResult`), the Arrow schemas
derived from it, and how a stage makes its output rows from its input (:func:`next_rows`).

* decode stage -> GPU stage: the image's status fields, its record, its nouns, the given masks and the decoded
  pixels (:func:`decoded_schema`);
* GPU stage -> finalize stage: the status fields, the record, the nouns' matches with the matched masks as run
  lengths (:func:`matched_schema`);
* finalize stage -> driver: one :class:`ImageResult` per image with its pairs (:func:`image_result_schema`), the
  contract with the driver (``ovseg_mine.mine.run.driver``), which writes the pairs to the shard and the image's
  :class:`~ovseg_mine.done_record.ImageStatus` (:meth:`ImageResult.image_status`) to its done record.

Every image keeps exactly one row through every stage, with a ``status`` (``ok`` or the stage that rejected it)
and a ``reason``: nothing is dropped silently. A stage keeps the Arrow columns it does not change as they are
(:func:`next_rows`); it reads only the columns it needs.
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ovseg_mine.done_record import ImageStatus
from ovseg_mine.shards import arrow_type, pair_schema
from ovseg_mine.storage import first_line

if TYPE_CHECKING:
    import pyarrow as pa

#: Per-image seconds recorded by the stages (fields ``<step>_s`` of :class:`ImageResult`).
TIMED_STEPS = ("decode", "nouns", "proposals", "crops", "clip")

#: The Arrow type of a field the read step's record already has: the record's
#: (:func:`ovseg_mine.mine.sources.records.record_schema`).
AS_RECORD = "as the record"
#: The Arrow type of ``pairs``: a list of pair rows (schemas/pairs-v1.json, :func:`ovseg_mine.shards.pair_schema`).
PAIR_ROWS = "pair rows"


def _field(arrow: Any, default: Any = MISSING, factory: Any = MISSING) -> Any:
    """A field of :class:`ImageResult` with its Arrow type (a spec of :func:`ovseg_mine.shards.arrow_type`,
    :data:`AS_RECORD` or :data:`PAIR_ROWS`)."""
    return field(default=default, default_factory=factory, metadata={"arrow": arrow})


@dataclass(frozen=True, kw_only=True)
class ImageResult:
    """One image's row, from the GPU stage to the shard: the one definition of the image's fields. Every stage row
    carries the *status fields* (all but ``pairs``; :func:`status_fields`), the finalize stage adds ``pairs``, and
    the driver reads the rows back as ImageResults (:meth:`from_row`).

    Attributes:
        image_id: the image's id; None for a reject about an input file (``records.file_reject_row``).
        file_name: the sample's path or key inside the source (the file's name for a file reject).
        shard, shard_size, shard_row: the output shard, its number of rows, this row's position in it (stamped by
            the read step; None in a row that was not, e.g. a stage called directly).
        status: ``ok``, or the stage that rejected the image.
        reason: why it was rejected ("" when ``ok``).
        width, height: its size in pixels: the decoded size once decoded, else the source's (0: unknown).
        num_nouns: nouns parsed from its captions.
        num_proposals: non-empty mask proposals it was matched against.
        decode_s, nouns_s, proposals_s, crops_s, clip_s: seconds spent on it per step (:data:`TIMED_STEPS`); the
            GPU stage's three are its share of its batch's time, the host's time issuing the step on a GPU unless
            ``engine.profile_steps`` (:class:`~ovseg_mine.mine.algorithms.engine.StepTimer`).
        notes: what happened on the way (a caption skipped or cut, a size that differs from the source).
        error_type: the exception's class name when mining it raised (status ``error``), else "".
        traceback: that exception's formatted traceback, which the driver writes to the run's log, else "".
        pairs: its pair rows (schemas/pairs-v1.json: ``mask`` a COCO RLE dict, ``bbox`` XYWH pixels).
    """

    image_id: int | None = _field(AS_RECORD)
    file_name: str = _field(AS_RECORD)
    shard: int | None = _field(AS_RECORD, None)
    shard_size: int | None = _field(AS_RECORD, None)
    shard_row: int | None = _field(AS_RECORD, None)
    status: str = _field(AS_RECORD, "ok")
    reason: str = _field(AS_RECORD, "")
    width: int = _field(AS_RECORD)
    height: int = _field(AS_RECORD)
    num_nouns: int = _field("int32", 0)
    num_proposals: int = _field("int32", 0)
    decode_s: float = _field("float64", 0.0)
    nouns_s: float = _field("float64", 0.0)
    proposals_s: float = _field("float64", 0.0)
    crops_s: float = _field("float64", 0.0)
    clip_s: float = _field("float64", 0.0)
    notes: list[str] = _field(AS_RECORD, factory=list)
    error_type: str = _field("string", "")
    traceback: str = _field("string", "")
    pairs: list[dict[str, Any]] = _field(PAIR_ROWS, factory=list)

    def image_status(self) -> ImageStatus:
        """The image's entry in its shard's done record: the fields :class:`~ovseg_mine.done_record.ImageStatus`
        shares with this row, and ``num_pairs``."""
        shared = {f.name: getattr(self, f.name) for f in fields(ImageStatus) if f.name != "num_pairs"}
        shared.update(notes=tuple(self.notes or ()), error_type=self.error_type or "")
        return ImageStatus(**shared, num_pairs=len(self.pairs))

    @classmethod
    def from_status(cls, image: ImageStatus, file_name: str | None, pairs: list[dict[str, Any]]) -> "ImageResult":
        """The row of an image that a done record lists (``mine --retry-failed`` keeps it as it is): its
        :class:`~ovseg_mine.done_record.ImageStatus` fields, its ``file_name`` and ``pairs``; no timings, no
        traceback, no shard stamp."""
        shared = {f.name: getattr(image, f.name) for f in fields(ImageStatus) if f.name != "num_pairs"}
        return cls(**shared | {"notes": list(image.notes)}, file_name=file_name, pairs=pairs)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "ImageResult":
        """An :func:`image_result_schema` row (a dict, as Arrow's ``to_pylist`` gives it)."""
        return cls(**row)


def error_row(exc: BaseException) -> dict[str, Any]:
    """The fields of a result row for an image whose mining raised ``exc``: status ``error``, a one-line
    ``reason`` (``Type: first line``), ``error_type`` (the exception's class name) and the formatted
    ``traceback`` (with its causes), which the driver writes to the run's log."""
    import traceback

    return {
        "status": "error",
        "reason": f"{type(exc).__name__}: {first_line(exc)}",
        "error_type": type(exc).__name__,
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _arrow(spec: Any, name: str) -> "pa.DataType":
    import pyarrow as pa

    from ovseg_mine.mine.sources.records import record_schema

    if spec == AS_RECORD:
        return record_schema().field(name).type
    if spec == PAIR_ROWS:
        return pa.list_(pa.struct(list(pair_schema())))
    return arrow_type(spec)


def status_fields() -> list[tuple[str, "pa.DataType"]]:
    """The status fields of every stage row: the fields of :class:`ImageResult` but ``pairs``, in order, with
    their Arrow types."""
    return [(f.name, _arrow(f.metadata["arrow"], f.name)) for f in fields(ImageResult) if f.name != "pairs"]


def noun_fields() -> list[tuple[str, "pa.DataType"]]:
    """The columns the noun stage adds to a record: ``nouns`` and the index of the caption each came from."""
    import pyarrow as pa

    return [("nouns", pa.list_(pa.string())), ("noun_caption_index", pa.list_(pa.int16()))]


def _record_fields() -> list[tuple[str, "pa.DataType"]]:
    """What the finalize stage needs of the record to write pair rows."""
    from ovseg_mine.mine.sources.records import record_schema

    return [("captions", record_schema().field("captions").type), *noun_fields()]


def decoded_schema() -> "pa.Schema":
    """Rows of the decode stage: status fields, the record, the given masks (``proposals``, null when SAM runs:
    :func:`ovseg_mine.mine.sources.records.proposal_type`) and the pixels (empty unless ``status == "ok"``):
    ``pixels`` uint8 RGB ``[height, width, 3]`` (C order, the decoded image, EXIF orientation applied) and
    ``sam_pixels`` uint8 RGB ``[sam_height, sam_width, 3]`` (SAM's resize to its input size; empty with given
    masks)."""
    import pyarrow as pa

    from ovseg_mine.mine.sources.records import proposal_type

    return pa.schema(
        [
            *status_fields(),
            *_record_fields(),
            ("proposals", pa.list_(proposal_type())),
            ("pixels", pa.large_binary()),
            ("sam_pixels", pa.large_binary()),
            ("sam_height", pa.int32()),
            ("sam_width", pa.int32()),
        ]
    )


def match_struct() -> "pa.StructType":
    """One noun's match as the GPU stage reports it (see :class:`ovseg_mine.mine.algorithms.engine.NounMatch`);
    ``runs`` is the matched mask's column-major run lengths (uncompressed COCO RLE)."""
    import pyarrow as pa

    return pa.struct(
        [
            ("noun_index", pa.int32()),
            ("mask_index", pa.int32()),
            ("similarity", pa.float64()),
            ("probability", pa.float64()),
            ("margin", pa.float64()),
            ("predicted_iou", pa.float64()),  # null: a given mask without scores
            ("stability_score", pa.float64()),
            ("bbox", pa.list_(pa.int32())),
            ("area", pa.int64()),
            ("runs", pa.list_(pa.uint32())),
        ]
    )


def matched_schema() -> "pa.Schema":
    """Rows of the GPU stage: status fields, the record, and the nouns' matches that passed the thresholds."""
    import pyarrow as pa

    return pa.schema([*status_fields(), *_record_fields(), ("matches", pa.list_(match_struct()))])


def image_result_schema() -> "pa.Schema":
    """Arrow schema of the rows the driver receives: the fields of :class:`ImageResult`, in order (one row per
    image; ``pairs`` nested, schemas/pairs-v1.json)."""
    import pyarrow as pa

    return pa.schema([(f.name, _arrow(f.metadata["arrow"], f.name)) for f in fields(ImageResult)])


#: A column that every input row must have (no default).
_REQUIRED = object()


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    return _REQUIRED if f.default_factory is MISSING else f.default_factory()


#: What a column of a stage row holds where the stage's input has no value (a null, or no such column): the
#: defaults of :class:`ImageResult`, then those of the columns of the decode and GPU stages.
_DEFAULTS: dict[str, Any] = {
    **{f.name: _default(f) for f in fields(ImageResult)},
    "proposals": None,
    "pixels": b"",
    "sam_pixels": b"",
    "sam_height": 0,
    "sam_width": 0,
    "matches": [],
}


def column_values(batch: "pa.Table", name: str) -> list[Any]:
    """Column ``name`` of ``batch`` as Python values, a null (or the whole column, when ``batch`` has none)
    replaced by the column's default (the :class:`ImageResult` field's, else the stage column's, else None).

    Raises:
        KeyError: ``batch`` lacks a column that has no default (``image_id``, ``file_name``, ``width``,
            ``height``).
    """
    default = _DEFAULTS.get(name)
    if name not in batch.column_names:
        if default is _REQUIRED:
            raise KeyError(name)
        return [copy.copy(default) for _ in range(batch.num_rows)]
    values = batch.column(name).to_pylist()
    if default is None or default is _REQUIRED:
        return values
    return [copy.copy(default) if value is None else value for value in values]


def row_values(batch: "pa.Table", names: list[str]) -> list[dict[str, Any]]:
    """Columns ``names`` of ``batch`` as one dict per row, with the defaults of :func:`column_values`.

    Raises:
        KeyError: as :func:`column_values`.
    """
    columns = [column_values(batch, name) for name in names]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def next_rows(batch: "pa.Table", schema: "pa.Schema", changes: list[dict[str, Any]]) -> "pa.Table":
    """A stage's output rows: the columns of ``schema``, from ``batch`` (its input rows) and each row's
    ``changes`` (``{column: value}``, one dict per row).

    A column that no row changes is the batch's own Arrow column, cast to ``schema``'s type (no copy when it has
    that type already); a column with nulls where it has a default, or a changed one, is made again from
    :func:`column_values` with the changes applied; a column the batch lacks takes its default.

    Raises:
        KeyError: ``batch`` lacks a column that has no default.
    """
    import pyarrow as pa

    changed = {name for change in changes for name in change}
    columns = []
    for column in schema:
        name, default = column.name, _DEFAULTS.get(column.name)
        kept = name in batch.column_names and name not in changed
        if kept and (default is None or default is _REQUIRED or not batch.column(name).null_count):
            columns.append(batch.column(name).cast(column.type))
            continue
        values = column_values(batch, name)
        for i, change in enumerate(changes):
            if name in change:
                values[i] = change[name]
        columns.append(pa.array(values, column.type))
    return pa.Table.from_arrays(columns, schema=schema)

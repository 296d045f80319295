"""The rows that travel between the Ray stages of mining, as Arrow schemas, and the error row.

* decode stage -> GPU stage: the image record, its nouns, a ``status`` and the decoded pixels
  (:func:`decoded_schema`);
* GPU stage -> finalize stage: per image, the nouns' matches with the matched masks as run lengths
  (:func:`matched_schema`);
* finalize stage -> driver: one row per image with its pairs (:func:`image_result_schema`), the contract with the
  driver (``ovseg_mine.mine.run.driver``).

Every image keeps exactly one row through every stage, with a ``status`` (``ok`` or the stage that rejected it)
and a ``reason``: nothing is dropped silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ovseg_mine.storage import first_line

if TYPE_CHECKING:
    import pyarrow as pa

#: Per-image seconds recorded by the stages (columns ``<step>_s``).
TIMED_STEPS = ("decode", "nouns", "proposals", "crops", "clip")


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


def _status_fields() -> list[tuple[str, "pa.DataType"]]:
    import pyarrow as pa

    return [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("shard", pa.int32()),
        ("shard_size", pa.int32()),
        ("shard_row", pa.int32()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_nouns", pa.int32()),
        ("num_proposals", pa.int32()),
        *[(f"{step}_s", pa.float64()) for step in TIMED_STEPS],
        ("notes", pa.list_(pa.string())),
        ("error_type", pa.string()),
        ("traceback", pa.string()),
    ]


def _record_fields() -> list[tuple[str, "pa.DataType"]]:
    """What the finalize stage needs of the record to write pair rows."""
    import pyarrow as pa

    return [
        ("captions", pa.list_(pa.string())),
        ("nouns", pa.list_(pa.string())),
        ("noun_caption_index", pa.list_(pa.int16())),
    ]


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
            *_status_fields(),
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

    return pa.schema([*_status_fields(), *_record_fields(), ("matches", pa.list_(match_struct()))])


def image_result_schema() -> "pa.Schema":
    """Arrow schema of the rows the driver receives (one per image; ``pairs`` nested, schemas/pairs-v1.json)."""
    import pyarrow as pa

    from ovseg_mine.shards import pair_schema

    return pa.schema([*_status_fields(), ("pairs", pa.list_(pa.struct(list(pair_schema()))))])

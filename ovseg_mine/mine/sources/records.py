"""Image records as Ray Data rows: the Arrow schema every source's read step produces, stable ids, caption
screening, and the batcher that stamps each row with its shard.

One input sample gives exactly one record row: an image to mine (``status`` ``ok``) or a source-level reject
(``status`` = the stage that refused it, ``source``, ``captions`` or ``proposals``, with a ``reason``). So a
shard's row count is known as soon as its samples are listed, before any image is read, and every row carries
``shard``, ``shard_size`` and ``shard_row``: the driver knows a shard is complete when it has seen
``shard_size`` distinct ``shard_row`` values, without holding anything per image of the dataset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ovseg_mine.mine.sources.captions import screen_caption

if TYPE_CHECKING:
    import pyarrow as pa

#: Rows a read step reads at once from a table file, and the most rows per Arrow batch it yields.
READ_BATCH_ROWS = 256
#: A read step yields its batch once the image bytes in it reach this size (so a batch of JPEGs stays a few MiB).
READ_BATCH_BYTES = 16 << 20

#: Image file extensions a source accepts as the image of a sample (lower case, without the dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def stable_id(key: str) -> int:
    """The 63-bit image id of a sample key: the first 8 bytes of ``sha256(key.encode("utf-8"))`` read as a
    big-endian unsigned integer, with its top bit cleared (so it fits Arrow's and Parquet's signed int64).

    The key is the sample's path or key inside the source (``00000.tar/000000000790``, ``photos/cat.jpg``,
    ``data-00000-of-00001.arrow/17``): the same sample gets the same id in every run, on every machine.
    Two keys collide with probability about ``n**2 / 2**64`` for ``n`` samples (1e-7 for 1.3 M images).
    """
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") & ((1 << 63) - 1)


def proposal_type() -> "pa.DataType":
    """Arrow type of one given mask: ``segmentation`` (COCO RLE ``{size: [h, w], counts}``), ``bbox`` (XYWH
    pixels, as the file states it), ``predicted_iou`` and ``stability_score`` (null when the file has none)."""
    import pyarrow as pa

    rle = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
    return pa.struct(
        [
            ("segmentation", rle),
            ("bbox", pa.list_(pa.float64())),
            ("predicted_iou", pa.float32()),
            ("stability_score", pa.float32()),
        ]
    )


def record_schema() -> "pa.Schema":
    """Arrow schema of the records a source's read step yields (one row per input sample).

    Columns:
        image_id (int64): the dataset's id column, or :func:`stable_id` of the sample key.
        file_name (string): the sample's path or key inside the source (``00000.tar/000000000790.jpg``).
        width, height (int32): size in pixels as the source states it; 0 when it does not (decoding decides).
        captions (list<string>): the screened captions to parse, at most ``source.captions_per_image``.
        notes (list<string>): what happened on the way (a caption skipped or cut), listed as the run's warnings.
        path (string): where the decode step reads the image (a local path or a URI), or null.
        image_bytes (binary): the encoded image (JPEG, PNG...) for sources that hold it, or null.
        status (string): ``ok``, or the stage of a source-level reject (``source``, ``captions``, ``proposals``).
        reason (string): why a rejected row was refused ("" when ``ok``).
        shard, shard_size, shard_row (int32): the output shard, its number of rows, this row's position in it.
        proposals (list<struct>, see :func:`proposal_type`): the masks given for this image, or null (SAM runs).
    """
    import pyarrow as pa

    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("file_name", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("captions", pa.list_(pa.string())),
            ("notes", pa.list_(pa.string())),
            ("path", pa.string()),
            ("image_bytes", pa.binary()),
            ("status", pa.string()),
            ("reason", pa.string()),
            ("shard", pa.int32()),
            ("shard_size", pa.int32()),
            ("shard_row", pa.int32()),
            ("proposals", pa.list_(proposal_type())),
        ]
    )


def screen_captions(
    texts: Iterable[Any], wanted: int, *, max_chars: int, english_only: bool
) -> tuple[list[str], list[str]]:
    """The first ``wanted`` captions of ``texts`` that pass :func:`~ovseg_mine.mine.sources.captions.screen_caption`,
    and a note (``caption I: why``) for each one skipped or cut on the way. Non-string entries are skipped with
    a note."""
    kept: list[str] = []
    notes: list[str] = []
    for index, text in enumerate(texts):
        if len(kept) == wanted:
            break
        if not isinstance(text, str):
            notes.append(f"caption {index}: not a string ({type(text).__name__})")
            continue
        screened = screen_caption(text, max_chars=max_chars, english_only=english_only)
        if screened.note:
            notes.append(f"caption {index}: {screened.note}")
        if screened.text is not None:
            kept.append(screened.text)
    return kept, notes


def as_caption_list(value: Any) -> list[Any] | None:
    """A caption cell as a list: a string gives ``[string]``, a list or tuple is kept, None/empty gives None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value) or None
    return [value]


def image_row(
    image_id: int,
    file_name: str,
    texts: list[Any] | None,
    *,
    captions_per_image: int,
    max_caption_chars: int,
    skip_non_english: bool,
    path: str | None = None,
    image_bytes: bytes | None = None,
    width: int = 0,
    height: int = 0,
) -> dict[str, Any]:
    """A record row for one sample, screening its captions: ``ok`` when a caption survives, else a reject
    (stage ``source``, "no caption", when there is none at all; stage ``captions`` when none is usable)."""
    if not texts:
        return reject_row(image_id, file_name, "source", "no caption")
    captions, notes = screen_captions(
        texts, captions_per_image, max_chars=max_caption_chars, english_only=skip_non_english
    )
    if not captions:
        return reject_row(image_id, file_name, "captions", "no usable caption: " + "; ".join(notes))
    return {
        "image_id": image_id,
        "file_name": file_name,
        "width": int(width or 0),
        "height": int(height or 0),
        "captions": captions,
        "notes": notes,
        "path": path,
        "image_bytes": image_bytes,
        "status": "ok",
        "reason": "",
    }


def reject_row(image_id: int | None, file_name: str | None, stage: str, reason: str) -> dict[str, Any]:
    """A record row for a sample refused at ``stage`` (``source``, ``captions``, ``proposals``) for ``reason``.

    ``image_id`` None makes it a *file reject* (:func:`file_reject_row`): a reject about an input file, not an
    image."""
    return {
        "image_id": image_id,
        "file_name": file_name or "",
        "width": 0,
        "height": 0,
        "captions": [],
        "notes": [],
        "path": None,
        "image_bytes": None,
        "status": stage,
        "reason": reason,
    }


def file_reject_row(file_name: str, reason: str) -> dict[str, Any]:
    """A record row about an input file rather than an image (``image_id`` null, stage ``source``): a tar's
    unreadable tail, a tar without its end marker, a table file whose rows cannot be known. The run lists it with
    its reason (``file_name`` is the file's name in the source) and does not count it as an image; a source puts
    such rows after its images' rows, so that the images keep their positions in the shard."""
    return reject_row(None, file_name, "source", reason)


def batches(
    rows: Iterable[dict[str, Any]], shard: int, shard_size: int, keep: frozenset[int] | None = None
) -> Iterator["pa.Table"]:
    """Stamp ``rows`` (exactly ``shard_size`` of them, in shard order) with ``shard``, ``shard_size`` and
    ``shard_row`` and yield them as :func:`record_schema` tables of at most :data:`READ_BATCH_ROWS` rows and about
    :data:`READ_BATCH_BYTES` of image bytes.

    A row whose image id an earlier row of the shard already has becomes a reject (stage ``source``, "duplicate
    image id"): ids key the pairs (``pair_id``), so two images must never share one. With ``keep``, only the rows
    of those image ids are yielded (each still stamped with its position in the whole shard), and the file rejects
    (:func:`file_reject_row`), which no done record lists among its images.

    Raises:
        RuntimeError: ``rows`` does not hold exactly ``shard_size`` rows (a bug in a source: the driver would
            wait for rows that never come, or close a shard early).
    """
    import pyarrow as pa

    schema = record_schema()
    buffer: list[dict[str, Any]] = []
    count = size = 0
    seen: set[int] = set()
    for row in rows:
        if row["status"] == "ok" and row["image_id"] in seen:
            row = reject_row(row["image_id"], row["file_name"], "source", "duplicate image id (first kept)")
        seen.add(row["image_id"])
        count += 1
        if keep is not None and row["image_id"] is not None and row["image_id"] not in keep:
            continue
        buffer.append({**row, "shard": shard, "shard_size": shard_size, "shard_row": count - 1, "proposals": None})
        size += len(row["image_bytes"] or b"")
        if len(buffer) == READ_BATCH_ROWS or size >= READ_BATCH_BYTES:
            yield pa.Table.from_pylist(buffer, schema=schema)
            buffer, size = [], 0
    if buffer:
        yield pa.Table.from_pylist(buffer, schema=schema)
    if count != shard_size:
        raise RuntimeError(f"shard {shard}: the source yielded {count} rows, {shard_size} were announced")

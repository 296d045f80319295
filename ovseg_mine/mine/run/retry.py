"""``mine --retry-failed``: mine again only the images a run listed as failed, and rewrite only their shards.

An image fails (stage ``error``) when mining it raised, or when the workers died on it ``ray.max_image_attempts``
times (:mod:`ovseg_mine.mine.graph.attempts`): a cause that may be gone on the next run (a full disk, a flaky GPU, a bug
since fixed). Other rejects (``decode``, ``source``, ``captions``, ``nouns``, ``proposals``, ``matching``) are
answers about the input; they are kept as they are.

A shard that holds failed images is rebuilt from two parts: the results of its other images, read back from the
shard file and its done marker (:func:`kept_results`, in the shape the mask/match stage yields), and the new
results of the failed images. It is then written as any shard is, so the rewritten shard is byte-identical to
the shard of a run in which those images never failed. Shards without failed images are not touched.
"""

from __future__ import annotations

from typing import Any

from ovseg_mine.done_record import DoneRecord
from ovseg_mine.mine.graph.rows import ImageResult
from ovseg_mine.shards import read_table
from ovseg_mine.storage import Location

#: The reject stage of an image whose mining failed (an exception, or workers that died on it).
FAILED = "error"


def failed_images(record: DoneRecord) -> set[int]:
    """Ids of the images a shard's done record lists as failed (stage ``error``)."""
    return {image.image_id for image in record.images if image.status == FAILED}


def kept_results(run: Location, record: DoneRecord, failed: set[int]) -> list[ImageResult]:
    """The results (pairs as row dicts, no shard stamp) of the images of a done shard that are not retried, rebuilt
    from its file and its done marker (:meth:`ImageResult.from_status`).

    Timings are not kept per image: they are 0 here, and :func:`merged_stage_s` carries the shard's earlier
    timings over. ``notes`` are the image's notes as the done record lists them.

    Raises:
        ovseg_mine.storage.StorageError: the shard file cannot be read.
    """
    pairs_by_image: dict[int, list[dict[str, Any]]] = {}
    if record.rows:
        for pair in read_table(run.join(record.file)).replace_schema_metadata(None).to_pylist():
            pairs_by_image.setdefault(pair["image_id"], []).append(pair)
    names = {r.image_id: r.file_name for r in record.rejects + record.warnings}
    results = []
    for image in record.images:
        if image.image_id in failed:
            continue
        pairs = pairs_by_image.get(image.image_id, [])
        file_name = pairs[0]["file_name"] if pairs else names.get(image.image_id)
        results.append(ImageResult.from_status(image, file_name, pairs))
    return results


def merged_stage_s(old: DoneRecord, new: DoneRecord) -> dict[str, float]:
    """Per-stage seconds of a rewritten shard: its earlier run's plus the retry's."""
    before, after = old.stage_s, new.stage_s
    return {stage: before.get(stage, 0.0) + after.get(stage, 0.0) for stage in sorted(set(before) | set(after))}

"""The Ray Data stages of mining, laid out by the resource they need (Ray's callable-class form for the stages
that load something: models load once in ``__init__``, batches are processed in ``__call__``; Arrow tables in,
Arrow tables out):

* :class:`NounStage` (CPU): captions -> nouns, with spaCy.
* :func:`decode_stage` (CPU tasks): image file -> RGB pixels and SAM's resize of them (PIL, exact as SAM's own).
* :class:`MaskMatchStage` (GPU when present): a batch of decoded images -> SAM proposals -> masked crops -> CLIP
  -> each noun's best mask (:class:`ovseg_mine.mine.algorithms.engine.MiningEngine`). Dense masks never leave the
  device: the matched masks leave it as run lengths.
* :func:`finalize_stage` (CPU tasks): run lengths -> COCO RLE, pair rows.

Every input row leaves each stage as exactly one row per image (:mod:`ovseg_mine.mine.graph.rows`), with a ``status``
(``ok`` or the stage that rejected it) and a ``reason``: nothing is dropped silently. Input rows are the records of
the read step (:func:`ovseg_mine.mine.sources.records.record_schema`): the image is read from ``path`` or decoded
from ``image_bytes``; a row the source already rejected passes through with its stage and reason; ``shard``,
``shard_size`` and ``shard_row`` are carried to the output; a row with ``proposals`` (masks the user gave) uses them
instead of SAM (:func:`ovseg_mine.mine.algorithms.given_proposals.given_mask_set`), and with ``proposals.kind`` other
than ``sam`` SAM is neither loaded nor run.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ovseg_mine.mine.graph.rows import (
    decoded_schema,
    error_row,
    image_result_schema,
    matched_schema,
    next_rows,
    noun_fields,
    row_values,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from ovseg_mine.config import MineConfig
    from ovseg_mine.mine.algorithms.engine import ImageOutcome
    from ovseg_mine.mine.graph.weights import ResolvedWeights

__all__ = [
    "MaskMatchStage",
    "NounStage",
    "decode_stage",
    "error_row",
    "finalize_stage",
    "image_result_schema",
]


class NounStage:
    """Adds ``nouns`` (list<string>) and ``noun_caption_index`` (list<int16>) to batches of image records.

    Args:
        cfg: the run's config (``nouns``; pickled to the actor as it is).
    """

    def __init__(self, cfg: "MineConfig") -> None:
        from ovseg_mine.mine.algorithms.nouns import load_nlp

        self.cfg = cfg
        self.nlp = load_nlp(cfg.nouns.model)

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        from ovseg_mine.mine.algorithms.nouns import extract_nouns

        start = time.perf_counter()
        captions = [list(c) for c in batch.column("captions").to_pylist()]
        per_image = extract_nouns(
            self.nlp,
            captions,
            batch_size=self.cfg.nouns.batch_size,
            extra_stop_nouns=self.cfg.nouns.extra_stop_nouns,
        )
        per_image_s = (time.perf_counter() - start) / max(1, batch.num_rows)
        (nouns, nouns_type), (caption_index, caption_index_type) = noun_fields()
        batch = batch.append_column(nouns, pa.array([[n.text for n in ns] for ns in per_image], nouns_type))
        batch = batch.append_column(
            caption_index, pa.array([[n.caption_index for n in ns] for ns in per_image], caption_index_type)
        )
        return batch.append_column("nouns_s", pa.array([per_image_s] * batch.num_rows, pa.float64()))


def decode_stage(batch: "pa.Table", *, sam_input_size: int | None, max_pixels: int | None = None) -> "pa.Table":
    """Decode each image of a batch of noun-stage rows (CPU work, run as Ray tasks).

    A row the source already rejected passes through with its stage and reason; rows without a noun are rejected
    here (status ``nouns``) and not decoded; a file that cannot be decoded is rejected with status ``decode`` and
    the decoder's reason. The decoded size wins over the record's (a note says so when they differ, e.g. after EXIF
    rotation). Rows with given masks (``proposals``), or every row when ``sam_input_size`` is None, skip SAM's
    resize (SAM does not run on them).

    Args:
        batch: rows with ``image_id``, ``file_name``, ``path`` or ``image_bytes``, ``width``, ``height``,
            ``captions``, ``nouns``, ``noun_caption_index``, ``nouns_s`` (and optionally the read step's
            ``status``, ``reason``, ``notes``, ``shard``, ``shard_size``, ``shard_row``, ``proposals``).
        sam_input_size: side of SAM's square input (:func:`ovseg_mine.models.sam_input_size`); None when the run
            has given masks instead of SAM.
        max_pixels: refuse larger images (default :data:`ovseg_mine.images.DEFAULT_MAX_PIXELS`).

    Returns:
        Rows of :func:`ovseg_mine.mine.graph.rows.decoded_schema`.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    from ovseg_mine.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_rgb

    resize = None if sam_input_size is None else ResizeLongestSide(sam_input_size)
    names = ["image_id", "status", "width", "height", "nouns", "notes", "path", "image_bytes", "proposals"]
    changes = []
    for record in row_values(batch, names):
        change: dict[str, Any] = {"num_nouns": len(record["nouns"])}
        changes.append(change)
        if record["status"] != "ok":  # rejected by the source (read step): passed through as it is
            continue
        if not record["nouns"]:
            change.update(status="nouns", reason="no visual noun in the captions")
            continue
        start = time.perf_counter()
        encoded = record["image_bytes"]
        try:
            image = load_rgb(
                record["path"] if encoded is None else encoded, max_pixels=max_pixels or DEFAULT_MAX_PIXELS
            )
            sam_image = None if resize is None or record["proposals"] is not None else resize.apply_image(image)
        except ImageDecodeError as exc:
            change.update(status="decode", reason=str(exc))
            continue
        except Exception as exc:  # per-image isolation; the driver logs the traceback (ovseg_mine.mine.run.failures)
            change.update(error_row(exc))
            continue
        height, width = image.shape[:2]
        if record["width"] and record["height"] and (width, height) != (record["width"], record["height"]):
            change["notes"] = record["notes"] + [
                f"size in the captions file {record['width']}x{record['height']} differs from the "
                f"decoded image {width}x{height} (EXIF orientation applied); the decoded size is used"
            ]
        change.update(width=width, height=height, pixels=image.tobytes(), decode_s=time.perf_counter() - start)
        if sam_image is not None:
            change.update(sam_pixels=sam_image.tobytes(), sam_height=sam_image.shape[0], sam_width=sam_image.shape[1])
    return next_rows(batch, decoded_schema(), changes)


class MaskMatchStage:
    """SAM proposals (or the record's given masks) and CLIP matching for batches of decoded images (the GPU stage).
    With ``proposals.kind`` other than ``sam`` in the config, SAM is not built at all.

    Args:
        cfg: the run's config (pickled to the actor as it is).
        weights: the weights the driver resolved (:func:`ovseg_mine.mine.graph.weights.resolve_weights`): every
            actor loads these files (:func:`~ovseg_mine.mine.graph.weights.load_models`), without resolving or
            hashing them again, and none falls back on its own.
        threads: torch CPU threads (None: leave torch's default).
        tracker: handle of the run's :class:`ovseg_mine.mine.graph.attempts.AttemptTracker` actor: one ``begin`` per
            batch
            (one ``ray.get``), one ``end`` without waiting; after a worker death the batch is mined one image at a
            time and an image on which ``ray.max_image_attempts`` workers died is listed as failed (status
            ``error``). None: no tracking (e.g. the stage called directly in a test or a benchmark).
    """

    def __init__(
        self, cfg: "MineConfig", weights: "ResolvedWeights", threads: int | None = None, tracker: Any = None
    ) -> None:
        import torch

        from ovseg_mine.mine.algorithms.engine import MiningEngine
        from ovseg_mine.mine.graph.weights import load_models

        if threads:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.tracker = tracker
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # given masks (--proposals coco:/sa1b:): SAM is not built at all (sam is None)
        sam, clip, tokenizer = load_models(cfg, weights, device)
        self.engine = MiningEngine(cfg, sam, clip, tokenizer, device)

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        """Rows of :func:`~ovseg_mine.mine.graph.rows.decoded_schema` in, of
        :func:`~ovseg_mine.mine.graph.rows.matched_schema` out (the pixels dropped)."""
        names = ["image_id", "status", "width", "height", "nouns", "proposals", "sam_height", "sam_width"]
        records = row_values(batch, names)
        for column in ("pixels", "sam_pixels"):  # the pixels stay in Arrow's buffers (no copy on the host)
            for record, value in zip(records, batch.column(column), strict=True):
                record[column] = value.as_buffer()
        changes: list[dict[str, Any]] = [{} for _ in records]
        todo = [i for i, record in enumerate(records) if record["status"] == "ok"]
        self._tracked(records, changes, todo)
        return next_rows(batch, matched_schema(), changes)

    def _tracked(self, records: list[dict[str, Any]], rows: list[dict[str, Any]], todo: list[int]) -> None:
        """Mine rows ``todo`` between the tracker's ``begin`` and ``end`` (see ovseg_mine.mine.graph.attempts);
        ``rows``: each row's changes (:func:`~ovseg_mine.mine.graph.rows.next_rows`), filled in here."""
        import ray

        from ovseg_mine.mine.graph.attempts import worker_death_reason

        if self.tracker is None or not todo:
            self._mine(records, rows, todo)
            return
        ids = [records[i]["image_id"] for i in todo]
        deaths = ray.get(self.tracker.begin.remote(ids))
        if not any(deaths):
            self._mine(records, rows, todo)
            self.tracker.end.remote(ids)
            return
        # A worker died on this batch: mine it one image at a time, so the next death is counted on one image.
        self.tracker.end.remote(ids)
        for i, image_id, died in zip(todo, ids, deaths, strict=True):
            if died >= self.cfg.ray.max_image_attempts:
                rows[i].update(status="error", reason=worker_death_reason(died), error_type="WorkerDied")
                continue
            ray.get(self.tracker.begin.remote([image_id]))
            self._mine(records, rows, [i])
            self.tracker.end.remote([image_id])

    def _mine(self, records: list[dict[str, Any]], rows: list[dict[str, Any]], todo: list[int]) -> None:
        """Mine rows ``todo`` as one batch (failures stay per image) and fill in their results (``rows``: each
        row's changes). The batch's pixels go to the device together (:meth:`MiningEngine.to_device_many`)."""
        from ovseg_mine.faults import failpoint
        from ovseg_mine.mine.algorithms.given_proposals import GivenMaskError

        staged, where = [], []
        for i in todo:
            try:
                failpoint("image", records[i]["image_id"])  # kill: the worker dies on this image; raise: it raises
                staged.append(self._pixels(records[i]))
                where.append(i)
            except Exception as exc:
                rows[i].update(error_row(exc))
        on_device = iter(self.engine.to_device_many([pixels for images in staged for pixels in images]))
        jobs, kept = [], []
        for i, images in zip(where, staged, strict=True):
            image, sam_image = next(on_device), next(on_device) if len(images) == 2 else None
            try:
                jobs.append(self._job(records[i], image, sam_image))
                kept.append(i)
            except GivenMaskError as exc:
                rows[i].update(status="proposals", reason=str(exc))
            except Exception as exc:
                rows[i].update(error_row(exc))
        for i, job, outcome in zip(kept, jobs, self.engine.mine_each(jobs), strict=True):
            if isinstance(outcome, BaseException):
                rows[i].update(error_row(outcome))
            else:
                rows[i].update(self._result(outcome))
                rows[i]["proposals_s"] += job.given_s

    def _pixels(self, record: dict[str, Any]) -> tuple[Any, ...]:
        """A decoded record's uint8 ``[H, W, 3]`` host pixels: the image, and SAM's resize of it when SAM runs on
        it (no given masks)."""
        import numpy as np

        image = np.frombuffer(record["pixels"], np.uint8).reshape(record["height"], record["width"], 3)
        if record.get("proposals") is not None or self.engine.sam is None:
            return (image,)
        sam = np.frombuffer(record["sam_pixels"], np.uint8).reshape(record["sam_height"], record["sam_width"], 3)
        return image, sam

    def _job(self, record: dict[str, Any], image: Any, sam_image: Any) -> Any:
        """The engine's job for a decoded record whose pixels are on the device (``sam_image`` None: the record's
        given masks, or none when SAM is not built, are the job's proposals, made here, so a mask that does not
        fit its image is refused before the batch runs).

        Raises:
            GivenMaskError: a given mask's size differs from the decoded image's.
        """
        from ovseg_mine.mine.algorithms.engine import ImageJob

        job = ImageJob(record["image_id"], image, sam_image, list(record["nouns"]))
        if sam_image is None:
            start = time.perf_counter()
            job.given = self.engine.given_masks(record.get("proposals") or [], job.size)
            job.given_s = time.perf_counter() - start
        return job

    @staticmethod
    def _result(outcome: "ImageOutcome") -> dict[str, Any]:
        """A mined image's changes: proposals, timings, and its matches or the reason it has none."""
        out: dict[str, Any] = {"num_proposals": outcome.num_proposals}
        out.update({f"{step}_s": seconds for step, seconds in outcome.seconds.items()})
        if outcome.num_proposals == 0:
            reason = f"no mask proposal ({outcome.num_generated} generated, all empty)"
            return {**out, "status": "proposals", "reason": reason}
        if not outcome.matches:
            reason = f"all {outcome.num_matches} nouns below the matching thresholds"
            return {**out, "status": "matching", "reason": reason}
        out["matches"] = [{**vars(match), "runs": match.runs.tolist()} for match in outcome.matches]
        return out


def finalize_stage(batch: "pa.Table") -> "pa.Table":
    """Pair rows from the GPU stage's matches (CPU work, run as Ray tasks): each matched mask's run lengths
    become its COCO RLE (pycocotools), each match a row of schemas/pairs-v1.json.

    Returns:
        Rows of :func:`ovseg_mine.mine.graph.rows.image_result_schema`, one per image.
    """
    names = ["image_id", "file_name", "width", "height", "num_proposals", "captions", "nouns", "noun_caption_index"]
    rows = row_values(batch, [*names, "matches"])
    return next_rows(batch, image_result_schema(), [{"pairs": pair_rows(row)} for row in rows])


def pair_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The pair rows (schemas/pairs-v1.json) of one image of the GPU stage: ``record`` holds its ``image_id``,
    ``file_name``, ``width``, ``height``, ``num_proposals``, ``captions``, ``nouns``, ``noun_caption_index`` and
    ``matches`` (:func:`~ovseg_mine.mine.graph.rows.match_struct`: run lengths, XYWH ``bbox``). A pair's ``bbox``
    and ``area`` are the mask's own (pycocotools), equal to the match's for stock kernels."""
    from ovseg_mine import rle

    nouns, pairs = record["nouns"], []
    width, height = record["width"], record["height"]
    for match in record["matches"] or []:
        k = match["noun_index"]
        caption_index = record["noun_caption_index"][k]
        mask = rle.from_runs(match["runs"], height, width)
        pairs.append(
            {
                "pair_id": f"{record['image_id']}:{nouns[k]}",
                "image_id": record["image_id"],
                "file_name": record["file_name"],
                "width": width,
                "height": height,
                "caption_index": caption_index,
                "caption": record["captions"][caption_index],
                "noun": nouns[k],
                "mask": mask,
                # from the mask itself, so that they agree with it pixel for pixel whichever kernels selected it
                "bbox": [int(v) for v in rle.bbox(mask)],
                "area": rle.area(mask),
                "proposal_index": match["mask_index"],
                "num_proposals": record["num_proposals"],
                "similarity": match["similarity"],
                "probability": match["probability"],
                "margin": match["margin"],
                "predicted_iou": match["predicted_iou"],
                "stability_score": match["stability_score"],
            }
        )
    return pairs

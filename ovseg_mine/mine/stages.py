"""The Ray Data stages of mining, in Ray's callable-class form: models load once in ``__init__``, batches
are processed in ``__call__`` (Arrow tables in, Arrow tables out).

* :class:`NounStage` (CPU): captions -> nouns, with spaCy.
* :class:`MaskMatchStage` (GPU when present): decode image -> SAM proposals -> masked crops -> CLIP
  -> each noun's best mask. Proposals and matching share one actor so dense masks never cross a process
  boundary; only RLE and scores leave it.

Every input row leaves as exactly one output row per image, with a ``status`` (``ok`` or the stage that
rejected it) and a ``reason``: nothing is dropped silently.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ovseg_mine.storage import first_line

if TYPE_CHECKING:
    import pyarrow as pa


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
        "pairs": [],
    }


def image_result_schema() -> "pa.Schema":
    """Arrow schema of :class:`MaskMatchStage` output rows (one per image; ``pairs`` nested)."""
    import pyarrow as pa

    from ovseg_mine.shards import pair_schema

    pair_struct = pa.struct(list(pair_schema()))
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("file_name", pa.string()),
            ("status", pa.string()),
            ("reason", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("num_nouns", pa.int32()),
            ("num_proposals", pa.int32()),
            ("decode_s", pa.float64()),
            ("nouns_s", pa.float64()),
            ("proposals_s", pa.float64()),
            ("crops_s", pa.float64()),
            ("clip_s", pa.float64()),
            ("notes", pa.list_(pa.string())),
            ("error_type", pa.string()),
            ("traceback", pa.string()),
            ("pairs", pa.list_(pair_struct)),
        ]
    )


class NounStage:
    """Adds ``nouns`` (list<string>) and ``noun_caption_index`` (list<int16>) to batches of image records.

    Args:
        config: the run's :class:`MineConfig` as a JSON-able dict.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from ovseg_mine.config import MineConfig
        from ovseg_mine.mine.nouns import load_nlp

        self.cfg = MineConfig.model_validate(config)
        self.nlp = load_nlp(self.cfg.nouns.model)

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        from ovseg_mine.mine.nouns import extract_nouns

        start = time.perf_counter()
        captions = [list(c) for c in batch.column("captions").to_pylist()]
        per_image = extract_nouns(
            self.nlp,
            captions,
            batch_size=self.cfg.nouns.batch_size,
            extra_stop_nouns=self.cfg.nouns.extra_stop_nouns,
        )
        per_image_s = (time.perf_counter() - start) / max(1, batch.num_rows)
        batch = batch.append_column(
            "nouns", pa.array([[n.text for n in ns] for ns in per_image], pa.list_(pa.string()))
        )
        batch = batch.append_column(
            "noun_caption_index", pa.array([[n.caption_index for n in ns] for ns in per_image], pa.list_(pa.int16()))
        )
        return batch.append_column("nouns_s", pa.array([per_image_s] * batch.num_rows, pa.float64()))


class MaskMatchStage:
    """SAM proposals and CLIP matching for batches of images that carry their nouns.

    Args:
        config: the run's :class:`MineConfig` as a JSON-able dict.
        sam_checkpoint, clip_pretrained: weights as resolved by the driver (a path or tag, or ``random``),
            so that every actor loads the same weights and none falls back on its own.
        threads: torch CPU threads (None: leave torch's default).
        tracker: handle of the run's :class:`ovseg_mine.mine.attempts.AttemptTracker` actor; an image on which
            ``ray.max_image_attempts`` workers died is listed as failed (status ``error``) instead of retried
            again. None: no tracking (e.g. the stage called directly in a test).
    """

    def __init__(
        self,
        config: dict[str, Any],
        sam_checkpoint: str,
        clip_pretrained: str,
        threads: int | None = None,
        tracker: Any = None,
    ) -> None:
        import torch

        from ovseg_mine import precision as precision_mod
        from ovseg_mine.config import MineConfig
        from ovseg_mine.mine.proposals import build_mask_generator
        from ovseg_mine.models import clip_input_size, clip_mean_std, load_clip
        from ovseg_mine.text import NounEmbeddings

        if threads:
            torch.set_num_threads(threads)
        self.cfg = MineConfig.model_validate(config)
        self.tracker = tracker
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sam_cfg = self.cfg.sam.model_copy(update={"checkpoint": sam_checkpoint})
        self.precision = precision_mod.for_inference(self.cfg.clip.precision, self.device)
        self.generator, _ = build_mask_generator(
            "sam",
            sam_cfg,
            device=self.device,
            seed=self.cfg.seed,
            precision=precision_mod.for_inference(self.cfg.sam.precision, self.device),
        )
        self.clip, tokenizer, _ = load_clip(self.cfg.clip.arch, clip_pretrained, device=self.device, seed=self.cfg.seed)
        self.clip = precision_mod.cast_model(self.clip, self.precision)
        self.input_size = clip_input_size(self.clip)
        self.mean, self.std = clip_mean_std(self.clip)
        # One noun per encode_text call: a noun's embedding does not depend on which nouns this actor met first.
        self.text_cache = NounEmbeddings(self.clip, tokenizer, self.device, nouns_per_call=1, precision=self.precision)

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        rows = [self._tracked(record) for record in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=image_result_schema())

    def _tracked(self, record: dict[str, Any]) -> dict[str, Any]:
        """:meth:`_process` one image between the tracker's ``begin`` and ``end`` (see ovseg_mine.mine.attempts)."""
        import ray

        from ovseg_mine.mine.attempts import worker_death_reason

        image_id = record["image_id"]
        if self.tracker is None:
            return self._process(record)
        deaths = ray.get(self.tracker.begin.remote(image_id))
        if deaths >= self.cfg.ray.max_image_attempts:
            row = {**self._empty_row(record), "status": "error", "reason": worker_death_reason(deaths)}
            row["error_type"] = "WorkerDied"
        else:
            row = self._process(record)
        self.tracker.end.remote(image_id)
        return row

    @staticmethod
    def _empty_row(record: dict[str, Any]) -> dict[str, Any]:
        return {
            "image_id": record["image_id"],
            "file_name": record["file_name"],
            "status": "ok",
            "reason": "",
            "width": record["width"],
            "height": record["height"],
            "num_nouns": len(record["nouns"]),
            "num_proposals": 0,
            "decode_s": 0.0,
            "nouns_s": record.get("nouns_s", 0.0),
            "proposals_s": 0.0,
            "crops_s": 0.0,
            "clip_s": 0.0,
            "notes": [],
            "error_type": "",
            "traceback": "",
            "pairs": [],
        }

    def _process(self, record: dict[str, Any]) -> dict[str, Any]:
        import torch

        from ovseg_mine.images import ImageDecodeError, load_rgb

        out = self._empty_row(record)
        if not record["nouns"]:
            return {**out, "status": "nouns", "reason": "no visual noun in the captions"}
        start = time.perf_counter()
        try:
            image = load_rgb(record["path"])
        except ImageDecodeError as exc:
            return {**out, "status": "decode", "reason": str(exc)}
        out["decode_s"] = time.perf_counter() - start
        height, width = image.shape[:2]
        if (width, height) != (record["width"], record["height"]):
            out["notes"] = [
                f"size in the captions file {record['width']}x{record['height']} differs from the "
                f"decoded image {width}x{height} (EXIF orientation applied); the decoded size is used"
            ]
        out["width"], out["height"] = width, height
        error = ""
        for attempt in range(1, self.cfg.ray.max_image_attempts + 1):
            try:
                return self._mine(image, record, dict(out))
            except torch.OutOfMemoryError as exc:  # transient: free the cache and try the image again
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                error = f"out of memory {attempt} times: {first_line(exc)}"
            except Exception as exc:
                # Per-image isolation: the image is listed as failed and the run goes on. The driver logs the
                # traceback to the run's log, counts failures by type, and stops the run when the same exception
                # keeps coming (ovseg_mine.mine.failures): a bug of ours must not pass for bad input.
                return {**out, **error_row(exc)}
        return {**out, "status": "error", "reason": error, "error_type": "OutOfMemoryError", "pairs": []}

    def _mine(self, image: Any, record: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        import torch

        from ovseg_mine.crops import normalize, render_masked_crops
        from ovseg_mine.faults import failpoint
        from ovseg_mine.mine.matching import encode_crops, keep_match, match_nouns

        failpoint("image", record["image_id"])  # kill: the worker dies on this image; raise: mining it raises
        start = time.perf_counter()
        proposals = self.generator(image)
        out["proposals_s"] = time.perf_counter() - start
        out["num_proposals"] = len(proposals)
        if len(proposals) == 0:
            return {
                **out,
                "status": "proposals",
                "reason": f"no mask proposal ({proposals.num_generated} generated, all empty)",
            }
        start = time.perf_counter()
        image_t = torch.from_numpy(image).to(self.device).permute(2, 0, 1)
        bboxes = torch.as_tensor(proposals.bboxes, dtype=torch.int64)
        fill = [255.0 * m for m in self.mean]
        crops = render_masked_crops(image_t, proposals.masks, bboxes, size=self.input_size, fill=fill)
        crops = normalize(crops, self.mean, self.std)
        out["crops_s"] = time.perf_counter() - start
        start = time.perf_counter()
        image_emb = encode_crops(self.clip, crops, batch_size=self.cfg.clip.batch_size, precision=self.precision)
        nouns = record["nouns"]
        text_emb = self.text_cache.embed(nouns)
        matches = match_nouns(image_emb, text_emb, logit_scale=self.cfg.matching.logit_scale)
        out["clip_s"] = time.perf_counter() - start
        pairs = []
        for match in matches:
            if not keep_match(match, self.cfg.matching):
                continue
            k, m = match.noun_index, match.mask_index
            caption_index = record["noun_caption_index"][k]
            pairs.append(
                {
                    "pair_id": f"{record['image_id']}:{nouns[k]}",
                    "image_id": record["image_id"],
                    "file_name": record["file_name"],
                    "width": out["width"],
                    "height": out["height"],
                    "caption_index": caption_index,
                    "caption": record["captions"][caption_index],
                    "noun": nouns[k],
                    "mask": proposals.rles[m],
                    "bbox": [int(v) for v in proposals.bboxes[m]],
                    "area": int(proposals.areas[m]),
                    "proposal_index": m,
                    "num_proposals": len(proposals),
                    "similarity": match.similarity,
                    "probability": match.probability,
                    "margin": match.margin,
                    "predicted_iou": float(proposals.predicted_iou[m]),
                    "stability_score": float(proposals.stability_score[m]),
                }
            )
        if not pairs:
            return {**out, "status": "matching", "reason": f"all {len(matches)} nouns below the matching thresholds"}
        return {**out, "pairs": pairs}

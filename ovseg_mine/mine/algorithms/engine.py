"""The GPU stage's work on a batch of images: SAM proposals, masked crops, CLIP, each noun's best mask, and the
run lengths of the matched masks, with a handful of host syncs per image and memory bounded whatever the
image size.

For a batch of decoded images (original pixels and SAM's resized input, both already on the device) and their
nouns, :meth:`MiningEngine.mine`:

1. encodes the images with SAM's image encoder in fixed-size batches
(:class:`~ovseg_mine.mine.algorithms.sam_batch.BatchedSam`);
2. per image, decodes every grid point and selects the proposals (:func:`~ovseg_mine.mine.algorithms.amg.select_masks`:
   predicted-IoU and stability filters, box NMS, empty masks last, the best ``max_masks_per_image``), kept as
   low-resolution logits. An image whose masks the user gave (:attr:`ImageJob.given`, built by
   :meth:`MiningEngine.given_masks`) skips 1 and 2: its masks are kept as run lengths and decoded on the device;
3. renders the masked crops of all kept masks (OVSeg's crop: tight box, CLIP's mean pixel, bicubic), chunk by
   chunk, upsampling the kept masks again for that;
4. embeds the crops with CLIP, and each image's nouns (cached per noun). ``engine.batching='pooled'`` (a GPU's
   default) renders each chunk's crops in one gather op and runs CLIP over the crops of the whole batch in calls
   padded to ``clip.batch_size``; ``per_image`` (a CPU's default) renders one crop at a time and runs CLIP per
   image without padding. Either way the kernels an image's crops see depend on that image alone;
5. per image, picks each noun's best mask on the device (:func:`~ovseg_mine.mine.algorithms.matching.best_masks`),
   applies the matching thresholds, upsamples the chosen masks and takes their column-major run lengths
   (:func:`ovseg_mine.rle.mask_runs`, one ``nonzero`` for the batch);
6. brings the per-noun numbers of the batch to the host in one transfer (a float64 table whose columns
   :class:`NounColumn` names).

The per-image host syncs are the three of the proposal selection; the batch adds three more (crops' run
lengths: ``nonzero`` and its copy; the results' copy), plus one ``torch.cuda.synchronize`` per timed step.
Failures stay per image (:meth:`MiningEngine.mine_each`): a batch that raises is mined again one image at a
time, so only the image that raises is reported; an out-of-memory error on a single image is reported, not
retried (the same image would fail the same way).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from ovseg_mine.config import MineConfig
    from ovseg_mine.mine.algorithms.amg import MaskSet

#: Step names timed per batch (seconds, summed over the batch's images by :class:`StepTimer`).
STEPS = ("proposals", "crops", "clip")


@dataclass
class ImageJob:
    """One image to mine.

    Attributes:
        image_id: the dataset's id (reported back with the outcome).
        image: uint8 ``[3, H, W]`` RGB original pixels on the engine's device (crops are cut from it).
        sam_image: uint8 ``[3, h, w]`` RGB, SAM's resize of ``image`` (longest side = SAM's input size); None
            when ``given`` is set.
        nouns: the image's nouns (at least one).
        given: the image's given masks (:meth:`MiningEngine.given_masks`), used instead of SAM; None: SAM runs.
        given_s: seconds spent building ``given``.
    """

    image_id: int
    image: "torch.Tensor"
    sam_image: "torch.Tensor | None"
    nouns: list[str]
    given: "MaskSet | None" = None
    given_s: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])


@dataclass
class NounMatch:
    """A noun's best mask that passed the matching thresholds.

    Attributes:
        noun_index: index into the job's nouns.
        mask_index: rank of the mask among the image's proposals (0 = highest predicted IoU).
        similarity, probability, margin: as :class:`ovseg_mine.mine.algorithms.matching.Match` (margin None: no
        runner-up).
        predicted_iou, stability_score: SAM's scores of the mask (None: a given mask without scores).
        bbox: tight box, XYWH in pixels (COCO convention).
        area: foreground pixels.
        runs: uint32 column-major run lengths (uncompressed COCO RLE; :func:`ovseg_mine.rle.from_runs`).
    """

    noun_index: int
    mask_index: int
    similarity: float
    probability: float
    margin: float | None
    predicted_iou: float | None
    stability_score: float | None
    bbox: list[int]
    area: int
    runs: np.ndarray


@dataclass
class ImageOutcome:
    """What mining one image gave.

    Attributes:
        num_proposals: non-empty proposals kept (0: the image has no usable mask).
        num_generated: masks left after NMS, before the empty-mask drop and the cap.
        num_matches: nouns that got a mask (before the thresholds).
        matches: the nouns' matches that passed the thresholds, in noun order.
        seconds: per step (:data:`STEPS`), this image's share of the batch's time.
    """

    num_proposals: int
    num_generated: int
    num_matches: int
    matches: list[NounMatch]
    seconds: dict[str, float] = field(default_factory=dict)


class NounColumn(IntEnum):
    """The columns of the per-noun table of :meth:`MiningEngine._match`: float64 ``[nouns, len(NounColumn)]``, one
    row per noun of an image with at least one proposal, the rows of a batch's images stacked and brought to the
    host in one copy. The integer columns come first (exact in float64: ranks, pixel counts and coordinates stay
    far below 2**53), then the float32 scores widened; each group is stacked and cast once (:func:`noun_table`).
    """

    MASK_INDEX = 0  # the chosen mask's rank among the image's proposals
    AREA = 1  # its foreground pixels
    NUM_VALID = 2  # the image's non-empty proposals (the same on each of its rows)
    BOX_X = 3  # its tight box, XYWH in pixels of the original image
    BOX_Y = 4
    BOX_W = 5
    BOX_H = 6
    SIMILARITY = 7  # cosine similarity of the masked crop's and the noun's embeddings
    PROBABILITY = 8  # softmax over the image's nouns
    MARGIN = 9  # similarity minus the runner-up mask's; +inf without a runner-up
    PASSED = 10  # 1.0: the match passed the matching thresholds
    PREDICTED_IOU = 11  # SAM's score of the mask; NaN: a given mask without scores
    STABILITY_SCORE = 12  # likewise


#: The columns stacked as integers, and as floats, each in table order.
_INTEGER_COLUMNS = tuple(c for c in NounColumn if c < NounColumn.SIMILARITY)
_FLOAT_COLUMNS = tuple(c for c in NounColumn if c >= NounColumn.SIMILARITY)
_BOX = (NounColumn.BOX_X, NounColumn.BOX_Y, NounColumn.BOX_W, NounColumn.BOX_H)


def noun_table(
    masks: "MaskSet",
    best: "torch.Tensor",
    sims: "torch.Tensor",
    probs: "torch.Tensor",
    margins: "torch.Tensor",
    passed: "torch.Tensor",
) -> "torch.Tensor":
    """One image's per-noun numbers on the device, float64 ``[nouns, len(NounColumn)]`` in :class:`NounColumn`
    order, without a host sync.

    Args:
        masks: the image's proposals.
        best, sims, probs, margins: :func:`~ovseg_mine.mine.algorithms.matching.best_masks`' outputs, ``[nouns]``.
        passed: bool ``[nouns]``, :func:`~ovseg_mine.mine.algorithms.matching.passes_thresholds`.
    """
    import torch

    boxes = masks.boxes[best]
    columns = {
        NounColumn.MASK_INDEX: best,
        NounColumn.AREA: masks.areas[best],
        NounColumn.NUM_VALID: masks.valid.sum().expand(len(best)),
        **{column: boxes[:, j] for j, column in enumerate(_BOX)},
        NounColumn.SIMILARITY: sims,
        NounColumn.PROBABILITY: probs,
        NounColumn.MARGIN: margins,
        NounColumn.PASSED: passed.float(),
        NounColumn.PREDICTED_IOU: masks.predicted_iou[best],
        NounColumn.STABILITY_SCORE: masks.stability_score[best],
    }
    ints = torch.stack([columns[c] for c in _INTEGER_COLUMNS], dim=1).double()
    floats = torch.stack([columns[c] for c in _FLOAT_COLUMNS], dim=1).double()
    return torch.cat([ints, floats], dim=1)


def image_outcome(part: np.ndarray, num_generated: int, runs: list[np.ndarray]) -> "ImageOutcome":
    """An image's :class:`ImageOutcome` from its rows of the host table (float64 ``[nouns, len(NounColumn)]``, or
    ``[0, len(NounColumn)]`` without a proposal) and its matched masks' run lengths (one per noun, noun order).
    """
    c = NounColumn
    num_valid = int(part[0, c.NUM_VALID]) if len(part) else 0
    matches = [
        NounMatch(
            noun_index=i,
            mask_index=int(row[c.MASK_INDEX]),
            similarity=float(row[c.SIMILARITY]),
            probability=float(row[c.PROBABILITY]),
            margin=None if np.isinf(row[c.MARGIN]) else float(row[c.MARGIN]),
            predicted_iou=None if np.isnan(row[c.PREDICTED_IOU]) else float(row[c.PREDICTED_IOU]),
            stability_score=None if np.isnan(row[c.STABILITY_SCORE]) else float(row[c.STABILITY_SCORE]),
            bbox=[int(row[column]) for column in _BOX],
            area=int(row[c.AREA]),
            runs=runs[i],
        )
        for i, row in enumerate(part)
        if num_valid and row[c.PASSED]
    ]
    return ImageOutcome(num_valid, num_generated, len(part) if num_valid else 0, matches)


class StepTimer:
    """Wall time per step, with ``torch.cuda.synchronize`` at both ends on a GPU (queued kernels would otherwise
    be billed to whichever step syncs next)."""

    def __init__(self, device: "torch.device") -> None:
        self.device = device
        self.seconds: dict[str, float] = dict.fromkeys(STEPS, 0.0)

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[step] += time.perf_counter() - start


class MiningEngine:
    """SAM, CLIP and the noun embeddings of one GPU actor, and the batch computation of :mod:`this module
    <ovseg_mine.mine.algorithms.engine>`.

    Args:
        cfg: the run's config (``sam``, ``clip``, ``matching``, ``engine``, ``ray.chunk_mib``).
        sam: a segment-anything ``Sam`` on ``device`` (weights as loaded; cast here for low precisions), or None
            when the run's masks are given (every job then carries :attr:`ImageJob.given`).
        clip, tokenizer: an open_clip model on ``device`` and its tokenizer.
        device: where everything runs.
    """

    def __init__(self, cfg: "MineConfig", sam: Any, clip: Any, tokenizer: Any, device: "torch.device") -> None:
        import torch

        from ovseg_mine import precision as precision_mod
        from ovseg_mine.mine.algorithms.sam_batch import BatchedSam
        from ovseg_mine.models import clip_input_size, clip_mean_std
        from ovseg_mine.text import NounEmbeddings

        self.cfg = cfg
        self.device = torch.device(device)
        rules = "cuda" if cfg.engine.device_rules == "cuda" else self.device.type  # whose defaults apply
        cuda = rules == "cuda"
        self.sam = (
            None
            if sam is None
            else BatchedSam(
                sam,
                points_per_side=cfg.sam.points_per_side,
                points_per_batch=cfg.sam.points_per_batch or (512 if cuda else 64),
                precision=precision_mod.for_inference(cfg.sam.precision, rules),
                encoder_batch_size=cfg.sam.encoder_batch_size or (8 if cuda else 1),
                low_precision_decoder=cuda,
                compile=cfg.engine.compile != "off",
                kernels=cfg.engine.kernels if cfg.engine.kernels != "auto" else ("fused" if cuda else "stock"),
            )
        )
        self.clip_precision = precision_mod.for_inference(cfg.clip.precision, rules)
        self.clip = precision_mod.cast_model(clip, self.clip_precision)
        if cfg.engine.compile != "off" and self.device.type == "cuda":
            self.clip.encode_image = torch.compile(self.clip.encode_image, dynamic=False)
        self.input_size = clip_input_size(self.clip)
        self.mean, self.std = clip_mean_std(self.clip)
        self.fill = [255.0 * m for m in self.mean]
        # One noun per encode_text call: a noun's embedding does not depend on which nouns this actor met first.
        self.text = NounEmbeddings(clip, tokenizer, self.device, nouns_per_call=1, precision=self.clip_precision)
        self.pooled = cfg.engine.batching == "pooled" or (cfg.engine.batching == "auto" and cuda)
        self.chunk_bytes = cfg.ray.chunk_mib * 2**20

    # ----------------------------------------------------------------------------------------------- inputs

    def to_device(self, pixels: np.ndarray) -> "torch.Tensor":
        """uint8 ``[H, W, 3]`` host pixels -> uint8 ``[3, H, W]`` on the device: a view of the same memory on a CPU
        (the engine only reads it), an asynchronous copy from pinned memory on a GPU."""
        import warnings

        import torch

        with warnings.catch_warnings():  # Arrow's buffers are read-only; nothing writes into the pixels
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.permute(2, 0, 1)

    def resize_for_sam(self, image: np.ndarray) -> np.ndarray:
        """SAM's resize (longest side = SAM's input size), uint8 ``[h, w, 3]``; what the decode stage runs."""
        return self.sam.resize(image)

    def given_masks(self, entries: list[dict[str, Any]], size: tuple[int, int]) -> "MaskSet":
        """An image's given masks as its proposals on the device
        (:func:`ovseg_mine.mine.algorithms.given_proposals.given_mask_set` with the run's ``sam`` filters and chunk
        budget).

        Raises:
            GivenMaskError: a mask's size differs from ``size`` ``(H, W)``.
        """
        from ovseg_mine.mine.algorithms.given_proposals import given_mask_set

        return given_mask_set(entries, size, self.cfg.sam, self.device, self.chunk_bytes)

    # -------------------------------------------------------------------------------------------- the batch

    def mine_each(self, jobs: Sequence[ImageJob]) -> list[ImageOutcome | BaseException]:
        """:meth:`mine` with failures kept per image: the outcome of each job, or the exception that mining it
        alone raised. A batch that raises is mined again one image at a time (after emptying the CUDA cache
        when it ran out of memory); a single image's error, out-of-memory included, is returned, not retried."""
        import torch

        if not jobs:
            return []
        try:
            return list(self.mine(jobs))
        except Exception as exc:
            if len(jobs) == 1:
                return [exc]
            if isinstance(exc, torch.OutOfMemoryError) and self.device.type == "cuda":
                torch.cuda.empty_cache()
        outcomes: list[ImageOutcome | BaseException] = []
        for job in jobs:
            try:
                outcomes.extend(self.mine([job]))
            except Exception as exc:
                if isinstance(exc, torch.OutOfMemoryError) and self.device.type == "cuda":
                    torch.cuda.empty_cache()
                outcomes.append(exc)
        return outcomes

    def mine(self, jobs: Sequence[ImageJob]) -> list[ImageOutcome]:
        """Mine a batch of images (see the module docstring); raises on any failure."""
        import torch

        timer = StepTimer(self.device)
        with torch.inference_mode():
            with timer("proposals"):
                sam_jobs = [job for job in jobs if job.given is None]
                features = self.sam.embed([job.sam_image for job in sam_jobs]) if sam_jobs else None
                sets, j = [], 0
                for job in jobs:
                    if job.given is None:
                        sets.append(self.propose(job, features[j : j + 1]))
                        j += 1
                    else:
                        sets.append(job.given)
            with timer("crops"):
                crops = self._crops(jobs, sets)
            with timer("clip"):
                embeddings = self._embed_crops(crops, [len(masks) for masks in sets])
                outcomes = self._match(jobs, sets, embeddings)
        share = {step: seconds / len(jobs) for step, seconds in timer.seconds.items()}
        for outcome in outcomes:
            outcome.seconds = dict(share)
        return outcomes

    def propose(self, job: ImageJob, features: "torch.Tensor") -> "MaskSet":
        """SAM's kept proposals of one image: the decoder over the point grid, then the automatic mask generator's
        selection, on the device, with the run's ``sam`` settings and chunk budget
        (:meth:`~ovseg_mine.mine.algorithms.sam_batch.BatchedSam.propose`).

        Args:
            job: the image (its ``size`` is ``(H, W)`` of the original image).
            features: its image embedding from ``self.sam.embed``, ``[1, C, h, w]``.

        Returns:
            The image's :class:`~ovseg_mine.mine.algorithms.amg.MaskSet`, best first.
        """
        return self.sam.propose(features, job.size, self.cfg.sam, self.chunk_bytes)

    def _crops(self, jobs: Sequence[ImageJob], sets: Sequence["MaskSet"]) -> "torch.Tensor":
        """CLIP-normalized masked crops of every kept mask of the batch, ``[sum K, 3, S, S]`` float32."""
        import torch

        from ovseg_mine.crops import normalize, render_masked_crops, render_masked_crops_batched

        render = render_masked_crops_batched if self.pooled else render_masked_crops
        side = self.input_size
        per_crop = 33 * 16 * side * side if self.pooled else 0  # the gather's bytes per mask
        out = []
        for job, masks in zip(jobs, sets, strict=True):
            k = len(masks)
            step = max(1, min(masks.chunk, self.chunk_bytes // max(1, per_crop)))
            for start in range(0, k, step):
                index = torch.arange(start, min(k, start + step), device=self.device)
                boxes = masks.boxes.index_select(0, index)
                if not self.pooled:  # the per-mask loop refuses empty boxes; empty masks are flagged
                    boxes = torch.cat([boxes[:, :2], boxes[:, 2:].clamp(min=1)], dim=1)
                out.append(render(job.image, masks.masks(index), boxes, size=side, fill=self.fill))
        crops = torch.cat(out) if out else torch.zeros((0, 3, side, side), device=self.device)
        return normalize(crops, self.mean, self.std)

    def _embed_crops(self, crops: "torch.Tensor", counts: list[int]) -> "torch.Tensor":
        """CLIP embeddings of the batch's crops: pooled in padded calls, or per image (``counts`` crops each)."""
        import torch

        from ovseg_mine.mine.algorithms.matching import encode_crops

        size, precision = self.cfg.clip.batch_size, self.clip_precision
        if self.pooled:
            return encode_crops(self.clip, crops, batch_size=size, precision=precision)
        parts = [
            encode_crops(self.clip, part, batch_size=size, precision=precision, pad=False)
            for part in torch.split(crops, counts)
            if len(part)
        ]
        return torch.cat(parts) if parts else crops.new_zeros((0, 0))

    def _match(
        self, jobs: Sequence[ImageJob], sets: Sequence["MaskSet"], embeddings: "torch.Tensor"
    ) -> list[ImageOutcome]:
        """Each noun's best mask per image, the matched masks' run lengths, and one transfer to the host: the
        per-noun numbers of the whole batch as one :class:`NounColumn` table."""
        import torch

        from ovseg_mine.mine.algorithms.matching import best_masks, passes_thresholds

        m = self.cfg.matching
        rows, runs, pending, offset = [], [[] for _ in jobs], [], 0
        for i, (job, masks) in enumerate(zip(jobs, sets, strict=True)):
            k = len(masks)
            image_emb, offset = embeddings[offset : offset + k], offset + k
            if k == 0:
                rows.append(torch.zeros((0, len(NounColumn)), dtype=torch.float64, device=self.device))
                continue
            best, sims, probs, margins = best_masks(
                image_emb, self.text.embed(job.nouns), valid=masks.valid, logit_scale=m.logit_scale
            )
            rows.append(noun_table(masks, best, sims, probs, margins, passes_thresholds(sims, probs, margins, m)))
            for start in range(0, len(best), masks.chunk):  # the chosen masks' run lengths, in bounded memory
                pending.append((i, masks, best[start : start + masks.chunk]))
                if sum(4 * len(b) * ms.size[0] * ms.size[1] for _, ms, b in pending) > self.chunk_bytes:
                    self._runs(pending, runs)
        self._runs(pending, runs)
        table = torch.cat(rows).cpu().numpy()  # the batch's one device-to-host copy of the per-noun numbers
        outcomes, start = [], 0
        for job, masks, image_runs in zip(jobs, sets, runs, strict=True):
            part = table[start : start + (len(job.nouns) if len(masks) else 0)]
            start += len(part)
            outcomes.append(image_outcome(part, masks.num_generated, image_runs))
        return outcomes

    @staticmethod
    def _runs(pending: list[tuple[int, "MaskSet", "torch.Tensor"]], runs: list[list[np.ndarray]]) -> None:
        """Run lengths of the ``pending`` chosen masks (``(image, masks, index)``, one ``nonzero`` for all),
        appended to ``runs[image]``; empties ``pending``."""
        from ovseg_mine import rle

        if not pending:
            return
        found = rle.mask_runs([masks.masks(index) for _, masks, index in pending])
        for (i, _, _), image_runs in zip(pending, found, strict=True):
            runs[i].extend(image_runs)
        pending.clear()

"""The GPU stage's work on a batch of images: SAM proposals, masked crops, CLIP, each noun's best mask, and the
run lengths of the matched masks, with a handful of host syncs per image and memory bounded whatever the
image size.

For a batch of decoded images (original pixels and SAM's resized input, both already on the device:
:meth:`MiningEngine.to_device_many`) and their nouns, :meth:`MiningEngine.mine`:

0. embeds the batch's nouns not embedded yet (:class:`~ovseg_mine.text.NounEmbeddings`, one noun per text-tower
   call, their tokens sent in one copy), so that no text-tower call and no copy happens between the images;
1. encodes the images with SAM's image encoder in fixed-size batches
(:class:`~ovseg_mine.mine.algorithms.sam_batch.BatchedSam`);
2. per image, decodes every grid point and selects the proposals (:func:`~ovseg_mine.mine.algorithms.amg.select_masks`:
   predicted-IoU and stability filters, box NMS, empty masks last, the best ``max_masks_per_image``), kept as
   low-resolution logits. An image whose masks the user gave (:attr:`ImageJob.given`, built by
   :meth:`MiningEngine.given_masks`) skips 1 and 2: its masks are kept as run lengths and decoded on the device;
   With ``engine.kernels`` resolving to ``fused`` (``auto``: under a GPU's rules), every image of the batch is
   decoded first and the selection runs for all of them at once
   (:func:`~ovseg_mine.mine.algorithms.fused_amg.select_masks_fused`: three host syncs per batch, upsampling as two
   matrices per image size, fixed-shape chunks); ``min_mask_region_area > 0`` keeps the stock per-image selection;
3. renders the masked crops of all kept masks (OVSeg's crop: tight box, CLIP's mean pixel, bicubic), chunk by
   chunk, upsampling the kept masks again for that (fused: straight from the low-resolution logits at the bicubic
   taps, :func:`~ovseg_mine.crops.render_crops_from_logits`, in chunks of a fixed size);
4. embeds the crops with CLIP. ``engine.batching='pooled'`` (a GPU's default) renders each chunk's crops in one
   gather op and runs CLIP over the crops of the whole batch in calls of a few fixed sizes
   (:func:`~ovseg_mine.mine.algorithms.matching.pooled_calls`: ``clip.batch_size`` halved down to 32, fewer than
   32 padding crops per batch, each crop in a call whose shape its own image decides); ``per_image`` (a CPU's
   default) renders one crop at a time and runs CLIP per image without padding. Either way the kernels an image's
   crops see depend on that image alone;
5. per image, picks each noun's best mask on the device (:func:`~ovseg_mine.mine.algorithms.matching.best_masks`),
   applies the matching thresholds, upsamples the chosen masks and takes their column-major run lengths
   (:func:`ovseg_mine.rle.mask_runs`, one ``nonzero`` for the batch);
6. brings the per-noun numbers of the batch to the host in one transfer (a float64 table whose columns
   :class:`NounColumn` names).

Host syncs on CUDA (what ``benchmarks/proxies.py`` counts, blocking host-to-device copies included): per image
the three of the proposal selection (:func:`~ovseg_mine.mine.algorithms.amg.select_masks`; fused kernels: three for
the whole batch); per batch the matched
masks' run lengths (one ``nonzero`` and the copy of its result) and the per-noun table's copy to the host. The
engine's own code makes no blocking host-to-device copy: the images come in one non-blocking copy from pinned
memory (:meth:`MiningEngine.to_device_many`), the new nouns' tokens likewise, CLIP's mean and std are device
constants made once, the run lengths' mask starts are found on the device; the crops' fill colour is
:mod:`ovseg_mine.crops`' to make once. ``torch.cuda.synchronize`` runs only with ``engine.profile_steps``
(:class:`StepTimer`: two per step and batch); without it the per-step seconds are host time. One-off syncs
outside the steady state: the constants at start-up, and SAM's point grid for a new image size (made once per
size by :class:`~ovseg_mine.mine.algorithms.sam_batch.BatchedSam`). With fp32 SAM weights, segment-anything's own
attention (``get_rel_pos``) indexes its tables with host indices (two blocking copies per attention block and
encoder call); bf16/fp16 weights take :mod:`~ovseg_mine.mine.algorithms.sam_attention`, whose tables are made once.

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

#: Step names timed per batch (seconds, summed over the batch's images by :class:`StepTimer`; host time unless
#: ``engine.profile_steps``).
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
        seconds: per step (:data:`STEPS`), this image's share of the batch's time: the host's time issuing the
            step (a GPU may still be running its kernels) unless ``engine.profile_steps``, which drains the
            device's queue at both ends of each step (:class:`StepTimer`).
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
    """Wall time per step (seconds, summed over the batch in :attr:`seconds`).

    With ``profile`` (``engine.profile_steps``) each step is framed by ``torch.cuda.synchronize`` on a GPU, so a
    step is billed its own kernels: two host syncs per step and batch, which stall the GPU's queue. Without it
    (the default) nothing syncs and a step's seconds are the host's time issuing it: on a GPU, queued kernels are
    billed to whichever step waits for them (the one that copies results to the host). On a CPU both are the same.

    Args:
        device: the engine's device.
        profile: synchronize the device at both ends of each step.
    """

    def __init__(self, device: "torch.device", profile: bool = False) -> None:
        self.device = device
        self.profile = profile
        self.seconds: dict[str, float] = dict.fromkeys(STEPS, 0.0)

    def _sync(self) -> None:
        import torch

        if self.profile and self.device.type == "cuda":
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
        from ovseg_mine.crops import device_constant, render_crops_from_logits
        from ovseg_mine.mine.algorithms.compiled import CompiledPart, CompiledParts
        from ovseg_mine.mine.algorithms.fused_amg import SELECTION_CHUNK_OPTIONS, selection_chunk
        from ovseg_mine.mine.algorithms.sam_batch import BatchedSam
        from ovseg_mine.models import clip_input_size, clip_mean_std
        from ovseg_mine.text import NounEmbeddings

        self.cfg = cfg
        self.device = torch.device(device)
        rules = "cuda" if cfg.engine.device_rules == "cuda" else self.device.type  # whose defaults apply
        cuda = rules == "cuda"
        self.parts = CompiledParts(cfg.engine.compile, self.device)  # engine.compile: the parts below, counted
        self.kernels = cfg.engine.kernels if cfg.engine.kernels != "auto" else ("fused" if cuda else "stock")
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
                compile=self.parts,
                kernels=self.kernels,
            )
        )
        self.clip_precision = precision_mod.for_inference(cfg.clip.precision, rules)
        self.clip = precision_mod.cast_model(clip, self.clip_precision)
        encode_image = self.clip.encode_image  # (a model another engine compiled: its own function again)
        encode_image = encode_image.fn if isinstance(encode_image, CompiledPart) else encode_image
        self.clip.encode_image = self.parts.wrap("clip_image", encode_image)
        self.input_size = clip_input_size(self.clip)
        self.mean, self.std = clip_mean_std(self.clip)
        self.fill = [255.0 * m for m in self.mean]
        # the crops' fill and CLIP's normalization as float32 [3] device constants, made once (a tensor from a list
        # is a blocking copy on CUDA); the stock and the fused crops take the same ones
        self._fill, self._mean, self._std = (
            device_constant(v, self.device, torch.float32) for v in (self.fill, self.mean, self.std)
        )
        # One noun per encode_text call: a noun's embedding does not depend on which nouns this actor met first.
        self.text = NounEmbeddings(clip, tokenizer, self.device, nouns_per_call=1, precision=self.clip_precision)
        self.pooled = cfg.engine.batching == "pooled" or (cfg.engine.batching == "auto" and cuda)
        # the fused selection's and crops' chunk bodies (image-size dimensions dynamic: compiled.py)
        self._select_chunk, self._crop_chunk = selection_chunk, render_crops_from_logits
        if self.kernels == "fused":
            self._select_chunk = self.parts.wrap(
                "select_chunk", selection_chunk, dynamic={1: (0,), 2: (0,)}, options=SELECTION_CHUNK_OPTIONS
            )
            self._crop_chunk = self.parts.wrap(
                "crop_chunk", render_crops_from_logits, dynamic={0: (1, 2), 2: (0,), 3: (0,)}
            )
        self.chunk_bytes = cfg.ray.chunk_mib * 2**20

    def compile_stats(self) -> dict[str, dict[str, Any]]:
        """Per compiled part (``sam_encoder``, ``sam_decoder``, ``clip_image``; with fused kernels ``select_chunk``
        and ``crop_chunk``): its mode, graphs compiled, compile seconds, calls and input buckets so far
        (:meth:`~ovseg_mine.mine.algorithms.compiled.CompiledParts.stats`; empty when ``engine.compile='off'``)."""
        return self.parts.stats()

    # ----------------------------------------------------------------------------------------------- inputs

    def to_device(self, pixels: np.ndarray) -> "torch.Tensor":
        """One image's :meth:`to_device_many`."""
        return self.to_device_many([pixels])[0]

    def to_device_many(self, images: Sequence[np.ndarray]) -> list["torch.Tensor"]:
        """uint8 ``[H_i, W_i, 3]`` host pixels -> uint8 ``[3, H_i, W_i]`` on the device, in order.

        On a CPU each is a view of the same memory (the engine only reads it). On a GPU all are staged through one
        pinned host buffer (one allocation from PyTorch's pinned-memory cache, which keeps the block until the
        copy has run) and sent in one ``non_blocking`` copy, which does not block the host; each image is a view
        of the one device buffer.
        """
        import warnings

        import torch

        with warnings.catch_warnings():  # Arrow's buffers are read-only; nothing writes into the pixels
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = [torch.from_numpy(np.ascontiguousarray(pixels)) for pixels in images]
        if self.device.type == "cuda" and tensors:
            sizes = [t.numel() for t in tensors]
            staging = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
            torch.cat([t.reshape(-1) for t in tensors], out=staging)
            flat = staging.to(self.device, non_blocking=True)
            tensors = [part.view(t.shape) for part, t in zip(flat.split(sizes), tensors, strict=True)]
        else:  # on a CPU the tensors themselves (what benchmarks/proxies.py takes for a pinned copy)
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        return [t.permute(2, 0, 1) for t in tensors]

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

        timer = StepTimer(self.device, self.cfg.engine.profile_steps)
        with torch.inference_mode():
            with timer("clip"):  # the batch's vocabulary, before the images: no text-tower call between them
                self.text.embed([noun for job in jobs for noun in job.nouns])
            with timer("proposals"):
                sets = self._proposals(jobs)
            with timer("crops"):
                crops = self._crops(jobs, sets)
            with timer("clip"):
                embeddings = self._embed_crops(crops, [len(masks) for masks in sets])
                outcomes = self._match(jobs, sets, embeddings)
        share = {step: seconds / len(jobs) for step, seconds in timer.seconds.items()}
        for outcome in outcomes:
            outcome.seconds = dict(share)
        return outcomes

    @property
    def fused(self) -> bool:
        """Whether ``engine.kernels`` resolves to the fused decoder, selection and crops (``auto``: under a GPU's
        rules)."""
        return self.kernels == "fused"

    def _proposals(self, jobs: Sequence[ImageJob]) -> list["MaskSet"]:
        """Every job's proposals: its given masks, or SAM's (the encoder over the batch's images at once, then per
        image :meth:`propose`; with fused kernels every image is decoded first and the selection runs for all of
        them at once, :func:`~ovseg_mine.mine.algorithms.fused_amg.select_masks_fused`)."""
        from ovseg_mine.mine.algorithms.fused_amg import DecodedImage, postprocess_operator, select_masks_fused

        sam_jobs = [job for job in jobs if job.given is None]
        features = self.sam.embed([job.sam_image for job in sam_jobs]) if sam_jobs else None
        if not (self.fused and self.cfg.sam.min_mask_region_area == 0):  # stock; and small regions need opencv
            found = iter([self.propose(job, features[j : j + 1]) for j, job in enumerate(sam_jobs)])
            return [next(found) if job.given is None else job.given for job in jobs]
        sam, decoded = self.sam, []
        for j, job in enumerate(sam_jobs):
            low, iou = sam.decode(features[j : j + 1], job.size)
            op = postprocess_operator(
                tuple(low.shape[1:]), sam.input_size(job.size), job.size, sam.img_size, low.device
            )
            decoded.append(DecodedImage(low, iou, op, upsample=sam.upsampler(job.size)))  # masks out: stock pixels
        found = iter(
            select_masks_fused(
                decoded,
                cfg=self.cfg.sam,
                mask_threshold=sam.mask_threshold,
                chunk_bytes=self.chunk_bytes,
                chunk_fn=self._select_chunk,
            )
        )
        return [next(found) if job.given is None else job.given for job in jobs]

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

        from ovseg_mine.crops import render_masked_crops, render_masked_crops_batched

        render = render_masked_crops_batched if self.pooled else render_masked_crops
        side = self.input_size
        per_crop = 33 * 16 * side * side if self.pooled else 0  # the gather's bytes per mask
        out = []
        for job, masks in zip(jobs, sets, strict=True):
            k = len(masks)
            if self.fused and masks.operator is not None and masks.full_res is None:
                out.extend(self._fused_crops(job, masks))
                continue
            step = max(1, min(masks.chunk, self.chunk_bytes // max(1, per_crop)))
            for start in range(0, k, step):
                index = torch.arange(start, min(k, start + step), device=self.device)
                boxes = masks.boxes.index_select(0, index)
                if not self.pooled:  # the per-mask loop refuses empty boxes; empty masks are flagged
                    boxes = torch.cat([boxes[:, :2], boxes[:, 2:].clamp(min=1)], dim=1)
                crops = render(job.image, masks.masks(index), boxes, size=side, fill=self.fill)
                mean, std = self._mean.view(1, 3, 1, 1), self._std.view(1, 3, 1, 1)
                out.append((crops / 255.0 - mean) / std)  # crops.normalize, with the constants made once
        return torch.cat(out) if out else torch.zeros((0, 3, side, side), device=self.device)

    def _fused_crops(self, job: ImageJob, masks: "MaskSet") -> list["torch.Tensor"]:
        """The crops of a fused selection's masks (:func:`~ovseg_mine.crops.render_crops_from_logits`: from the
        low-resolution logits, no full-resolution mask; CLIP-normalized in the same body): float32
        chunks that concatenate to ``[len(masks), 3, S, S]``, of a fixed number of crops for the run
        (``max_masks_per_image`` split evenly into the fewest chunks that fit the chunk budget,
        :func:`~ovseg_mine.crops.even_chunk`; the last chunk padded and cut), so a compiled chunk sees one shape."""
        import torch

        from ovseg_mine.crops import even_chunk

        k, side = len(masks), self.input_size
        step = even_chunk(self.cfg.sam.max_masks_per_image, self.chunk_bytes // (33 * 16 * side * side))
        fill, mean, std = self._fill, self._mean, self._std
        ay, ax, out = masks.operator.ay, masks.operator.ax, []
        for start in range(0, k, step):
            index = torch.arange(start, start + step, device=self.device).clamp(max=k - 1)  # padded: repeats the last
            low, boxes = masks.low_res.index_select(0, index), masks.boxes.index_select(0, index)
            crops = self._crop_chunk(
                job.image,
                low,
                ay,
                ax,
                boxes,
                size=side,
                fill=fill,
                mask_threshold=masks.mask_threshold,
                mean=mean,
                std=std,
            )
            out.append(crops[: min(step, k - start)])
        return out

    def _embed_crops(self, crops: "torch.Tensor", counts: list[int]) -> "torch.Tensor":
        """CLIP embeddings of the batch's crops (``counts`` per image): pooled in the calls of
        :func:`~ovseg_mine.mine.algorithms.matching.pooled_calls`, or per image without padding."""
        import torch

        from ovseg_mine.mine.algorithms.matching import encode_crops, encode_crops_pooled

        size, precision = self.cfg.clip.batch_size, self.clip_precision
        if self.pooled:
            return encode_crops_pooled(self.clip, crops, counts, batch_size=size, precision=precision)
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

"""The automatic mask generator's selection (:func:`ovseg_mine.mine.algorithms.amg.select_masks`) written to move
few bytes, for several images at once: ``engine.kernels = "fused"``.

What it computes is the stock selection's rule (segment-anything ``automatic_mask_generator.py``
``_process_batch``: predicted-IoU filter, stability score with offset 1.0, box NMS; then ovseg-mine's empty-mask drop,
order and cap). What changes is how:

* **Upsampling as two small matrices.** ``Sam.postprocess_masks`` (bilinear from the decoder's ``h x w`` to the
  encoder's square input, crop of the padding, bilinear to the image's ``H x W``) is linear and separable per axis,
  so it is one ``[H, h]`` matrix ``Ay`` and one ``[W, w]`` matrix ``Ax`` per image size
  (:func:`postprocess_operator`, built once per size by pushing identity matrices through the same
  ``F.interpolate`` calls, in float64): full-resolution logits are ``Ay @ low @ Ax^T``. They equal the stock
  ones up to float32 rounding (the stock path rounds after each of its two resizes), so a pixel whose logit is
  within ~1e-6 of a threshold may fall on the other side: stability scores, areas and boxes agree to a few
  pixels, and a candidate whose score sits on a threshold may be kept by one path and not the other.
* **Fixed-shape chunk bodies.** :func:`selection_chunk` maps a chunk of ``C`` candidates' logits to their
  stability score, area and box with pure tensor ops (no host value, no data-dependent shape). Eagerly, two plain
  matrix products write the chunk's full-resolution logits once (float32 ``[H, C, W]``) and every count reads
  them. Under ``torch.compile`` (with :data:`SELECTION_CHUNK_OPTIONS`) the body is one pass over the
  low-resolution logits with no full-resolution buffer: each logit is an expression of its nine low-resolution
  taps (:func:`~ovseg_mine.banded.banded_taps`, the bands of ``Ay`` and ``Ax``) that Inductor inlines into two
  reductions, one along rows (the three threshold counts, packed in one int64) and one along columns (recomputing
  the logits, transposed). Bytes per candidate (``benchmarks/selection_bytes.py``): 16 MB stock and 12 MB fused
  eagerly at 640x480; compiled, Inductor's estimate, 0.70 MB in chunks of 8 and 0.28 MB in chunks of 512 (the bf16
  logits read twice, and the bands; 2.3 MB before, with a row-resampled float32 buffer and an int8 map of the
  thresholds written and read back). The two forms agree up to float32 rounding of the logits. The last chunk of
  an image is padded to ``C`` (its padding's results are dropped), and ``C`` is a power of two, so an image size
  compiles a few times.
* **Several images, three host syncs.** :func:`select_masks_fused` takes every decoded image of a batch: the
  predicted-IoU filter of all images is one host read (the survivors' counts), the stability filter needs none
  (a failing candidate enters NMS with score ``-inf``: sorted after every passing one, it can suppress none of them,
  and is dropped afterwards), NMS runs once over the batch with each image's boxes shifted apart (so boxes of
  different images never overlap: torchvision's ``batched_nms`` coordinate trick), and the per-image counts come
  back in one host read. Each image's result equals :func:`select_masks_fused` on that image alone.

Not covered (the caller falls back to the stock :func:`~ovseg_mine.mine.algorithms.amg.select_masks`):
``min_mask_region_area > 0`` (opencv on full-resolution masks) and given masks (run lengths, no logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ovseg_mine.banded import band, banded_taps
from ovseg_mine.mine.algorithms.amg import MaskSet, boxes_from_projections

if TYPE_CHECKING:
    import torch

    from ovseg_mine.config import SamConfig

#: Operators kept per process (one per image size and device); cleared when full.
_OPERATOR_CACHE_SIZE = 64
_OPERATORS: dict[tuple, "PostprocessOperator"] = {}
#: Bits of each of the three counts packed in one int64 by the compiled chunk body (widths below 2**21 pixels).
_FIELD = 21
#: Inductor settings for the compiled :func:`selection_chunk` (``torch.compile(..., options=...)``; the engine's
#: ``select_chunk`` part passes them). Inductor stores a pointwise result whose expression exceeds 30 operations
#: (50 on a CPU) or 8 input buffers (12): the nine-tap logits of the compiled body (about 70 operations) would be
#: written at full resolution, float32, before the reductions read them. Raised, the logits stay inlined.
SELECTION_CHUNK_OPTIONS = {"realize_opcount_threshold": 400, "realize_acc_reads_threshold": 64}


@dataclass(frozen=True)
class PostprocessOperator:
    """``Sam.postprocess_masks`` of one image size as two matrices.

    Attributes:
        ay: float32 ``[H, h]``: row ``y`` holds the weights of the decoder's rows in output row ``y``.
        ax: float32 ``[W, w]``: likewise for columns.
    """

    ay: "torch.Tensor"
    ax: "torch.Tensor"

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the original image."""
        return int(self.ay.shape[0]), int(self.ax.shape[0])

    def upsample(self, low: "torch.Tensor") -> "torch.Tensor":
        """Full-resolution logits float32 ``[k, H, W]`` of low-resolution logits ``[k, h, w]`` (any float dtype):
        ``Ay @ low @ Ax^T``."""
        return upsample_logits(low, self.ay, self.ax).permute(1, 0, 2).contiguous()


def postprocess_operator(
    low_size: tuple[int, int], input_size: tuple[int, int], size: tuple[int, int], img_size: int, device: "torch.device"
) -> PostprocessOperator:
    """The matrices of ``Sam.postprocess_masks(masks, input_size, size)`` for decoder logits of ``low_size``
    (cached per arguments).

    Args:
        low_size: ``(h, w)`` of the decoder's logits (256, 256 for the published SAMs).
        input_size: ``(h', w')`` of the image resized for the encoder, before padding (``ResizeLongestSide``).
        size: ``(H, W)`` of the original image.
        img_size: the encoder's square input side (``image_encoder.img_size``, 1024).
        device: where the matrices live (built there: no host-to-device copy).

    Raises:
        ValueError: ``input_size`` larger than ``img_size`` or a size below 1.
    """
    import torch

    if min(*low_size, *input_size, *size) < 1 or max(input_size) > img_size:
        raise ValueError(f"bad sizes: low {low_size}, input {input_size}, original {size}, encoder {img_size}")
    device = torch.device(device)
    key = (tuple(low_size), tuple(input_size), tuple(size), int(img_size), str(device))
    if key not in _OPERATORS:
        if len(_OPERATORS) >= _OPERATOR_CACHE_SIZE:
            _OPERATORS.clear()
        ay = _axis_matrix(low_size[0], input_size[0], size[0], img_size, device, axis=0)
        ax = _axis_matrix(low_size[1], input_size[1], size[1], img_size, device, axis=1)
        _OPERATORS[key] = PostprocessOperator(ay, ax)
    return _OPERATORS[key]


def _axis_matrix(n: int, kept: int, out: int, img_size: int, device: "torch.device", *, axis: int) -> "torch.Tensor":
    """One axis of ``Sam.postprocess_masks`` as a float32 ``[out, n]`` matrix: the identity's ``n`` basis vectors
    as a batch of one-pixel-wide images, through the same two bilinear resizes and crop (a resize from 1 to 1
    pixel is the identity, so the other axis adds nothing), in float64."""
    import torch
    import torch.nn.functional as F

    dtype = torch.float64 if device.type != "mps" else torch.float32
    eye = torch.eye(n, dtype=dtype, device=device)
    if axis == 0:
        x = F.interpolate(eye[:, None, :, None], (img_size, 1), mode="bilinear", align_corners=False)
        x = F.interpolate(x[:, :, :kept], (out, 1), mode="bilinear", align_corners=False)
    else:
        x = F.interpolate(eye[:, None, None, :], (1, img_size), mode="bilinear", align_corners=False)
        x = F.interpolate(x[..., :kept], (1, out), mode="bilinear", align_corners=False)
    return x.reshape(n, out).T.to(torch.float32).contiguous()


def upsample_logits(low: "torch.Tensor", ay: "torch.Tensor", ax: "torch.Tensor") -> "torch.Tensor":
    """Full-resolution logits of a chunk, float32 ``[H, C, W]`` (row-major across the chunk: two plain matrix
    products, no broadcast copy of ``ay``).

    Args:
        low: ``[C, h, w]`` logits, any float dtype.
        ay, ax: :class:`PostprocessOperator` matrices ``[H, h]``, ``[W, w]``.
    """
    import torch

    c, h, w = low.shape
    stacked = low.permute(1, 0, 2).to(torch.float32, copy=True, memory_format=torch.contiguous_format).view(h, c * w)
    rows = torch.mm(ay, stacked).view(-1, w)  # [H * C, w]
    return torch.mm(rows, ax.T).view(ay.shape[0], c, ax.shape[0])


def selection_chunk(
    low: "torch.Tensor", ay: "torch.Tensor", ax: "torch.Tensor", mask_threshold: float
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """The fused chunk body of the selection: stability score, area and box of ``C`` candidates from their
    low-resolution logits, with fixed shapes and no host sync (``torch.compile``-able without a graph break).

    The stability score is segment-anything's ``calculate_stability_score(masks, mask_threshold, 1.0)`` (pixels
    above ``mask_threshold + 1`` over pixels above ``mask_threshold - 1``; NaN when none is above the latter), the
    area the pixels above ``mask_threshold``, the box ``batched_mask_to_box``'s, of the logits ``Ay @ low @ Ax^T``.

    Args:
        low: ``[C, h, w]`` logits (any float dtype).
        ay, ax: float32 ``[H, h]``, ``[W, w]`` (:class:`PostprocessOperator`).
        mask_threshold: SAM's ``mask_threshold`` (0.0).

    Returns:
        float32 ``[C]`` stability scores, int64 ``[C]`` areas, int64 ``[C, 4]`` XYXY boxes (inclusive right/bottom
        pixel; zeros for an empty mask).
    """
    import torch

    if torch.compiler.is_compiling():
        return _banded_selection_chunk(low, ay, ax, mask_threshold)
    full = upsample_logits(low, ay, ax)  # [H, C, W]
    fg = full > mask_threshold
    row_area = fg.sum(dim=2, dtype=torch.int32)  # [H, C]: every count runs along a row
    inter = (full > mask_threshold + 1.0).sum(dim=2, dtype=torch.int32).sum(dim=0)
    union = (full > mask_threshold - 1.0).sum(dim=2, dtype=torch.int32).sum(dim=0)
    stability = inter.to(torch.float32) / union.to(torch.float32)
    boxes = boxes_from_projections(row_area.T > 0, fg.any(dim=0))
    return stability, row_area.sum(dim=0, dtype=torch.int64), boxes


def _banded_selection_chunk(
    low: "torch.Tensor", ay: "torch.Tensor", ax: "torch.Tensor", mask_threshold: float
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """:func:`selection_chunk` as one pass over the low-resolution logits, for Inductor (with
    :data:`SELECTION_CHUNK_OPTIONS`): each full-resolution logit is an expression of its nine low-resolution taps
    (:func:`~ovseg_mine.banded.banded_taps`, the sums in :func:`~ovseg_mine.banded.banded_resample`'s order), never
    written. One reduction along each row gives its three counts at once (pixels above ``mask_threshold - 1``,
    ``mask_threshold``, ``mask_threshold + 1``, packed 21 bits apart in an int64, so the image width must be below
    2**21), a second along each column, over the transposed expression (recomputed, not read back), the column's
    any. Equal to the eager body up to float32 rounding of the logits."""
    import torch

    rows_band, cols_band = band(ay), band(ax)
    bounds = torch.tensor([mask_threshold - 1.0, mask_threshold, mask_threshold + 1.0], device=low.device)
    places = torch.tensor([1, 1 << _FIELD, 1 << (2 * _FIELD)], device=low.device)
    logits = banded_taps(low, rows_band, cols_band)  # [C, H, W]: inlined into the row reduction
    rows = ((logits[..., None] > bounds).to(torch.int64) * places).sum(dim=(2, 3))  # [C, H]: three packed counts
    field = (1 << _FIELD) - 1
    union, row_area, inter = (rows & field).sum(dim=1), (rows >> _FIELD) & field, (rows >> (2 * _FIELD)).sum(dim=1)
    cols = (banded_taps(low, rows_band, cols_band, transposed=True) > mask_threshold).any(dim=2)  # [C, W]
    stability = inter.to(torch.float32) / union.to(torch.float32)
    return stability, row_area.sum(dim=1), boxes_from_projections(row_area > 0, cols)


@dataclass
class DecodedImage:
    """One image's decoder output, for :func:`select_masks_fused`.

    Attributes:
        low_res: ``[M, h, w]`` logits of every candidate (3 per point, point-major), the decoder's dtype.
        predicted_iou: float32 ``[M]``.
        operator: the image size's :class:`PostprocessOperator`.
        upsample: the masks handed out (:meth:`MaskSet.masks`: the matched masks' run lengths) upsampled with this
            (``Sam.postprocess_masks``'s own two ``F.interpolate`` calls, so that a mask the fused selection keeps is
            the stock one pixel for pixel); None: the operator's matrices.
    """

    low_res: "torch.Tensor"
    predicted_iou: "torch.Tensor"
    operator: PostprocessOperator
    upsample: Callable[["torch.Tensor"], "torch.Tensor"] | None = None


def fused_chunk(size: tuple[int, int], low_size: tuple[int, int], chunk_bytes: int) -> int:
    """Candidates per :func:`selection_chunk` call for an image of ``size`` ``(H, W)``: the largest power of two
    whose working memory fits in ``chunk_bytes`` (per candidate, eagerly: the float32 logits and up to four bool
    maps at ``size``, the row-upsampled ``[H, w]`` and the float32 copy of the ``[h, w]`` logits); a power of two,
    so that a compiled chunk sees few shapes. At least 1."""
    (height, width), (h, w) = size, low_size
    per_candidate = 8 * height * width + 4 * height * w + 4 * h * w
    fits = max(1, chunk_bytes // per_candidate)
    return 1 << (fits.bit_length() - 1)


def select_masks_fused(
    images: Sequence[DecodedImage],
    *,
    cfg: "SamConfig",
    mask_threshold: float,
    chunk_bytes: int,
    chunk_fn: Callable[..., Any] | None = None,
) -> list[MaskSet]:
    """The stock selection's result for each image (see the module docstring), with three host syncs for all.

    Args:
        images: the decoded images of a batch.
        cfg: ``pred_iou_thresh``, ``stability_score_thresh``, ``box_nms_thresh``, ``max_masks_per_image``
            (``min_mask_region_area`` must be 0).
        mask_threshold: SAM's ``mask_threshold`` (0.0).
        chunk_bytes: working memory of a chunk: an image's chunk is its :func:`fused_chunk`, or the power of two
            at or above its survivors' count if smaller; the last chunk of an image is padded to it.
        chunk_fn: the chunk body, :func:`selection_chunk` or that compiled (the engine's ``select_chunk`` part,
            :mod:`~ovseg_mine.mine.algorithms.compiled`); None: :func:`selection_chunk`.

    Returns:
        One :class:`~ovseg_mine.mine.algorithms.amg.MaskSet` per image, its ``operator`` set and its ``chunk`` the
        image's chunk.

    Raises:
        ValueError: ``min_mask_region_area > 0`` (use the stock selection).
    """
    import torch

    if cfg.min_mask_region_area > 0:
        raise ValueError("select_masks_fused needs min_mask_region_area == 0 (use amg.select_masks)")
    if not images:
        return []
    survivors = _iou_survivors(images, cfg.pred_iou_thresh)  # sync 1
    pools, chunks = [], []
    for image, keep in zip(images, survivors, strict=True):
        low = image.low_res.index_select(0, keep)
        budget = fused_chunk(image.operator.size, tuple(low.shape[1:]), chunk_bytes)
        chunks.append(min(budget, 1 << max(0, len(keep) - 1).bit_length()))  # powers of two: few chunk shapes
        stats = _chunked_stats(low, image.operator, mask_threshold, chunks[-1], chunk_fn or selection_chunk)
        pools.append((low, image.predicted_iou.index_select(0, keep), *stats))
    device = images[0].low_res.device
    iou = torch.cat([p[1] for p in pools])
    stability, areas, boxes = (torch.cat([p[k] for p in pools]) for k in (2, 3, 4))
    owner = torch.cat([torch.full((len(p[1]),), i, dtype=torch.int64, device=device) for i, p in enumerate(pools)])
    passed = stability >= cfg.stability_score_thresh if cfg.stability_score_thresh > 0.0 else areas >= 0
    order, generated, groups = _nms_and_rank(boxes, iou, passed, areas, owner, len(images), cfg)  # syncs 2, 3
    sets, start, offset = [], 0, 0
    for i, (image, pool) in enumerate(zip(images, pools, strict=True)):
        index = order[start : start + min(generated[i], cfg.max_masks_per_image)] - offset
        start, offset = start + groups[i], offset + len(pool[1])
        sets.append(_mask_set(pool, index, generated[i], image, mask_threshold, chunks[i]))
    return sets


def _iou_survivors(images: Sequence[DecodedImage], thresh: float) -> list["torch.Tensor"]:
    """Per image, int64 indices of the candidates with predicted IoU above ``thresh`` (all when it is 0, as the AMG),
    ascending; one host read for the batch (a stable sort puts the survivors first, their counts come back)."""
    import torch

    if thresh <= 0.0:
        return [torch.arange(len(im.predicted_iou), device=im.predicted_iou.device) for im in images]
    flags = [(~(im.predicted_iou > thresh)).to(torch.uint8) for im in images]  # NaN fails, as the AMG's filter
    counts = torch.stack([(f == 0).sum() for f in flags]).tolist()  # the one host read
    return [torch.sort(f, stable=True).indices[:n] for f, n in zip(flags, counts, strict=True)]


def _chunked_stats(
    low: "torch.Tensor", operator: PostprocessOperator, mask_threshold: float, chunk: int, fn: Callable[..., Any]
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """The chunk body ``fn`` (:func:`selection_chunk`) over ``low`` in chunks of exactly ``chunk`` candidates (the last
    one padded by repeating its first candidate), results cut back to ``len(low)``."""
    import torch

    n = low.shape[0]
    parts = []
    for start in range(0, n, chunk):
        part = low[start : start + chunk]
        if part.shape[0] < chunk:
            part = torch.cat([part, part[:1].expand(chunk - part.shape[0], *part.shape[1:])])
        parts.append(fn(part, operator.ay, operator.ax, mask_threshold))
    if not parts:
        device = low.device
        return (
            torch.zeros(0, device=device),
            torch.zeros(0, dtype=torch.int64, device=device),
            torch.zeros((0, 4), dtype=torch.int64, device=device),
        )
    return tuple(torch.cat([p[k] for p in parts])[:n] for k in range(3))  # type: ignore[return-value]


def _nms_and_rank(
    boxes: "torch.Tensor",
    iou: "torch.Tensor",
    passed: "torch.Tensor",
    areas: "torch.Tensor",
    owner: "torch.Tensor",
    num_images: int,
    cfg: "SamConfig",
) -> tuple["torch.Tensor", list[int], list[int]]:
    """Box NMS of all images' candidates at once (each image's boxes shifted past the previous ones'), then per
    image: the stability filter's survivors, empty masks last, predicted IoU descending (stable: ties keep NMS's
    order). Returns the pool indices grouped by image (each group: the image's NMS survivors that passed, ranked,
    then those that did not), and per image the survivors that passed and the group's length (host ints)."""
    import torch
    from torchvision.ops import nms

    if len(iou) == 0:
        return owner, [0] * num_images, [0] * num_images
    shift = (boxes.max() + 1).to(torch.float32) * owner.to(torch.float32)
    scores = torch.where(passed, iou, -torch.inf)
    keep = nms(boxes.to(torch.float32) + shift[:, None], scores, cfg.box_nms_thresh)  # sync 2 (torchvision)
    key = torch.where(areas[keep] > 0, iou[keep], -torch.inf)
    rank = keep[torch.sort(key, descending=True, stable=True).indices]
    rank = rank[torch.sort((~passed[rank]).to(torch.uint8), stable=True).indices]
    rank = rank[torch.sort(owner[rank], stable=True).indices]
    one_hot = owner[rank][None, :] == torch.arange(num_images, device=owner.device)[:, None]  # [B, kept]
    counts = torch.stack([(one_hot & passed[rank]).sum(1), one_hot.sum(1)]).tolist()  # sync 3
    return rank, counts[0], counts[1]


def _mask_set(
    pool: tuple, index: "torch.Tensor", generated: int, image: DecodedImage, threshold: float, chunk: int
) -> MaskSet:
    """The :class:`MaskSet` of one image's ranked, capped pool ``index``."""
    import torch

    operator = image.operator
    low, iou, stability, areas, xyxy = pool
    xyxy = xyxy[index]
    xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2] + 1], dim=1)
    valid = areas[index] > 0
    return MaskSet(
        low_res=low.index_select(0, index),
        predicted_iou=iou[index],
        stability_score=stability[index],
        boxes=xywh * valid[:, None],
        areas=areas[index],
        valid=valid,
        size=operator.size,
        num_generated=generated,
        upsample=image.upsample or operator.upsample,
        mask_threshold=threshold,
        chunk=chunk,
        operator=operator,
    )

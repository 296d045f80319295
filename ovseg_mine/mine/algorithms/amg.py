"""The automatic mask generator's selection, on the device and in bounded memory: from the decoder's
low-resolution logits of every point prompt of an image to its best proposals.

The rule is segment-anything's ``SamAutomaticMaskGenerator`` with one crop layer (``automatic_mask_generator.py``:
``_process_batch`` then ``_process_crop``): keep masks whose predicted IoU is above ``pred_iou_thresh``; upsample
the logits to the original image (``Sam.postprocess_masks``: bilinear to the encoder's input size, crop the
padding, bilinear to ``H x W``); stability score with offset 1.0 (``calculate_stability_score``) at or above
``stability_score_thresh``; binarise at ``mask_threshold``; XYXY boxes of the binary masks; box NMS at
``box_nms_thresh`` with the predicted IoU as score. Then ovseg-mine's proposal rule: drop empty masks, order by
predicted IoU (stable), keep the best ``max_masks_per_image``.

How it stays cheap and bounded, with the same result:

* survivors are kept as **low-resolution logits** (``[K, 256, 256]``, whatever the image size); full-resolution
  logits exist only for a chunk of masks at a time (``chunk_bytes``), to compute stability, area and box, and are
  dropped; the kept masks are upsampled again where they are needed (crops, the matched masks' RLE). Upsampling is
  deterministic, so the second time gives the same pixels as the first;
* three host syncs per image: the predicted-IoU filter's survivors, the stability filter's survivors, and NMS
  (torchvision's CUDA NMS syncs internally). The empty-mask drop and the top-N cap need none: empty masks are
  sorted last and flagged ``valid=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from ovseg_mine.config import SamConfig

#: segment_anything's ``SamAutomaticMaskGenerator(crop_nms_thresh=0.7)`` default. With one crop layer it only
#: enters the second NMS after ``min_mask_region_area`` post-processing, at ``max(box_nms_thresh, this)``.
CROP_NMS_THRESH = 0.7


@dataclass
class MaskSet:
    """The kept proposals of one image, on the device, best first: SAM's (kept as low-resolution logits) or
    masks the user gave (kept as run lengths, :func:`ovseg_mine.mine.algorithms.given_proposals.given_mask_set`).

    Attributes:
        low_res: mask logits at the decoder's resolution, ``[K, h, w]`` in the decoder's dtype (None for given
            masks).
        predicted_iou: float32 ``[K]``, descending among the valid masks (NaN: a given mask without scores).
        stability_score: float32 ``[K]`` (NaN: a given mask without scores).
        boxes: int64 ``[K, 4]`` tight boxes, XYWH in pixels of the original image (COCO: ``w = x1 - x0 + 1``;
            ``[0, 0, 0, 0]`` for an empty mask).
        areas: int64 ``[K]`` foreground pixels.
        valid: bool ``[K]``, False for an empty mask (all of them sorted after the valid ones).
        size: original image size ``(H, W)``.
        num_generated: masks left after NMS, before the empty-mask drop and the cap (host int).
        upsample: maps low-res logits ``[k, h, w]`` to float32 full-resolution logits ``[k, H, W]`` (None for
            given masks).
        mask_threshold: logit above which a pixel is in the mask.
        chunk: masks upsampled at a time to stay within the chunk's byte budget (host int).
        full_res: bool ``[K, H, W]`` masks when ``min_mask_region_area`` changed them (they are then no longer
            the upsampled logits); None otherwise.
        counts: int64 ``[K, L]`` given masks' column-major run lengths, zero-padded (:func:`ovseg_mine.rle.counts_of`),
            decoded on the device by :meth:`masks`; None for SAM's masks.
        operator: the image size's upsampling matrices
            (:class:`~ovseg_mine.mine.algorithms.fused_amg.PostprocessOperator`) when the fused selection made the
            set (``upsample`` is then its product, and crops are rendered from ``low_res`` through it); None
            otherwise.
    """

    low_res: "torch.Tensor | None"
    predicted_iou: "torch.Tensor"
    stability_score: "torch.Tensor"
    boxes: "torch.Tensor"
    areas: "torch.Tensor"
    valid: "torch.Tensor"
    size: tuple[int, int]
    num_generated: int
    upsample: Callable[["torch.Tensor"], "torch.Tensor"] | None
    mask_threshold: float
    chunk: int
    full_res: "torch.Tensor | None" = None
    counts: "torch.Tensor | None" = None
    operator: Any = None

    def __len__(self) -> int:
        return int(self.predicted_iou.shape[0])

    def masks(self, index: "torch.Tensor") -> "torch.Tensor":
        """Full-resolution bool masks ``[len(index), H, W]`` of the proposals ``index`` (int64 on the device).
        Callers that hold many masks of a large image should ask for at most :attr:`chunk` at a time."""
        if self.full_res is not None:
            return self.full_res.index_select(0, index)
        if self.counts is not None:
            from ovseg_mine.rle import masks_from_counts

            return masks_from_counts(self.counts.index_select(0, index), *self.size)
        return self.upsample(self.low_res.index_select(0, index).float()) > self.mask_threshold


def mask_boxes(masks: "torch.Tensor") -> "torch.Tensor":
    """Tight boxes of bool masks ``[N, H, W]`` as int64 ``[N, 4]`` XYXY with inclusive right/bottom pixel (what
    segment_anything's ``batched_mask_to_box`` returns, with fewer ops); ``[0, 0, 0, 0]`` for an empty mask."""
    return boxes_from_projections(masks.any(dim=2), masks.any(dim=1))


def boxes_from_projections(rows: "torch.Tensor", cols: "torch.Tensor") -> "torch.Tensor":
    """:func:`mask_boxes` from the masks' projections: bool ``rows`` ``[N, H]`` (a row has a foreground pixel)
    and ``cols`` ``[N, W]``; int64 ``[N, 4]`` XYXY, ``[0, 0, 0, 0]`` for an empty mask. No host sync."""
    import torch

    h, w = rows.shape[1], cols.shape[1]
    top = rows.to(torch.uint8).argmax(dim=1)  # first maximum: first True row
    bottom = h - 1 - rows.flip(1).to(torch.uint8).argmax(dim=1)
    left = cols.to(torch.uint8).argmax(dim=1)
    right = w - 1 - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    return boxes * rows.any(dim=1, keepdim=True)


def chunk_size(size: tuple[int, int], img_size: int, chunk_bytes: int) -> int:
    """Masks whose full-resolution post-processing fits in ``chunk_bytes``: per mask, the float32 logits at the
    encoder's input size and at ``size``, plus three bool maps at ``size``."""
    per_mask = 4 * img_size * img_size + 7 * size[0] * size[1]
    return max(1, chunk_bytes // per_mask)


def select_masks(
    low_res: "torch.Tensor",
    predicted_iou: "torch.Tensor",
    *,
    cfg: "SamConfig",
    size: tuple[int, int],
    upsample: Callable[["torch.Tensor"], "torch.Tensor"],
    mask_threshold: float,
    chunk: int,
    min_region_area: int = 0,
) -> MaskSet:
    """Select an image's proposals from its decoder output.

    Args:
        low_res: ``[M, h, w]`` low-resolution logits of every mask (3 per point, point-major).
        predicted_iou: float32 ``[M]``.
        cfg: ``pred_iou_thresh``, ``stability_score_thresh``, ``box_nms_thresh``, ``max_masks_per_image``.
        size: original image size ``(H, W)``.
        upsample: low-res ``[k, h, w]`` float32 -> full-resolution logits ``[k, H, W]`` (``Sam.postprocess_masks``).
        mask_threshold: SAM's ``mask_threshold`` (0.0).
        chunk: masks upsampled at a time (:func:`chunk_size`).
        min_region_area: the AMG's ``min_mask_region_area``: when above 0, holes and islands smaller than this
            (pixels) are removed from the NMS survivors and a second NMS prefers unchanged masks
            (``postprocess_small_regions``; opencv on the CPU, one mask at a time: slow, and full-resolution
            masks of every NMS survivor are held).

    Returns:
        A :class:`MaskSet` with at most ``max_masks_per_image`` proposals.
    """
    import torch
    from segment_anything.utils.amg import calculate_stability_score
    from torchvision.ops import nms

    device = low_res.device
    if cfg.pred_iou_thresh > 0.0:
        keep = torch.nonzero(predicted_iou > cfg.pred_iou_thresh).squeeze(1)  # sync 1
        low_res, predicted_iou = low_res.index_select(0, keep), predicted_iou.index_select(0, keep)
    n = low_res.shape[0]
    stability = torch.empty(n, dtype=torch.float32, device=device)
    boxes = torch.empty((n, 4), dtype=torch.int64, device=device)
    areas = torch.empty(n, dtype=torch.int64, device=device)
    for start in range(0, n, chunk):
        logits = upsample(low_res[start : start + chunk].float())
        stability[start : start + chunk] = calculate_stability_score(logits, mask_threshold, 1.0)
        masks = logits > mask_threshold
        boxes[start : start + chunk] = mask_boxes(masks)
        areas[start : start + chunk] = masks.sum(dim=(1, 2))
    if cfg.stability_score_thresh > 0.0:
        keep = torch.nonzero(stability >= cfg.stability_score_thresh).squeeze(1)  # sync 2
        low_res, predicted_iou = low_res.index_select(0, keep), predicted_iou.index_select(0, keep)
        stability, boxes, areas = stability[keep], boxes[keep], areas[keep]
    keep = nms(boxes.float(), predicted_iou, cfg.box_nms_thresh)  # sync 3 on CUDA (inside torchvision)
    full_res = None
    if min_region_area > 0:
        second_nms = max(cfg.box_nms_thresh, CROP_NMS_THRESH)
        keep, full_res, boxes, areas = _remove_small_regions(
            keep, low_res, boxes, areas, min_region_area, second_nms, upsample, mask_threshold
        )
    num_generated = int(keep.shape[0])
    # Empty masks last, then predicted IoU descending; stable, so ties keep NMS's order.
    key = torch.where(areas[keep] > 0, predicted_iou[keep], -torch.inf)
    rank = torch.sort(key, descending=True, stable=True).indices[: cfg.max_masks_per_image]
    order = keep[rank]
    xyxy = boxes[order]
    xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2] + 1], dim=1)
    valid = areas[order] > 0
    return MaskSet(
        low_res=low_res.index_select(0, order),
        predicted_iou=predicted_iou[order],
        stability_score=stability[order],
        boxes=xywh * valid[:, None],
        areas=areas[order],
        valid=valid,
        size=size,
        num_generated=num_generated,
        upsample=upsample,
        mask_threshold=mask_threshold,
        chunk=chunk,
        full_res=None if full_res is None else full_res[rank],
    )


def _remove_small_regions(
    keep: "torch.Tensor",
    low_res: "torch.Tensor",
    boxes: "torch.Tensor",
    areas: "torch.Tensor",
    min_area: int,
    nms_thresh: float,
    upsample: Callable[["torch.Tensor"], "torch.Tensor"],
    mask_threshold: float,
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """The AMG's ``postprocess_small_regions`` on the NMS survivors ``keep``. Returns the new keep (indices into
    the candidates), the survivors' full-resolution masks in that order, and the candidates' boxes and areas
    with the changed masks' values."""
    import numpy as np
    import torch
    from segment_anything.utils.amg import remove_small_regions
    from torchvision.ops import nms

    masks = upsample(low_res.index_select(0, keep).float()) > mask_threshold
    scores = []
    for i, mask in enumerate(masks.cpu().numpy()):
        mask, holes = remove_small_regions(mask, min_area, mode="holes")
        mask, islands = remove_small_regions(mask, min_area, mode="islands")
        masks[i] = torch.from_numpy(np.ascontiguousarray(mask)).to(masks.device)
        scores.append(float(not (holes or islands)))
    new_boxes = mask_boxes(masks)
    second = nms(new_boxes.float(), torch.tensor(scores, device=masks.device), nms_thresh)
    boxes, areas = boxes.clone(), areas.clone()
    boxes[keep], areas[keep] = new_boxes, masks.sum(dim=(1, 2))
    return keep[second], masks[second], boxes, areas

"""Masks the user already has, as the :class:`~ovseg_mine.mine.proposals.Proposals` SAM's generator returns.

A record of a run with ``--proposals coco:...`` or ``--proposals sa1b:...`` carries its image's masks in its
``proposals`` column (:func:`ovseg_mine.mine.sources.records.proposal_type`: COCO RLE, XYWH box, and SAM's
``predicted_iou`` and ``stability_score`` where the file has them; attached by
:mod:`ovseg_mine.mine.proposal_sources`). :func:`given_proposals` turns them into the same object SAM's generator
returns, with the same rules: the score thresholds of :class:`~ovseg_mine.config.SamConfig` where a score exists
(``predicted_iou > pred_iou_thresh``, ``stability_score >= stability_score_thresh``, as segment-anything's AMG
filters), empty masks dropped, best first by ``predicted_iou`` (masks without scores keep the file's order, after
scored ones), at most ``max_masks_per_image``. Crops, CLIP matching and pairs then run unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ovseg_mine import rle as rle_utils
from ovseg_mine.config import SamConfig
from ovseg_mine.mine.proposals import Proposals, tight_boxes

if TYPE_CHECKING:
    import torch


class GivenMaskError(ValueError):
    """A given mask that does not fit its image (its RLE size differs from the decoded image's)."""


def _score(value: Any) -> float:
    return float("nan") if value is None else float(value)


def given_proposals(
    entries: list[dict[str, Any]], image_hw: tuple[int, int], cfg: SamConfig, device: "torch.device | str" = "cpu"
) -> Proposals:
    """The :class:`Proposals` of one image from its given masks.

    Args:
        entries: the record's ``proposals``: dicts with ``segmentation`` (COCO RLE ``{size: [h, w], counts}``),
            ``bbox`` (XYWH; not used: boxes are recomputed as the masks' tight boxes, as for SAM),
            ``predicted_iou`` and ``stability_score`` (float or None).
        image_hw: ``(height, width)`` of the decoded image.
        cfg: ``pred_iou_thresh``, ``stability_score_thresh`` and ``max_masks_per_image`` are applied.
        device: where the dense masks go.

    Returns:
        Proposals whose ``predicted_iou``/``stability_score`` are float32 with NaN where the file has no score;
        ``num_generated`` is the number of entries given.

    Raises:
        GivenMaskError: a mask's RLE size differs from ``image_hw`` (e.g. masks of another image, or of the
            image before an EXIF rotation).
    """
    import torch

    height, width = image_hw
    kept = []
    for entry in entries:
        size = [int(v) for v in entry["segmentation"]["size"]]
        if size != [height, width]:
            raise GivenMaskError(
                f"a given mask is {size[1]}x{size[0]} (RLE size) but the image is {width}x{height}: masks of "
                "another image?"
            )
        iou, stability = entry.get("predicted_iou"), entry.get("stability_score")
        if iou is not None and cfg.pred_iou_thresh > 0.0 and not iou > cfg.pred_iou_thresh:
            continue
        if stability is not None and cfg.stability_score_thresh > 0.0 and not stability >= cfg.stability_score_thresh:
            continue
        kept.append(entry)
    # Best first: by predicted IoU (descending), unscored masks after the scored ones, in the file's order.
    kept.sort(key=lambda e: (e.get("predicted_iou") is None, -(e.get("predicted_iou") or 0.0)))
    chosen, dense = [], []
    for entry in kept:  # decoded one by one, so at most max_masks_per_image dense masks are held
        if len(chosen) == cfg.max_masks_per_image:
            break
        mask = rle_utils.decode(entry["segmentation"])
        if mask.any():
            chosen.append(entry)
            dense.append(mask)
    masks = np.stack(dense) if dense else np.zeros((0, height, width), dtype=bool)
    return Proposals(
        masks=torch.from_numpy(masks).to(device),
        rles=rle_utils.encode_many(masks) if len(chosen) else [],
        bboxes=tight_boxes(masks) if len(chosen) else np.zeros((0, 4), dtype=np.int32),
        areas=masks.sum(axis=(1, 2), dtype=np.int64),
        predicted_iou=np.array([_score(e.get("predicted_iou")) for e in chosen], dtype=np.float32),
        stability_score=np.array([_score(e.get("stability_score")) for e in chosen], dtype=np.float32),
        num_generated=len(entries),
    )

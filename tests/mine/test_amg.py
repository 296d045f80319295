"""The automatic mask generator's selection on the device (ovseg_mine.mine.algorithms.amg), on hand-made logits:
filters, NMS, empty masks last, the cap, and results that do not depend on the chunk size."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_mine.config import SamConfig
from ovseg_mine.mine.algorithms.amg import chunk_size, mask_boxes, select_masks

SIZE = (30, 40)


def _upsample(low: torch.Tensor) -> torch.Tensor:
    return F.interpolate(low[:, None], SIZE, mode="bilinear", align_corners=False)[:, 0]


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    """12 masks at 8x8: 2x2 blobs in separate cells, two empty ones with the highest predicted IoUs."""
    low = torch.full((12, 8, 8), -4.0)
    for i in range(10):
        y, x = (i // 4) * 3, (i % 4) * 2
        low[i, y : y + 2, x : x + 2] = 4.0 + i
    iou = torch.linspace(0.5, 0.95, 12)
    return low, iou


def test_mask_boxes_equal_segment_anything():
    from segment_anything.utils.amg import batched_mask_to_box

    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((5, 9, 13)) > 0.8)
    masks[1] = False
    masks[2] = False
    masks[2, 8, 12] = True
    assert torch.equal(mask_boxes(masks), batched_mask_to_box(masks))


def test_empty_masks_last_flagged_and_capped():
    low, iou = _logits()
    cfg = SamConfig(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, max_masks_per_image=11)
    kept = select_masks(low, iou, cfg=cfg, size=SIZE, upsample=_upsample, mask_threshold=0.0, chunk=5)
    assert len(kept) == 11 and kept.num_generated == 12
    assert kept.valid.tolist() == [True] * 10 + [False]  # the empty masks (highest IoU) sorted after the others
    assert torch.all(kept.predicted_iou[:10].diff() <= 0)  # valid masks by predicted IoU, descending
    assert kept.boxes[10].tolist() == [0, 0, 0, 0] and kept.areas[10] == 0
    masks = kept.masks(torch.arange(10))
    assert torch.equal(masks.sum(dim=(1, 2)), kept.areas[:10])
    xyxy = mask_boxes(masks)
    assert torch.equal(kept.boxes[:10], torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2] + 1], dim=1))


def test_filters_and_nms():
    low, iou = _logits()
    low[3] = low[2]  # a duplicate of mask 2 with a higher IoU: NMS keeps 3, drops 2
    cfg = SamConfig(pred_iou_thresh=0.6, stability_score_thresh=0.5, box_nms_thresh=0.7, max_masks_per_image=100)
    kept = select_masks(low, iou, cfg=cfg, size=SIZE, upsample=_upsample, mask_threshold=0.0, chunk=3)
    assert torch.all(kept.predicted_iou > 0.6) and torch.all(kept.stability_score >= 0.5)
    ious = set(kept.predicted_iou.tolist())
    assert float(iou[3]) in ious and float(iou[2]) not in ious and float(iou[1]) not in ious


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_the_chunk_size_changes_nothing(chunk):
    low, iou = _logits()
    cfg = SamConfig(pred_iou_thresh=0.55, stability_score_thresh=0.0, box_nms_thresh=0.9)
    ref = select_masks(low, iou, cfg=cfg, size=SIZE, upsample=_upsample, mask_threshold=0.0, chunk=12)
    got = select_masks(low, iou, cfg=cfg, size=SIZE, upsample=_upsample, mask_threshold=0.0, chunk=chunk)
    for name in ("low_res", "predicted_iou", "stability_score", "boxes", "areas", "valid"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0, equal_nan=True)
    assert got.num_generated == ref.num_generated


def test_chunk_size_keeps_a_64_megapixel_image_in_budget():
    assert chunk_size((480, 640), 1024, 2 * 2**30) > 300
    big = chunk_size((8000, 8000), 1024, 2 * 2**30)
    assert big >= 1 and big * (4 * 1024 * 1024 + 7 * 8000 * 8000) <= 2 * 2**30

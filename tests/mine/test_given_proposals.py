"""Given masks as proposals: the same object SAM's generator returns, with its filters and cap; a mask of the wrong
size is refused, and in the mask/match stage becomes a listed reject."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ovseg_mine import rle
from ovseg_mine.config import SamConfig
from ovseg_mine.mine.algorithms.given_proposals import GivenMaskError, given_mask_set
from ovseg_mine.mine.algorithms.proposals import Proposals, proposals_of
from ovseg_mine.mine.sources.records import batches, image_row, proposal_type

H, W = 12, 16


def _mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def given_proposals(entries: list[dict], image_hw: tuple[int, int], cfg: SamConfig) -> Proposals:
    """The given masks as the engine keeps them (:func:`given_mask_set`), made dense as SAM's generator returns
    them (:func:`proposals_of`)."""
    return proposals_of(given_mask_set(entries, image_hw, cfg))


def _entry(mask: np.ndarray, iou=None, stability=None) -> dict:
    return {
        "segmentation": rle.encode(mask),
        "bbox": [0.0, 0.0, 1.0, 1.0],
        "predicted_iou": iou,
        "stability_score": stability,
    }


def test_filters_order_cap_and_boxes_as_sam_does():
    masks = [_mask(0, 4, 0, 4), _mask(2, 12, 3, 9), _mask(0, 0, 0, 0), _mask(5, 6, 0, 16), _mask(1, 2, 1, 2)]
    entries = [
        _entry(masks[0], 0.90, 0.99),
        _entry(masks[1], 0.95, 0.97),
        _entry(masks[2], 0.99, 0.99),  # empty: dropped
        _entry(masks[3], 0.88, 0.99),  # not above pred_iou_thresh 0.88
        _entry(masks[4], 0.93, 0.94),  # under stability_score_thresh 0.95
    ]
    cfg = SamConfig(pred_iou_thresh=0.88, stability_score_thresh=0.95, max_masks_per_image=10)
    proposals = given_proposals(entries, (H, W), cfg)
    assert len(proposals) == 2 and proposals.num_generated == 5
    assert [rle.decode(r).tolist() for r in proposals.rles] == [masks[1].tolist(), masks[0].tolist()]
    assert np.array_equal(proposals.masks.numpy(), np.stack([masks[1], masks[0]]))
    assert proposals.bboxes.tolist() == [[3, 2, 6, 10], [0, 0, 4, 4]]  # tight XYWH, not the file's bbox
    assert proposals.areas.tolist() == [60, 16] and proposals.predicted_iou.tolist() == pytest.approx([0.95, 0.90])
    capped = given_proposals(
        entries, (H, W), SamConfig(pred_iou_thresh=0.0, stability_score_thresh=0.0, max_masks_per_image=2)
    )
    assert [rle.decode(r).tolist() for r in capped.rles] == [masks[1].tolist(), masks[4].tolist()]


def test_masks_without_scores_keep_the_file_order_and_nan_scores():
    masks = [_mask(0, 4, 0, 4), _mask(2, 12, 3, 9), _mask(5, 6, 0, 16)]
    proposals = given_proposals([_entry(m) for m in masks], (H, W), SamConfig(max_masks_per_image=2))
    assert [rle.decode(r).tolist() for r in proposals.rles] == [masks[0].tolist(), masks[1].tolist()]
    assert np.isnan(proposals.predicted_iou).all() and np.isnan(proposals.stability_score).all()
    assert len(given_proposals([], (H, W), SamConfig())) == 0


def test_a_mask_of_another_size_is_refused():
    with pytest.raises(GivenMaskError, match="a given mask is 16x12 .* but the image is 20x12"):
        given_proposals([_entry(_mask(0, 4, 0, 4))], (H, 20), SamConfig())


def test_in_the_stage_a_wrong_size_is_a_proposals_reject_and_right_masks_make_pairs(sample, smoke_stages):
    from PIL import Image

    path = sorted((sample / "images").glob("*.jpg"))[0]
    with Image.open(path) as img:
        w, h = img.size
    good = np.zeros((h, w), dtype=bool)
    good[h // 4 : h // 2, w // 4 : w // 2] = True
    screening = {"captions_per_image": 1, "max_caption_chars": 1000, "skip_non_english": True}
    rows = [image_row(i, path.name, ["A dog on a bed."], path=str(path), **screening) for i in (1, 2)]
    table = next(batches(iter(rows), 0, 2))
    given = [[_entry_rle(rle.encode(good), 0.9)], [_entry_rle(rle.encode(good[:, : w // 2]), 0.9)]]
    table = table.set_column(
        table.schema.get_field_index("proposals"), "proposals", pa.array(given, pa.list_(proposal_type()))
    )
    results = smoke_stages(table, 'proposals.kind="coco"', 'sam.model_type="no-such-sam"')
    assert results[0]["status"] == "ok" and rle.decode(results[0]["pairs"][0]["mask"]).tolist() == good.tolist()
    assert results[0]["pairs"][0]["predicted_iou"] == pytest.approx(0.9)
    assert results[1]["status"] == "proposals" and results[1]["reason"].startswith(f"a given mask is {w // 2}x{h}")


def _entry_rle(segmentation: dict, iou: float) -> dict:
    return {"segmentation": segmentation, "bbox": None, "predicted_iou": iou, "stability_score": None}

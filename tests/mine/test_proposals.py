"""SAM mask proposals on real COCO images with the tiny SAM (random weights, seed 0).

Random weights give near-identical, image-wide masks, so box NMS at the usual 0.7 keeps one; the tests use
``box_nms_thresh=1.0`` (no suppression) and zero quality thresholds to get several masks per image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_mine import rle
from ovseg_mine.config import SamConfig
from ovseg_mine.mine.algorithms.proposals import Proposals, SamMaskGenerator, tight_boxes

PERMISSIVE = dict(
    model_type="tiny",
    checkpoint="random",
    points_per_side=4,
    points_per_batch=64,
    pred_iou_thresh=0.0,
    stability_score_thresh=0.0,
    box_nms_thresh=1.0,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The AMG's post-processing of speckled random masks is many small ops: one thread is faster on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(sample) -> list[np.ndarray]:
    paths = sorted((sample / "images").glob("*.jpg"))[:2]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


@pytest.fixture(scope="module")
def generator() -> SamMaskGenerator:
    gen, info = SamMaskGenerator.load(SamConfig(**PERMISSIVE, max_masks_per_image=20), seed=0)
    assert info.is_random and info.name == "tiny"
    return gen


def _check(props: Proposals, image: np.ndarray, cap: int) -> None:
    h, w = image.shape[:2]
    n = len(props)
    assert 0 < n <= cap and props.num_generated >= n
    assert props.masks.dtype == torch.bool and tuple(props.masks.shape) == (n, h, w)
    assert props.bboxes.dtype == np.int32 and props.bboxes.shape == (n, 4)
    assert props.areas.dtype == np.int64 and props.areas.shape == (n,)
    assert props.predicted_iou.dtype == np.float32 and props.predicted_iou.shape == (n,)
    assert props.stability_score.dtype == np.float32 and props.stability_score.shape == (n,)
    assert len(props.rles) == n
    masks = props.masks.cpu().numpy()
    assert np.all(props.areas > 0)
    assert np.array_equal(props.areas, masks.sum(axis=(1, 2)))
    assert np.all(np.diff(props.predicted_iou) <= 0)
    for i, r in enumerate(props.rles):
        assert r["size"] == [h, w] and isinstance(r["counts"], str)
        assert np.array_equal(rle.decode(r), masks[i])
        assert rle.bbox(r) == [float(v) for v in props.bboxes[i]]
        assert rle.area(r) == props.areas[i]


def test_sam_proposals_on_coco(generator, images):
    for image in images:
        props = generator(image)
        _check(props, image, cap=20)
        assert len(props) >= 3


def test_cap_and_determinism(images):
    gen, _ = SamMaskGenerator.load(SamConfig(**PERMISSIVE, max_masks_per_image=3), seed=0)
    a, b = gen(images[0]), gen(images[0])
    _check(a, images[0], cap=3)
    assert len(a) == 3 and a.num_generated > 3
    assert torch.equal(a.masks, b.masks) and a.rles == b.rles and a.num_generated == b.num_generated
    assert np.array_equal(a.bboxes, b.bboxes) and np.array_equal(a.predicted_iou, b.predicted_iou)
    full, _ = SamMaskGenerator.load(SamConfig(**PERMISSIVE, max_masks_per_image=100), seed=0)
    everything = full(images[0])
    assert a.rles == everything.rles[:3]  # the cap keeps the best-first prefix


def test_bad_images(generator, images):
    image = images[0]
    bad = {
        "float": image.astype(np.float32) / 255,
        "grayscale": image[..., 0],
        "rgba": np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2),
        "chw": np.ascontiguousarray(image.transpose(2, 0, 1)),
        "empty": np.zeros((0, 5, 3), np.uint8),
    }
    for array in bad.values():
        with pytest.raises(ValueError, match="image"):
            generator(array)
    with pytest.raises(ValueError, match="numpy array"):
        generator(Image.fromarray(image))


def test_an_unknown_sam_lists_the_valid_names():
    from ovseg_mine.models import list_sam_models

    with pytest.raises(ValueError, match="no-such-sam") as err:
        SamMaskGenerator.load(SamConfig(**{**PERMISSIVE, "model_type": "no-such-sam"}))
    assert all(name in str(err.value) for name in list_sam_models())


def test_tight_boxes_match_pycocotools():
    masks = np.zeros((3, 7, 9), dtype=bool)
    masks[0, 2:5, 3:8] = True
    masks[1, 0, 0] = True
    masks[2, :, 8] = True
    masks[2, 6, 1] = True
    boxes = tight_boxes(masks)
    assert boxes.tolist() == [[3, 2, 5, 3], [0, 0, 1, 1], [1, 0, 8, 7]]
    assert [rle.bbox(r) for r in rle.encode_many(masks)] == [[float(v) for v in b] for b in boxes]
    assert tight_boxes(np.zeros((0, 4, 4), bool)).shape == (0, 4)


def _stock_proposals(sam, cfg: SamConfig, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """segment-anything's own SamAutomaticMaskGenerator with the same parameters and ovseg-mine's proposal rule
    (drop empty masks, stable order by predicted IoU, cap): masks, predicted IoU, stability, count generated."""
    from segment_anything import SamAutomaticMaskGenerator

    amg = SamAutomaticMaskGenerator(
        sam,
        points_per_side=cfg.points_per_side,
        points_per_batch=cfg.points_per_batch or 64,
        pred_iou_thresh=cfg.pred_iou_thresh,
        stability_score_thresh=cfg.stability_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        output_mode="binary_mask",
    )
    records = amg.generate(image)
    generated = len(records)
    records = [r for r in records if r["area"] > 0]
    ious = np.asarray([r["predicted_iou"] for r in records], dtype=np.float32)
    order = np.argsort(-ious, kind="stable")[: cfg.max_masks_per_image]
    masks = (
        np.stack([records[i]["segmentation"] for i in order]) if len(order) else np.zeros((0, *image.shape[:2]), bool)
    )
    stability = np.asarray([records[i]["stability_score"] for i in order], dtype=np.float32)
    return masks, ious[order], stability, generated


def test_fp32_proposals_equal_stock_amg(images):
    """The re-implemented AMG gives exactly the stock AMG's masks and scores: several point batches, with and
    without the score filters (thresholds at the medians of the unfiltered scores), with box NMS."""
    base = SamConfig(**{**PERMISSIVE, "points_per_batch": 7}, max_masks_per_image=30)
    gen, _ = SamMaskGenerator.load(base, seed=0)
    unfiltered = gen(images[0])
    iou_median = float(np.median(unfiltered.predicted_iou))
    stability_median = float(np.median(unfiltered.stability_score))
    variants = [
        base,
        base.model_copy(update={"pred_iou_thresh": iou_median, "stability_score_thresh": stability_median}),
        base.model_copy(update={"box_nms_thresh": 0.95, "max_masks_per_image": 100}),
    ]
    counts = []
    for cfg in variants:
        gen = SamMaskGenerator(gen.sam, cfg)
        for image in images:
            props = gen(image)
            masks, ious, stability, generated = _stock_proposals(gen.sam, cfg, image)
            assert len(props) > 0 and props.num_generated == generated
            assert np.array_equal(props.masks.numpy(), masks)
            assert np.array_equal(props.predicted_iou, ious)
            assert np.array_equal(props.stability_score, stability)
            counts.append(props.num_generated)
    assert counts[2] < counts[0] and counts[4] < 48  # the filters and the NMS did remove masks (48 = 3 * 4 * 4)


def test_bf16_proposals_are_close_to_fp32(images):
    """bf16 autocast of SAM's networks moves masks only slightly (the tiny SAM: IoU with the fp32 mask of the
    same rank stays high for most masks); an unknown precision is refused."""
    cfg = SamConfig(**PERMISSIVE, max_masks_per_image=20)
    fp32, _ = SamMaskGenerator.load(cfg, seed=0)
    bf16, _ = SamMaskGenerator.load(cfg, seed=0, precision="pure_bf16")
    a, b = fp32(images[0]), bf16(images[0])
    _check(b, images[0], cap=20)
    ious = rle.iou(a.rles, b.rles).max(axis=1)
    assert np.mean(ious >= 0.9) >= 0.8
    with pytest.raises(ValueError, match="precision"):
        SamMaskGenerator(fp32.sam, cfg, precision="int8")

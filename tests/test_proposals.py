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
from ovseg_mine.proposals import (
    Proposals,
    SamMaskGenerator,
    build_mask_generator,
    list_mask_generators,
    tight_boxes,
)

PERMISSIVE = dict(
    model_type="tiny", checkpoint="random", points_per_side=4, points_per_batch=64,
    pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
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
    gen, info = build_mask_generator("sam", SamConfig(**PERMISSIVE, max_masks_per_image=20), seed=0)
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


def test_list_mask_generators():
    assert list_mask_generators() == ["sam"]


def test_sam_proposals_on_coco(generator, images):
    for image in images:
        props = generator(image)
        _check(props, image, cap=20)
        assert len(props) >= 3


def test_cap_and_determinism(images):
    gen, _ = build_mask_generator("sam", SamConfig(**PERMISSIVE, max_masks_per_image=3), seed=0)
    a, b = gen(images[0]), gen(images[0])
    _check(a, images[0], cap=3)
    assert len(a) == 3 and a.num_generated > 3
    assert torch.equal(a.masks, b.masks) and a.rles == b.rles and a.num_generated == b.num_generated
    assert np.array_equal(a.bboxes, b.bboxes) and np.array_equal(a.predicted_iou, b.predicted_iou)
    full, _ = build_mask_generator("sam", SamConfig(**PERMISSIVE, max_masks_per_image=100), seed=0)
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
    for name, array in bad.items():
        with pytest.raises(ValueError, match="image"):
            generator(array)
    with pytest.raises(ValueError, match="numpy array"):
        generator(Image.fromarray(image))


def test_unknown_generator():
    with pytest.raises(ValueError, match="'sam'|sam"):
        build_mask_generator("maskformer", SamConfig(**PERMISSIVE))


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

"""COCO ground truth (ovseg_mine.groundtruth): instance masks in COCO's three segmentation forms, panoptic PNGs,
per-category unions, the crowd/area/missing-image selection with counted skips, and bad files."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from ovseg_mine import rle
from ovseg_mine.groundtruth import GroundTruth, GroundTruthError

from helpers.runs import CATEGORIES, DOG_POLYGON, H, W, box, polygon_mask, write_gt


def _decoded(masks):
    return [rle.decode(m) for m in masks]


def test_instance_masks_in_all_three_forms(tmp_path):
    path = write_gt(tmp_path / "gt.json")
    data = json.loads(path.read_text())
    crowd = box(5, 10, 10, 20)
    counts = rle.encode(crowd)
    # an uncompressed RLE (list counts, column-major runs) of the same mask, as COCO writes iscrowd groups
    flat = crowd.flatten(order="F").astype(np.uint8)
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]]))), prepend=0)
    data["annotations"] += [
        {"id": 6, "image_id": 1, "category_id": 1, "segmentation": {"size": [H, W], "counts": runs.tolist()},
         "iscrowd": 1, "area": int(crowd.sum())},
        {"id": 7, "image_id": 1, "category_id": 24, "segmentation": [], "iscrowd": 0, "area": 0},
        {"id": 8, "image_id": 42, "category_id": 24, "segmentation": DOG_POLYGON, "iscrowd": 0, "area": 50},
    ]  # fmt: skip
    path.write_text(json.dumps(data))
    gt = GroundTruth(path)
    assert gt.kind == "instances" and gt.categories == {c["id"]: c["name"] for c in CATEGORIES}
    assert list(gt.categories) == sorted(gt.categories)
    assert gt.left_out == {"no_segmentation": 1, "image_not_listed": 1} and gt.num_annotations == 6
    dog, person, crowd_mask = _decoded(gt.rles(1))
    assert np.array_equal(dog, polygon_mask()) and np.array_equal(person, box(0, 5, 10, 20))
    assert np.array_equal(crowd_mask, crowd) and gt.rles(1)[1] == rle.encode(box(0, 5, 10, 20)) != counts
    unions = gt.category_masks(1)
    assert set(unions) == {18, 1} and np.array_equal(rle.decode(unions[1]), box(0, 10, 10, 20))
    assert np.array_equal(rle.decode(gt.category_masks(2)[18]), box(0, 10, 0, 10))  # two RLE halves
    assert gt.category_masks(3) == {} and gt.annotations(3) == [] and gt.rles(3) == []


def test_masks_agree_with_pycocotools_on_the_bundled_sample(sample):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(sample / "instances.json"))
    gt = GroundTruth(sample / "instances.json")
    checked = 0
    for image_id in gt.images:
        expected = [coco.annToMask(a).astype(bool) for a in coco.imgToAnns.get(image_id, [])]
        assert len(expected) == len(gt.annotations(image_id))
        for ours, theirs in zip(_decoded(gt.rles(image_id)), expected, strict=True):
            assert np.array_equal(ours, theirs)
            checked += 1
    assert checked == len(coco.anns) > 0


def test_select_counts_what_it_leaves_out(tmp_path):
    path = write_gt(tmp_path / "gt.json")
    data = json.loads(path.read_text())
    for a in data["annotations"]:
        a["area"] = 50
    data["annotations"][1]["iscrowd"] = 1  # image 1's person
    data["annotations"][2]["area"] = 3  # image 2's first dog half
    path.write_text(json.dumps(data))
    gt = GroundTruth(path)
    sel = gt.select(min_area=4)
    assert sel.skipped == {"crowd": 1, "tiny": 1, "missing_image": 0} and sel.annotations == 3
    assert list(sel.by_image) == [1, 2] and [a["id"] for a in sel.by_image[2]] == [4, 5]
    assert np.array_equal(sel.masks(2)[0], box(5, 10, 0, 10)) and sel.masks(2).shape == (2, H, W)
    assert gt.select(include_crowd=True).annotations == 5
    assert list(gt.select(limit=1).by_image) == [1]
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "images" / "2.png")
    sel = gt.select(images_root=tmp_path / "images")
    assert sel.missing_images == ["1.png"] and sel.skipped["missing_image"] == 2 and list(sel.by_image) == [2]
    assert sel.image_path(2) == tmp_path / "images" / "2.png"


def test_panoptic_segments_from_the_png(tmp_path):
    ids = np.zeros((H, W, 3), dtype=np.uint8)
    ids[0:10, 0:10] = (1, 0, 0)  # segment 1
    ids[0:5, 10:20] = (2, 1, 0)  # segment 2 + 256 = 258
    ids[5:10, 10:20] = (3, 0, 0)  # segment 3, same category as 1
    (tmp_path / "panoptic").mkdir()
    Image.fromarray(ids).save(tmp_path / "panoptic" / "2.png")
    segments = [
        {"id": 1, "category_id": 18, "iscrowd": 0, "area": 100},
        {"id": 258, "category_id": 17, "iscrowd": 1, "area": 50},
        {"id": 3, "category_id": 18, "iscrowd": 0, "area": 50},
    ]
    data = {
        "images": [{"id": 2, "file_name": "2.jpg", "width": W, "height": H}],
        "categories": CATEGORIES,
        "annotations": [{"image_id": 2, "file_name": "2.png", "segments_info": segments}],
    }
    (tmp_path / "panoptic.json").write_text(json.dumps(data))
    gt = GroundTruth(tmp_path / "panoptic.json")
    assert gt.kind == "panoptic" and gt.num_annotations == 3
    assert [m.sum() for m in _decoded(gt.rles(2))] == [100, 50, 50]
    unions = gt.category_masks(2)
    assert np.array_equal(rle.decode(unions[18]), box(0, 10, 0, 10) | box(5, 10, 10, 20))
    assert np.array_equal(rle.decode(unions[17]), box(0, 5, 10, 20))
    sel = gt.select()
    assert sel.skipped["crowd"] == 1 and [s["id"] for s in sel.by_image[2]] == [1, 3]
    (tmp_path / "panoptic" / "2.png").unlink()
    with pytest.raises(GroundTruthError, match="panoptic PNG .*2.png not found"):
        GroundTruth(tmp_path / "panoptic.json").category_masks(2)


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(GroundTruthError, match="not found") as err:
        GroundTruth(tmp_path / "nope.json")
    assert isinstance(err.value.__cause__, FileNotFoundError)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GroundTruthError, match="not readable JSON"):
        GroundTruth(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(GroundTruthError, match="not COCO annotations") as err:
        GroundTruth(tmp_path / "list.json")
    assert "\n" not in str(err.value) and isinstance(err.value.__cause__, KeyError)
    path = write_gt(tmp_path / "gt.json")
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"] = {"counts": "abc"}  # no size
    path.write_text(json.dumps(data))
    with pytest.raises(GroundTruthError, match="image 1: not a COCO RLE"):
        GroundTruth(path).category_masks(1)


def test_rle_union_and_segmentation_errors():
    a, b = rle.encode(box(0, 5, 0, 5)), rle.encode(box(3, 8, 3, 8))
    assert rle.area(rle.union([a, b])) == 25 + 25 - 4
    assert rle.union([a]) == a
    with pytest.raises(rle.RLEError):
        rle.union([])
    with pytest.raises(rle.RLEError, match="empty polygon"):
        rle.from_segmentation([], H, W)
    assert rle.from_segmentation(a, H, W) == a

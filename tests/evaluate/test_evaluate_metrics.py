"""evaluate/metrics.py and evaluate/labels.py: scores equal an independent per-class computation on constructed
maps (perfect, shifted, ignore pixels predicted as anything, classes absent from the ground truth, uint16 maps with
65535 written and read back as files, uncovered pixels); label maps and class lists, bad values named."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ovseg_mine.evaluate.labels import (
    LabelError,
    from_train_ids,
    read_classes,
    read_label_map,
    to_train_ids,
    write_label_map,
)
from ovseg_mine.evaluate.metrics import ConfusionMatrix, scores


def independent(preds, gts, k):
    """detectron2's definitions computed class by class with boolean masks (no confusion matrix): gt == k is
    ignored; a prediction of k (no class) is a miss."""
    tp, pos_gt, pos_pred = np.zeros(k), np.zeros(k), np.zeros(k)
    for pred, gt in zip(preds, gts, strict=True):
        valid = gt != k
        for c in range(k):
            tp[c] += np.sum((pred == c) & (gt == c))
            pos_gt[c] += np.sum(gt == c)
            pos_pred[c] += np.sum((pred == c) & valid)
    has = pos_gt > 0
    iou = [tp[c] / (pos_gt[c] + pos_pred[c] - tp[c]) for c in range(k) if has[c]]
    acc = [tp[c] / pos_gt[c] for c in range(k) if has[c]]
    w = pos_gt[has] / pos_gt.sum()
    return {
        "mIoU": 100 * np.mean(iou),
        "mACC": 100 * np.mean(acc),
        "fwIoU": 100 * float(np.sum(np.array(iou) * w)),
        "pACC": 100 * tp.sum() / pos_gt.sum(),
        "IoU": {c: (100 * tp[c] / (pos_gt[c] + pos_pred[c] - tp[c]) if has[c] else None) for c in range(k)},
    }


def check(preds, gts, k):
    names = [f"c{i}" for i in range(k)]
    cm = ConfusionMatrix(k)
    for p, g in zip(preds, gts, strict=True):
        cm.update(p, g)
    got, want = scores(cm.matrix, names), independent(preds, gts, k)
    for key in ("mIoU", "mACC", "fwIoU", "pACC"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    for c in range(k):
        if want["IoU"][c] is None:
            assert got["IoU"][names[c]] is None
        else:
            assert got["IoU"][names[c]] == pytest.approx(want["IoU"][c], abs=1e-9)
    return got


@pytest.fixture()
def maps():
    rng = np.random.default_rng(0)
    gt = np.repeat(np.arange(4), 16).reshape(8, 8)  # 4 classes in horizontal bands, 16 pixels each
    gt2 = rng.integers(0, 4, size=(6, 10))
    return rng, [gt, gt2]


def test_perfect_prediction_scores_100(maps):
    _, gts = maps
    got = check([g.copy() for g in gts], gts, 5)  # class 4 never appears: no score for it
    assert got["mIoU"] == got["pACC"] == got["mACC"] == got["fwIoU"] == 100.0
    assert got["IoU"]["c4"] is None and got["classes_with_gt"] == 4


def test_shifted_prediction(maps):
    _, gts = maps
    preds = [np.roll(g, 1, axis=0) for g in gts]
    got = check(preds, gts, 4)
    assert 0 < got["mIoU"] < 100
    # the band map rolled down one row: each 2-row band keeps one row and gets the previous band's on the other
    band = ConfusionMatrix(4)
    band.update(preds[0], gts[0])
    assert band.matrix[3, 0] == 8 and band.matrix[0, 0] == 8 and band.matrix[0, 1] == 8


def test_ignore_pixels_predicted_as_anything_do_not_count(maps):
    rng, gts = maps
    k = 4
    base = [g.copy() for g in gts]
    ignored = [g.copy() for g in gts]
    for g in ignored:
        g[rng.random(g.shape) < 0.3] = k
    preds = [np.where(g == k, rng.integers(0, k + 1, size=g.shape), g) for g in ignored]
    got = check(preds, ignored, k)
    assert got["mIoU"] == 100.0 and got["pixels"] == sum(int((g != k).sum()) for g in ignored)
    assert base[0].size > got["pixels"] / 2


def test_classes_absent_from_gt_get_no_score_but_their_false_positives_count(maps):
    _, gts = maps
    gt = gts[0] % 2  # classes 0 and 1 only
    pred = gt.copy()
    pred[0, :4] = 3  # class 3: absent from the ground truth, predicted on 4 pixels of class 0
    got = check([pred], [gt], 4)
    assert got["IoU"]["c3"] is None and got["IoU"]["c2"] is None
    assert got["IoU"]["c0"] == pytest.approx(100 * 28 / 32) and got["mIoU"] == pytest.approx((100 * 28 / 32 + 100) / 2)


def test_uncovered_pixels_are_misses(maps):
    _, gts = maps
    pred = gts[0].copy()
    pred[:2] = 4  # no class on the whole first band (16 pixels of class 0)
    got = check([pred], [gts[0]], 4)
    assert got["IoU"]["c0"] == 0.0 and got["pACC"] == 75.0 and got["no_class_pixels"] == 16


def test_uint16_maps_with_65535_round_trip_through_files(tmp_path):
    rng = np.random.default_rng(1)
    k = 847
    raw_gt = rng.integers(0, k, size=(20, 30)).astype(np.uint16)
    raw_gt[:3] = 65535
    raw_pred = raw_gt.copy()
    raw_pred[5:9, 4:20] = rng.integers(0, k, size=(4, 16))
    raw_pred[10, :] = 65535  # no class
    write_label_map(tmp_path / "gt.png", raw_gt)
    Image.fromarray(raw_pred).save(tmp_path / "pred.tif")
    gt_back, pred_back = read_label_map(tmp_path / "gt.png"), read_label_map(tmp_path / "pred.tif")
    assert gt_back.dtype == np.uint16 and np.array_equal(gt_back, raw_gt) and np.array_equal(pred_back, raw_pred)
    gt = to_train_ids(gt_back, k, ignore_label=65535)
    pred = to_train_ids(pred_back, k, ignore_label=65535)
    assert (gt == k).sum() == 90 and (pred[10] == k).all()
    got = check([pred], [gt], k)
    assert 0 < got["pACC"] < 100
    assert np.array_equal(to_train_ids(from_train_ids(pred, k, ignore_label=65535), k, ignore_label=65535), pred)


def test_seen_unseen_and_hiou():
    gt = np.array([[0, 0, 1, 1], [2, 2, 3, 3]])
    pred = np.array([[0, 0, 1, 0], [2, 3, 3, 3]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    got = scores(cm.matrix, ["a", "b", "c", "d"], seen=[0, 1])
    iou = {"a": 2 / 3, "b": 1 / 2, "c": 1 / 2, "d": 2 / 3}
    seen, unseen = 100 * (iou["a"] + iou["b"]) / 2, 100 * (iou["c"] + iou["d"]) / 2
    assert got["mIoU-seen"] == pytest.approx(seen) and got["mIoU-unseen"] == pytest.approx(unseen)
    assert got["hIoU"] == pytest.approx(2 * seen * unseen / (seen + unseen))


def test_reduce_zero_label_and_out_of_range_values():
    raw = np.array([[0, 1, 150], [255, 2, 3]], dtype=np.uint8)
    ids = to_train_ids(raw, 150, reduce_zero_label=True)
    assert ids.tolist() == [[150, 0, 149], [150, 1, 2]]
    assert np.array_equal(from_train_ids(ids, 150, reduce_zero_label=True), np.where(raw == 255, 0, raw))
    with pytest.raises(LabelError, match=r"a\.png: label value 151 is outside the 150 classes"):
        to_train_ids(np.array([[151]], np.uint8), 150, reduce_zero_label=True, path="a.png")
    with pytest.raises(LabelError, match="label value 7 "):
        to_train_ids(np.array([[7, 255]], np.uint8), 5, path="b.png")
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(3).update(np.array([[5]]), np.array([[0]]))


def test_class_lists(tmp_path):
    good = tmp_path / "classes.txt"
    good.write_text("# ADE-like\nwall\nbuilding;edifice\n\nsky\n")
    classes = read_classes(good)
    assert classes.names == ("wall", "building", "sky") and classes.synonyms[1] == ("building", "edifice")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(LabelError, match="has no class"):
        read_classes(empty)
    dup = tmp_path / "dup.txt"
    dup.write_text("wall\nsky\nwall;partition\n")
    with pytest.raises(LabelError, match=r"'wall' is given twice \(lines 1 and 3\)"):
        read_classes(dup)
    with pytest.raises(LabelError, match="cannot be read"):
        read_classes(tmp_path / "missing.txt")
    from ovseg_mine.evaluate.benchmarks import BENCHMARKS, bundled_classes

    ade = read_classes(bundled_classes(BENCHMARKS["ade150"]))
    assert len(ade) == 150 and ade.names[:3] == ("wall", "building", "sky") and ade.names[58] == "screen door"

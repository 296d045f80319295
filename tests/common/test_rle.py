"""COCO RLE through pycocotools, and run lengths taken on the device (one host sync for many masks)."""

import numpy as np
import pytest
import torch

from ovseg_mine import rle


def test_encode_decode_area_bbox_round_trip():
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:4, 2:6] = True
    enc = rle.encode(mask)
    assert enc["size"] == [5, 7] and isinstance(enc["counts"], str)
    assert np.array_equal(rle.decode(enc), mask)
    assert rle.area(enc) == 12 and rle.bbox(enc) == [2.0, 1.0, 4.0, 3.0]


def test_device_runs_give_the_same_rle_as_pycocotools():
    rng = np.random.default_rng(0)
    first = torch.from_numpy(rng.random((4, 13, 9)) > 0.5)
    first[1] = True  # a mask that starts with a set pixel: its runs start with 0
    first[2] = False
    second = torch.from_numpy(rng.random((2, 6, 11)) > 0.2)
    none = torch.zeros((0, 3, 3), dtype=torch.bool)
    runs = rle.mask_runs([first, none, second])
    assert [len(r) for r in runs] == [4, 0, 2]
    for masks, image_runs in zip([first, none, second], runs, strict=True):
        for mask, counts in zip(masks.numpy(), image_runs, strict=True):
            assert counts.dtype == np.uint32 and counts.sum() == mask.size
            assert rle.from_runs(counts, *mask.shape) == rle.encode(mask)
    assert list(runs[0][1][:2]) == [0, 13 * 9] and list(runs[0][2]) == [13 * 9]
    assert rle.mask_runs([none]) == [[]]


def test_runs_that_do_not_cover_the_mask_are_refused():
    with pytest.raises(rle.RLEError, match="cover 5 pixels"):
        rle.from_runs([2, 3], 2, 3)


def test_counts_of_the_compressed_string_and_their_decode_on_the_device_give_the_mask():
    rng = np.random.default_rng(1)
    masks = np.stack([rng.random((17, 23)) < p for p in (0.0, 0.05, 0.5, 0.95, 1.0)])
    big = np.zeros((1500, 2100), dtype=bool)
    big[3:1490, 700:2099] = True  # runs far above 2**5: several characters each, and negative differences
    for mask in [*masks, big]:
        enc = rle.encode(mask)
        counts = rle.counts_of(enc)
        assert counts.sum() == mask.size and rle.from_runs(counts, *mask.shape)["counts"] == enc["counts"]
        assert np.array_equal(rle.counts_of({"size": enc["size"], "counts": counts.tolist()}), counts)
    runs = [rle.counts_of(rle.encode(mask)) for mask in masks]
    padded = torch.zeros((len(masks), max(len(r) for r in runs) + 3), dtype=torch.int64)  # zero padding is a no-op
    for row, counts in zip(padded, runs, strict=True):
        row[: len(counts)] = torch.from_numpy(counts)
    assert np.array_equal(rle.masks_from_counts(padded, 17, 23).numpy(), masks)
    assert np.array_equal(rle.masks_from_counts(padded[[3, 1]], 17, 23).numpy(), masks[[3, 1]])
    with pytest.raises(rle.RLEError, match="cover 390 pixels, expected 17x23 = 391"):
        rle.counts_of({"size": [17, 23], "counts": [390]})

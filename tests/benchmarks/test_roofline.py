"""benchmarks/roofline.py on a case computed by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from roofline import H100_SXM, H200_SXM, estimate, op_seconds  # noqa: E402
from traffic import OpRecord  # noqa: E402

RECORDS = [
    # compute bound: 1e12 / (989.4e12 * 0.6) = 1.68452 ms > 1e9 / (3.35e12 * 0.6) = 0.49751 ms
    OpRecord("aten.mm", "decoder", 10**9, 10**12, torch.bfloat16, 10**9),
    # memory bound: 3.35e9 / (3.35e12 * 0.6) = 1.66667 ms
    OpRecord("aten.add", "selection", 335 * 10**7, 0, torch.float32, 335 * 10**7),
]


def test_op_seconds_is_the_slower_roof():
    assert op_seconds(1e12, 1e9, 1e12, 1e12, eff=0.5) == pytest.approx(2.0)
    assert op_seconds(1e9, 1e12, 1e12, 1e12, eff=0.5) == pytest.approx(2.0)


def test_h100_by_hand():
    out = estimate(RECORDS, H100_SXM, images=1)
    assert out["ms_per_image_by_part"]["decoder"] == pytest.approx(1.684524, rel=1e-6)
    assert out["ms_per_image_by_part"]["selection"] == pytest.approx(1.666667, rel=1e-6)
    assert out["ms_per_image"] == pytest.approx(3.351190, rel=1e-6)
    assert out["images_per_s"] == pytest.approx(1000 / 3.351190, rel=1e-6)
    assert out["memory_bound_share"] == pytest.approx(1.666667 / 3.351190, rel=1e-6)


def test_h200_has_more_bandwidth_and_images_share_the_time():
    out = estimate(RECORDS, H200_SXM, images=2)
    # the add: 3.35e9 / (4.8e12 * 0.6) = 1.163194 ms; the mm is unchanged; two images share both
    assert out["ms_per_image"] == pytest.approx((1.684524 + 1.163194) / 2, rel=1e-6)


def test_float32_matmuls_use_the_fp32_or_tf32_peak():
    record = [OpRecord("aten.mm", "clip", 0, 10**12, torch.float32, 0)]
    assert estimate(record, H100_SXM, images=1)["ms_per_image"] == pytest.approx(24.912805, rel=1e-6)  # 66.9 TFLOP/s
    assert estimate(record, H100_SXM, images=1, tf32=True)["ms_per_image"] == pytest.approx(3.369045, rel=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="eff"):
        estimate(RECORDS, H100_SXM, images=1, eff=0)
    with pytest.raises(ValueError, match="images"):
        estimate(RECORDS, H100_SXM, images=0)

"""The fused selection (ovseg_mine.mine.algorithms.fused_amg) against the stock one (amg.select_masks with SAM's own
``postprocess_masks``), on real images: the tiny SAM's decoder logits (random weights give logits of about 0.06, so
they are scaled by 100 to have masks whose stability scores spread over [0, 1]) and logits made from the image
itself (its grey levels near a grid point, at the decoder's resolution: masks that follow the image's edges, with
boxes of every size, so that NMS has work to do).

Tolerance: the fused path computes the same full-resolution logits up to float32 rounding (one product of two
matrices instead of two rounded resizes), so a pixel whose logit is within ~1e-5 of a threshold can flip. The
tests allow at most 0.01 % of a kept mask's pixels to differ, stability scores to differ by 1e-3, areas by 0.01 %
and boxes by one pixel, and the kept set and its order to be the same (no candidate of these images sits that
close to a threshold; on other data a rare one may)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovseg_mine.config import SamConfig
from ovseg_mine.mine.algorithms.amg import select_masks
from ovseg_mine.mine.algorithms.fused_amg import (
    DecodedImage,
    fused_chunk,
    postprocess_operator,
    select_masks_fused,
    selection_chunk,
)
from ovseg_mine.models import load_sam

CFG = SamConfig(pred_iou_thresh=0.3, stability_score_thresh=0.4, box_nms_thresh=0.7, max_masks_per_image=20)


def _image_logits(image: np.ndarray, batched, n: int, low: int) -> torch.Tensor:
    """``n`` logits ``[n, low, low]`` from the image: grey level minus a level, times a bump around a point, in the
    decoder's frame (the image resized for the encoder, padded, at ``low`` x ``low``)."""
    h, w = batched.input_size(image.shape[:2])
    grey = torch.from_numpy(image.copy()).float().mean(dim=2)[None, None]
    frame = torch.zeros((1, 1, batched.img_size, batched.img_size))
    frame[..., :h, :w] = F.interpolate(grey, (h, w), mode="bilinear", align_corners=False)
    frame = F.avg_pool2d(frame, batched.img_size // low)[0, 0]  # [low, low]
    rng = np.random.default_rng(0)
    yy, xx = torch.meshgrid(torch.arange(low), torch.arange(low), indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0, low * h / batched.img_size), rng.uniform(0, low * w / batched.img_size)
        radius, level = rng.uniform(3, low / 2), rng.uniform(60, 200)
        bump = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        out.append((frame - level).sign() * bump * 8.0 - 2.0 * (1 - bump))
    return torch.stack(out)


@pytest.fixture(scope="module")
def decoded(sample):
    """Three sample images of three sizes: (image, size, low-res logits, predicted IoU, stock upsample, operator)."""
    from ovseg_mine.mine.algorithms.sam_batch import BatchedSam

    sam, _ = load_sam("tiny", "random", seed=0)
    batched = BatchedSam(sam, points_per_side=3, points_per_batch=9)
    paths = sorted((sample / "images").glob("*.jpg"))
    out = []
    with torch.inference_mode():
        for k in (0, 3, 4):  # 640x426, 612x612, 480x640
            image = np.asarray(Image.open(paths[k]).convert("RGB"))
            size = image.shape[:2]
            features = batched.embed([torch.from_numpy(batched.resize(image)).permute(2, 0, 1)])
            low, _ = batched.decode(features, size)
            low = torch.cat([low * 100.0, _image_logits(image, batched, 36, low.shape[-1])])
            iou = torch.from_numpy(np.random.default_rng(k).uniform(0, 1, len(low)).astype(np.float32))
            input_size = batched.input_size(size)

            def upsample(x, input_size=input_size, size=size):
                return sam.postprocess_masks(x[:, None], input_size, size)[:, 0]

            op = postprocess_operator(tuple(low.shape[1:]), input_size, size, batched.img_size, torch.device("cpu"))
            out.append((image, size, low, iou, upsample, op))
    return out


def _same_sets(stock, fused) -> None:
    assert len(fused) == len(stock) and fused.num_generated == stock.num_generated
    assert torch.equal(fused.predicted_iou, stock.predicted_iou)  # the same masks, in the same order
    assert torch.equal(fused.valid, stock.valid)
    torch.testing.assert_close(fused.stability_score, stock.stability_score, atol=1e-3, rtol=0, equal_nan=True)
    h, w = stock.size
    assert (fused.areas - stock.areas).abs().max() <= max(1, h * w // 10_000)
    assert (fused.boxes - stock.boxes).abs().max() <= 1
    index = torch.arange(len(stock))
    differ = (fused.masks(index) != stock.masks(index)).sum(dim=(1, 2))
    assert differ.max() <= h * w // 10_000


def test_the_operator_is_sams_postprocess(decoded):
    for _, size, low, _, upsample, op in decoded:
        stock, fused = upsample(low[::4]), op.upsample(low[::4])
        assert fused.shape == stock.shape == (len(low[::4]), *size)
        torch.testing.assert_close(fused, stock, atol=1e-4, rtol=1e-5)
        assert ((fused > 0) != (stock > 0)).float().mean() < 1e-5


def test_selection_chunk_equals_the_stock_statistics(decoded):
    from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score

    _, _, low, _, upsample, op = decoded[1]
    stability, areas, boxes = selection_chunk(low[:16], op.ay, op.ax, 0.0)
    full = upsample(low[:16])
    torch.testing.assert_close(stability, calculate_stability_score(full, 0.0, 1.0), atol=1e-3, rtol=0)
    assert (areas - (full > 0).sum(dim=(1, 2))).abs().max() <= 40
    assert (boxes - batched_mask_to_box(full > 0)).abs().max() <= 1


@pytest.mark.parametrize("cfg", [CFG, SamConfig(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.5)])
def test_fused_selection_keeps_the_stock_masks(decoded, cfg):
    for _, size, low, iou, upsample, op in decoded:
        stock = select_masks(low, iou, cfg=cfg, size=size, upsample=upsample, mask_threshold=0.0, chunk=32)
        [fused] = select_masks_fused([DecodedImage(low, iou, op)], cfg=cfg, mask_threshold=0.0, chunk_bytes=2**26)
        assert len(stock) > 5
        _same_sets(stock, fused)


def test_several_images_give_what_each_gives_alone(decoded):
    images = [DecodedImage(low, iou, op) for _, _, low, iou, _, op in decoded]
    together = select_masks_fused(images, cfg=CFG, mask_threshold=0.0, chunk_bytes=2**26)
    for image, got in zip(images, together, strict=True):
        [alone] = select_masks_fused([image], cfg=CFG, mask_threshold=0.0, chunk_bytes=2**24)  # other chunks too
        assert got.size == alone.size and got.num_generated == alone.num_generated
        for name in ("low_res", "predicted_iou", "stability_score", "boxes", "areas", "valid"):
            assert torch.equal(getattr(got, name), getattr(alone, name)), name
    assert select_masks_fused([], cfg=CFG, mask_threshold=0.0, chunk_bytes=1) == []
    strict = SamConfig(pred_iou_thresh=0.999, stability_score_thresh=0.4)  # an image without a survivor
    assert [len(s) for s in select_masks_fused(images, cfg=strict, mask_threshold=0.0, chunk_bytes=2**26)] == [0] * 3


def test_fused_chunk_is_a_power_of_two_within_budget():
    chunk = fused_chunk((480, 640), (256, 256), 2 * 2**30)
    assert chunk & (chunk - 1) == 0 and 256 <= chunk <= 2 * 2**30 // (8 * 480 * 640)
    assert fused_chunk((8000, 8000), (256, 256), 2**20) == 1
    with pytest.raises(ValueError, match="min_mask_region_area"):
        select_masks_fused([], cfg=SamConfig(min_mask_region_area=10), mask_threshold=0.0, chunk_bytes=1)


def test_the_chunk_bodies_have_no_graph_break(decoded):
    from ovseg_mine.crops import device_constant, render_crops_from_logits

    _, _, low, _, _, op = decoded[0]
    explained = torch._dynamo.explain(selection_chunk)(low[:4], op.ay, op.ax, 0.0)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    image = torch.zeros((3, *op.size), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 5, 7], [3, 4, 100, 50]])
    fill = device_constant([1.0, 2.0, 3.0], torch.device("cpu"), torch.float32)
    explained = torch._dynamo.explain(render_crops_from_logits)(
        image, low[:2], op.ay, op.ax, boxes, size=8, fill=fill, mask_threshold=0.0
    )
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_the_band_is_the_matrix_and_the_banded_resample_the_product(decoded):
    from ovseg_mine.banded import band, banded_resample
    from ovseg_mine.mine.algorithms.fused_amg import upsample_logits

    _, _, low, _, _, op = decoded[2]
    for matrix in (op.ay, op.ax):
        index, weight = band(matrix)
        dense = torch.zeros_like(matrix).scatter_add_(1, index, weight)
        assert torch.equal(dense, matrix)  # every non-zero entry lies in the band of 3
    banded = banded_resample(low[:4], band(op.ay), band(op.ax))
    torch.testing.assert_close(banded, upsample_logits(low[:4], op.ay, op.ax).permute(1, 0, 2), atol=1e-4, rtol=1e-5)


def test_the_banded_taps_are_the_banded_resample_in_both_layouts(decoded):
    """The one-pass form of the compiled selection body sums in banded_resample's order: the same float32 values,
    row-major and transposed."""
    from ovseg_mine.banded import band, banded_resample, banded_taps

    _, _, low, _, _, op = decoded[2]
    rows, cols = band(op.ay), band(op.ax)
    resampled = banded_resample(low[:3], rows, cols)
    torch.testing.assert_close(banded_taps(low[:3], rows, cols), resampled, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        banded_taps(low[:3], rows, cols, transposed=True), resampled.transpose(1, 2), atol=1e-6, rtol=0
    )


def test_traced_crops_take_the_banded_path_and_agree(decoded):
    """Under torch.compile the crop body evaluates the mask from the bands (fused by Inductor); run through Dynamo
    with the eager backend, it renders what the eager body renders."""
    from ovseg_mine.crops import device_constant, render_crops_from_logits

    image, _, low, _, _, op = decoded[0]
    image = torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()
    boxes = torch.tensor([[0, 0, 640, 426], [100, 50, 20, 9], [600, 400, 40, 26]])
    fill = device_constant([1.0, 2.0, 3.0], torch.device("cpu"), torch.float32)
    args = (image, low[:3], op.ay, op.ax, boxes)
    eager = render_crops_from_logits(*args, size=16, fill=fill)
    traced = torch.compile(render_crops_from_logits, backend="eager", fullgraph=True)(*args, size=16, fill=fill)
    torch.testing.assert_close(traced, eager, atol=1e-3, rtol=0)


def test_the_traced_selection_chunk_takes_the_banded_form_and_agrees(decoded):
    """Under torch.compile the selection body counts from the bands (one int8 map of thresholds passed); run
    through Dynamo with the eager backend, its statistics agree with the eager body's up to rounding."""
    _, _, low, _, _, op = decoded[1]
    eager = selection_chunk(low[:8], op.ay, op.ax, 0.0)
    traced = torch.compile(selection_chunk, backend="eager", fullgraph=True)(low[:8], op.ay, op.ax, 0.0)
    torch.testing.assert_close(traced[0], eager[0], atol=1e-3, rtol=0, equal_nan=True)
    assert (traced[1] - eager[1]).abs().max() <= 40 and (traced[2] - eager[2]).abs().max() <= 1

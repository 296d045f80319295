import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_mine import rle
from ovseg_mine.crops import mask_bboxes, normalize, render_masked_crops

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
FILL = [255.0 * m for m in MEAN]


def test_mask_bboxes_match_pycocotools():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 30, 40), dtype=bool)
    masks[0, 5:9, 10:21] = True
    masks[1, 0:30, 39] = True
    masks[2] = rng.random((30, 40)) > 0.7
    boxes = mask_bboxes(torch.from_numpy(masks)).tolist()
    for mask, box in zip(masks, boxes, strict=True):
        assert box == [int(v) for v in rle.bbox(rle.encode(mask))]
    assert boxes[0] == [10, 5, 11, 4]
    assert boxes[3] == [0, 0, 0, 0]  # empty mask


def test_crop_box_fill_and_size_are_exact():
    # A 2-colour image; the mask covers a 4x6 (h x w) block and one extra pixel that widens the box.
    image = torch.zeros((3, 20, 30), dtype=torch.uint8)
    image[0] = 200
    image[1, :, 15:] = 100
    mask = torch.zeros((1, 20, 30), dtype=torch.bool)
    mask[0, 4:8, 10:16] = True
    mask[0, 9, 12] = True
    boxes = mask_bboxes(mask)
    assert boxes.tolist() == [[10, 4, 6, 6]]
    crops = render_masked_crops(image, mask, boxes, size=6, fill=FILL)
    assert crops.shape == (1, 3, 6, 6) and crops.dtype == torch.float32
    # size equals the box: bicubic resize to the same size is the identity, so values are exact
    expected = image[:, 4:10, 10:16].float().clone()
    keep = mask[0, 4:10, 10:16]
    for c in range(3):
        expected[c][~keep] = FILL[c]
    torch.testing.assert_close(crops[0], expected)
    assert crops[0, 0, 5, 0].item() == pytest.approx(FILL[0])  # background inside the box is the mean pixel
    assert crops[0, 0, 5, 2].item() == 200.0  # the extra foreground pixel


def test_crop_resize_is_bicubic_of_the_composited_box():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 256, (3, 50, 60), dtype=np.uint8))
    mask = torch.from_numpy(rng.random((1, 50, 60)) > 0.5)
    mask[0, :3] = False
    box = mask_bboxes(mask)
    x, y, w, h = box[0].tolist()
    crops = render_masked_crops(image, mask, box, size=16, fill=FILL)
    region = image[:, y : y + h, x : x + w].float()
    fill = torch.tensor(FILL).view(3, 1, 1)
    composited = torch.where(mask[:, y : y + h, x : x + w], region, fill)
    expected = F.interpolate(composited[None], size=(16, 16), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(crops[0], expected)


def test_background_normalizes_to_zero():
    crops = torch.tensor(FILL).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert normalize(crops, MEAN, STD).abs().max().item() < 1e-5


def test_bad_shapes_are_clear_errors():
    image = torch.zeros((3, 10, 10), dtype=torch.uint8)
    with pytest.raises(ValueError, match="masks must be"):
        render_masked_crops(image, torch.zeros((1, 5, 5), dtype=torch.bool), torch.zeros((1, 4)), size=4, fill=FILL)
    empty = torch.zeros((1, 10, 10), dtype=torch.bool)
    with pytest.raises(ValueError, match="empty box"):
        render_masked_crops(image, empty, mask_bboxes(empty), size=4, fill=FILL)


def test_batched_crops_equal_the_per_mask_loop(sample):
    """One gather op for all masks renders the pixels F.interpolate renders per mask (to float32 rounding): boxes
    larger and smaller than the output (down- and up-sampling), a one-pixel mask, a mask on the image border."""
    from PIL import Image

    from ovseg_mine.crops import render_masked_crops_batched

    path = sorted((sample / "images").glob("*.jpg"))[0]
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()
    h, w = image.shape[1:]
    rng = np.random.default_rng(0)
    masks = torch.zeros((6, h, w), dtype=torch.bool)
    masks[0, 10:200, 30:400] = torch.from_numpy(rng.random((190, 370)) > 0.3)
    masks[1, 5:12, 7:20] = True  # smaller than the output: upsampling
    masks[2, 50, 60] = True  # one pixel
    masks[3, :, w - 3 :] = True  # the right border, full height
    masks[4] = torch.from_numpy(rng.random((h, w)) > 0.5)
    masks[5, h - 40 :, :25] = True
    boxes = mask_bboxes(masks)
    loop = render_masked_crops(image, masks, boxes, size=32, fill=FILL)
    batched = render_masked_crops_batched(image, masks, boxes, size=32, fill=FILL)
    assert batched.shape == loop.shape == (6, 3, 32, 32) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, loop, atol=5e-3, rtol=0)
    # an empty mask's box renders without error (engines flag empty masks instead of checking on the host)
    nothing = torch.zeros((1, 4), dtype=torch.int64)
    empty = render_masked_crops_batched(image, masks[:1] & False, nothing, size=8, fill=FILL)
    assert empty.shape == (1, 3, 8, 8) and torch.isfinite(empty).all()


def test_crops_from_logits_equal_the_batched_crops_of_the_upsampled_masks(sample):
    """Crops rendered straight from low-resolution logits (mask evaluated at the bicubic taps through SAM's
    upsampling as two matrices) equal the gather-op crops of the full-resolution masks: with the same matrices up to
    float32 rounding of the 16-tap sum; against SAM's own postprocess_masks, up to the few pixels whose logit is
    within rounding of 0 (none in this image)."""
    from PIL import Image
    from segment_anything.utils.transforms import ResizeLongestSide

    from ovseg_mine.crops import device_constant, render_crops_from_logits, render_masked_crops_batched
    from ovseg_mine.mine.algorithms.fused_amg import postprocess_operator

    path = sorted((sample / "images").glob("*.jpg"))[1]
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()
    h, w = image.shape[1:]
    input_size = ResizeLongestSide.get_preprocess_shape(h, w, 256)
    op = postprocess_operator((64, 64), input_size, (h, w), 256, torch.device("cpu"))
    low = torch.randn((5, 64, 64), generator=torch.Generator().manual_seed(0)) * 4 - 2
    low[1] = -5.0
    low[1, 30, 20] = 5.0  # a small mask: its box is smaller than the output (upsampling)
    low[2] = -5.0  # empty: its zero box renders without error
    masks = op.upsample(low) > 0
    boxes = mask_bboxes(masks)
    fill = device_constant(FILL, image.device, torch.float32)
    fused = render_crops_from_logits(image, low, op.ay, op.ax, boxes, size=32, fill=fill)
    batched = render_masked_crops_batched(image, masks, boxes, size=32, fill=FILL)
    assert fused.shape == (5, 3, 32, 32) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, batched, atol=1e-3, rtol=0)
    stock = F.interpolate(low[:, None], (256, 256), mode="bilinear", align_corners=False)
    stock = F.interpolate(stock[..., : input_size[0], : input_size[1]], (h, w), mode="bilinear", align_corners=False)
    assert torch.equal(stock[:, 0] > 0, masks)
    assert device_constant(FILL, image.device, torch.float32) is fill  # made once
    mean, std = (device_constant(v, image.device, torch.float32) for v in (MEAN, STD))
    normalized = render_crops_from_logits(image, low, op.ay, op.ax, boxes, size=32, fill=fill, mean=mean, std=std)
    torch.testing.assert_close(normalized, normalize(fused, MEAN, STD), atol=1e-6, rtol=0)


def test_even_chunks():
    from ovseg_mine.crops import even_chunk

    assert even_chunk(100, 81) == 50 and even_chunk(100, 100) == 100 and even_chunk(100, 1000) == 100
    assert even_chunk(7, 2) == 2 and even_chunk(0, 5) == 1 and even_chunk(5, 0) == 1

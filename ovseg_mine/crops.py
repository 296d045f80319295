"""Masked-crop rendering, as OVSeg feeds mask proposals to CLIP.

Follows the OVSeg reference (facebookresearch/ov-seg, ``open_vocab_seg/modeling/clip_adapter/utils.py``,
``crop_with_mask`` and the adapter that resizes its output): for each mask, cut the image to the mask's
tight box (no expansion), replace every background pixel inside the box with a fill colour (CLIP's mean
pixel), and resize the crop to the CLIP input size with bicubic interpolation. All tensors stay on the
device they come in on; the mask itself is kept alongside (mask prompt tuning needs it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch

#: OVSeg's crop fill: 255 * OpenAI CLIP's per-channel mean (open_clip's OPENAI_DATASET_MEAN), RGB in [0, 255].
CLIP_MEAN_PIXEL: tuple[float, float, float] = (255.0 * 0.48145466, 255.0 * 0.4578275, 255.0 * 0.40821073)

#: Small constant tensors per (values, device, dtype), made once (a ``torch.tensor(list, device=cuda)`` is a
#: blocking host-to-device copy); cleared when full.
_CONSTANTS: dict[tuple, "torch.Tensor"] = {}


def device_constant(
    values: "Sequence[float] | torch.Tensor", device: "torch.device", dtype: "torch.dtype"
) -> "torch.Tensor":
    """``values`` as a 1-D tensor on ``device``, made once per process (later calls return the same tensor: do not
    write into it). A tensor is returned cast and moved (a no-op when it already is on ``device`` in ``dtype``)."""
    import torch

    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=dtype)
    key = (tuple(float(v) for v in values), str(device), dtype)
    if key not in _CONSTANTS:
        if len(_CONSTANTS) >= 64:
            _CONSTANTS.clear()
        with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
            _CONSTANTS[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return _CONSTANTS[key]


def even_chunk(total: int, fits: int) -> int:
    """The size of the fewest equal chunks of at most ``fits`` items that cover ``total`` items (at least 1): the
    fixed chunk of a compiled body that pads its last chunk, with the least padding."""
    total, fits = max(1, total), max(1, fits)
    chunks = -(-total // fits)
    return -(-total // chunks)


def mask_bboxes(masks: "torch.Tensor") -> "torch.Tensor":
    """Tight boxes of binary masks.

    Args:
        masks: bool ``[N, H, W]``.

    Returns:
        int64 ``[N, 4]`` boxes in XYWH pixels (x, y of the top-left pixel; w, h in pixels); an empty
        mask gives ``[0, 0, 0, 0]`` (the same convention as pycocotools ``toBbox``).
    """
    import torch

    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    n = masks.shape[0]
    boxes = torch.zeros((n, 4), dtype=torch.int64, device=masks.device)
    if n == 0:
        return boxes
    rows = masks.any(dim=2)  # [N, H]
    cols = masks.any(dim=1)  # [N, W]
    nonempty = rows.any(dim=1)
    h, w = masks.shape[1], masks.shape[2]
    row_idx = torch.arange(h, device=masks.device)
    col_idx = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, row_idx, h).amin(dim=1)
    y1 = torch.where(rows, row_idx, -1).amax(dim=1)
    x0 = torch.where(cols, col_idx, w).amin(dim=1)
    x1 = torch.where(cols, col_idx, -1).amax(dim=1)
    boxes[:, 0] = x0
    boxes[:, 1] = y0
    boxes[:, 2] = x1 - x0 + 1
    boxes[:, 3] = y1 - y0 + 1
    boxes[~nonempty] = 0
    return boxes


def render_masked_crops(
    image: "torch.Tensor",
    masks: "torch.Tensor",
    bboxes: "torch.Tensor",
    *,
    size: int,
    fill: "Sequence[float] | torch.Tensor",
) -> "torch.Tensor":
    """Render one masked crop per mask.

    Args:
        image: uint8 or float ``[3, H, W]`` RGB, pixel values in [0, 255].
        masks: bool ``[N, H, W]`` on the same device.
        bboxes: integer ``[N, 4]`` XYWH pixel boxes (usually :func:`mask_bboxes`); must be non-empty.
        size: output side in pixels (the CLIP input size, e.g. 224).
        fill: RGB background value in [0, 255] (OVSeg uses CLIP's mean pixel, 255 * mean); a list is made a device
            tensor once (:func:`device_constant`).

    Returns:
        float32 ``[N, 3, size, size]`` in the [0, 255] pixel scale (bicubic may overshoot slightly, as in
        the reference, which does not clamp). Normalize with :func:`normalize` before CLIP.

    Raises:
        ValueError: shapes that do not match, or a box with zero width or height.
    """
    import torch
    import torch.nn.functional as F

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got shape {tuple(image.shape)}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[1:]:
        raise ValueError(f"masks must be [N, {image.shape[1]}, {image.shape[2]}], got {tuple(masks.shape)}")
    if bboxes.shape != (masks.shape[0], 4):
        raise ValueError(f"bboxes must be [{masks.shape[0]}, 4], got {tuple(bboxes.shape)}")
    image_f = image.float()
    fill_t = device_constant(fill, image.device, torch.float32).view(3, 1, 1)
    out = torch.empty((masks.shape[0], 3, size, size), dtype=torch.float32, device=image.device)
    for i, (x, y, w, h) in enumerate(bboxes.tolist()):
        if w <= 0 or h <= 0:
            raise ValueError(f"mask {i} has an empty box {[x, y, w, h]}; drop empty masks before cropping")
        region = image_f[:, y : y + h, x : x + w]
        keep = masks[i, y : y + h, x : x + w].unsqueeze(0)
        crop = torch.where(keep, region, fill_t)
        out[i] = F.interpolate(crop.unsqueeze(0), size=(size, size), mode="bicubic", align_corners=False)[0]
    return out


def _cubic_taps(start: "torch.Tensor", length: "torch.Tensor", size: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Source pixels and weights of PyTorch's bicubic resize (``F.interpolate(mode="bicubic",
    align_corners=False)``: cubic convolution with A = -0.75, source index ``scale * (o + 0.5) - 0.5`` in float32,
    taps clamped to the border) from ``length`` pixels starting at ``start`` to ``size`` pixels, for N segments.

    Returns:
        int64 ``[N, size, 4]`` absolute pixel indices and float32 ``[N, size, 4]`` weights.
    """
    import torch

    a = -0.75
    scale = length.to(torch.float32) / size  # float32, as upsample_bicubic2d computes it
    out = torch.arange(size, dtype=torch.float32, device=length.device)
    src = scale[:, None] * (out + 0.5) - 0.5  # [N, size]
    first = src.floor()
    t = (src - first)[..., None]  # [N, size, 1]
    x = torch.cat([t + 1.0, t, 1.0 - t, 2.0 - t], dim=-1)  # distances to the 4 taps
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    inner = torch.arange(4, device=x.device) % 3 != 0  # taps 1 and 2 are within one pixel: [F, T, T, F]
    weights = torch.where(inner, near, far)
    taps = first.to(torch.int64)[..., None] + torch.arange(-1, 3, device=length.device)
    taps = torch.minimum(taps.clamp(min=0), (length - 1)[:, None, None])
    return taps + start[:, None, None], weights


def render_masked_crops_batched(
    image: "torch.Tensor",
    masks: "torch.Tensor",
    bboxes: "torch.Tensor",
    *,
    size: int,
    fill: "Sequence[float] | torch.Tensor",
) -> "torch.Tensor":
    """:func:`render_masked_crops` for all masks in one batched op (no per-mask loop, no host sync).

    Each output pixel is the sum of 16 taps of PyTorch's bicubic kernel (4 rows x 4 columns of the composited
    box, clamped to the box), gathered straight from the full image and the mask: the same pixels as
    ``F.interpolate(mode="bicubic", align_corners=False)`` of the composited box, up to float32 rounding
    (summation order). Memory: about ``16 * size**2 * 33`` bytes per mask (26 MB at 224); callers chunk.

    Args:
        image: uint8 or float ``[3, H, W]`` RGB in [0, 255].
        masks: bool ``[N, H, W]`` on the same device.
        bboxes: int64 ``[N, 4]`` XYWH boxes on the same device (a box with zero width or height renders a crop
            of its first pixel, so that empty masks flagged elsewhere need no host-side check).
        size: output side in pixels.
        fill: RGB background in [0, 255] (a list is made a device tensor once).

    Returns:
        float32 ``[N, 3, size, size]`` in the [0, 255] pixel scale.

    Raises:
        ValueError: shapes that do not match.
    """
    import torch

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got shape {tuple(image.shape)}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[1:]:
        raise ValueError(f"masks must be [N, {image.shape[1]}, {image.shape[2]}], got {tuple(masks.shape)}")
    if bboxes.shape != (masks.shape[0], 4):
        raise ValueError(f"bboxes must be [{masks.shape[0]}, 4], got {tuple(bboxes.shape)}")
    n, width = masks.shape[0], image.shape[2]
    boxes = bboxes.to(torch.int64)
    extent = boxes[:, 2:].clamp(min=1)
    # the rows' and the columns' taps in one call (each segment's taps depend on its own start and length only)
    taps, weights = _cubic_taps(boxes[:, :2].flip(1).T.reshape(-1), extent.flip(1).T.reshape(-1), size)  # [2N, S, 4]
    (rows, cols), (wy, wx) = taps.view(2, n, size, 4), weights.view(2, n, size, 4)
    flat = (rows[:, :, :, None, None] * width + cols[:, None, None, :, :]).view(n, -1)  # [N, S*4*S*4]
    keep = masks.reshape(n, -1).gather(1, flat)
    pixels = image.reshape(3, -1).index_select(1, flat.view(-1)).view(3, n, -1).float()
    values = torch.where(keep, pixels, device_constant(fill, image.device, torch.float32).view(3, 1, 1))
    return _bicubic_sum(values.view(3, n, size, 4, size, 4), wy, wx)


def _bicubic_sum(values: "torch.Tensor", wy: "torch.Tensor", wx: "torch.Tensor") -> "torch.Tensor":
    """Crops ``[N, 3, S, S]`` from the composited taps ``[3, N, S, 4, S, 4]`` (output row, row tap, output column,
    column tap) and the taps' weights ``[N, S, 4]`` per axis: along x first, as PyTorch's bicubic."""
    across = (values * wx[None, :, None, None, :, :]).sum(dim=-1)  # [3, N, S, 4, S]
    crops = (across * wy[None, :, :, :, None]).sum(dim=3)  # [3, N, S, S]
    return crops.permute(1, 0, 2, 3).contiguous()


def render_crops_from_logits(
    image: "torch.Tensor",
    low: "torch.Tensor",
    ay: "torch.Tensor",
    ax: "torch.Tensor",
    bboxes: "torch.Tensor",
    *,
    size: int,
    fill: "torch.Tensor",
    mask_threshold: float = 0.0,
    mean: "torch.Tensor | None" = None,
    std: "torch.Tensor | None" = None,
) -> "torch.Tensor":
    """:func:`render_masked_crops_batched` of masks given as low-resolution logits and a separable upsampling
    (``mask = Ay @ low @ Ax^T > mask_threshold``, e.g. ``Sam.postprocess_masks`` as
    :class:`~ovseg_mine.mine.algorithms.fused_amg.PostprocessOperator` matrices), without full-resolution masks: the
    mask is evaluated at the bicubic taps only, from the rows of ``Ay`` and ``Ax`` at the taps' rows and columns.
    A fixed-shape, sync-free chunk body (``torch.compile``-able without a graph break); the same pixels as
    :func:`render_masked_crops_batched` of the thresholded ``Ay @ low @ Ax^T`` up to float32 rounding.

    Args:
        image: uint8 or float ``[3, H, W]`` RGB in [0, 255].
        low: ``[N, h, w]`` mask logits (any float dtype).
        ay, ax: float32 ``[H, h]`` and ``[W, w]`` on the same device.
        bboxes: int64 ``[N, 4]`` XYWH boxes of the masks (a zero width or height renders the box's first pixel).
        size: output side in pixels.
        fill: float32 ``[3]`` RGB background in [0, 255] on the device (:func:`device_constant`).
        mask_threshold: logit above which a pixel is in the mask.
        mean, std: float32 ``[3]`` on the device: when given, the crops come CLIP-normalized (:func:`normalize`'s
            formula, in the same body, so a compiled body writes the crops once).

    Returns:
        float32 ``[N, 3, size, size]`` in the [0, 255] pixel scale, or normalized.
    """
    import torch

    n = low.shape[0]
    boxes = bboxes.to(torch.int64)
    taps, weights = _cubic_taps(
        boxes[:, :2].flip(1).T.reshape(-1), boxes[:, 2:].clamp(min=1).flip(1).T.reshape(-1), size
    )
    (rows, cols), (wy, wx) = taps.view(2, n, size, 4), weights.view(2, n, size, 4)
    logits = _logits_at_taps(low, ay, ax, rows.view(n, 4 * size), cols.view(n, 4 * size))  # [N, 4S, 4S]
    keep = (logits > mask_threshold).view(n, size, 4, size, 4).permute(0, 1, 3, 2, 4)  # [N, S, S, 4, 4]
    pixels = image[:, rows[:, :, None, :, None], cols[:, None, :, None, :]]  # [3, N, S, S, 4, 4]
    values = torch.where(keep, pixels.to(torch.float32), fill.view(3, 1, 1, 1, 1, 1))
    taps_weight = wy[:, :, None, :, None] * wx[:, None, :, None, :]  # [N, S, S, 4, 4]
    crops = (values * taps_weight).sum(dim=(-2, -1)).permute(1, 0, 2, 3)
    if mean is not None and std is not None:
        crops = (crops / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return crops.contiguous()


def _logits_at_taps(
    low: "torch.Tensor", ay: "torch.Tensor", ax: "torch.Tensor", rows: "torch.Tensor", cols: "torch.Tensor"
) -> "torch.Tensor":
    """``(Ay @ low[i] @ Ax^T)[rows[i]][:, cols[i]]``, float32 ``[N, R, Q]``: two batched matrix products eagerly;
    under ``torch.compile`` the banded gathers (:mod:`ovseg_mine.banded`), which fuse into the crop kernel."""
    import torch

    from ovseg_mine.banded import band, banded_resample

    n = low.shape[0]
    if torch.compiler.is_compiling():
        (yi, yw), (xi, xw) = band(ay), band(ax)
        return banded_resample(low, (yi[rows], yw[rows]), (xi[cols], xw[cols]))
    at_rows = ay.index_select(0, rows.reshape(-1)).view(n, rows.shape[1], -1)  # [N, R, h]
    at_cols = ax.index_select(0, cols.reshape(-1)).view(n, cols.shape[1], -1)  # [N, Q, w]
    return torch.bmm(torch.bmm(at_rows, low.to(torch.float32)), at_cols.transpose(1, 2))


def normalize(crops: "torch.Tensor", mean: Sequence[float], std: Sequence[float]) -> "torch.Tensor":
    """CLIP input normalization of crops in [0, 255]: ``(x / 255 - mean) / std``, per channel.

    Args:
        crops: float ``[N, 3, S, S]`` in [0, 255].
        mean, std: per-channel values in [0, 1] (e.g. open_clip's OPENAI_DATASET_MEAN / STD), made device tensors
            once (:func:`device_constant`).
    """

    mean_t = device_constant(mean, crops.device, crops.dtype).view(1, 3, 1, 1)
    std_t = device_constant(std, crops.device, crops.dtype).view(1, 3, 1, 1)
    return (crops / 255.0 - mean_t) / std_t


def masked_crop_images(
    image: "np.ndarray", masks: "np.ndarray", *, size: int, fill: Sequence[float] = CLIP_MEAN_PIXEL
) -> "np.ndarray":
    """Masked crops as viewable 8-bit images (for reports and datasets, not for CLIP input).

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        masks: bool ``[N, H, W]``, each non-empty.
        size: output side in pixels.
        fill: RGB background in [0, 255] (default: CLIP's mean pixel, as mining renders crops).

    Returns:
        uint8 ``[N, size, size, 3]``: :func:`render_masked_crops` rounded and clamped to [0, 255].

    Raises:
        ValueError: as :func:`render_masked_crops` (shape mismatch, empty mask).
    """
    import torch

    masks_t = torch.from_numpy(masks)
    crops = render_masked_crops(
        torch.from_numpy(image).permute(2, 0, 1), masks_t, mask_bboxes(masks_t), size=size, fill=fill
    )
    return crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

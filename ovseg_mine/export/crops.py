"""Masked crops as OVSeg's open_clip trainer reads them: the pair's bbox at the image's own resolution, background
exactly RGB (124, 116, 103).

OVSeg's mask prompt tuning finds the mask again in each crop image as every pixel that is not exactly
(124, 116, 103) (facebookresearch/ov-seg, ``open_clip_training/src/open_clip/transform.py``, ``Maskget``). So a
crop here keeps the image's pixels under the mask, paints every other pixel of the box that colour, and moves a
mask pixel that happens to be that colour by one level (its red channel to 125): the mask comes back exactly.
The geometry is mining's (:mod:`ovseg_mine.crops`: the mask's tight box, no expansion), without the resize: the
trainer augments and resizes itself. The lossless PNG keeps every pixel.
"""

from __future__ import annotations

import hashlib

import numpy as np

#: OVSeg's background colour (``Maskget``, ``Erosion``): RGB uint8.
OVSEG_BACKGROUND: tuple[int, int, int] = (124, 116, 103)


def ovseg_crop(image: np.ndarray, mask: np.ndarray, bbox: list[int] | tuple[int, ...]) -> np.ndarray:
    """The masked crop of one pair for OVSeg's trainer.

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        mask: bool ``[H, W]``, the pair's mask (decoded COCO RLE).
        bbox: ``[x, y, w, h]`` in pixels (XYWH, the pair's ``bbox``: the mask's tight box).

    Returns:
        uint8 ``[h, w, 3]``: image pixels under the mask (any equal to :data:`OVSEG_BACKGROUND` get red 125),
        :data:`OVSEG_BACKGROUND` elsewhere. :func:`crop_mask` of it equals ``mask[y:y+h, x:x+w]``.

    Raises:
        ValueError: image and mask sizes differ, or the box is empty or outside the image.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, the image {image.shape[1]}x{image.shape[0]}")
    x, y, w, h = (int(v) for v in bbox)
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > image.shape[1] or y + h > image.shape[0]:
        raise ValueError(f"bbox {[x, y, w, h]} is empty or outside the {image.shape[1]}x{image.shape[0]} image")
    region = image[y : y + h, x : x + w]
    keep = mask[y : y + h, x : x + w]
    r, g, b = OVSEG_BACKGROUND
    clash = keep & (region[..., 0] == r) & (region[..., 1] == g) & (region[..., 2] == b)
    out = np.where(keep[..., None], region, np.array(OVSEG_BACKGROUND, dtype=np.uint8))
    if clash.any():
        out[clash, 0] = r + 1
    return out


def crop_mask(crop: np.ndarray) -> np.ndarray:
    """OVSeg's rule: bool ``[h, w]``, True where the crop pixel is not exactly :data:`OVSEG_BACKGROUND`."""
    r, g, b = OVSEG_BACKGROUND
    return ~((crop[..., 0] == r) & (crop[..., 1] == g) & (crop[..., 2] == b))


def sample_key(image_id: int, pair_id: str) -> str:
    """A file-name and webdataset-safe key of a pair (no dots or slashes): ``IMAGEID-`` + 16 hex of sha1(pair_id)."""
    return f"{image_id}-{hashlib.sha1(pair_id.encode()).hexdigest()[:16]}"


def png_bytes(crop: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 ``[h, w, 3]`` RGB crop (no alpha, no gamma chunk)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(crop, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()

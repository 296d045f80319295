"""The mask that goes with a masked crop, and the per-patch foreground mask of mask prompt tuning.

A masked crop (:func:`ovseg_mine.crops.render_masked_crops`) is the image cut to the mask's tight box and
resized; its mask is cut to the same box and resized with nearest-neighbour interpolation, as the OVSeg
reference resizes region masks (facebookresearch/ov-seg, ``open_vocab_seg/modeling/clip_adapter/adapter.py``,
``MaskFormerClipAdapter._preprocess_image``). A ViT patch is *masked* (gets the prompt) only when every pixel
of it is background; the reference computes this as ``ceil(avg_pool(mask, patch))``, here an equivalent max
pool over each patch (any foreground pixel makes the patch foreground).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def crop_masks(masks: "torch.Tensor", bboxes: "torch.Tensor", *, size: int) -> "torch.Tensor":
    """Cut masks to their boxes and resize them, the way their masked crops are rendered.

    Args:
        masks: bool ``[N, H, W]``.
        bboxes: integer ``[N, 4]`` XYWH pixel boxes (as given to ``render_masked_crops``), each non-empty.
        size: output side in pixels (the crop size).

    Returns:
        bool ``[N, size, size]``: True on the object (foreground), nearest-neighbour resized.

    Raises:
        ValueError: shapes that do not match, or an empty box.
    """
    import torch
    import torch.nn.functional as F

    if masks.ndim != 3 or bboxes.shape != (masks.shape[0], 4):
        raise ValueError(f"masks must be [N, H, W] and bboxes [N, 4], got {tuple(masks.shape)}, {tuple(bboxes.shape)}")
    out = torch.empty((masks.shape[0], size, size), dtype=torch.bool, device=masks.device)
    for i, (x, y, w, h) in enumerate(bboxes.tolist()):
        if w <= 0 or h <= 0:
            raise ValueError(f"mask {i} has an empty box {[x, y, w, h]}")
        region = masks[i, y : y + h, x : x + w].float()[None, None]
        out[i] = F.interpolate(region, size=(size, size), mode="nearest")[0, 0] > 0.5
    return out


def patch_foreground(pixel_masks: "torch.Tensor", patch_size: int | tuple[int, int]) -> "torch.Tensor":
    """Which ViT patches hold any foreground pixel.

    Args:
        pixel_masks: bool ``[B, H, W]`` crop masks (True: object), H and W multiples of the patch size.
        patch_size: the ViT's patch side in pixels (``model.visual.patch_size``), int or (ph, pw).

    Returns:
        bool ``[B, (H / ph) * (W / pw)]`` in row-major patch order (open_clip's token order after the class
        token): True for a foreground patch (m = 1, kept), False for a patch whose pixels are all background
        (m = 0, replaced by the mask prompt).

    Raises:
        ValueError: the mask size is not a multiple of the patch size.
    """
    import torch.nn.functional as F

    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if pixel_masks.ndim != 3 or pixel_masks.shape[1] % ph or pixel_masks.shape[2] % pw:
        raise ValueError(
            f"pixel masks must be [B, H, W] with H, W multiples of the patch {ph}x{pw}, got {tuple(pixel_masks.shape)}"
        )
    pooled = F.max_pool2d(pixel_masks[:, None].float(), kernel_size=(ph, pw), stride=(ph, pw))
    return pooled.flatten(1) > 0

"""Random SAM weights that give realistic work: about 100 masks per image through the paper's filters.

With seeded random weights SAM's predicted IoUs are spread around 0 (about +-0.07) and its mask logits are small
(|logit| ~ 0.07), so the paper's filters (``pred_iou_thresh=0.88``, ``stability_score_thresh=0.95``) reject every
mask and crops, CLIP and matching get nothing to do. Zero thresholds would instead push all 3,072 masks of a
32x32 grid through every step (and inflate the baseline's time). :func:`calibrate_sam` changes two output
layers so the same filters keep a realistic share, with the same masks:

* the last linear layer of each mask token's hypernetwork MLP is scaled by ``logit_scale`` (300): mask logits
  are ``hyper_in @ upscaled_embedding``, so they scale by exactly 300 and keep their sign (same binary masks),
  while the stability score (logits thresholded at +-1) rises from 0 to 0.86-0.98: about half pass 0.95;
* the IoU head's last bias is shifted by ``iou_shift`` (0.88): predicted IoUs become 0.88 +- ~0.03, about half
  pass 0.88 (as real SAM's spread of scores, centred on the threshold).

About a quarter of a 32x32 grid's 3,072 masks (~770) then reach box NMS; random masks are image-wide and
speckled, so every box is the whole image and any NMS threshold below 1 would keep one mask: the benchmark runs
NMS at 1.0 (the NMS still runs on all ~770 boxes), and the cap of 100 keeps 100 masks per image. The masks stay
speckled (more RLE runs than real masks), which makes the baseline's RLE of every survivor costlier than with
real weights; ovseg-mine RLE-encodes only the matched masks.
"""

from __future__ import annotations

from typing import Any

LOGIT_SCALE = 300.0
IOU_SHIFT = 0.88


def calibrate_sam(sam: Any, *, logit_scale: float = LOGIT_SCALE, iou_shift: float = IOU_SHIFT) -> Any:
    """Scale the mask logits and shift the predicted IoUs of a random-weight segment-anything ``Sam`` in place
    (see the module docstring); returns it."""
    import torch

    decoder = sam.mask_decoder
    with torch.no_grad():
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_scale)
            mlp.layers[-1].bias.mul_(logit_scale)
        decoder.iou_prediction_head.layers[-1].bias.add_(iou_shift)
    return sam


def calibrated_checkpoint(model_type: str, path: str, *, seed: int = 0) -> str:
    """Write the calibrated seeded random weights of SAM ``model_type`` to ``path`` (a state dict that
    ``--set sam.checkpoint=PATH`` and :func:`ovseg_mine.models.load_sam` load, in Ray workers too); returns it."""
    import torch

    from ovseg_mine.models import load_sam

    sam, _ = load_sam(model_type, "random", seed=seed)
    torch.save(calibrate_sam(sam).state_dict(), path)
    return path


def settings(points_per_side: int, max_masks: int = 100) -> list[str]:
    """``--set`` overrides of the benchmark on top of ``coco-ovseg``: the paper's score filters, NMS at 1.0 (random
    masks all span the image), the cap."""
    return [
        f"sam.points_per_side={points_per_side}",
        "sam.pred_iou_thresh=0.88",
        "sam.stability_score_thresh=0.95",
        "sam.box_nms_thresh=1.0",
        f"sam.max_masks_per_image={max_masks}",
    ]

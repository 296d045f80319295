"""Class-agnostic mask proposals: segment-anything's automatic mask generator (AMG) behind a small interface.

A mask generator maps one RGB image to :class:`Proposals`, its masks ordered best first. The SAM generator
runs ``segment_anything.SamAutomaticMaskGenerator`` (``segment_anything/automatic_mask_generator.py``: a grid of
point prompts, three masks per point, filtering by predicted IoU and stability score, box NMS) with the
parameters of :class:`~ovseg_mine.config.SamConfig`, then re-derives box and area from each binary mask,
drops empty masks, orders by predicted IoU and keeps the best ``max_masks_per_image``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ovseg_mine import rle as rle_utils
from ovseg_mine.config import SamConfig
from ovseg_mine.models import ModelNameError, WeightsInfo, load_sam

if TYPE_CHECKING:
    import torch


@dataclass
class Proposals:
    """Class-agnostic masks of one image, best first (predicted IoU descending).

    Attributes:
        masks: bool tensor ``[N, H, W]`` on the generator's device; ``H, W`` = the original image size.
        rles: N COCO RLEs ``{"size": [H, W], "counts": str}`` of ``masks`` (see :mod:`ovseg_mine.rle`).
        bboxes: int32 ``[N, 4]``, tight box of each mask as XYWH in pixels of the original image (COCO
            convention: ``w = x_max - x_min + 1``; equals ``rle.bbox`` of the RLE).
        areas: int64 ``[N]``, foreground pixels of each mask (never 0).
        predicted_iou: float32 ``[N]``, SAM's own quality estimate, descending.
        stability_score: float32 ``[N]``, SAM's stability under a shifted binarisation cutoff.
        num_generated: how many masks SAM returned before the empty-mask filter and the cap.
    """

    masks: "torch.Tensor"
    rles: list[dict[str, Any]]
    bboxes: np.ndarray
    areas: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    num_generated: int

    def __len__(self) -> int:
        return len(self.rles)


class MaskGenerator(Protocol):
    """Maps an ``[H, W, 3]`` uint8 RGB image to its :class:`Proposals`; raises ValueError for other input."""

    def __call__(self, image: np.ndarray) -> Proposals: ...


def check_image(image: Any) -> np.ndarray:
    """Return ``image`` as a C-contiguous ``[H, W, 3]`` uint8 array, or raise ValueError saying what is wrong."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array [H, W, 3] uint8 RGB, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (RGBA? convert with PIL's .convert('RGB'))" if image.ndim == 3 and image.shape[2] == 4 else ""
        hint = " (grayscale? convert with PIL's .convert('RGB'))" if image.ndim == 2 else hint
        raise ValueError(f"image must be [H, W, 3] uint8 RGB, got shape {tuple(image.shape)}{hint}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB (0-255), got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    return np.ascontiguousarray(image)


def tight_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight XYWH int32 boxes ``[N, 4]`` of non-empty bool masks ``[N, H, W]`` (``w = x_max - x_min + 1``);
    numpy front of :func:`ovseg_mine.crops.mask_bboxes`."""
    import torch

    from ovseg_mine.crops import mask_bboxes

    return mask_bboxes(torch.from_numpy(np.ascontiguousarray(masks))).numpy().astype(np.int32)


class SamMaskGenerator:
    """segment-anything's ``SamAutomaticMaskGenerator`` with a :class:`SamConfig`'s parameters.

    ``points_per_side``, ``points_per_batch``, ``pred_iou_thresh``, ``stability_score_thresh``,
    ``box_nms_thresh`` and ``min_mask_region_area`` go to the AMG unchanged (``output_mode="binary_mask"``,
    other AMG arguments at their defaults: one crop layer, stability offset 1.0); ``max_masks_per_image``
    caps the output. Works with any SAM whose ``image_encoder.img_size`` the AMG reads (1024 or the tiny 256).
    Deterministic: the same image and weights give identical proposals.

    Raises:
        ImportError: ``min_mask_region_area > 0`` without opencv (the AMG needs ``cv2`` for it).
    """

    def __init__(self, sam: Any, cfg: SamConfig) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        self.cfg = cfg
        self.sam = sam
        self.device = next(sam.parameters()).device
        try:
            self.amg = SamAutomaticMaskGenerator(
                sam,
                points_per_side=cfg.points_per_side,
                points_per_batch=cfg.points_per_batch,
                pred_iou_thresh=cfg.pred_iou_thresh,
                stability_score_thresh=cfg.stability_score_thresh,
                box_nms_thresh=cfg.box_nms_thresh,
                min_mask_region_area=cfg.min_mask_region_area,
                output_mode="binary_mask",
            )
        except ImportError as exc:
            raise ImportError(
                f"sam.min_mask_region_area={cfg.min_mask_region_area} needs opencv ({exc}); install "
                "opencv-python-headless or --set sam.min_mask_region_area=0"
            ) from None

    def __call__(self, image: np.ndarray) -> Proposals:
        """Proposals of one image.

        Args:
            image: ``[H, W, 3]`` uint8 RGB.

        Raises:
            ValueError: ``image`` is not ``[H, W, 3]`` uint8 (e.g. float, grayscale, RGBA).
        """
        import torch

        image = check_image(image)
        h, w = image.shape[:2]
        with torch.inference_mode():
            records = self.amg.generate(image)
        num_generated = len(records)
        records = [r for r in records if r["area"] > 0]  # the AMG's area is counted on the final mask
        ious = np.asarray([r["predicted_iou"] for r in records], dtype=np.float32)
        order = np.argsort(-ious, kind="stable")[: self.cfg.max_masks_per_image]
        records = [records[i] for i in order]
        if records:
            masks = np.stack([np.asarray(r["segmentation"], dtype=bool) for r in records])
        else:
            masks = np.zeros((0, h, w), dtype=bool)
        return Proposals(
            masks=torch.from_numpy(masks).to(self.device),
            rles=rle_utils.encode_many(masks),
            bboxes=tight_boxes(masks),
            areas=masks.sum(axis=(1, 2), dtype=np.int64),
            predicted_iou=np.asarray([r["predicted_iou"] for r in records], dtype=np.float32),
            stability_score=np.asarray([r["stability_score"] for r in records], dtype=np.float32),
            num_generated=num_generated,
        )


_GENERATORS = {"sam": SamMaskGenerator}


def list_mask_generators() -> list[str]:
    """Names accepted by :func:`build_mask_generator`: ``['sam']``."""
    return sorted(_GENERATORS)


def build_mask_generator(
    name: str, cfg: SamConfig, *, device: Any = "cpu", seed: int = 0, allow_random: bool = False
) -> tuple[MaskGenerator, WeightsInfo]:
    """Build a mask generator and load its weights (:func:`ovseg_mine.models.load_sam` with ``cfg.model_type``
    and ``cfg.checkpoint``).

    Raises:
        ModelNameError: unknown ``name`` or ``cfg.model_type`` (a ValueError; the message lists the valid ones).
        WeightsError: the weights cannot be loaded (see :func:`~ovseg_mine.models.load_sam`).
    """
    if name not in _GENERATORS:
        raise ModelNameError(f"unknown mask generator {name!r}; valid: {', '.join(list_mask_generators())}")
    sam, info = load_sam(cfg.model_type, cfg.checkpoint, device=device, seed=seed, allow_random=allow_random)
    return _GENERATORS[name](sam, cfg), info

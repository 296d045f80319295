"""Class-agnostic mask proposals: segment-anything's automatic mask generator (AMG) behind a small interface.

A mask generator maps one RGB image to :class:`Proposals`, its masks ordered best first. The SAM generator
does what ``segment_anything.SamAutomaticMaskGenerator.generate`` does (``automatic_mask_generator.py``: a grid
of point prompts, three masks per point, filtering by predicted IoU and stability score, box NMS), with the
parameters of :class:`~ovseg_mine.config.SamConfig` and the same result in fp32, but keeps masks dense on the
model's device until the final RLE, skips the AMG's RLE round trip, and can autocast the two networks. It then
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

#: segment_anything's ``SamAutomaticMaskGenerator(crop_nms_thresh=0.7)`` default. With one crop layer it only
#: enters the second NMS after ``min_mask_region_area`` post-processing, at ``max(box_nms_thresh, this)``.
CROP_NMS_THRESH = 0.7


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
    """segment-anything's automatic mask generator (AMG) with a :class:`SamConfig`'s parameters, re-implemented
    for speed with the same result as ``SamAutomaticMaskGenerator.generate``.

    The AMG's steps and parameters are kept (one crop layer, ``points_per_side``² grid, batches of
    ``points_per_batch`` points, three masks per point, ``pred_iou_thresh``, ``stability_score_thresh`` with
    offset 1.0, ``box_nms_thresh``, ``min_mask_region_area``), done with fewer and cheaper operations:

    * the predicted-IoU filter runs on the low-resolution logits, before upsampling (it does not depend on them);
    * masks stay dense on the model's device through thresholds, boxes and NMS; only the at most
      ``max_masks_per_image`` kept masks are RLE-encoded (pycocotools), instead of every mask being
      RLE-encoded in Python and decoded again;
    * ``precision="pure_bf16"`` (or ``"pure_fp16"``) runs the image encoder with its weights in that dtype
      (:func:`ovseg_mine.precision.cast_model` and ``cast_io``: input cast on the way in, image embedding cast
      back to float32 on the way out, SAM's code unchanged) and autocasts the mask decoder to the same dtype
      (``amp_bf16``); logits are cast to float32 before any post-processing. Measured on a 2-core AMX CPU, vit_b
      encoder: 8.1 s under bf16 autocast, 5.6 s with bf16 weights (fp32: 15-30 s).

    With ``precision="fp32"`` the proposals equal the stock AMG's (tests check it). Lower precisions perturb
    the logits and predicted IoUs slightly, so masks near a threshold or the cap can differ.
    Deterministic: the same image, weights and precision give identical proposals.

    Args:
        sam: a segment-anything ``Sam`` model (any ``image_encoder.img_size``: 1024, or the tiny 256).
        cfg: the AMG parameters and ``max_masks_per_image``.
        precision: ``fp32``, ``pure_bf16`` or ``pure_fp16`` (:mod:`ovseg_mine.precision`; a recipe's
            ``sam.precision`` goes through :func:`ovseg_mine.precision.for_inference`): the image encoder's weights
            are cast in place to that dtype, the mask decoder runs under autocast to it.

    Raises:
        ImportError: ``min_mask_region_area > 0`` without opencv (the AMG needs ``cv2`` for it).
        ValueError: unknown ``precision``.
    """

    def __init__(self, sam: Any, cfg: SamConfig, precision: str = "fp32") -> None:
        from segment_anything import SamPredictor
        from segment_anything.utils.amg import build_point_grid

        from ovseg_mine import precision as precision_mod

        if precision not in ("fp32", "pure_bf16", "pure_fp16"):
            raise ValueError(f"precision must be one of fp32, pure_bf16, pure_fp16, got {precision!r}")
        if cfg.min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401  (segment_anything.utils.amg.remove_small_regions)
            except ImportError as exc:
                raise ImportError(
                    f"sam.min_mask_region_area={cfg.min_mask_region_area} needs opencv ({exc}); install "
                    "opencv-python-headless or --set sam.min_mask_region_area=0"
                ) from exc
        self.cfg = cfg
        self.sam = sam
        self.precision = precision
        self.decoder_precision = precision.replace("pure_", "amp_")
        self.device = next(sam.parameters()).device
        precision_mod.cast_model(sam.image_encoder, precision)
        precision_mod.cast_io(sam.image_encoder, precision)
        self.predictor = SamPredictor(sam)
        self.point_grid = build_point_grid(cfg.points_per_side)  # [P*P, 2] xy in [0, 1]

    def __call__(self, image: np.ndarray) -> Proposals:
        """Proposals of one image.

        Args:
            image: ``[H, W, 3]`` uint8 RGB.

        Raises:
            ValueError: ``image`` is not ``[H, W, 3]`` uint8 (e.g. float, grayscale, RGBA).
        """
        import torch
        from segment_anything.utils.amg import batched_mask_to_box
        from torchvision.ops.boxes import batched_nms

        image = check_image(image)
        h, w = image.shape[:2]
        with torch.inference_mode():
            self.predictor.set_image(image)
            features = self.predictor.features
            points = self.point_grid * np.array([w, h])  # xy in pixels, as the AMG's grid
            masks, iou_preds, stability = [], [], []
            for start in range(0, len(points), self.cfg.points_per_batch):
                batch = self._decode(features, points[start : start + self.cfg.points_per_batch], (h, w))
                for store, value in zip((masks, iou_preds, stability), batch, strict=True):
                    store.append(value)
            masks_t, ious_t, stab_t = torch.cat(masks), torch.cat(iou_preds), torch.cat(stability)
            boxes = batched_mask_to_box(masks_t)  # XYXY, inclusive right/bottom pixel: what the AMG's NMS sees
            keep = batched_nms(boxes.float(), ious_t, torch.zeros_like(ious_t), iou_threshold=self.cfg.box_nms_thresh)
            if self.cfg.min_mask_region_area > 0:
                keep = self._remove_small_regions(masks_t, keep)
            num_generated = len(keep)
            keep = keep[masks_t.flatten(1).any(dim=1)[keep]]  # drop empty masks
            ious = ious_t[keep].cpu().numpy()
            order = np.argsort(-ious, kind="stable")[: self.cfg.max_masks_per_image]
            keep = keep[torch.as_tensor(order, dtype=torch.int64, device=keep.device)]
            masks_t = masks_t[keep]
            masks_np = masks_t.cpu().numpy()
        return Proposals(
            masks=masks_t,
            rles=rle_utils.encode_many(masks_np),
            bboxes=tight_boxes(masks_np),
            areas=masks_np.sum(axis=(1, 2), dtype=np.int64),
            predicted_iou=ious[order].astype(np.float32),
            stability_score=stab_t[keep].cpu().numpy().astype(np.float32),
            num_generated=num_generated,
        )

    def _decode(self, features: "torch.Tensor", points: np.ndarray, size: tuple[int, int]):
        """Masks of one batch of point prompts: bool ``[3B, H, W]``, predicted IoU and stability float32 ``[3B]``,
        after the predicted-IoU and stability filters (the AMG's ``_process_batch``)."""
        import torch
        from segment_anything.utils.amg import calculate_stability_score

        from ovseg_mine.precision import autocast

        sam = self.sam
        coords = self.predictor.transform.apply_coords(points, size)
        coords_t = torch.as_tensor(coords, device=self.device)[:, None, :]  # float64, as the AMG passes them
        labels = torch.ones((len(points), 1), dtype=torch.int, device=self.device)
        # The prompt encoder's Fourier features (sin/cos of large phases) stay in float32 whatever the precision.
        sparse, dense = sam.prompt_encoder(points=(coords_t, labels), boxes=None, masks=None)
        with autocast(self.decoder_precision, self.device):
            low_res, iou_preds = sam.mask_decoder(
                image_embeddings=features,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
        low_res, iou_preds = low_res.float().flatten(0, 1), iou_preds.float().flatten(0, 1)  # [3B, 256, 256], [3B]
        if self.cfg.pred_iou_thresh > 0.0:
            keep = iou_preds > self.cfg.pred_iou_thresh
            low_res, iou_preds = low_res[keep], iou_preds[keep]
        logits = sam.postprocess_masks(low_res[:, None], self.predictor.input_size, size)[:, 0]
        stability = calculate_stability_score(logits, sam.mask_threshold, 1.0)
        if self.cfg.stability_score_thresh > 0.0:
            keep = stability >= self.cfg.stability_score_thresh
            logits, iou_preds, stability = logits[keep], iou_preds[keep], stability[keep]
        return logits > sam.mask_threshold, iou_preds, stability

    def _remove_small_regions(self, masks: "torch.Tensor", keep: "torch.Tensor") -> "torch.Tensor":
        """The AMG's ``postprocess_small_regions`` on the NMS survivors ``keep``: fills small holes and removes
        small islands in place in ``masks``, then a second NMS prefers unchanged masks. Returns the new keep."""
        import torch
        from segment_anything.utils.amg import batched_mask_to_box, remove_small_regions
        from torchvision.ops.boxes import batched_nms

        min_area = self.cfg.min_mask_region_area
        scores = []
        for i in keep.tolist():
            mask, holes = remove_small_regions(masks[i].cpu().numpy(), min_area, mode="holes")
            mask, islands = remove_small_regions(mask, min_area, mode="islands")
            masks[i] = torch.from_numpy(mask).to(masks.device)
            scores.append(float(not (holes or islands)))
        scores_t = torch.tensor(scores, device=masks.device)
        second = batched_nms(
            batched_mask_to_box(masks[keep]).float(),
            scores_t,
            torch.zeros_like(scores_t),
            iou_threshold=max(self.cfg.box_nms_thresh, CROP_NMS_THRESH),
        )
        return keep[second]


_GENERATORS = {"sam": SamMaskGenerator}


def list_mask_generators() -> list[str]:
    """Names accepted by :func:`build_mask_generator`: ``['sam']``."""
    return sorted(_GENERATORS)


def build_mask_generator(
    name: str,
    cfg: SamConfig,
    *,
    device: Any = "cpu",
    seed: int = 0,
    allow_random: bool = False,
    precision: str = "fp32",
) -> tuple[MaskGenerator, WeightsInfo]:
    """Build a mask generator and load its weights (:func:`ovseg_mine.models.load_sam` with ``cfg.model_type``
    and ``cfg.checkpoint``); ``precision`` (``fp32``, ``pure_bf16``, ``pure_fp16``) as in :class:`SamMaskGenerator`.

    Raises:
        ModelNameError: unknown ``name`` or ``cfg.model_type`` (a ValueError; the message lists the valid ones).
        WeightsError: the weights cannot be loaded (see :func:`~ovseg_mine.models.load_sam`).
    """
    if name not in _GENERATORS:
        raise ModelNameError(f"unknown mask generator {name!r}; valid: {', '.join(list_mask_generators())}")
    sam, info = load_sam(cfg.model_type, cfg.checkpoint, device=device, seed=seed, allow_random=allow_random)
    return _GENERATORS[name](sam, cfg, precision=precision), info

"""The single-image API of mining's proposals: :class:`SamMaskGenerator` maps one RGB image to its
:class:`Proposals`, class-agnostic masks ordered best first.

It is to mining's engine what ``segment_anything.SamAutomaticMaskGenerator`` is to its model: a thin facade. It
does what ``SamAutomaticMaskGenerator.generate`` does (``automatic_mask_generator.py``: a grid of point prompts,
three masks per point, filtering by predicted IoU and stability score, box NMS), with the parameters of
:class:`~ovseg_mine.config.SamConfig` and the same result in fp32, by running the proposal step that mining runs on
batches of images (:meth:`~ovseg_mine.mine.algorithms.sam_batch.BatchedSam.propose`, the step of
:class:`~ovseg_mine.mine.algorithms.engine.MiningEngine`) on a batch of one. It then drops empty masks, orders by
predicted IoU and keeps the best ``max_masks_per_image``. Mining itself does not build :class:`Proposals` (the GPU
stage keeps masks on the device); this API serves users who want proposals of their own images, benchmarks and
tests::

    generator, info = SamMaskGenerator.load(SamConfig(model_type="vit_b"), device="cuda")
    proposals = generator(rgb)  # rgb: uint8 [H, W, 3]; proposals.masks: bool [N, H, W], best first

Masks the user already has become proposals with the same rules through
:func:`~ovseg_mine.mine.algorithms.given_proposals.given_mask_set` and :func:`proposals_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ovseg_mine import rle as rle_utils
from ovseg_mine.config import SamConfig
from ovseg_mine.models import load_sam
from ovseg_mine.weights_info import WeightsInfo

if TYPE_CHECKING:
    import torch

    from ovseg_mine.mine.algorithms.amg import MaskSet

#: Memory a single-image :class:`SamMaskGenerator` gives full-resolution masks at a time (2 GiB).
DEFAULT_CHUNK_BYTES = 2 * 2**30


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
    """segment-anything's automatic mask generator (AMG) with a :class:`SamConfig`'s parameters, for one image at a
    time, with the same result as ``SamAutomaticMaskGenerator.generate`` in fp32.

    It runs the engine mining uses (:class:`~ovseg_mine.mine.algorithms.sam_batch.BatchedSam` and
    :func:`~ovseg_mine.mine.algorithms.amg.select_masks`) on a batch of one: the AMG's steps and parameters (one crop
    layer, ``points_per_side``² grid, batches of ``points_per_batch`` points, three masks per point,
    ``pred_iou_thresh``, ``stability_score_thresh`` with offset 1.0, ``box_nms_thresh``,
    ``min_mask_region_area``), with masks kept on the model's device and only the kept ones RLE-encoded.
    ``precision="pure_bf16"`` (or ``"pure_fp16"``) casts SAM's encoder and decoder weights (the IoU head stays
    float32) and runs the encoder's attention through SDPA; logits are cast to float32 before any
    post-processing. Lower precisions perturb the logits and predicted IoUs slightly, so masks near a threshold
    or the cap can differ. Deterministic: the same image, weights and precision give identical proposals.

    Args:
        sam: a segment-anything ``Sam`` model (any ``image_encoder.img_size``: 1024, or the tiny 256).
        cfg: the AMG parameters and ``max_masks_per_image``.
        precision: ``fp32``, ``pure_bf16`` or ``pure_fp16`` (:mod:`ovseg_mine.precision`; a recipe's
            ``sam.precision`` goes through :func:`ovseg_mine.precision.for_inference`).

    Raises:
        ImportError: ``min_mask_region_area > 0`` without opencv (the AMG needs ``cv2`` for it).
        ValueError: unknown ``precision``.

    :meth:`load` builds one with its weights (``cfg.model_type``, ``cfg.checkpoint``).
    """

    def __init__(self, sam: Any, cfg: SamConfig, precision: str = "fp32") -> None:
        from ovseg_mine.mine.algorithms.sam_batch import BatchedSam

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
        self.batched = BatchedSam(
            sam,
            points_per_side=cfg.points_per_side,
            points_per_batch=cfg.points_per_batch or (512 if next(sam.parameters()).is_cuda else 64),
            precision=precision,
            encoder_batch_size=cfg.encoder_batch_size or 1,
        )
        self.device = self.batched.device

    @classmethod
    def load(
        cls,
        cfg: SamConfig,
        *,
        device: Any = "cpu",
        seed: int = 0,
        allow_random: bool = False,
        precision: str = "fp32",
    ) -> tuple["SamMaskGenerator", WeightsInfo]:
        """A generator with the weights of ``cfg.model_type`` and ``cfg.checkpoint``
        (:func:`ovseg_mine.models.load_sam`: ``default``, a local file, or ``random`` seeded by ``seed``) on
        ``device``, and where the weights came from; ``precision`` as in the constructor.

        Raises:
            ModelNameError: unknown ``cfg.model_type`` (a ValueError; the message lists the valid ones).
            WeightsError: the weights cannot be loaded (see :func:`~ovseg_mine.models.load_sam`).
        """
        sam, info = load_sam(cfg.model_type, cfg.checkpoint, device=device, seed=seed, allow_random=allow_random)
        return cls(sam, cfg, precision=precision), info

    def __call__(self, image: np.ndarray) -> Proposals:
        """Proposals of one image.

        Args:
            image: ``[H, W, 3]`` uint8 RGB.

        Raises:
            ValueError: ``image`` is not ``[H, W, 3]`` uint8 (e.g. float, grayscale, RGBA).
        """
        import torch

        image = check_image(image)
        size = image.shape[0], image.shape[1]
        sam = self.batched
        resized = torch.from_numpy(sam.resize(image)).to(self.device).permute(2, 0, 1)
        with torch.inference_mode():
            kept = sam.propose(sam.embed([resized]), size, self.cfg, DEFAULT_CHUNK_BYTES)
        return proposals_of(kept)


def proposals_of(kept: "MaskSet") -> Proposals:
    """The :class:`Proposals` of an image's kept masks (:class:`~ovseg_mine.mine.algorithms.amg.MaskSet`, valid masks
    first): dense masks on the set's device, their RLEs, and the boxes, areas and scores on the host."""
    import torch

    n = int(kept.valid.sum())
    device = kept.valid.device
    with torch.inference_mode():
        index = torch.arange(n, device=device)
        masks = torch.cat(
            [kept.masks(index[i : i + kept.chunk]) for i in range(0, n, kept.chunk)]
            or [torch.zeros((0, *kept.size), dtype=torch.bool, device=device)]
        )
    return Proposals(
        masks=masks,
        rles=rle_utils.encode_many(masks.cpu().numpy()),
        bboxes=kept.boxes[:n].cpu().numpy().astype(np.int32),
        areas=kept.areas[:n].cpu().numpy().astype(np.int64),
        predicted_iou=kept.predicted_iou[:n].cpu().numpy().astype(np.float32),
        stability_score=kept.stability_score[:n].cpu().numpy().astype(np.float32),
        num_generated=kept.num_generated,
    )

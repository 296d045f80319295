"""Masks the user already has, as the proposals the mining engine works on (SAM is neither loaded nor run).

A record of a run with ``--proposals coco:...`` or ``--proposals sa1b:...`` carries its image's masks in its
``proposals`` column (:func:`ovseg_mine.mine.sources.records.proposal_type`: COCO RLE, XYWH box, and SAM's
``predicted_iou`` and ``stability_score`` where the file has them; attached by
:mod:`ovseg_mine.mine.sources.proposal_files`). :func:`given_mask_set` turns them into the
:class:`~ovseg_mine.mine.algorithms.amg.MaskSet` SAM's selection returns, with the same rules: the score thresholds of
:class:`~ovseg_mine.config.SamConfig` where a score exists (``predicted_iou > pred_iou_thresh``,
``stability_score >= stability_score_thresh``, as segment-anything's AMG filters), empty masks dropped, best first
by ``predicted_iou`` (masks without scores keep the file's order, after scored ones), at most
``max_masks_per_image``. Crops, CLIP matching and pairs then run unchanged (:class:`~ovseg_mine.mine.algorithms.engine.
MiningEngine`).

The selection reads only the scores and the RLEs' areas and boxes (pycocotools on the compressed RLE); no mask is
decoded on the host. The chosen masks travel to the device as run lengths and are decoded there chunk by chunk
when crops or the matched masks' RLE need them (:func:`ovseg_mine.rle.masks_from_counts`), so memory stays bounded
whatever the image size. ``proposals_of(given_mask_set(...))``
(:func:`~ovseg_mine.mine.algorithms.proposals.proposals_of`) gives them as dense masks and RLEs, the
:class:`~ovseg_mine.mine.algorithms.proposals.Proposals` that
:class:`~ovseg_mine.mine.algorithms.proposals.SamMaskGenerator` gives for SAM's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ovseg_mine import rle as rle_utils
from ovseg_mine.config import SamConfig
from ovseg_mine.mine.algorithms.proposals import DEFAULT_CHUNK_BYTES

if TYPE_CHECKING:
    import torch

    from ovseg_mine.mine.algorithms.amg import MaskSet


class GivenMaskError(ValueError):
    """A given mask that does not fit its image (its RLE size differs from the decoded image's)."""


def _score(value: Any) -> float:
    return float("nan") if value is None else float(value)


def given_mask_set(
    entries: list[dict[str, Any]],
    image_hw: tuple[int, int],
    cfg: SamConfig,
    device: "torch.device | str" = "cpu",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> "MaskSet":
    """The proposals of one image from its given masks, as the engine's
    :class:`~ovseg_mine.mine.algorithms.amg.MaskSet`.

    Args:
        entries: the record's ``proposals``: dicts with ``segmentation`` (COCO RLE ``{size: [h, w], counts}``),
            ``bbox`` (XYWH; not used: boxes are the masks' tight boxes, as for SAM), ``predicted_iou`` and
            ``stability_score`` (float or None).
        image_hw: ``(height, width)`` of the decoded image.
        cfg: ``pred_iou_thresh``, ``stability_score_thresh`` and ``max_masks_per_image`` are applied.
        device: where the run lengths (and so the decoded masks) go.
        chunk_bytes: memory given to decoded masks at a time (sets the set's ``chunk``).

    Returns:
        A MaskSet of the kept masks (all valid), ``predicted_iou``/``stability_score`` float32 with NaN where the
        file has no score, ``num_generated`` the number of entries given.

    Raises:
        GivenMaskError: a mask's RLE size differs from ``image_hw`` (e.g. masks of another image, or of the
            image before an EXIF rotation).
    """
    import torch

    from ovseg_mine.mine.algorithms.amg import MaskSet, chunk_size

    height, width = image_hw
    kept = []
    for entry in entries:
        size = [int(v) for v in entry["segmentation"]["size"]]
        if size != [height, width]:
            raise GivenMaskError(
                f"a given mask is {size[1]}x{size[0]} (RLE size) but the image is {width}x{height}: masks of "
                "another image?"
            )
        iou, stability = entry.get("predicted_iou"), entry.get("stability_score")
        if iou is not None and cfg.pred_iou_thresh > 0.0 and not iou > cfg.pred_iou_thresh:
            continue
        if stability is not None and cfg.stability_score_thresh > 0.0 and not stability >= cfg.stability_score_thresh:
            continue
        kept.append(entry)
    # Best first: by predicted IoU (descending), unscored masks after the scored ones, in the file's order.
    kept.sort(key=lambda e: (e.get("predicted_iou") is None, -(e.get("predicted_iou") or 0.0)))
    chosen, areas, counts = [], [], []
    for entry in kept:
        if len(chosen) == cfg.max_masks_per_image:
            break
        runs = rle_utils.counts_of(entry["segmentation"])
        area = int(runs[1::2].sum())
        if area:  # empty masks are dropped, as SAM's
            chosen.append(entry)
            areas.append(area)
            counts.append(runs)
    padded = np.zeros((len(counts), max((len(c) for c in counts), default=0)), dtype=np.int64)
    for row, runs in zip(padded, counts, strict=True):
        row[: len(runs)] = runs
    boxes = [[int(v) for v in rle_utils.bbox(e["segmentation"])] for e in chosen]

    def tensor(values: Any, dtype: "torch.dtype", shape: tuple[int, ...] = (0,)) -> "torch.Tensor":
        return torch.as_tensor(np.asarray(values) if len(values) else np.zeros(shape), dtype=dtype).to(device)

    return MaskSet(
        low_res=None,
        predicted_iou=tensor([_score(e.get("predicted_iou")) for e in chosen], torch.float32),
        stability_score=tensor([_score(e.get("stability_score")) for e in chosen], torch.float32),
        boxes=tensor(boxes, torch.int64, (0, 4)),
        areas=tensor(areas, torch.int64),
        valid=torch.ones(len(chosen), dtype=torch.bool, device=device),
        size=(height, width),
        num_generated=len(entries),
        upsample=None,
        mask_threshold=0.0,
        chunk=chunk_size((height, width), 0, chunk_bytes),
        counts=torch.from_numpy(padded).to(device),
    )

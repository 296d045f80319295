"""Masked-region classification on ground-truth masks (``ovseg-mine evaluate``).

The measure OVSeg uses to show what mask-adapted CLIP gains (Liang et al., CVPR 2023, Sec. 4, "mask-adapted
CLIP" ablations on ground-truth masks): every ground-truth instance mask of a COCO instances file is rendered
as a masked crop exactly as mining renders proposals (:func:`ovseg_mine.crops.render_masked_crops`: tight box,
CLIP mean-pixel fill, bicubic resize), encoded by the image tower (with the mask prompts when the checkpoint
has them), and classified among the file's category names, each embedded with the 14 ViLD templates
averaged (:class:`ovseg_mine.text.NounEmbeddings`). Reported: top-1 and top-5 accuracy over all
masks, the mean over categories, and per category.

The ground truth is read by :mod:`ovseg_mine.groundtruth` (the same reader as ``inspect --gt``). Choices:
crowd annotations (``iscrowd=1``, a group of objects) are skipped; masks under ``min_area`` pixels are skipped;
annotations of an image that is missing or cannot be decoded are skipped. All are counted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ovseg_mine.groundtruth import GroundTruth, GroundTruthError, Selection


class EvaluateError(ValueError):
    """A ground-truth file or image folder that cannot be evaluated on; the message says why."""


def load_ground_truth(
    instances: str | os.PathLike[str],
    images_root: str | os.PathLike[str],
    *,
    min_area: float = 16,
    limit: int | None = None,
) -> Selection:
    """Read COCO instance annotations and select the masks to classify.

    Args:
        instances: ``instances_*.json`` (polygons, RLE and uncompressed RLE; read by
            :class:`~ovseg_mine.groundtruth.GroundTruth`).
        images_root: folder holding the images.
        min_area: skip annotations whose ``area`` (pixels) is below this.
        limit: only the first N images by id.

    Returns:
        A :class:`~ovseg_mine.groundtruth.Selection` of the non-crowd annotations of at least ``min_area`` pixels
        whose image is present; its ``skipped`` counts ``crowd``, ``tiny``, ``missing_image`` and
        ``undecodable_image`` (0 here, filled in by :func:`classify`).

    Raises:
        EvaluateError: unreadable file, not instance annotations, no image folder, or nothing to classify.
    """
    path, root = Path(instances), Path(images_root)
    if not root.is_dir():
        raise EvaluateError(f"image folder {root} not found")
    try:
        gt = GroundTruth(path)
    except GroundTruthError as exc:
        raise EvaluateError(str(exc)) from exc
    if gt.kind != "instances" or (gt.left_out["no_segmentation"] and not gt.num_annotations):
        raise EvaluateError(f"{path} has no instance masks (segmentation): use an instances_*.json file")
    selection = gt.select(min_area=min_area, images_root=root, limit=limit)
    selection.skipped["undecodable_image"] = 0
    if not selection.annotations:
        raise EvaluateError(f"no annotation to classify in {path} with images in {root} (skipped: {selection.skipped})")
    return selection


def topk_hits(logits: "Any", targets: "Any", k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 and top-k correctness per row.

    Args:
        logits: float ``[N, K]`` scores (higher is better) over K classes, a tensor on any device or an array.
        targets: int ``[N]`` true class indices.
        k: top-k (clipped to K).

    Returns:
        Two bool arrays ``[N]``: top-1 hit, top-k hit. Ties rank the lower class index first.
    """
    import torch

    logits, targets = torch.as_tensor(logits).detach().float().cpu(), torch.as_tensor(targets).long().cpu()
    order = torch.argsort(-logits, dim=1, stable=True)[:, : min(k, logits.shape[1])]
    hits = order == targets[:, None]
    return hits[:, 0].numpy(), hits.any(dim=1).numpy()


def classify(
    model: Any,
    tokenizer: Callable[[list[str]], Any],
    gt: Selection,
    *,
    size: int,
    mean: Any,
    std: Any,
    prompts: Any = None,
    device: Any = "cpu",
    batch_size: int = 64,
    on_image: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Classify every selected ground-truth mask among the categories.

    Args:
        model: an open_clip CLIP (``encode_image``, ``encode_text``; anything with those two methods).
        tokenizer: its tokenizer.
        gt: the masks to classify, from :func:`load_ground_truth`.
        size: crop side (the model's input size); mean, std: its normalization for pixels in [0, 1].
        prompts: :class:`~ovseg_mine.finetune.mask_prompt.MaskPrompts` to apply, or None.
        on_image: called after each image (progress).

    Returns:
        ``{"masks", "top1", "top5", "mean_top1", "mean_top5", "per_category": {name: {"n", "top1", "top5"}},
        "skipped": {...}, "categories": K}``; accuracies are fractions in [0, 1] (None with no mask).

    Raises:
        EvaluateError: an annotation whose mask cannot be read (malformed segmentation).
    """
    import torch

    from ovseg_mine.text import NounEmbeddings

    device = torch.device(device)
    cat_ids = list(gt.categories)
    text = NounEmbeddings(model, tokenizer, device).embed([gt.categories[c] for c in cat_ids])
    column = {c: i for i, c in enumerate(cat_ids)}
    skipped = dict(gt.skipped)
    top1, top5, targets = [], [], []
    for image_id, anns in gt.by_image.items():
        loaded = _image_and_masks(gt, image_id, anns, skipped)
        if loaded is None:
            continue
        image, anns, masks = loaded
        for s in range(0, len(anns), batch_size):
            chunk, part = anns[s : s + batch_size], masks[s : s + batch_size]
            feats = _mask_features(model, image, part, size=size, mean=mean, std=std, prompts=prompts, device=device)
            t = [column[int(a["category_id"])] for a in chunk]
            h1, h5 = topk_hits(feats @ text.T, t)
            top1.extend(h1.tolist()), top5.extend(h5.tolist()), targets.extend(t)
        if on_image is not None:
            on_image()
    return summarize(
        np.asarray(top1, bool),
        np.asarray(top5, bool),
        np.asarray(targets, int),
        [gt.categories[c] for c in cat_ids],
        skipped,
    )


def _image_and_masks(
    gt: Selection, image_id: int, anns: list[dict[str, Any]], skipped: dict[str, int]
) -> tuple[Any, list[dict[str, Any]], Any] | None:
    """The uint8 ``[3, H, W]`` image, its annotations with a non-empty mask, their masks; None: skipped, counted."""
    import torch

    from ovseg_mine.images import ImageDecodeError, load_rgb

    try:
        image = torch.from_numpy(load_rgb(gt.image_path(image_id))).permute(2, 0, 1)
    except ImageDecodeError:
        skipped["undecodable_image"] += len(anns)
        return None
    try:
        masks = gt.masks(image_id)
    except GroundTruthError as exc:
        raise EvaluateError(str(exc)) from exc
    if masks.shape[1:] != tuple(image.shape[1:]):
        skipped["undecodable_image"] += len(anns)
        return None
    keep = masks.any(axis=(1, 2))
    skipped["tiny"] += int((~keep).sum())
    return image, [a for a, k in zip(anns, keep, strict=True) if k], torch.from_numpy(masks[keep])


def _mask_features(
    model: Any, image: Any, masks: Any, *, size: int, mean: Any, std: Any, prompts: Any, device: Any
) -> Any:
    """The L2-normalized float32 ``[N, D]`` image features of the masked crops of ``masks`` in ``image``."""
    import torch

    from ovseg_mine.crops import CLIP_MEAN_PIXEL, mask_bboxes, normalize, render_masked_crops
    from ovseg_mine.finetune.patch_mask import crop_masks, patch_foreground

    boxes = mask_bboxes(masks)
    crops = normalize(render_masked_crops(image, masks, boxes, size=size, fill=CLIP_MEAN_PIXEL), mean, std)
    with torch.inference_mode():
        if prompts is not None:
            fg = patch_foreground(crop_masks(masks, boxes, size=size), prompts.patch_size)
            feats = prompts(crops.to(device), fg.to(device))
        else:
            feats = model.encode_image(crops.to(device))
    return torch.nn.functional.normalize(feats.float(), dim=-1)


def summarize(
    top1: np.ndarray, top5: np.ndarray, targets: np.ndarray, names: list[str], skipped: dict[str, int]
) -> dict[str, Any]:
    """Overall, mean-over-categories and per-category accuracies from per-mask hits (see :func:`classify`)."""

    def acc(x: np.ndarray) -> float | None:
        return round(float(x.mean()), 4) if x.size else None

    per = {}
    for i, name in enumerate(names):
        sel = targets == i
        if sel.any():
            per[name] = {"n": int(sel.sum()), "top1": acc(top1[sel]), "top5": acc(top5[sel])}
    return {
        "masks": int(targets.size),
        "top1": acc(top1),
        "top5": acc(top5),
        "mean_top1": acc(np.array([v["top1"] for v in per.values()])),
        "mean_top5": acc(np.array([v["top5"] for v in per.values()])),
        "per_category": per,
        "skipped": skipped,
        "categories": len(names),
    }


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def format_results(results: dict[str, dict[str, Any]], *, per_category: bool = True) -> str:
    """A text table of :func:`classify` results by model name (e.g. ``checkpoint`` and ``baseline``)."""
    names = list(results)
    first = results[names[0]]
    lines = [
        f"{first['masks']} ground-truth masks, {first['categories']} categories; skipped: "
        + ", ".join(f"{k} {v}" for k, v in first["skipped"].items())
    ]
    lines.append(f"{'':24s}" + "".join(f"{n + ' top1':>17s}{n + ' top5':>17s}" for n in names))
    for key, label in (("", "all masks"), ("mean_", "mean over categories")):
        lines.append(
            f"{label:24s}"
            + "".join(f"{_pct(r[key + 'top1']):>17s}{_pct(r[key + 'top5']):>17s}" for r in results.values())
        )
    if per_category:
        lines.append("per category (n):")
        for cat, row in sorted(first["per_category"].items(), key=lambda kv: -kv[1]["n"]):
            cells = "".join(
                f"{_pct(r['per_category'][cat]['top1']):>17s}{_pct(r['per_category'][cat]['top5']):>17s}"
                for r in results.values()
            )
            lines.append(f"  {cat[:16]:16s} {row['n']:5d}" + cells)
    return "\n".join(lines)

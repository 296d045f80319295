"""Masked-region classification on ground-truth masks (``ovseg-mine evaluate``).

The measure OVSeg uses to show what mask-adapted CLIP gains (Liang et al., CVPR 2023, Sec. 4, "mask-adapted
CLIP" ablations on ground-truth masks): every ground-truth instance mask of a COCO instances file is rendered
as a masked crop exactly as mining renders proposals (:func:`ovseg_mine.crops.render_masked_crops`: tight box,
CLIP mean-pixel fill, bicubic resize), encoded by the image tower (with the mask prompts when the checkpoint
has them), and classified among the file's category names, each embedded with the 14 ViLD templates
averaged (:class:`ovseg_mine.text.NounEmbeddings`). Reported: top-1 and top-5 accuracy over all
masks, the mean over categories, and per category.

Choices: crowd annotations (``iscrowd=1``, a group of objects) are skipped; masks under ``min_area`` pixels
are skipped; annotations of an image that is missing or cannot be decoded are skipped. All are counted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


class EvaluateError(ValueError):
    """A ground-truth file or image folder that cannot be evaluated on; the message says why."""


@dataclass
class GroundTruth:
    """Instance annotations to classify.

    Attributes:
        coco: the pycocotools ``COCO`` object.
        images_root: folder of the images (``file_name`` relative to it).
        categories: ``{category id: name}`` in id order; the classes to choose among.
        by_image: ``{image id: [annotation dict, ...]}`` of the annotations kept (non-crowd, area >= min_area,
            image present).
        skipped: counts of annotations left out: ``crowd``, ``tiny`` (area < min_area), ``missing_image``,
            ``undecodable_image`` (filled in by :func:`classify`).
        missing_images: file names of images not found.
    """

    coco: Any
    images_root: Path
    categories: dict[int, str]
    by_image: dict[int, list[dict[str, Any]]]
    skipped: dict[str, int] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)

    @property
    def annotations(self) -> int:
        """Annotations kept, over all images of ``by_image``."""
        return sum(len(v) for v in self.by_image.values())


def load_ground_truth(
    instances: str | os.PathLike[str],
    images_root: str | os.PathLike[str],
    *,
    min_area: float = 16,
    limit: int | None = None,
) -> GroundTruth:
    """Read COCO instance annotations and select the masks to classify.

    Args:
        instances: ``instances_*.json`` (polygons, RLE and uncompressed RLE all handled by pycocotools).
        images_root: folder holding the images.
        min_area: skip annotations whose ``area`` (pixels) is below this.
        limit: only the first N images by id.

    Raises:
        EvaluateError: unreadable file, not instance annotations, no image folder, or nothing to classify.
    """
    from pycocotools.coco import COCO

    path, root = Path(instances), Path(images_root)
    if not path.is_file():
        raise EvaluateError(f"ground-truth file {path} not found")
    if not root.is_dir():
        raise EvaluateError(f"image folder {root} not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(path))
        categories = {int(c["id"]): str(c["name"]) for c in sorted(coco.dataset["categories"], key=lambda c: c["id"])}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as exc:
        raise EvaluateError(f"{path} is not COCO instance annotations: {type(exc).__name__}: {exc}") from None
    if coco.dataset.get("annotations") and "segmentation" not in coco.dataset["annotations"][0]:
        raise EvaluateError(f"{path} has no instance masks (segmentation): use an instances_*.json file")
    skipped = {"crowd": 0, "tiny": 0, "missing_image": 0, "undecodable_image": 0}
    by_image, missing = {}, []
    for image_id in sorted(coco.imgs)[:limit]:
        anns = coco.imgToAnns.get(image_id, [])
        if not anns:
            continue
        if not (root / coco.imgs[image_id]["file_name"]).is_file():
            missing.append(coco.imgs[image_id]["file_name"])
            skipped["missing_image"] += len(anns)
            continue
        kept = []
        for a in anns:
            if a.get("iscrowd"):
                skipped["crowd"] += 1
            elif a.get("area", 0) < min_area:
                skipped["tiny"] += 1
            else:
                kept.append(a)
        if kept:
            by_image[image_id] = kept
    gt = GroundTruth(coco, root, categories, by_image, skipped, missing)
    if not gt.annotations:
        raise EvaluateError(f"no annotation to classify in {path} with images in {root} (skipped: {skipped})")
    return gt


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
    gt: GroundTruth,
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
        gt: from :func:`load_ground_truth`.
        size: crop side (the model's input size); mean, std: its normalization for pixels in [0, 1].
        prompts: :class:`~ovseg_mine.finetune.mask_prompt.MaskPrompts` to apply, or None.
        on_image: called after each image (progress).

    Returns:
        ``{"masks", "top1", "top5", "mean_top1", "mean_top5", "per_category": {name: {"n", "top1", "top5"}},
        "skipped": {...}, "categories": K}``; accuracies are fractions in [0, 1] (None with no mask).
    """
    import torch

    from ovseg_mine.crops import CLIP_MEAN_PIXEL, mask_bboxes, normalize, render_masked_crops
    from ovseg_mine.finetune.patch_mask import crop_masks, patch_foreground
    from ovseg_mine.images import ImageDecodeError, load_rgb
    from ovseg_mine.text import NounEmbeddings

    device = torch.device(device)
    cat_ids = list(gt.categories)
    text = NounEmbeddings(model, tokenizer, device).embed([gt.categories[c] for c in cat_ids])
    column = {c: i for i, c in enumerate(cat_ids)}
    skipped = dict(gt.skipped)
    top1, top5, targets = [], [], []
    for image_id, anns in gt.by_image.items():
        try:
            image = torch.from_numpy(load_rgb(gt.images_root / gt.coco.imgs[image_id]["file_name"])).permute(2, 0, 1)
        except ImageDecodeError:
            skipped["undecodable_image"] += len(anns)
            continue
        masks = np.stack([gt.coco.annToMask(a).astype(bool) for a in anns])
        if masks.shape[1:] != tuple(image.shape[1:]):
            skipped["undecodable_image"] += len(anns)
            continue
        keep = masks.any(axis=(1, 2))
        skipped["tiny"] += int((~keep).sum())
        anns, masks_t = [a for a, k in zip(anns, keep, strict=True) if k], torch.from_numpy(masks[keep])
        for s in range(0, len(anns), batch_size):
            chunk, part = anns[s : s + batch_size], masks_t[s : s + batch_size]
            boxes = mask_bboxes(part)
            crops = normalize(render_masked_crops(image, part, boxes, size=size, fill=CLIP_MEAN_PIXEL), mean, std)
            with torch.inference_mode():
                if prompts is not None:
                    fg = patch_foreground(crop_masks(part, boxes, size=size), prompts.patch_size)
                    feats = prompts(crops.to(device), fg.to(device))
                else:
                    feats = model.encode_image(crops.to(device))
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
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

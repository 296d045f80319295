"""Region classification on a semantic-segmentation benchmark (``evaluate --task regions``).

OVSeg's measure of a mask-adapted CLIP during training (``ade150-zeroshot-val-top1``, its ``--ade-val``; Liang et
al., CVPR 2023, Sec. 4.3): every class present in an image's ground-truth map becomes one region, the union of its
pixels; the region is rendered as a masked crop (the mining crop) and classified among all K class names (14 ViLD
templates averaged, mask prompts when the weights have them). Reported: top-1 and top-5 accuracy over all
regions, mean class accuracy (top-1 and top-5 averaged over the classes that have regions) and per class.
Ignored pixels belong to no region.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ovseg_mine.evaluate.dataset import SemSegData
from ovseg_mine.evaluate.weights import Classifier


def class_regions(gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The regions of one ground-truth map.

    Args:
        gt: int ``[H, W]`` train ids, K = ignored.
        num_classes: K.

    Returns:
        ``(classes, masks)``: int64 ``[R]`` the classes present (ascending) and bool ``[R, H, W]`` their pixels.
    """
    present = np.unique(gt)
    present = present[present < num_classes].astype(np.int64)
    return present, gt[None] == present[:, None, None]


def classify_regions(
    data: SemSegData,
    classifiers: Sequence[Classifier],
    *,
    device: Any = "cpu",
    batch_size: int = 64,
    images_per_batch: int = 1,
    on_image: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Classify every ground-truth class region of the benchmark with each classifier.

    Args:
        data: the benchmark.
        classifiers: the models (each sees the same regions).
        device: where crops are rendered and encoded.
        batch_size: crops per image-encoder call (spanning images).
        images_per_batch: images whose crops are encoded together (a GPU's batches stay full).
        on_image: called after each image (progress).

    Returns:
        Per classifier name, :func:`ovseg_mine.finetune.evaluate.summarize`'s dict: ``masks`` (regions), ``top1``,
        ``top5``, ``mean_top1`` (mean class accuracy), ``mean_top5``, ``per_category`` (fractions in [0, 1]).

    Raises:
        LabelError: a label value outside the classes (file and value named).
    """
    import torch

    from ovseg_mine.finetune.evaluate import summarize, topk_hits

    names = list(data.classes.names)
    k = len(names)
    hits = {c.name: ([], [], []) for c in classifiers}  # top1, top5, targets
    texts = {c.name: c.text(names) for c in classifiers}

    def flush(group: list[tuple[Any, Any, np.ndarray]]) -> None:
        items = [(image, masks) for image, masks, _ in group]
        targets = np.concatenate([t for _, _, t in group]) if group else np.zeros(0, np.int64)
        for clf in classifiers:
            feats = torch.cat(clf.encode_many(items, batch_size=batch_size))
            h1, h5 = topk_hits(feats @ texts[clf.name].T, torch.from_numpy(targets))
            top1, top5, tgt = hits[clf.name]
            top1.extend(h1.tolist()), top5.extend(h5.tolist()), tgt.extend(targets.tolist())

    group: list[tuple[Any, Any, np.ndarray]] = []
    for sample in data.samples():
        classes, masks = class_regions(sample.gt, k)
        image = torch.from_numpy(sample.image).permute(2, 0, 1).to(device)
        group.append((image, torch.from_numpy(masks).to(device), classes))
        if len(group) >= images_per_batch:
            flush(group)
            group = []
        if on_image is not None:
            on_image()
    if group:
        flush(group)
    return {
        name: summarize(np.asarray(t1, bool), np.asarray(t5, bool), np.asarray(tg, int), names, {})
        for name, (t1, t5, tg) in hits.items()
    }

"""Semantic-segmentation scores from a pixel confusion matrix, as detectron2's ``SemSegEvaluator``
(``detectron2/evaluation/sem_seg_evaluation.py``) and zsseg/OVSeg's ``GeneralizedSemSegEvaluator``
(``open_vocab_seg/evaluation/generalized_sem_seg_evaluation.py``: mIoU over seen and unseen classes, hIoU).

The matrix is ``[K + 1, K + 1]`` int64, rows = predicted class, columns = ground-truth class, K classes. Index K
is, as a column, the ground truth's ignore value (those pixels never count) and, as a row, *no class*: a pixel
that no proposal covers (two-stage inference) or that a prediction file marks with the ignore value. detectron2
never predicts no class (its argmax covers every pixel) and drops row K from its ground-truth counts; here such a
pixel stays in its class's ground-truth count, so it is a miss (it lowers that class's accuracy and IoU and the
pixel accuracy). For predictions without no-class pixels the two are identical.

Per class c with ground-truth pixels (``pos_gt > 0``): ``acc = tp / pos_gt`` and ``IoU = tp / (pos_gt +
pos_pred - tp)``; mIoU and mACC average them over those classes, fwIoU weights IoU by ``pos_gt / sum(pos_gt)``,
pACC is ``sum(tp) / sum(pos_gt)``. A class absent from the ground truth gets no score (``None``), even when it is
predicted (its false positives still lower the IoU of the classes they cover). Scores are percentages.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class ConfusionMatrix:
    """A pixel confusion matrix over K classes, filled image by image.

    Args:
        num_classes: K (at least 1).

    Attributes:
        matrix: int64 ``[K + 1, K + 1]``; ``matrix[p, g]`` counts pixels predicted ``p`` whose ground truth is
            ``g`` (``p == K``: no class, ``g == K``: ignored).
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image.

        Args:
            pred: int ``[H, W]`` predicted train ids in ``[0, K]`` (K: no class).
            gt: int ``[H, W]`` ground-truth train ids in ``[0, K]`` (K: ignored), same shape.

        Raises:
            ValueError: different shapes, or a value outside ``[0, K]``.
        """
        if pred.shape != gt.shape:
            raise ValueError(f"prediction is {pred.shape} but ground truth is {gt.shape}")
        k = self.num_classes
        for name, a in (("prediction", pred), ("ground truth", gt)):
            if a.size and (int(a.min()) < 0 or int(a.max()) > k):
                raise ValueError(f"{name} value outside [0, {k}]: {int(a.min())}..{int(a.max())}")
        flat = (k + 1) * pred.astype(np.int64).ravel() + gt.astype(np.int64).ravel()
        self.matrix += np.bincount(flat, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)

    def merge(self, other: "ConfusionMatrix") -> None:
        """Add another matrix of the same K (e.g. from another worker)."""
        self.matrix += other.matrix


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) * 100 if values.size else None


def scores(matrix: np.ndarray, class_names: Sequence[str], seen: Sequence[int] | None = None) -> dict[str, Any]:
    """Scores of a :class:`ConfusionMatrix` ``matrix`` (see the module docstring), percentages.

    Args:
        matrix: int ``[K + 1, K + 1]``.
        class_names: K names (keys of the per-class scores).
        seen: indices of the classes seen in training (zsseg's "base" classes); adds ``mIoU-seen``,
            ``mIoU-unseen`` and ``hIoU`` (their harmonic mean; None when either is None or 0), as
            ``GeneralizedSemSegEvaluator`` over the classes with ground truth.

    Returns:
        ``{"mIoU", "fwIoU", "mACC", "pACC", "IoU": {name: float | None}, "ACC": {name: ...}, "pixels",
        "no_class_pixels", "classes_with_gt"}`` (+ the seen/unseen keys); None where no class has ground truth.
    """
    k = len(class_names)
    if matrix.shape != (k + 1, k + 1):
        raise ValueError(f"matrix is {matrix.shape} for {k} classes")
    m = matrix.astype(np.float64)
    tp = np.diag(m)[:k]
    pos_gt = m[:, :k].sum(axis=0)  # no-class predictions (row K) included: they are misses
    pos_pred = m[:k, :k].sum(axis=1)
    valid = pos_gt > 0
    acc = np.divide(tp, pos_gt, out=np.zeros(k), where=valid)
    iou = np.divide(tp, pos_gt + pos_pred - tp, out=np.zeros(k), where=valid)
    total = pos_gt.sum()
    out: dict[str, Any] = {
        "mIoU": _mean(iou[valid]),
        "fwIoU": float((iou[valid] * pos_gt[valid]).sum() / total) * 100 if total else None,
        "mACC": _mean(acc[valid]),
        "pACC": float(tp.sum() / total) * 100 if total else None,
        "IoU": {n: (float(iou[i]) * 100 if valid[i] else None) for i, n in enumerate(class_names)},
        "ACC": {n: (float(acc[i]) * 100 if valid[i] else None) for i, n in enumerate(class_names)},
        "pixels": int(total),
        "no_class_pixels": int(m[k, :k].sum()),
        "classes_with_gt": int(valid.sum()),
    }
    if seen is not None:
        mask = np.zeros(k, dtype=bool)
        mask[list(seen)] = True
        s, u = _mean(iou[valid & mask]), _mean(iou[valid & ~mask])
        out["mIoU-seen"], out["mIoU-unseen"] = s, u
        out["hIoU"] = 2 * s * u / (s + u) if s and u else None
    return out

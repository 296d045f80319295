"""COCO run-length encoding of binary masks, through pycocotools.

An RLE here is the COCO compressed form ``{"size": [height, width], "counts": str}`` (column-major,
counts as pycocotools' compressed ASCII string), the same as COCO's ``iscrowd`` annotations and SA-1B.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class RLEError(ValueError):
    """An RLE that is malformed (missing keys, wrong size) or a mask that is not 2-D."""


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode one binary mask.

    Args:
        mask: ``[H, W]`` array, bool or 0/1 integers.

    Returns:
        ``{"size": [H, W], "counts": str}``.

    Raises:
        RLEError: the mask is not 2-D.
    """
    from pycocotools import mask as mask_utils

    if mask.ndim != 2:
        raise RLEError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    return _from_coco(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False))))


def encode_many(masks: np.ndarray) -> list[dict[str, Any]]:
    """Encode ``[N, H, W]`` binary masks in one pycocotools call; returns N RLEs (see :func:`encode`)."""
    from pycocotools import mask as mask_utils

    if masks.ndim != 3:
        raise RLEError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    stacked = np.asfortranarray(np.transpose(masks.astype(np.uint8, copy=False), (1, 2, 0)))
    return [_from_coco(r) for r in mask_utils.encode(stacked)]


def _to_coco(rle: dict[str, Any]) -> dict[str, Any]:
    """Our RLE (or pycocotools' own) as pycocotools' C functions take it: ``counts`` as bytes."""
    try:
        size = [int(rle["size"][0]), int(rle["size"][1])]
        counts = rle["counts"]
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise RLEError(f"not a COCO RLE (needs size [h, w] and counts): {str(rle)[:80]}") from exc
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": size, "counts": counts}


def _from_coco(rle: dict[str, Any]) -> dict[str, Any]:
    """pycocotools' RLE (``counts`` bytes) as ours: ``{"size": [h, w] ints, "counts": str}``."""
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def from_segmentation(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """The RLE of a COCO annotation's ``segmentation``, in any of COCO's three forms.

    Args:
        segmentation: polygons (a list of ``[x0, y0, x1, y1, ...]`` lists in pixels, their union is the mask),
            an uncompressed RLE (``{"size": [h, w], "counts": [int, ...]}``, COCO's ``iscrowd`` form) or a
            compressed RLE (``counts`` a str or bytes).
        height, width: the image's size in pixels (polygons and uncompressed RLE need it).

    Returns:
        ``{"size": [H, W], "counts": str}`` (pycocotools ``frPyObjects`` and ``merge``, as ``COCO.annToRLE``).

    Raises:
        RLEError: not one of the three forms, or an empty polygon list.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            raise RLEError("empty polygon list")
        try:
            return _from_coco(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
        except (TypeError, ValueError, IndexError) as exc:
            raise RLEError(f"not COCO polygons: {str(segmentation)[:80]}") from exc
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        try:
            return _from_coco(mask_utils.frPyObjects(segmentation, height, width))
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise RLEError(f"not an uncompressed COCO RLE: {str(segmentation)[:80]}") from exc
    return _from_coco(_to_coco(segmentation))


def union(rles: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The union of RLEs of one size, as one RLE (pycocotools ``merge``).

    Raises:
        RLEError: no RLE given, or a malformed one.
    """
    from pycocotools import mask as mask_utils

    if not rles:
        raise RLEError("the union of no mask has no size")
    return _from_coco(mask_utils.merge([_to_coco(r) for r in rles], intersect=False))


def decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode an RLE to a ``[H, W]`` bool mask.

    Raises:
        RLEError: the RLE is malformed.
    """
    from pycocotools import mask as mask_utils

    return mask_utils.decode(_to_coco(rle)).astype(bool)


def area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an RLE."""
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(_to_coco(rle)))


def bbox(rle: dict[str, Any]) -> list[float]:
    """Tight box of an RLE as ``[x, y, w, h]`` in pixels (COCO XYWH; ``[0, 0, 0, 0]`` when empty)."""
    from pycocotools import mask as mask_utils

    return [float(v) for v in mask_utils.toBbox(_to_coco(rle))]


def iou(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> np.ndarray:
    """Pairwise mask IoU, ``[len(a), len(b)]`` float64 (pycocotools ``iou`` with iscrowd=0)."""
    from pycocotools import mask as mask_utils

    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    ca = [_to_coco(r) for r in a]
    cb = [_to_coco(r) for r in b]
    return np.asarray(mask_utils.iou(ca, cb, [0] * len(cb)), dtype=np.float64).reshape(len(a), len(b))

"""COCO run-length encoding of binary masks, through pycocotools.

An RLE here is the COCO compressed form ``{"size": [height, width], "counts": str}`` (column-major,
counts as pycocotools' compressed ASCII string), the same as COCO's ``iscrowd`` annotations and SA-1B.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch


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
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_many(masks: np.ndarray) -> list[dict[str, Any]]:
    """Encode ``[N, H, W]`` binary masks in one pycocotools call; returns N RLEs (see :func:`encode`)."""
    from pycocotools import mask as mask_utils

    if masks.ndim != 3:
        raise RLEError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    stacked = np.asfortranarray(np.transpose(masks.astype(np.uint8, copy=False), (1, 2, 0)))
    return [
        {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}
        for r in mask_utils.encode(stacked)
    ]


def mask_runs(masks: Sequence["torch.Tensor"]) -> list[list[np.ndarray]]:
    """Uncompressed COCO run lengths of bool masks that live on a device, with one host sync for all of them.

    COCO RLE reads a mask column by column (Fortran order) and alternates runs of 0s and 1s, starting with 0s
    (a mask whose first pixel is set starts with a run of length 0). The change points of every mask are found
    on the device in one ``nonzero``; only they travel to the host, where the run lengths are their
    differences. :func:`from_runs` turns runs into the compressed RLE pycocotools writes.

    Args:
        masks: bool tensors ``[k_i, H_i, W_i]`` (any device; sizes may differ between tensors).

    Returns:
        For each tensor, its ``k_i`` run-length arrays (uint32, summing to ``H_i * W_i``).
    """
    import torch

    flats = [m.transpose(1, 2).reshape(-1) for m in masks if m.numel()]
    lengths = [m.shape[1] * m.shape[2] for m in masks for _ in range(m.shape[0])]
    if not flats:
        return [[] for _ in masks]
    values = torch.cat(flats)
    starts = np.cumsum([0] + lengths)
    previous = torch.cat([values.new_zeros(1), values[:-1]])
    previous[torch.as_tensor(starts[:-1], device=values.device)] = False  # each mask starts with a run of 0s
    changes = torch.nonzero(values != previous).squeeze(1).cpu().numpy()  # the one host sync
    bounds = np.searchsorted(changes, starts)
    runs = [
        np.diff(np.concatenate([[0], changes[lo:hi] - start, [end - start]])).astype(np.uint32)
        for start, end, lo, hi in zip(starts[:-1], starts[1:], bounds[:-1], bounds[1:], strict=True)
    ]
    firsts = np.cumsum([0] + [m.shape[0] for m in masks])
    return [runs[a:b] for a, b in zip(firsts[:-1], firsts[1:], strict=True)]


def from_runs(runs: Sequence[int] | np.ndarray, height: int, width: int) -> dict[str, Any]:
    """The compressed COCO RLE (see :func:`encode`) of uncompressed run lengths (column-major, 0s first), as
    :func:`mask_runs` gives them; equal to :func:`encode` of the same mask.

    Raises:
        RLEError: the runs do not cover ``height * width`` pixels.
    """
    from pycocotools import mask as mask_utils

    counts = [int(v) for v in runs]
    if sum(counts) != height * width:
        raise RLEError(f"runs cover {sum(counts)} pixels, expected {height}x{width} = {height * width}")
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _to_coco(rle: dict[str, Any]) -> dict[str, Any]:
    try:
        size = [int(rle["size"][0]), int(rle["size"][1])]
        counts = rle["counts"]
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise RLEError(f"not a COCO RLE (needs size [h, w] and counts): {str(rle)[:80]}") from exc
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": size, "counts": counts}


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

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


def mask_runs(masks: Sequence["torch.Tensor"]) -> list[list[np.ndarray]]:
    """Uncompressed COCO run lengths of bool masks that live on a device, with one host sync for all of them.

    COCO RLE reads a mask column by column (Fortran order) and alternates runs of 0s and 1s, starting with 0s
    (a mask whose first pixel is set starts with a run of length 0). The change points of every mask (each pixel
    compared with the one before it in its own mask, the first with a 0) are found on the device in one
    ``nonzero``, with no host data sent to the device; only they travel to the host, where the run lengths are
    their differences. :func:`from_runs` turns runs into the compressed RLE pycocotools writes.

    Args:
        masks: bool tensors ``[k_i, H_i, W_i]`` (any device; sizes may differ between tensors).

    Returns:
        For each tensor, its ``k_i`` run-length arrays (uint32, summing to ``H_i * W_i``).
    """
    import torch

    lengths = [m.shape[1] * m.shape[2] for m in masks for _ in range(m.shape[0])]
    flips = []
    for m in masks:
        if m.numel():  # [k, 1 + H*W]: each mask column-major after a 0, so that it starts with a run of 0s
            padded = torch.cat([m.new_zeros((m.shape[0], 1)), m.transpose(1, 2).reshape(m.shape[0], -1)], dim=1)
            flips.append((padded[:, 1:] != padded[:, :-1]).reshape(-1))
    if not flips:
        return [[] for _ in masks]
    starts = np.cumsum([0] + lengths)
    changes = torch.nonzero(torch.cat(flips)).squeeze(1).cpu().numpy()  # the one host sync
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


def counts_of(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed run lengths (int64, column-major, 0s first; the inverse of :func:`from_runs`) of an RLE whose
    ``counts`` are COCO's compressed string (or already a list of runs), without decoding the mask.

    COCO's string (``maskApi.c``, ``rleToString``) writes each run as 5-bit groups, least significant first, as
    characters ``48 + group`` with bit 0x20 set on every group but a run's last, whose bit 0x10 is the sign; from
    the fourth run on, the value stored is the difference to the run two places before. Decoded here with numpy
    (no Python loop over characters).

    Raises:
        RLEError: the counts are malformed or do not cover the RLE's ``size``.
    """
    counts = rle["counts"]
    height, width = (int(v) for v in rle["size"])
    if isinstance(counts, (list, tuple, np.ndarray)):
        runs = np.asarray(counts, dtype=np.int64)
    else:
        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
        chars = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
        if chars.size and (chars.min() < 0 or chars.max() > 63 or chars[-1] & 0x20):
            raise RLEError("malformed RLE counts string")
        last = (chars & 0x20) == 0  # the last group of each run
        run = np.concatenate([[0], np.cumsum(last)[:-1]])  # which run each character belongs to
        starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
        shift = 5 * (np.arange(chars.size) - starts[run])
        runs = np.zeros(int(last.sum()), dtype=np.int64)
        np.add.at(runs, run, (chars & 0x1F) << shift)
        ends = np.flatnonzero(last)
        negative = (chars[ends] & 0x10) != 0
        runs[negative] -= np.int64(1) << (shift[ends][negative] + 5)
        for first in (1, 2):  # runs 3, 5, ... add run 1 cumulatively; runs 4, 6, ... add run 2
            runs[first::2] = np.cumsum(runs[first::2])
    if (runs < 0).any() or int(runs.sum()) != height * width:
        raise RLEError(f"RLE counts cover {int(runs.sum())} pixels, expected {height}x{width} = {height * width}")
    return runs


def masks_from_counts(counts: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
    """Decode run lengths on their device, with no host sync: ``counts`` int64 ``[k, L]``, each row a mask's
    uncompressed COCO runs (:func:`counts_of`) padded with zeros to ``L``, summing to ``height * width``.

    Returns:
        bool ``[k, height, width]`` on ``counts``' device.
    """
    import torch

    k, length = counts.shape
    values = (torch.arange(length, device=counts.device) % 2).bool().expand(k, length)
    flat = torch.repeat_interleave(values.reshape(-1), counts.reshape(-1), output_size=k * height * width)
    return flat.reshape(k, width, height).transpose(1, 2)


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

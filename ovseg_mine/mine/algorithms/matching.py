"""Matching: CLIP embeddings of masked crops and nouns, and the noun -> mask selection rule.

The rule follows OVSeg's mining (Liang et al., CVPR 2023, Sec. 3.2): each noun extracted from an image's
captions is paired with the proposal whose masked crop has the highest CLIP cosine similarity to the noun's
text embedding (:class:`ovseg_mine.text.NounEmbeddings`: the 14 ViLD prompt templates, cached per noun).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

    from ovseg_mine.config import MatchingConfig


def encode_crops(
    model: "torch.nn.Module",
    crops: "torch.Tensor",
    *,
    batch_size: int,
    precision: str = "fp32",
    pad: bool = True,
) -> "torch.Tensor":
    """CLIP image embeddings of normalized crops.

    Args:
        model: open_clip CLIP model (``encode_image``).
        crops: float ``[N, 3, S, S]``, CLIP-normalized (see :func:`ovseg_mine.crops.normalize`).
        batch_size: crops per ``encode_image`` call.
        precision: an :mod:`ovseg_mine.precision` name; ``amp_*`` autocasts. The crops are cast to the dtype of
            the model's weights (bf16 or fp16 after :func:`ovseg_mine.precision.cast_model` with ``pure_*``).
        pad: pad the last call with zero crops to ``batch_size``, so that every crop goes through kernels of one
            shape and its embedding does not depend on how many crops came with it (mining batches the crops of
            several images: the determinism contract).

    Returns:
        float32 ``[N, D]`` unit-norm embeddings on the crops' device.
    """
    import torch

    from ovseg_mine.precision import autocast

    dtype = next(model.parameters()).dtype
    chunks = []
    with torch.inference_mode(), autocast(precision, crops.device):
        for start in range(0, crops.shape[0], batch_size):
            chunk = crops[start : start + batch_size].to(dtype)
            count = chunk.shape[0]
            if pad and count < batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros((batch_size - count, *chunk.shape[1:]))])
            chunks.append(model.encode_image(chunk)[:count].float())
    feats = torch.cat(chunks) if chunks else crops.new_zeros((0, 0))
    return feats / feats.norm(dim=-1, keepdim=True)


#: The smallest CLIP call of the pooled plan (:func:`pooled_calls`): a batch's crops are padded by fewer than this.
SMALLEST_CALL = 32


def call_sizes(batch_size: int, smallest: int = SMALLEST_CALL) -> tuple[int, ...]:
    """The CLIP call sizes of the pooled plan: ``batch_size`` halved while at least ``smallest`` (256, 128, 64, 32
    for 256 and 32); just ``batch_size`` when it is below ``smallest``.

    Raises:
        ValueError: ``batch_size`` or ``smallest`` below 1.
    """
    if batch_size < 1 or smallest < 1:
        raise ValueError(f"batch_size and smallest must be at least 1, got {batch_size} and {smallest}")
    sizes = [batch_size]
    while sizes[-1] // 2 >= smallest:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def pooled_calls(
    counts: Sequence[int], batch_size: int, smallest: int = SMALLEST_CALL
) -> list[tuple[int, list[tuple[int, int]]]]:
    """How the crops of several images go through CLIP: few calls, little padding, and each crop in a call of a
    shape that depends on its own image only (the determinism contract of the mining engine).

    Each image's crops (``counts[i]`` of them, images one after the other) are cut by its own count: greedily
    into blocks of the :func:`call_sizes` (largest first), the rest (fewer than the smallest size) joining the
    smallest size's block. The blocks of one size, from all images, fill calls of that size: every call but the
    last of the smallest size is full, so a batch pads fewer than ``smallest`` crops, and a crop's call has the
    shape its image alone would give it.

    Returns:
        ``(size, ranges)`` per call, in order: the call's shape and the ``(start, stop)`` crop ranges (indices into
        the concatenated crops) it holds, at most ``size`` crops in all (fewer: the rest of the call is padding).
    """
    sizes = call_sizes(batch_size, smallest)
    blocks: dict[int, list[tuple[int, int]]] = {size: [] for size in sizes}
    offset = 0
    for count in counts:
        start, rest = offset, count
        for size in sizes:
            take = rest if size == sizes[-1] else rest // size * size
            if take:
                blocks[size].append((start, start + take))
                start, rest = start + take, rest - take
        offset += count
    calls = []
    for size in sizes:
        ranges: list[tuple[int, int]] = []
        filled = 0
        for start, stop in blocks[size]:
            while start < stop:
                take = min(stop - start, size - filled)
                ranges.append((start, start + take))
                start, filled = start + take, filled + take
                if filled == size:
                    calls.append((size, ranges))
                    ranges, filled = [], 0
        if ranges:
            calls.append((size, ranges))
    return calls


def encode_crops_pooled(
    model: "torch.nn.Module",
    crops: "torch.Tensor",
    counts: Sequence[int],
    *,
    batch_size: int,
    precision: str = "fp32",
    smallest: int = SMALLEST_CALL,
) -> "torch.Tensor":
    """:func:`encode_crops` of the crops of several images in the calls of :func:`pooled_calls` (a call's missing
    crops are zero crops): an image's embeddings are what it gives alone, given kernels whose rows do not depend
    on their position in a call of one shape (the assumption :func:`encode_crops`' padding makes too).

    Args:
        model, precision: as :func:`encode_crops`.
        crops: float ``[sum(counts), 3, S, S]``, CLIP-normalized, image after image.
        counts: crops per image.
        batch_size, smallest: the largest and smallest calls (:func:`call_sizes`).

    Returns:
        float32 ``[sum(counts), D]`` unit-norm embeddings in the crops' order (``[0, 0]`` without a crop).
    """
    import torch

    from ovseg_mine.precision import autocast

    dtype = next(model.parameters()).dtype
    pieces = []
    with torch.inference_mode(), autocast(precision, crops.device):
        for size, ranges in pooled_calls(counts, batch_size, smallest):
            parts = [crops[start:stop] for start, stop in ranges]
            count = sum(len(part) for part in parts)
            if count < size:
                parts.append(crops.new_zeros((size - count, *crops.shape[1:])))
            feats = model.encode_image((torch.cat(parts) if len(parts) > 1 else parts[0]).to(dtype)).float()
            at = 0
            for start, stop in ranges:
                pieces.append((start, feats[at : at + stop - start]))
                at += stop - start
    if not pieces:
        return crops.new_zeros((0, 0))
    feats = torch.cat([rows for _, rows in sorted(pieces, key=lambda piece: piece[0])])
    return feats / feats.norm(dim=-1, keepdim=True)


def best_masks(
    image_embeddings: "torch.Tensor",
    text_embeddings: "torch.Tensor",
    *,
    valid: "torch.Tensor | None" = None,
    logit_scale: float = 100.0,
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Each noun's best mask, on the embeddings' device and without a host sync.

    Args:
        image_embeddings: float ``[M, D]`` unit-norm crop embeddings (M >= 1 proposals).
        text_embeddings: float ``[K, D]`` unit-norm noun embeddings (K >= 1 nouns).
        valid: bool ``[M]``; masks flagged False are never chosen (None: all valid).
        logit_scale: CLIP's logit scale for the softmax over nouns.

    Returns:
        ``mask_index`` int64 ``[K]`` (first maximum: lowest index on ties), ``similarity`` float32 ``[K]``
        (cosine), ``probability`` float32 ``[K]`` (softmax over the K nouns of ``logit_scale * similarity`` at the
        chosen mask), ``margin`` float32 ``[K]`` (similarity minus the noun's runner-up among the valid masks;
        ``+inf`` when there is no runner-up).
    """
    import torch

    sims = text_embeddings.float() @ image_embeddings.float().T  # [K, M]
    if valid is not None:
        sims = sims.masked_fill(~valid[None, :], -torch.inf)
    best = sims.argmax(dim=1)
    best_sims = sims.gather(1, best[:, None])[:, 0]
    probs = torch.softmax(logit_scale * sims[:, best], dim=0).diagonal()  # [K nouns, K chosen masks]
    runner_up = sims.scatter(1, best[:, None], -torch.inf).max(dim=1).values
    return best, best_sims, probs, best_sims - runner_up


@dataclass(frozen=True)
class Match:
    """One noun paired with its best mask.

    Attributes:
        noun_index: index into the image's noun list.
        mask_index: index into the image's proposals.
        similarity: cosine similarity of the crop and noun embeddings, in [-1, 1].
        probability: softmax over the image's nouns of ``logit_scale * similarity`` for the chosen mask.
        margin: similarity minus the noun's similarity to its runner-up mask; None with a single mask.
    """

    noun_index: int
    mask_index: int
    similarity: float
    probability: float
    margin: float | None


def match_nouns(
    image_embeddings: "torch.Tensor", text_embeddings: "torch.Tensor", *, logit_scale: float = 100.0
) -> list[Match]:
    """Pick each noun's best mask (:func:`best_masks`, brought to the host).

    Args:
        image_embeddings: float ``[M, D]`` unit-norm crop embeddings (M proposals).
        text_embeddings: float ``[K, D]`` unit-norm noun embeddings (K nouns).
        logit_scale: CLIP's logit scale, multiplying the cosine similarities before the softmax over nouns (100).

    Returns:
        K matches in noun order (empty if M or K is 0). Ties pick the lowest mask index.
    """
    if text_embeddings.shape[0] == 0 or image_embeddings.shape[0] == 0:
        return []
    best, sims, probs, margins = best_masks(image_embeddings, text_embeddings, logit_scale=logit_scale)
    rows = zip(best.tolist(), sims.tolist(), probs.tolist(), margins.tolist(), strict=True)
    return [Match(k, m, s, p, None if math.isinf(margin) else margin) for k, (m, s, p, margin) in enumerate(rows)]


def passes_thresholds(
    similarity: "torch.Tensor", probability: "torch.Tensor", margin: "torch.Tensor", cfg: "MatchingConfig"
) -> "torch.Tensor":
    """Which matches pass the recipe's thresholds (``min_similarity``, ``min_probability``, ``min_margin``), on the
    tensors' device without a host sync: bool, the shape of the inputs (:func:`best_masks`' outputs). A match
    without a runner-up (margin ``+inf``) passes the margin threshold."""
    return (similarity >= cfg.min_similarity) & (probability >= cfg.min_probability) & (margin >= cfg.min_margin)

"""Matching: CLIP embeddings of masked crops and nouns, and the noun -> mask selection rule.

The rule follows OVSeg's mining (Liang et al., CVPR 2023, Sec. 3.2): each noun extracted from an image's
captions is paired with the proposal whose masked crop has the highest CLIP cosine similarity to the noun's
text embedding (:class:`ovseg_mine.text.NounEmbeddings`: the 14 ViLD prompt templates, cached per noun).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

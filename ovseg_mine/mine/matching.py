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
) -> "torch.Tensor":
    """CLIP image embeddings of normalized crops.

    Args:
        model: open_clip CLIP model (``encode_image``).
        crops: float ``[N, 3, S, S]``, CLIP-normalized (see :func:`ovseg_mine.crops.normalize`).
        batch_size: crops per ``encode_image`` call.
        precision: an :mod:`ovseg_mine.precision` name; ``amp_*`` autocasts. The crops are cast to the dtype of
            the model's weights (bf16 or fp16 after :func:`ovseg_mine.precision.cast_model` with ``pure_*``).

    Returns:
        float32 ``[N, D]`` unit-norm embeddings on the crops' device.
    """
    import torch

    from ovseg_mine.precision import autocast

    dtype = next(model.parameters()).dtype
    chunks = []
    with torch.inference_mode(), autocast(precision, crops.device):
        for start in range(0, crops.shape[0], batch_size):
            chunks.append(model.encode_image(crops[start : start + batch_size].to(dtype)).float())
    feats = torch.cat(chunks) if chunks else crops.new_zeros((0, 0))
    return feats / feats.norm(dim=-1, keepdim=True)


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
    """Pick each noun's best mask.

    Args:
        image_embeddings: float ``[M, D]`` unit-norm crop embeddings (M proposals).
        text_embeddings: float ``[K, D]`` unit-norm noun embeddings (K nouns).
        logit_scale: CLIP's logit scale, multiplying the cosine similarities before the softmax over nouns (100).

    Returns:
        K matches in noun order (empty if M or K is 0). Ties pick the lowest mask index.
    """
    import torch

    k, m = text_embeddings.shape[0], image_embeddings.shape[0]
    if k == 0 or m == 0:
        return []
    sims = (text_embeddings.float() @ image_embeddings.float().T).cpu()  # [K, M]
    best = sims.argmax(dim=1)  # first maximum: lowest index on ties
    best_sims = sims.gather(1, best[:, None])[:, 0]
    probs = torch.softmax(logit_scale * sims[:, best], dim=0)  # [K nouns, K chosen masks]
    if m > 1:
        others = sims.clone()
        others[torch.arange(k), best] = -math.inf
        runner_up = others.max(dim=1).values
    matches = []
    for i in range(k):
        margin = float(best_sims[i] - runner_up[i]) if m > 1 else None
        matches.append(Match(i, int(best[i]), float(best_sims[i]), float(probs[i, i]), margin))
    return matches


def keep_match(match: Match, cfg: "MatchingConfig") -> bool:
    """True when a match passes the recipe's thresholds (similarity, probability, margin).

    A match without a margin (single proposal) passes the margin threshold.
    """
    if match.similarity < cfg.min_similarity or match.probability < cfg.min_probability:
        return False
    return match.margin is None or match.margin >= cfg.min_margin

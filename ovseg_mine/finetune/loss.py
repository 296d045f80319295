"""Contrastive loss between masked crops and their nouns, with same-noun pairs as positives.

CLIP's loss (Radford et al., 2021; open_clip ``open_clip/loss.py``, ``ClipLoss``), which the OVSeg reference
trains with (facebookresearch/ov-seg, ``open_clip_training/src/training/train.py``), takes the i-th text of
the batch as the only positive of the i-th image. Mined pairs repeat nouns ("person" many times in a batch),
so that loss pushes a crop of a person away from the word "person" of another pair. Here the text side is the
batch's *unique* nouns: each crop's positive is its noun, and each noun's positives are all crops of it.
With all nouns distinct this is exactly CLIP's symmetric loss.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def unique_targets(nouns: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The batch's unique nouns in first-seen order and, per pair, the index of its noun among them.

    Returns:
        ``(unique, targets)``: ``unique`` a list of U strings; ``targets`` int64 ``[len(nouns)]`` in [0, U).
    """
    index: dict[str, int] = {}
    targets = [index.setdefault(n, len(index)) for n in nouns]
    return list(index), torch.tensor(targets, dtype=torch.long)


def noun_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric contrastive loss of crops against the batch's unique nouns.

    Args:
        image_features: float ``[B, D]`` unit-norm crop embeddings.
        text_features: float ``[U, D]`` unit-norm embeddings of the batch's unique nouns.
        targets: int64 ``[B]``, the noun index of each crop (:func:`unique_targets`).
        logit_scale: the temperature multiplier (CLIP's ``logit_scale.exp()``, at most 100).

    Returns:
        Scalar float32: the mean of

        * image -> text: cross-entropy of ``logit_scale * image @ text.T`` ``[B, U]`` against ``targets``;
        * text -> image: for each noun u, ``-log(sum_{i: target_i = u} exp(l_iu) / sum_i exp(l_iu))``, the
          multi-positive form of CLIP's text-side cross-entropy, averaged over the U nouns.
    """
    logits = logit_scale * image_features.float() @ text_features.float().T  # [B, U]
    image_loss = F.cross_entropy(logits, targets)
    columns = logits.T  # [U, B]
    positive = targets[None, :] == torch.arange(columns.shape[0], device=columns.device)[:, None]  # [U, B]
    pos = torch.logsumexp(columns.masked_fill(~positive, float("-inf")), dim=1)
    text_loss = (torch.logsumexp(columns, dim=1) - pos).mean()
    return (image_loss + text_loss) / 2

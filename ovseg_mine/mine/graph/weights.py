"""The weights of a mining run, resolved once by the driver and handed to every actor, so that every actor
loads the same weights and none downloads, hashes or falls back to random weights on its own."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ovseg_mine.config import MineConfig

if TYPE_CHECKING:
    import torch

    from ovseg_mine.weights_info import WeightsInfo


@dataclass(frozen=True)
class ResolvedWeights:
    """Weights chosen once by the driver (:func:`resolve_weights`) and handed to every actor (pickled).

    Attributes:
        sam_path: SAM's checkpoint file (the published one in the driver's cache, or the recipe's local file);
            None for random weights, or when the run's masks are given and SAM is not used.
        clip_path: CLIP's weights file (a pretrained tag's file in open_clip's cache, or a local checkpoint);
            None for random weights.
        clip_tag: the pretrained tag's open_clip config (preprocessing, QuickGELU); empty for a local file and
            for random weights.
        models: per model (``sam``, ``clip``), :meth:`~ovseg_mine.weights_info.WeightsInfo.to_dict`: where the
            weights came from and their sha256 (the manifest's ``models``).
        random: some weights are randomly initialised (the manifest's ``weights: random``).
    """

    sam_path: str | None = None
    clip_path: str | None = None
    clip_tag: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    random: bool = False


def resolve_weights(cfg: MineConfig) -> ResolvedWeights:
    """Resolve the models' weights once in the driver, without building the models (no SAM or CLIP in the
    driver's memory): downloads and checks published weights, hashes local files, applies the recipe's random
    fallback, and records where the weights came from. Actors then load exactly these files
    (:func:`load_models`), or ``random`` with the run's seed, so no actor downloads, hashes or falls back on its
    own. A local file of the wrong architecture is found by the actors, whose first failure stops the run with the
    loader's message (ovseg_mine.mine.graph.dataset.guarded). With given masks (``proposals.kind`` not ``sam``)
    SAM is not resolved: only CLIP is resolved and recorded.

    Raises:
        ovseg_mine.weights_info.WeightsError: weights unavailable and the recipe does not allow random weights.
    """
    from ovseg_mine.models import resolve_clip_weights, resolve_sam_weights

    sam_path, sam_info = None, None
    if cfg.proposals.kind == "sam":
        sam_path, sam_info = resolve_sam_weights(
            cfg.sam.model_type, cfg.sam.checkpoint, allow_random=cfg.allow_random_weights
        )
    clip_path, clip_tag, clip_info = resolve_clip_weights(
        cfg.clip.arch, cfg.clip.pretrained, allow_random=cfg.allow_random_weights
    )
    models = {"clip": clip_info.to_dict()}
    if sam_info is not None:
        models = {"sam": sam_info.to_dict(), **models}
    return ResolvedWeights(  # absolute paths: an actor's working folder is not the driver's
        sam_path=None if sam_path is None else os.path.abspath(sam_path),
        clip_path=None if clip_path is None else os.path.abspath(clip_path),
        clip_tag=dict(clip_tag),
        models=models,
        random=_is_random(sam_info) or clip_info.is_random,
    )


def _is_random(info: "WeightsInfo | None") -> bool:
    return info is not None and info.is_random


def load_models(cfg: MineConfig, weights: ResolvedWeights, device: "torch.device | str") -> tuple[Any, Any, Any]:
    """Build the run's models on ``device`` from the driver's :class:`ResolvedWeights`, without resolving or
    hashing them again: ``(sam, clip, tokenizer)``, ``sam`` None when ``proposals.kind`` is not ``sam``.

    The files are read where the driver found them: the same path on every node (a shared cache, or the same
    home folder). A node that does not have a file there (a cluster without a shared disk) gets it as the driver
    did: it downloads and checks published weights into its own cache; a local checkpoint missing there is an
    error.

    Raises:
        ovseg_mine.weights_info.WeightsError: a file missing (and not published), corrupt or of another
            architecture; published weights that this node cannot obtain.
        ovseg_mine.weights_info.ModelNameError: unknown ``sam.model_type`` or ``clip.arch``.
    """
    from ovseg_mine.models import build_clip, build_sam, resolve_clip_weights, resolve_sam_weights

    sam = None
    if cfg.proposals.kind == "sam":
        sam_path: Any = weights.sam_path
        if sam_path is not None and not os.path.isfile(sam_path):  # not on this node: get it as the driver did
            sam_path, _ = resolve_sam_weights(cfg.sam.model_type, cfg.sam.checkpoint)
        sam = build_sam(cfg.sam.model_type, sam_path, device=device, seed=cfg.seed)
    clip_path, clip_tag = weights.clip_path, weights.clip_tag
    if clip_path is not None and not os.path.isfile(clip_path):
        clip_path, clip_tag, _ = resolve_clip_weights(cfg.clip.arch, cfg.clip.pretrained)
    clip, tokenizer = build_clip(cfg.clip.arch, clip_path, clip_tag, device=device, seed=cfg.seed)
    return sam, clip, tokenizer

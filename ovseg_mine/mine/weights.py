"""The weights of a mining run, resolved once by the driver and handed to every actor, so that every actor
loads the same weights and none downloads or falls back to random weights on its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ovseg_mine.config import MineConfig

if TYPE_CHECKING:
    from ovseg_mine.models import WeightsInfo


@dataclass
class ResolvedWeights:
    """Weights chosen once by the driver and handed to every actor."""

    sam_checkpoint: str
    clip_pretrained: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    random: bool = False


def resolve_weights(cfg: MineConfig) -> ResolvedWeights:
    """Load both models once on CPU in the driver: downloads and checks weights, applies the recipe's
    random fallback, and records what was loaded. Actors then load exactly these weights (the cached file,
    or ``random`` with the run's seed), so no actor downloads or falls back on its own. With given masks
    (``proposals.kind`` not ``sam``) SAM is not loaded: only CLIP is resolved and recorded.

    Raises:
        ovseg_mine.models.WeightsError: weights unavailable and the recipe does not allow random weights.
    """
    import gc

    from ovseg_mine.models import load_clip, load_sam

    sam_info = None
    if cfg.proposals.kind == "sam":
        sam, sam_info = load_sam(
            cfg.sam.model_type, cfg.sam.checkpoint, device="cpu", seed=cfg.seed, allow_random=cfg.allow_random_weights
        )
        del sam
    clip, _, clip_info = load_clip(
        cfg.clip.arch, cfg.clip.pretrained, device="cpu", seed=cfg.seed, allow_random=cfg.allow_random_weights
    )
    del clip
    gc.collect()

    def actor_spec(info: "WeightsInfo", asked: str) -> str:
        if info.is_random:
            return "random"
        return info.source if info.weights == "file" and info.source else asked

    models = {"clip": clip_info.to_dict()}
    if sam_info is not None:
        models = {"sam": sam_info.to_dict(), **models}
    return ResolvedWeights(
        sam_checkpoint=actor_spec(sam_info, cfg.sam.checkpoint) if sam_info is not None else "",
        clip_pretrained=actor_spec(clip_info, cfg.clip.pretrained),
        models=models,
        random=(sam_info is not None and sam_info.is_random) or clip_info.is_random,
    )

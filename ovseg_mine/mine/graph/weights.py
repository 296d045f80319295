"""The weights of a mining run, resolved once by the driver and handed to every actor, so that every actor
loads the same weights and none downloads or falls back to random weights on its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ovseg_mine.config import MineConfig

if TYPE_CHECKING:
    from ovseg_mine.weights_info import WeightsInfo


@dataclass
class ResolvedWeights:
    """Weights chosen once by the driver and handed to every actor."""

    sam_checkpoint: str
    clip_pretrained: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    random: bool = False


def resolve_weights(cfg: MineConfig) -> ResolvedWeights:
    """Resolve the models' weights once in the driver, without building the models (no SAM or CLIP in the
    driver's memory): downloads and checks published weights, applies the recipe's random fallback, and records
    where the weights came from. Actors then load exactly these weights (the cached file, or ``random`` with the
    run's seed), so no actor downloads or falls back on its own. A local file of the wrong architecture is found
    by the actors, whose first failure stops the run with the loader's message (ovseg_mine.mine.graph.dataset.guarded).
    With given masks (``proposals.kind`` not ``sam``) SAM is not resolved: only CLIP is resolved and recorded.

    Raises:
        ovseg_mine.weights_info.WeightsError: weights unavailable and the recipe does not allow random weights.
    """
    from ovseg_mine.models import resolve_clip_weights, resolve_sam_weights

    sam_info = None
    if cfg.proposals.kind == "sam":
        _, sam_info = resolve_sam_weights(cfg.sam.model_type, cfg.sam.checkpoint, allow_random=cfg.allow_random_weights)
    _, _, clip_info = resolve_clip_weights(cfg.clip.arch, cfg.clip.pretrained, allow_random=cfg.allow_random_weights)

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

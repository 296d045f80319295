"""Where a model's weights came from (recorded in manifests and checkpoints), the errors of weights that do not
load, and the checked strict load of a state dict. Shared by SAM's and CLIP's loaders (:mod:`ovseg_mine.models`,
:mod:`ovseg_mine.clip_weights`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class WeightsError(RuntimeError):
    """Pretrained weights cannot be loaded (download failed, file missing/corrupt, wrong architecture)."""


class ModelNameError(WeightsError, ValueError):
    """An unknown model type, architecture or pretrained tag; the message lists where the valid names are."""


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from; recorded in the run manifest."""

    name: str  # 'vit_b', 'tiny', 'ViT-B-16', ...
    weights: str  # 'random', 'default' (published SAM), an open_clip tag like 'openai', or 'file'
    source: str | None  # URL, local path or 'hf-hub:org/repo/file' it came from; None for random
    sha256: str | None  # of the checkpoint file, when loaded from one

    @property
    def is_random(self) -> bool:
        return self.weights == "random"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_fitting_state(model: Any, state: dict, subject: str, target: str) -> None:
    """Load ``state`` (a state dict of tensors) into ``model`` (a ``torch.nn.Module``) only when its keys and shapes
    are exactly the model's.

    Args:
        subject: what the weights are, for the message (``"checkpoint /path/sam.pth"``).
        target: what they were meant for (``"SAM vit_b"``, ``"open_clip 'ViT-B-16'"``).

    Raises:
        WeightsError: one line, ``"{subject} does not fit {target}: N missing keys [...], M unexpected keys [...],
            K shape mismatches [...]"`` (the first three of each).
    """
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{subject} does not fit {target}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}"
        )
    model.load_state_dict(state, strict=True)

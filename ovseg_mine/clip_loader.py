"""A ready CLIP from ``(arch, pretrained)``, whatever ``pretrained`` is: an open_clip tag, ``random``, or a weights file
of another tool (read by :mod:`ovseg_mine.clip_weights`), with the file's mask prompts attached."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ovseg_mine.clip_weights import load_state, prompts_from_embedding, read_weights
from ovseg_mine.models import clip_input_size, clip_mean_std, load_clip
from ovseg_mine.resources import register_clip_configs
from ovseg_mine.storage import sha256_file
from ovseg_mine.weights_info import WeightsInfo

if TYPE_CHECKING:
    from ovseg_mine.finetune.mask_prompt import MaskPrompts


@dataclass
class LoadedClip:
    """What :func:`load_clip_model` returns.

    Attributes:
        model: open_clip CLIP in eval mode on the requested device.
        tokenizer: its tokenizer (``tokenizer(list_of_str) -> int64 [N, context_length]``).
        prompts: :class:`~ovseg_mine.finetune.mask_prompt.MaskPrompts` when the file had a mask embedding, else None.
        info: where the weights came from (:class:`~ovseg_mine.models.WeightsInfo`; ``weights="file"`` for files).
        arch: the architecture built (``arch``, or its ``-quickgelu`` variant for an OVSeg checkpoint).
        kind: the file kind (:attr:`ForeignWeights.kind`), ``"tag"`` or ``"random"``.
        size: square input side in pixels; mean, std: per-channel RGB normalization for pixels in [0, 1].
    """

    model: Any
    tokenizer: Callable[..., Any]
    prompts: "MaskPrompts | None"
    info: WeightsInfo
    arch: str
    kind: str
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_clip_model(
    arch: str,
    pretrained: str,
    *,
    device: Any = "cpu",
    seed: int = 0,
    with_prompts: bool = True,
    allow_random: bool = False,
) -> LoadedClip:
    """A ready open_clip model (+ mask prompts when the weights carry them) from ``(arch, pretrained)``.

    Args:
        arch: an open_clip architecture (``open_clip.list_models()``; ``ovseg-tiny-vit`` for tests). An OVSeg
            detectron2 checkpoint holds OpenAI CLIP weights, trained with QuickGELU: ``arch``'s
            ``-quickgelu`` variant is built for it when open_clip has one.
        pretrained: an open_clip tag of ``arch``, ``"random"``, or a weights file of a kind in the module docstring.
        device: torch device.
        seed: seed of random initialisation (``random``).
        with_prompts: attach the file's mask embedding as mask prompts.
        allow_random: a tag that cannot be downloaded gives seeded random weights with a warning.

    Returns:
        A :class:`LoadedClip`.

    Raises:
        ModelNameError: unknown architecture or tag. WeightsError: a file that is no CLIP weights file or does
            not fit ``arch`` (one line with missing/unexpected key counts). MaskPromptError: a mask embedding of
            another shape than the model's patch grid.
    """
    import open_clip

    register_clip_configs()
    expanded = os.path.expanduser(pretrained)
    weights = read_weights(expanded) if pretrained != "random" and os.path.isfile(expanded) else None
    prompts = None
    if weights is None:
        model, tokenizer, info = load_clip(arch, pretrained, device="cpu", seed=seed, allow_random=allow_random)
        kind = "random" if info.is_random else "tag"
    else:
        if weights.kind == "ovseg detectron2" and not arch.endswith("-quickgelu"):
            if f"{arch}-quickgelu" in open_clip.list_models():
                arch = f"{arch}-quickgelu"
        model, tokenizer, _ = load_clip(arch, "random", device="cpu", seed=seed)
        load_state(model, weights, arch)
        info = WeightsInfo(arch, "file", str(Path(expanded).resolve()), sha256_file(expanded))
        kind = weights.kind
        if with_prompts and weights.mask_embedding is not None:
            prompts = prompts_from_embedding(model, weights.mask_embedding, expanded)
    model = model.to(device).eval()
    if prompts is not None:
        prompts = prompts.to(device)
    mean, std = clip_mean_std(model)
    return LoadedClip(model, tokenizer, prompts, info, arch, kind, clip_input_size(model), mean, std)

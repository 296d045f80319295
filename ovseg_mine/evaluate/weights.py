"""The CLIP weights that ``evaluate`` scores, and the masked-region classifier built on them.

Weights come from an ovseg-mine finetune folder (``--checkpoint``: its CLIP and mask prompts, and with
``--baseline`` the weights it started from), or from ``--arch/--pretrained`` (an open_clip tag or a local
open_clip_train epoch file, an OVSeg ``.pth``, safetensors: :mod:`ovseg_mine.clip_weights`), loaded by
:func:`load_clip`, the one place here that turns ``(arch, pretrained)`` into a model and its mask prompts.

:class:`Classifier` is what both tasks use: class-name embeddings with the 14 ViLD templates
(:class:`ovseg_mine.text.NounEmbeddings`) and embeddings of masked crops rendered as mining renders proposals
(:func:`ovseg_mine.crops.render_masked_crops`: tight box, CLIP's mean pixel, bicubic), with the mask prompts when
the weights have them (OVSeg's mask prompt tuning, Sec. 3.3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

#: OVSeg's CLIP logit scale for region classification (``clip_adapter``'s ``temperature=100``).
LOGIT_SCALE = 100.0


class WeightsLoadError(ValueError):
    """Weights that cannot be loaded or combined as asked; the message says why, in one line."""


def load_clip(
    arch: str, pretrained: str, *, device: Any = "cpu", seed: int = 0, with_prompts: bool = True
) -> tuple[Any, Callable[..., Any], Any, dict[str, Any]]:
    """Build an open_clip model from ``(arch, pretrained)`` through :func:`ovseg_mine.clip_loader.load_clip_model`:
    an open_clip tag, an open_clip_train epoch file, an OVSeg detectron2 ``.pth``, a safetensors file, or
    ``"random"`` (seeded with ``seed``, for tests).

    Returns:
        ``(model, tokenizer, prompts, description)``: the model in eval mode on ``device``, its tokenizer, the mask
        prompts the file carries (``visual.mask_embedding``; None without, or unless ``with_prompts``) and a
        JSON-able description of the weights (arch, tag or file, sha256).

    Raises:
        WeightsLoadError: unknown arch or tag, a file that is no CLIP weights or does not fit ``arch`` (missing and
            unexpected key counts), weights that cannot be downloaded.
    """
    from ovseg_mine.clip_loader import load_clip_model
    from ovseg_mine.finetune.mask_prompt import MaskPromptError
    from ovseg_mine.weights_info import WeightsError

    try:
        loaded = load_clip_model(arch, pretrained, device=device, seed=seed, with_prompts=with_prompts)
    except (WeightsError, MaskPromptError, ValueError) as exc:
        raise WeightsLoadError(str(exc)) from exc
    return loaded.model, loaded.tokenizer, loaded.prompts, loaded.info.to_dict()


@dataclass
class Classifier:
    """A CLIP (and its mask prompts) ready to classify masked regions.

    Attributes:
        name: how reports call it (``checkpoint``, ``baseline``, ``model``).
        model: an open_clip CLIP in eval mode.
        tokenizer: its tokenizer.
        prompts: :class:`~ovseg_mine.finetune.mask_prompt.MaskPrompts` or None.
        size: crop side in pixels (the model's input size); mean, std: its normalization in [0, 1].
        weights: JSON-able description of the weights.
        device: where the model runs.
    """

    name: str
    model: Any
    tokenizer: Any
    prompts: Any
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: dict[str, Any]
    device: Any = "cpu"
    _text: Any = field(default=None, repr=False)
    _dim: int = field(default=0, repr=False)

    def text(self, names: Sequence[str]) -> Any:
        """float32 ``[K, D]`` unit-norm class embeddings (14 ViLD templates averaged), cached per name."""
        from ovseg_mine.text import NounEmbeddings

        if self._text is None:
            self._text = NounEmbeddings(self.model, self.tokenizer, self.device)
        emb = self._text.embed(list(names))
        if names:
            self._dim = int(emb.shape[1])
        return emb

    def encode_many(self, items: Sequence[tuple[Any, Any]], batch_size: int = 64) -> list[Any]:
        """Unit-norm embeddings of the masked crops of several images, in image-encoder calls of up to
        ``batch_size`` crops that span images (a GPU's batches stay full however few masks an image has).

        Args:
            items: per image ``(image, masks)``: uint8 ``[3, H, W]`` RGB and bool ``[N, H, W]`` masks (none empty),
                both on the device.
            batch_size: crops per image-encoder call.

        Returns:
            Per image, float32 ``[N, D]`` on the device.
        """
        import torch

        from ovseg_mine.crops import CLIP_MEAN_PIXEL, mask_bboxes, normalize, render_masked_crops
        from ovseg_mine.finetune.patch_mask import crop_masks, patch_foreground

        crops, fgs, counts = [], [], []
        with torch.inference_mode():
            for image, masks in items:
                boxes = mask_bboxes(masks)
                counts.append(int(masks.shape[0]))
                if not masks.shape[0]:
                    continue
                rendered = render_masked_crops(image, masks, boxes, size=self.size, fill=CLIP_MEAN_PIXEL)
                crops.append(normalize(rendered, self.mean, self.std))
                if self.prompts is not None:
                    fgs.append(patch_foreground(crop_masks(masks, boxes, size=self.size), self.prompts.patch_size))
            if not crops:  # D is known once the class names are embedded (:meth:`text`)
                return [torch.zeros((0, self._dim), device=self.device) for _ in counts]
            pixels, out = torch.cat(crops), []
            fg = torch.cat(fgs) if fgs else None
            for start in range(0, pixels.shape[0], batch_size):
                part = pixels[start : start + batch_size]
                if fg is not None:
                    feats = self.prompts(part, fg[start : start + batch_size])
                else:
                    feats = self.model.encode_image(part)
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return list(torch.split(torch.cat(out), counts))


def _from_model(
    name: str, model: Any, tokenizer: Any, prompts: Any, weights: dict[str, Any], device: Any, pre: dict | None = None
) -> Classifier:
    from ovseg_mine.models import clip_input_size, clip_mean_std

    if pre:  # a finetune's recorded preprocessing (its weights file carries none)
        size, mean, std = int(pre["size"]), tuple(pre["mean"]), tuple(pre["std"])
    else:
        (mean, std), size = clip_mean_std(model), clip_input_size(model)
    return Classifier(name, model, tokenizer, prompts, size, mean, std, weights, device)


def load_classifiers(
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    pretrained: str | None = None,
    baseline: bool = False,
    no_prompts: bool = False,
    device: Any = "cpu",
) -> list[Classifier]:
    """The models to evaluate: ``checkpoint`` (then also its start weights with ``baseline``), or ``arch`` +
    ``pretrained``.

    Raises:
        WeightsLoadError: neither or both sources given, ``baseline`` without a checkpoint, or weights that do
            not load (the message says which).
    """
    from ovseg_mine.clip_weights import load_prompts_any
    from ovseg_mine.finetune.checkpoint import CheckpointError, load_finetuned
    from ovseg_mine.finetune.mask_prompt import MaskPromptError
    from ovseg_mine.weights_info import WeightsError

    if (checkpoint is None) == (arch is None):
        raise WeightsLoadError("give either --checkpoint FOLDER or --arch ARCH --pretrained TAG_OR_FILE")
    if arch is not None:
        if baseline:
            raise WeightsLoadError(
                "--baseline needs --checkpoint (the baseline is the weights a finetune started from)"
            )
        model, tokenizer, prompts, info = load_clip(
            arch, pretrained or "openai", device=device, with_prompts=not no_prompts
        )
        return [_from_model("model", model, tokenizer, prompts, info, device)]
    try:
        model, tokenizer, prompts, meta = load_finetuned(checkpoint, device=device, with_prompts=not no_prompts)
        described = {"checkpoint": str(checkpoint), "arch": meta.get("open_clip_arch"), "prompts": prompts is not None}
        out = [_from_model("checkpoint", model, tokenizer, prompts, described, device, meta.get("preprocess"))]
        if baseline:
            start = meta["start"]
            base, base_tok, _, info = load_clip(
                start["arch"], start["pretrained"], device=device, seed=start.get("seed", 0), with_prompts=False
            )
            prompts_file = start.get("prompts") if not no_prompts else None
            base_prompts = load_prompts_any(prompts_file, base) if prompts_file else None
            out.append(_from_model("baseline", base, base_tok, base_prompts, info, device, meta.get("preprocess")))
    except (CheckpointError, MaskPromptError, WeightsError, KeyError) as exc:
        raise WeightsLoadError(str(exc)) from exc
    return out

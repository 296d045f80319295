"""CLIP weights written by other tools, read into an open_clip model (:func:`ovseg_mine.clip_loader.load_clip_model`
is the one entry point for ``(arch, pretrained)``).

``pretrained`` is an open_clip tag (``openai``, ``laion2b_s34b_b88k``...: :func:`ovseg_mine.models.load_clip`),
``random``, or a file of one of these kinds (found from its content, not its name):

* an **open_clip_train epoch file** (``epoch_N.pt``: ``{"epoch", "name", "state_dict", "optimizer"...}``), the
  ``module.`` prefix of a DDP run stripped, as OVSeg's ``tools/ovseg_replace_clip.py`` does;
* an **OVSeg detectron2 checkpoint** (``ovseg_swinbase_vitL14_ft_mpt.pth``: ``{"model": {...}}``): the keys under
  ``clip_adapter.clip_model.`` (OVSeg's CLIP is OpenAI's, whose key names open_clip's CLIP class shares);
* **safetensors** (``open_clip_model.safetensors``, what ``ovseg-mine finetune`` and the Hub's open_clip
  repositories hold), or a plain ``torch.save``'d state dict;
* an OpenAI TorchScript archive (``ViT-B-16.pt``), handed to open_clip's own loader.

In any of them, ``visual.mask_embedding`` (OVSeg's mask prompts, float ``[depth, grid_h * grid_w, width]``, or
``[depth, 1, width]`` shared by all patches; facebookresearch/ov-seg ``third_party/CLIP/clip/model.py``,
``VisionTransformer.mask_embedding``) is taken out of the state dict and becomes
:class:`~ovseg_mine.finetune.mask_prompt.MaskPrompts`. A file that is none of these kinds, or whose keys do not fit
the architecture, raises :class:`~ovseg_mine.weights_info.WeightsError` with one line: the kind found and how many keys
are missing and unexpected.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovseg_mine.weights_info import WeightsError, load_fitting_state

if TYPE_CHECKING:
    import torch

    from ovseg_mine.finetune.mask_prompt import MaskPrompts

#: The key prefix of the CLIP inside OVSeg's detectron2 model (``tools/ovseg_replace_clip.py``).
OVSEG_PREFIX = "clip_adapter.clip_model."
MASK_EMBEDDING = "visual.mask_embedding"


@dataclass
class ForeignWeights:
    """A CLIP state dict read from another tool's file.

    Attributes:
        kind: ``"open_clip_train epoch"``, ``"ovseg detectron2"``, ``"safetensors"``, ``"state dict"`` or
            ``"torchscript"`` (then ``state`` is empty: open_clip's loader reads the file itself).
        state: parameter name -> tensor, open_clip CLIP key names, without ``module.`` and the mask embedding.
        mask_embedding: float ``[depth, n_patches or 1, width]`` or None.
        path: the file.
    """

    kind: str
    state: dict[str, "torch.Tensor"]
    mask_embedding: "torch.Tensor | None"
    path: str


def _strip_module(state: dict[str, Any]) -> dict[str, Any]:
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def read_weights(path: str | os.PathLike[str]) -> ForeignWeights:
    """Read a CLIP weights file of any kind listed in the module docstring.

    Raises:
        WeightsError: the file is missing, unreadable, or holds no CLIP state dict (e.g. an OVSeg checkpoint
            without ``clip_adapter.clip_model.*`` keys, or a mask prompts file alone); one line.
    """
    import torch

    path = os.fspath(Path(path).expanduser())
    if not os.path.isfile(path):
        raise WeightsError(f"CLIP weights file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) >= 8 and not head.startswith((b"PK", b"\x80")):  # safetensors: 8-byte header length, then JSON
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"cannot read {path}: neither torch nor safetensors reads it ({exc})") from exc
        if set(state) == {"prompts"}:
            raise WeightsError(f"{path} holds mask prompts only (mask_prompts.safetensors), not CLIP weights")
        kind = "safetensors"
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError) as exc:
            if "TorchScript" in str(exc) or "constants.pkl" in str(exc):
                return ForeignWeights("torchscript", {}, None, path)
            raise WeightsError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        except (OSError, EOFError, KeyError, ValueError, IndexError) as exc:
            raise WeightsError(f"cannot read {path}: {type(exc).__name__}: {str(exc)[:200]}") from exc
        if isinstance(loaded, torch.jit.ScriptModule):
            return ForeignWeights("torchscript", {}, None, path)
        if not isinstance(loaded, dict):
            raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a CLIP state dict")
        if isinstance(loaded.get("state_dict"), dict):
            state, kind = _strip_module(loaded["state_dict"]), "open_clip_train epoch"
        elif isinstance(loaded.get("model"), dict):
            model = loaded["model"]
            state = {k[len(OVSEG_PREFIX) :]: v for k, v in model.items() if k.startswith(OVSEG_PREFIX)}
            if not state:
                raise WeightsError(
                    f"{path} is a detectron2 checkpoint ({len(model)} keys) without {OVSEG_PREFIX}* keys: "
                    "not an OVSeg model with a CLIP"
                )
            kind = "ovseg detectron2"
        else:
            state, kind = _strip_module(loaded), "state dict"
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path} ({kind}) holds no tensors")
    mask_embedding = tensors.pop(MASK_EMBEDDING, None)
    return ForeignWeights(kind, tensors, mask_embedding, path)


def load_state(model: "torch.nn.Module", weights: ForeignWeights, arch: str) -> None:
    """Load ``weights`` into ``model`` (an open_clip CLIP built for ``arch``), all keys and shapes exactly.

    A scalar ``logit_scale`` is reshaped to the model's (OpenAI files store it 0-d). TorchScript archives go
    through ``open_clip.load_checkpoint``.

    Raises:
        WeightsError: keys missing, unexpected or of another shape: one line with the counts and a few names.
    """
    import open_clip

    if weights.kind == "torchscript":
        try:
            open_clip.load_checkpoint(model, weights.path, strict=True)
        except Exception as exc:  # noqa: BLE001 any failure of open_clip's loader is the file's
            raise WeightsError(
                f"{weights.path} (torchscript) does not load into open_clip {arch!r}: {type(exc).__name__}: "
                f"{str(exc)[:200]}"
            ) from exc
        return
    state = dict(weights.state)
    own = model.state_dict()
    if "logit_scale" in state and "logit_scale" in own and state["logit_scale"].ndim != own["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    load_fitting_state(model, state, f"{weights.path} ({weights.kind}, {len(state)} keys)", f"open_clip {arch!r}")


def prompts_from_embedding(model: "torch.nn.Module", embedding: "torch.Tensor", what: str) -> "MaskPrompts":
    """:class:`~ovseg_mine.finetune.mask_prompt.MaskPrompts` on ``model.visual`` holding OVSeg's
    ``visual.mask_embedding`` (``[depth, n_patches, width]``; ``[depth, 1, width]`` is repeated over the patches).

    Raises:
        MaskPromptError: the model is not an open_clip ViT, or the embedding's shape does not fit it.
    """
    import torch

    from ovseg_mine.finetune.mask_prompt import MaskPromptError, MaskPrompts

    if embedding.ndim != 3:
        shape = tuple(embedding.shape)
        raise MaskPromptError(f"{what}: visual.mask_embedding has shape {shape}, not [depth, N, width]")
    prompts = MaskPrompts(model.visual, depth=embedding.shape[0])
    if embedding.shape[1] == 1:
        embedding = embedding.expand(-1, prompts.prompts.shape[1], -1)
    if embedding.shape != prompts.prompts.shape:
        prompts.remove()
        raise MaskPromptError(
            f"{what}: visual.mask_embedding has shape {tuple(embedding.shape)}, this model needs "
            f"{tuple(prompts.prompts.shape)}"
        )
    with torch.no_grad():
        prompts.prompts.copy_(embedding.float())
    return prompts.to(next(model.parameters()).device)


def load_prompts_any(path: str | os.PathLike[str], model: "torch.nn.Module") -> "MaskPrompts":
    """Mask prompts from ``mask_prompts.safetensors`` (ovseg-mine's) or from the ``visual.mask_embedding`` of any
    weights file :func:`read_weights` reads (an open_clip_train epoch file of OVSeg's prompt tuning, an OVSeg
    ``.pth``), attached to ``model.visual``.

    Raises:
        WeightsError: unreadable file, or no mask prompts in it. MaskPromptError: prompts of another shape.
    """
    from safetensors import safe_open

    from ovseg_mine.finetune.mask_prompt import load_prompts

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            if "prompts" in handle.keys():
                return load_prompts(path, model)
    except Exception:  # noqa: BLE001 not a safetensors file: read it as a weights file below
        pass
    weights = read_weights(path)
    if weights.mask_embedding is None:
        raise WeightsError(f"{path} ({weights.kind}) holds no mask prompts (visual.mask_embedding)")
    return prompts_from_embedding(model, weights.mask_embedding, os.fspath(path))

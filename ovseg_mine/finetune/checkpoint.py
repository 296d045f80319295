"""What a finetune run writes, and how it is read back.

Layout of an output folder::

    OUT/
      open_clip_model.safetensors   the whole CLIP state dict (finetuned image tower, original text tower):
                                    open_clip.create_model_and_transforms(ARCH, pretrained=PATH) loads it,
                                    ARCH being metadata.json's ``open_clip_arch``
      mask_prompts.safetensors      the mask prompts (prompt and full+prompt modes), see load_prompts
      metadata.json                 config, start weights, shards' identity, per-stage results, training curve
      state/last.pt                 resume state (trainable weights, optimizer, scheduler, step, curve)

``OUT`` is a local path or a URI (``s3://``, ``gs://``...: the shared storage a multi-node finetune needs). Every
file is written whole (:mod:`ovseg_mine.storage`: a temporary name and a rename on disks, one object on object
stores), so an interrupted run never leaves a partial file.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import TYPE_CHECKING, Any

from ovseg_mine.finetune.mask_prompt import PROMPTS_FILE, load_prompts
from ovseg_mine.storage import Location, StorageError, first_line, resolve

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "open_clip_model.safetensors"
METADATA_FILE = "metadata.json"
STATE_FILE = "state/last.pt"
# What torch.load(weights_only=True) raises on a file that is not a readable checkpoint: truncated (RuntimeError
# from the zip reader, EOFError), foreign bytes (KeyError, UnpicklingError from the restricted unpickler), unreadable.
UNREADABLE_STATE = (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError)


class CheckpointError(ValueError):
    """A folder that is not a finetune output, or whose files do not fit together."""


def uses_quick_gelu(model: "torch.nn.Module") -> bool:
    """True when the model's MLPs use QuickGELU (OpenAI-trained weights need it)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def open_clip_arch(arch: str, quick_gelu: bool) -> str:
    """The open_clip model name that rebuilds this module: ``arch`` or its ``-quickgelu`` variant.

    A model built from a QuickGELU tag (``ViT-B-16`` + ``openai``) must be reloaded as ``ViT-B-16-quickgelu``
    from a plain file, or its activations would silently change.
    """
    import open_clip

    if not quick_gelu or arch.endswith("-quickgelu"):
        return arch
    variant = f"{arch}-quickgelu"
    return variant if variant in open_clip.list_models() else arch


def save_weights(model: "torch.nn.Module", out: str | os.PathLike[str] | Location) -> Location:
    """Write ``model.state_dict()`` (float32, CPU) to ``OUT/open_clip_model.safetensors``; returns where."""
    from safetensors.torch import save_file

    path = resolve(out).join(WEIGHTS_FILE)
    state = {k: v.detach().float().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    path.write_via(lambda local: save_file(state, local, metadata={"format": "pt"}))
    return path


def write_metadata(out: str | os.PathLike[str] | Location, metadata: dict[str, Any]) -> None:
    """Write ``OUT/metadata.json`` whole (JSON, sorted keys)."""
    from ovseg_mine.shards import write_json_atomic

    write_json_atomic(resolve(out).join(METADATA_FILE), metadata)


def read_metadata(out: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """``OUT/metadata.json`` as a dict.

    Raises:
        CheckpointError: no such file (not a finetune output), invalid JSON, or a location that cannot be read.
    """
    path = resolve(out).join(METADATA_FILE)
    try:
        if not path.is_file():
            raise CheckpointError(f"{out} is not an ovseg-mine finetune output (no {METADATA_FILE} in it)")
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, StorageError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from exc


def save_state(out: str | os.PathLike[str] | Location, state: dict[str, Any]) -> None:
    """Write the resume state ``OUT/state/last.pt`` (``torch.save`` of tensors, dicts and numbers)."""
    import torch

    resolve(out).join(STATE_FILE).write_via(lambda local: torch.save(state, local))


def load_state(out: str | os.PathLike[str] | Location) -> dict[str, Any] | None:
    """The resume state of ``OUT``, or None when there is none.

    Raises:
        CheckpointError: the state file exists but cannot be read.
    """
    import torch

    path = resolve(out).join(STATE_FILE)
    try:
        if not path.is_file():
            return None
        with path.local_file() as local:
            return torch.load(local, map_location="cpu", weights_only=True)
    except (*UNREADABLE_STATE, StorageError) as exc:
        raise CheckpointError(
            f"cannot read the resume state {path} ({type(exc).__name__}: {first_line(exc, 200)}); "
            "delete it to start over"
        ) from exc


def load_finetuned(folder: str | os.PathLike[str] | Location, *, device: Any = "cpu", with_prompts: bool = True):
    """Load a finetune output for inference.

    Args:
        folder: an output folder of ``ovseg-mine finetune`` (a local path or a URI).
        device: torch device for the model.
        with_prompts: attach ``mask_prompts.safetensors`` when the folder has one.

    Returns:
        ``(model, tokenizer, prompts, metadata)``: the open_clip CLIP in eval mode, its tokenizer, a
        :class:`~ovseg_mine.finetune.mask_prompt.MaskPrompts` or None, and ``metadata.json``.

    Raises:
        CheckpointError: not a finetune output, or its weights do not load into its architecture.
    """
    from ovseg_mine.models import load_clip
    from ovseg_mine.weights_info import WeightsError

    folder = resolve(folder)
    meta = read_metadata(folder)
    weights = folder.join(WEIGHTS_FILE)
    try:
        if not weights.is_file():
            raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}: the run has not finished a stage yet")
        with weights.local_file() as local:
            model, tokenizer, _info = load_clip(meta["open_clip_arch"], local, device=device)
        prompts = None
        if with_prompts and folder.join(PROMPTS_FILE).is_file():
            prompts = load_prompts(folder.join(PROMPTS_FILE), model)
    except (WeightsError, StorageError) as exc:
        raise CheckpointError(str(exc)) from exc
    return model, tokenizer, prompts, meta

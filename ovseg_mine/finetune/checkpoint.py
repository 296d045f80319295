"""What a finetune run writes, and how it is read back.

Layout of an output folder::

    OUT/
      open_clip_model.safetensors   the whole CLIP state dict (finetuned image tower, original text tower):
                                    open_clip.create_model_and_transforms(ARCH, pretrained=PATH) loads it,
                                    ARCH being metadata.json's ``open_clip_arch``
      mask_prompts.safetensors      the mask prompts (prompt and full+prompt modes), see load_prompts
      metadata.json                 config, start weights, shards' identity, per-stage results, training curve
      state/last.pt                 resume state (trainable weights, optimizer, scheduler, step, curve)

Every file is written to a temporary name and renamed, so an interrupted run never leaves a partial file.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovseg_mine.finetune.mask_prompt import PROMPTS_FILE, load_prompts
from ovseg_mine.storage import first_line

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


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def save_weights(model: "torch.nn.Module", out: str | os.PathLike[str]) -> Path:
    """Write ``model.state_dict()`` (float32, CPU) to ``OUT/open_clip_model.safetensors``; returns the path."""
    from safetensors.torch import save_file

    path = Path(out) / WEIGHTS_FILE
    state = {k: v.detach().float().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(_tmp(path)), metadata={"format": "pt"})
    os.replace(_tmp(path), path)
    return path


def write_metadata(out: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
    """Write ``OUT/metadata.json`` atomically (JSON, sorted keys)."""
    from ovseg_mine.shards import write_json_atomic

    write_json_atomic(Path(out) / METADATA_FILE, metadata)


def read_metadata(out: str | os.PathLike[str]) -> dict[str, Any]:
    """``OUT/metadata.json`` as a dict.

    Raises:
        CheckpointError: no such file (not a finetune output) or invalid JSON.
    """
    path = Path(out) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{out} is not an ovseg-mine finetune output (no {METADATA_FILE} in it)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def save_state(out: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write the resume state ``OUT/state/last.pt`` (``torch.save`` of tensors, dicts and numbers)."""
    import torch

    path = Path(out) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, _tmp(path))
    os.replace(_tmp(path), path)


def load_state(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The resume state of ``OUT``, or None when there is none.

    Raises:
        CheckpointError: the state file exists but cannot be read.
    """
    import torch

    path = Path(out) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_STATE as exc:
        raise CheckpointError(
            f"cannot read the resume state {path} ({type(exc).__name__}: {first_line(exc, 200)}); "
            "delete it to start over"
        ) from exc


def load_finetuned(folder: str | os.PathLike[str], *, device: Any = "cpu", with_prompts: bool = True):
    """Load a finetune output for inference.

    Args:
        folder: an output folder of ``ovseg-mine finetune``.
        device: torch device for the model.
        with_prompts: attach ``mask_prompts.safetensors`` when the folder has one.

    Returns:
        ``(model, tokenizer, prompts, metadata)``: the open_clip CLIP in eval mode, its tokenizer, a
        :class:`~ovseg_mine.finetune.mask_prompt.MaskPrompts` or None, and ``metadata.json``.

    Raises:
        CheckpointError: not a finetune output, or its weights do not load into its architecture.
    """
    from ovseg_mine.models import WeightsError, load_clip

    folder = Path(folder)
    meta = read_metadata(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}: the run has not finished a stage yet")
    try:
        model, tokenizer, _info = load_clip(meta["open_clip_arch"], str(weights), device=device)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    prompts = None
    if with_prompts and (folder / PROMPTS_FILE).is_file():
        prompts = load_prompts(folder / PROMPTS_FILE, model)
    return model, tokenizer, prompts, meta

"""``export FINETUNE_OUT --format open_clip``: a finetune as the epoch file open_clip_train saves.

open_clip_train (``open_clip_train/main.py``) saves ``{"epoch", "name", "state_dict", "optimizer"[, "scaler"]}``
per epoch; OVSeg's ``tools/ovseg_replace_clip.py`` reads ``state_dict`` (``module.`` stripped), copies every key
into its detectron2 model as ``clip_adapter.clip_model.KEY``, and ``visual.mask_embedding`` for the mask prompts.
The file written here has ``epoch``, ``name`` and ``state_dict`` (the model's own keys, float32) plus, when the
finetune has mask prompts, ``state_dict["visual.mask_embedding"]`` in OVSeg's shape ``[depth, grid_h * grid_w,
width]`` (our prompts are that tensor: :mod:`ovseg_mine.finetune.mask_prompt`). No optimizer state: the file is
for inference and further training from these weights (``open_clip_train --pretrained FILE``,
``ovseg-mine finetune --init FILE``, ``evaluate --arch A --pretrained FILE``).
"""

from __future__ import annotations

import os
from typing import Any

from ovseg_mine.export.pairs import ExportError


def export_open_clip(folder: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write a finetune output folder as an open_clip_train epoch file.

    Args:
        folder: an output folder of ``ovseg-mine finetune`` (a local path or a URI).
        out: the ``.pt`` file to write (local; written whole: a temporary name, then a rename).

    Returns:
        ``{"out", "arch", "epoch", "keys", "mask_embedding": shape or None}``.

    Raises:
        ExportError: not a finetune output (or unfinished: no weights yet), or ``out`` cannot be written.
    """
    import torch
    from safetensors.torch import load_file

    from ovseg_mine.finetune import checkpoint as ckpt
    from ovseg_mine.finetune.mask_prompt import PROMPTS_FILE
    from ovseg_mine.storage import StorageError, resolve

    try:
        meta = ckpt.read_metadata(folder)
        location = resolve(folder)
        weights = location.join(ckpt.WEIGHTS_FILE)
        if not weights.is_file():
            raise ExportError(f"{folder} has no {ckpt.WEIGHTS_FILE}: the finetune has not finished a stage yet")
        with weights.local_file() as local:
            state = load_file(local)
        prompts = location.join(PROMPTS_FILE)
        embedding = None
        if prompts.is_file():
            with prompts.local_file() as local:
                embedding = load_file(local)["prompts"]
    except (ckpt.CheckpointError, StorageError) as exc:
        raise ExportError(str(exc)) from exc
    if embedding is not None:
        state["visual.mask_embedding"] = embedding
    epochs = int(meta.get("config", {}).get("epochs", 0))
    arch = meta["open_clip_arch"]
    blob = {"epoch": epochs, "name": f"ovseg-mine-{arch}", "state_dict": state}
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    tmp = f"{out}.tmp"
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        torch.save(blob, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise ExportError(f"cannot write --out {out}: {exc.strerror or exc}") from exc
    return {
        "out": out,
        "arch": arch,
        "epoch": epochs,
        "keys": len(state),
        "mask_embedding": list(embedding.shape) if embedding is not None else None,
    }

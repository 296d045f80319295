"""The open_clip_train command line that trains on an export, as OVSeg's reference scripts run it.

Settings follow facebookresearch/ov-seg ``open_clip_training/src/scripts/coco_proposal_1cap_finetune_VitL.sh``:
``--lock-text``, lr 5e-6, 100 warm-up steps, batch 32, 5 epochs, AMP, and ``--force-quick-gelu`` for weights trained
with QuickGELU (OpenAI's). The model and weights are the CLIP that mined the run (its manifest).
"""

from __future__ import annotations

import shlex
from typing import Any


def trainer_command(manifest: dict[str, Any], data_args: list[str]) -> str:
    """``python -m open_clip_train.main ...`` for an export.

    Args:
        manifest: the run's manifest (``models.clip``: the architecture and weights that mined it).
        data_args: the dataset arguments (``--train-data``, ``--dataset-type``...).

    Returns:
        One shell-quoted command line. Random mining weights give no ``--pretrained`` (open_clip_train starts
        from random weights then).
    """
    clip = manifest.get("models", {}).get("clip", {})
    arch = clip.get("name") or "ViT-B-16"
    args = ["python", "-m", "open_clip_train.main", *data_args, "--model", arch]
    weights = clip.get("weights")
    if weights == "file" and clip.get("source"):
        args += ["--pretrained", clip["source"]]
    elif weights and weights != "random":
        args += ["--pretrained", weights]
        import open_clip  # only here: a tag's QuickGELU

        try:
            if (open_clip.get_pretrained_cfg(arch, weights) or {}).get("quick_gelu"):
                args.append("--force-quick-gelu")
        except (RuntimeError, ValueError):
            pass
    args += ["--lock-text", "--lr", "5e-6", "--warmup", "100", "--batch-size", "32", "--epochs", "5"]
    args += ["--precision", "amp", "--workers", "4", "--save-frequency", "1"]
    return " ".join(shlex.quote(a) for a in args)

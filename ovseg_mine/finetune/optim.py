"""The optimizer of a training stage: AdamW set up as open_clip_train sets it up, and its learning-rate schedule.

* Parameter groups: no weight decay on 1-D parameters (norms, biases, class embedding); weights of 2 or more
  dimensions, the mask prompts included, decay (open_clip_train ``main.py``).
* Betas and eps: :meth:`ovseg_mine.finetune.config.OptimConfig.adamw` (open_clip_train's defaults by
  architecture unless ``--beta1``/``--beta2``/``--eps`` are given).
* Schedule: linear warm-up, then cosine decay to 0 over the stage (open_clip_train ``scheduler.cosine_lr``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ovseg_mine.finetune.config import OptimConfig


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as open_clip_train: no decay on 1-D parameters (norms, biases, class embedding); weights
    of 2 or more dimensions, the mask prompts ``[depth, n_patches, width]`` included, decay."""
    decay = [p for _, p in params if p.ndim >= 2]
    rest = [p for _, p in params if p.ndim < 2]
    return [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
        if g["params"]
    ]


def adamw(params: list[tuple[str, nn.Parameter]], cfg: OptimConfig, arch: str) -> torch.optim.AdamW:
    """AdamW over the named trainable ``params`` with the stage's lr, weight decay (:func:`param_groups`),
    betas and eps (:meth:`OptimConfig.adamw` for the open_clip architecture ``arch``)."""
    return torch.optim.AdamW(param_groups(params, cfg.weight_decay), lr=cfg.lr, **cfg.adamw(arch))


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The stage's schedule: the peak lr times :func:`cosine_lr` of the step, over ``total`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total, warmup))

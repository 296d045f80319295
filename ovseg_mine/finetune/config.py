"""Typed finetuning config: what ``ovseg-mine finetune`` trains, and how.

Defaults follow the OVSeg reference training scripts (facebookresearch/ov-seg,
``open_clip_training/src/scripts/coco_proposal_1cap_finetune_VitB.sh`` and
``coco_proposal_1cap_mask_prompt_tuning_VitL.sh``) and the paper (Liang et al., CVPR 2023, Sec. 3.3-3.4):
full finetuning with AdamW, lr 5e-6, weight decay 0.2, cosine schedule after 100 warm-up steps, mixed
precision, text tower locked, 5 epochs; mask prompt tuning with lr 5e-2 (the released script's ``--lr 0.05``),
weight decay 0 (``--mask_wd 0.0``), both towers frozen, prompt depth 3 (``--mask-emb-depth 3``).
AdamW's betas and eps are open_clip_train's defaults (the reference scripts do not set them):
0.9, 0.98, 1e-6 for a ViT, 0.9, 0.999, 1e-8 for other image towers. The resolved config is recorded in the
output's ``metadata.json``, with each stage's betas and eps.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["full", "prompt", "full+prompt"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class FinetuneConfigError(ValueError):
    """A finetuning config that cannot be used; the message names the option and the problem."""


# open_clip_train's AdamW (beta1, beta2, eps) by architecture (open_clip_train ``params.get_default_params``, from
# the CLIP paper): a model whose name contains "vit", and any other. The OVSeg reference scripts train ViTs
# without overriding them, so the ViT values are OVSeg's.
VIT_ADAMW = (0.9, 0.98, 1.0e-6)
OTHER_ADAMW = (0.9, 0.999, 1.0e-8)


class OptimConfig(BaseModel):
    """AdamW and schedule of one training stage (full finetuning or prompt tuning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(gt=0, description="peak learning rate after warm-up")
    weight_decay: float = Field(ge=0, description="AdamW decoupled weight decay (not applied to gains/biases)")
    beta1: float | None = Field(None, ge=0, lt=1, description="AdamW beta1; None: open_clip_train's (0.9)")
    beta2: float | None = Field(
        None, ge=0, lt=1, description="AdamW beta2; None: open_clip_train's (0.98 for a ViT, else 0.999)"
    )
    eps: float | None = Field(None, gt=0, description="AdamW eps; None: open_clip_train's (1e-6 for a ViT, else 1e-8)")

    def adamw(self, arch: str) -> dict[str, Any]:
        """``{"betas": (beta1, beta2), "eps": eps}`` for the open_clip architecture ``arch``: the values set here,
        else open_clip_train's defaults (:data:`VIT_ADAMW` when ``arch`` names a ViT, else :data:`OTHER_ADAMW`)."""
        beta1, beta2, eps = VIT_ADAMW if "vit" in arch.lower() else OTHER_ADAMW
        return {
            "betas": (beta1 if self.beta1 is None else self.beta1, beta2 if self.beta2 is None else self.beta2),
            "eps": eps if self.eps is None else self.eps,
        }


class FinetuneConfig(BaseModel):
    """Everything one ``finetune`` run needs; JSON-able (it travels to Ray Train workers as a dict).

    Attributes mirror the CLI options. ``arch``/``pretrained`` None means: the CLIP model recorded in the
    shards' manifest (the one that mined them), or the one of ``init``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    shards: str = Field(description="run folder of `ovseg-mine mine` (manifest.json + shards/)")
    out: str = Field(description="output folder: weights, mask prompts, metadata, resume state")
    mode: Mode = "full"
    images: str | None = Field(None, description="image root; default: source.image_root of the manifest")
    arch: str | None = Field(None, description="open_clip architecture; default: the manifest's CLIP")
    pretrained: str | None = Field(None, description="open_clip tag, checkpoint path or 'random'; default: manifest's")
    init: str | None = Field(
        None, description="start from an earlier finetune output folder, or a weights file with mask prompts"
    )
    allow_random: bool = Field(False, description="fall back to seeded random weights if a tag cannot be fetched")
    skip_damaged: bool = Field(
        False,
        description="leave out shards whose file does not match its done marker (listed) instead of refusing; "
        "what was trained on is identified by metadata.json's shards_id either way",
    )
    epochs: int = Field(5, ge=1, description="epochs of each stage")
    max_steps: int | None = Field(None, ge=1, description="stop each stage after this many optimizer steps")
    batch_size: int = Field(32, ge=1, description="pairs per step and per worker")
    full: OptimConfig = OptimConfig(lr=5e-6, weight_decay=0.2)
    prompt: OptimConfig = OptimConfig(lr=5e-2, weight_decay=0.0)
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps before the cosine decay")
    prompt_depth: int = Field(3, ge=1, description="layers with mask prompts (input + after blocks 1..depth-1)")
    precision: Precision = Field(
        "auto",
        description="autocast dtype (amp_bf16 or amp_fp16: ovseg_mine.precision.for_training); "
        "auto: bf16 (or fp16) on GPU, fp32 on CPU",
    )
    seed: int = 0
    loader_workers: int = Field(2, ge=0, description="DataLoader worker processes per training worker")
    shuffle_buffer: int = Field(2048, ge=1, description="rows (metadata only) held for shuffling")
    crop_scale: tuple[float, float] = Field((0.9, 1.0), description="RandomResizedCrop area range")
    checkpoint_every: int = Field(200, ge=1, description="steps between resume checkpoints")
    log_every: int = Field(1, ge=1, description="steps between log records")
    num_workers: int = Field(1, ge=1, description="training processes; >1 runs under Ray Train (DDP)")
    use_gpu: bool | None = Field(None, description="None: use GPUs when available")
    ray_address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self

    @property
    def stages(self) -> list[str]:
        """Stages in order: ``['full']``, ``['prompt']`` or ``['full', 'prompt']``."""
        return self.mode.split("+")

    def optim(self, stage: str) -> OptimConfig:
        """The optimizer settings of ``stage`` (``full`` or ``prompt``)."""
        return self.full if stage == "full" else self.prompt

    def training_dict(self) -> dict[str, Any]:
        """The fields that define the training result (paths, workers and logging left out), for resume checks."""
        skip = {
            "out",
            "images",
            "loader_workers",
            "log_every",
            "checkpoint_every",
            "num_workers",
            "use_gpu",
            "ray_address",
            "allow_random",
            "skip_damaged",  # the data itself is identified by shards_id
        }
        out = {k: v for k, v in self.model_dump(mode="json").items() if k not in skip}
        for stage in ("full", "prompt"):  # AdamW settings left at their defaults keep the hash of older outputs
            out[stage] = {k: v for k, v in out[stage].items() if v is not None or k not in ("beta1", "beta2", "eps")}
        return out

    def training_hash(self) -> str:
        """sha256 of :meth:`training_dict`: a resumed run must have the same one."""
        blob = json.dumps(self.training_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def build_config(**options: Any) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from keyword options; ``lr``/``weight_decay`` set the full stage,
    ``prompt_lr``/``prompt_weight_decay`` the prompt stage, ``beta1``/``beta2``/``eps`` both stages' AdamW.
    Paths are made absolute.

    Raises:
        FinetuneConfigError: an invalid value (the message names the option).
    """
    from pydantic import ValidationError

    adamw = {key: options.pop(key, None) for key in ("beta1", "beta2", "eps")}
    full = {"lr": options.pop("lr", None), "weight_decay": options.pop("weight_decay", None), **adamw}
    prompt = {"lr": options.pop("prompt_lr", None), "weight_decay": options.pop("prompt_weight_decay", None), **adamw}
    defaults = FinetuneConfig.model_fields
    try:
        for key, given in (("full", full), ("prompt", prompt)):
            base = defaults[key].default.model_dump()
            options[key] = OptimConfig(**{**base, **{k: v for k, v in given.items() if v is not None}})
        for key in ("shards", "out", "images", "init"):  # local paths made absolute, URIs kept
            if options.get(key) is not None:
                value = os.fspath(options[key])
                options[key] = value if "://" in value else str(Path(value).expanduser().resolve())
        options = {k: v for k, v in options.items() if v is not None}
        return FinetuneConfig(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise FinetuneConfigError(f"invalid finetune option {where}: {err['msg']}") from exc

"""One training stage of a finetune, ``full`` or ``prompt``: :class:`StageRunner` holds the trainable tower
(:class:`ImageTower`, in DDP when there are several workers), AdamW and its schedule
(:mod:`ovseg_mine.finetune.optim`), the loss scaler, the stage's data (:class:`~.data.PairDataset`), its
checkpoints and its part of the training curve; :func:`batch_loss` is the loss of one batch.

:func:`ovseg_mine.finetune.train.train_worker` builds what the stages share (:class:`TrainSetup`) and runs a
runner per stage. A stage checkpoints every ``checkpoint_every`` steps and at its end (rank 0); a runner given
the resume state continues mid-epoch, skipping the rows already seen without decoding them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ovseg_mine import precision as precision_mod
from ovseg_mine.finetune import checkpoint as ckpt
from ovseg_mine.finetune import optim
from ovseg_mine.finetune.config import FinetuneConfig
from ovseg_mine.finetune.data import PairDataset, ShardIndex, make_loader, steps_per_epoch
from ovseg_mine.finetune.loss import noun_contrastive_loss, unique_targets
from ovseg_mine.finetune.mask_prompt import PROMPTS_FILE, MaskPrompts, save_prompts
from ovseg_mine.finetune.patch_mask import patch_foreground

log = logging.getLogger("ovseg_mine")


class ImageTower(nn.Module):
    """The trainable part, as one module (what DDP wraps): CLIP's visual tower, optionally with mask prompts.

    ``forward(images [B,3,S,S] float, pixel_masks [B,S,S] bool)`` returns unit-norm float32 ``[B, D]``.
    """

    def __init__(self, visual: nn.Module, prompts: MaskPrompts | None = None) -> None:
        super().__init__()
        self.visual, self.prompts = visual, prompts

    def forward(self, images: torch.Tensor, pixel_masks: torch.Tensor) -> torch.Tensor:
        if self.prompts is None:
            feats = self.visual(images)
        else:
            feats = self.prompts(images, patch_foreground(pixel_masks, self.prompts.patch_size))
        return nn.functional.normalize(feats.float(), dim=-1)


def batch_loss(
    tower: nn.Module,
    text_cache: Any,
    batch: dict[str, Any],
    logit_scale: float,
    device: torch.device,
    precision: str = "fp32",
) -> torch.Tensor:
    """The training loss of one batch (``image``, ``mask``, ``noun`` as from :func:`~.data.make_loader`): a scalar
    float32 tensor on ``device`` (:func:`~.loss.noun_contrastive_loss`), with autograd history through ``tower``."""
    unique, targets = unique_targets(batch["noun"])
    text = text_cache.embed(unique)  # constants: the text tower is frozen
    with precision_mod.autocast(precision, device):
        feats = tower(batch["image"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True))
    return noun_contrastive_loss(feats, text, targets.to(device), logit_scale)


@dataclass(frozen=True)
class TrainSetup:
    """What every stage of one finetune shares, built once by :func:`train_worker`.

    Attributes:
        cfg: the finetune config.
        model: the open_clip CLIP on ``device`` (text tower frozen).
        text_cache: the noun embeddings (:class:`ovseg_mine.text.NounEmbeddings`).
        index: the shards (:func:`~.data.scan_shards`).
        size, mean, std: the model's input side in pixels and its per-channel normalization.
        logit_scale: CLIP's ``logit_scale.exp()``, at most 100 (fixed while training).
        device, precision: where and in which precision training runs (``fp32``, ``amp_bf16``, ``amp_fp16``:
            :func:`ovseg_mine.precision.for_training`).
        rank, world_size: this worker among the training workers.
        on_step: called on rank 0 after every step (see :func:`train_worker`).
    """

    cfg: FinetuneConfig
    model: nn.Module
    text_cache: Any
    index: ShardIndex
    size: int
    mean: Any
    std: Any
    logit_scale: float
    device: torch.device
    precision: str
    rank: int = 0
    world_size: int = 1
    on_step: Callable[[dict[str, Any]], None] | None = None


class StageRunner:
    """One training stage, ``full`` or ``prompt``: the trainable tower, AdamW, the warm-up + cosine schedule,
    the loss scaler, the stage's data, its checkpoints and its part of the training curve.

    Args:
        setup: what the stages share.
        stage: ``"full"`` (the image tower trains) or ``"prompt"`` (only ``prompts`` train).
        prompts: the mask prompts attached to the model (``prompt`` stage), else None.
        meta: the run's metadata (``OUT/metadata.json``); the runner records the stage in ``meta["stages"]``
            and its logged steps in ``meta["curve"]``, and writes it with each checkpoint (rank 0).
        state: the resume state of this stage (``OUT/state/last.pt``), or None to start it.
    """

    def __init__(
        self,
        setup: TrainSetup,
        stage: str,
        prompts: MaskPrompts | None,
        meta: dict[str, Any],
        state: dict[str, Any] | None = None,
    ) -> None:
        cfg = setup.cfg
        self.setup, self.stage, self.prompts, self.meta = setup, stage, prompts, meta
        self.optim_cfg = cfg.optim(stage)
        trainable = self._trainable()
        if prompts is not None and state is not None and state.get("prompts") is not None:
            with torch.no_grad():
                prompts.prompts.copy_(state["prompts"])
        self.tower = self._tower()
        self.optimizer = optim.adamw(trainable, self.optim_cfg, meta["arch"])
        self.per_epoch = steps_per_epoch(setup.index, cfg.batch_size, setup.world_size)
        self.total = min(cfg.max_steps or self.per_epoch * cfg.epochs, self.per_epoch * cfg.epochs)
        self.warmup = min(cfg.warmup_steps, self.total)
        self.scheduler = optim.scheduler(self.optimizer, self.total, self.warmup)
        self.scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.precision == "amp_fp16")
        self.step = 0
        self.dataset = PairDataset(
            setup.index,
            size=setup.size,
            mean=setup.mean,
            std=setup.std,
            seed=cfg.seed,
            crop_scale=tuple(cfg.crop_scale),
            shuffle_buffer=cfg.shuffle_buffer,
            rank=setup.rank,
            world_size=setup.world_size,
        )
        if state is not None:
            self._restore(state)

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        visual = self.setup.model.visual
        visual.requires_grad_(self.stage == "full")
        return list(visual.named_parameters()) if self.stage == "full" else [("prompts", self.prompts.prompts)]

    def _tower(self) -> nn.Module:
        tower: nn.Module = ImageTower(self.setup.model.visual, self.prompts)
        tower.train()
        if self.setup.world_size > 1:
            device = self.setup.device
            tower = nn.parallel.DistributedDataParallel(
                tower, device_ids=[device.index] if device.type == "cuda" else None
            )
        return tower

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        log.info("resuming stage %s at step %d of %d", self.stage, self.step, self.total)

    def run(self) -> None:
        """Train the stage to its last step, checkpointing every ``checkpoint_every`` steps and at its end.

        Rows lost to undecodable images can leave an epoch short: the loop then goes round the data again
        (a new order) so that every worker makes the same number of steps.
        """
        wraps = 0
        while self.step < self.total:
            if self._epoch(wraps):
                wraps += 1
            if self.step % self.setup.cfg.checkpoint_every == 0 or self.step == self.total:
                self.save(complete=self.step == self.total)
        self.setup.model.visual.requires_grad_(False)

    def _epoch(self, wraps: int) -> bool:
        """Steps until the epoch's end (or the stage's); True when the data ran out first."""
        cfg = self.setup.cfg
        epoch = self.step // self.per_epoch
        skip = 0 if wraps else self.step % self.per_epoch
        self.dataset.set_epoch(epoch + 1000 * wraps, skip_batches=skip, batch_size=cfg.batch_size)
        batches = iter(make_loader(self.dataset, batch_size=cfg.batch_size, workers=cfg.loader_workers))
        tick = time.perf_counter()
        while self.step < self.total:
            batch = next(batches, None)
            if batch is None:
                return True
            record = self._train_step(batch, epoch)
            now = time.perf_counter()
            record["samples_per_s"] = round(len(batch["noun"]) * self.setup.world_size / max(now - tick, 1e-9), 2)
            tick = now
            self._report(record)
            if self.step % self.per_epoch == 0 and not wraps:
                return False  # epoch boundary: next epoch's order
            if self.step % cfg.checkpoint_every == 0 and self.step < self.total:  # the last step is saved by run()
                self.save(complete=False)
        return False

    def _train_step(self, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
        """One optimizer step; returns the step's record (without its throughput)."""
        s = self.setup
        loss = batch_loss(self.tower, s.text_cache, batch, s.logit_scale, s.device, s.precision)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        loss_value = round(float(loss.detach()), 5)
        return {
            "stage": self.stage,
            "step": self.step,
            "total": self.total,
            "epoch": epoch,
            "loss": loss_value,
            "lr": lr,
        }

    def _report(self, record: dict[str, Any]) -> None:
        if self.setup.rank != 0:
            return
        if self.step % self.setup.cfg.log_every == 0 or self.step in (1, self.total):
            self.meta["curve"].append(record)
            log.info(
                "%(stage)s step %(step)d/%(total)d loss %(loss).4f lr %(lr).3g %(samples_per_s).1f samples/s", record
            )
        if self.setup.on_step is not None:
            self.setup.on_step(record)

    def summary(self, complete: bool) -> dict[str, Any]:
        """The stage's entry of ``metadata.json``: steps done and planned, lr, weight decay, AdamW betas and eps."""
        adamw = self.optim_cfg.adamw(self.meta["arch"])
        return {
            "complete": complete,
            "steps": self.step,
            "total_steps": self.total,
            "steps_per_epoch": self.per_epoch,
            "lr": self.optim_cfg.lr,
            "weight_decay": self.optim_cfg.weight_decay,
            "betas": list(adamw["betas"]),
            "eps": adamw["eps"],
            "warmup_steps": self.warmup,
        }

    def save(self, *, complete: bool) -> None:
        """Rank 0: the resume state, the stage's result when ``complete`` (weights or prompts), the metadata."""
        if self.setup.rank != 0:
            return
        out, model = Path(self.setup.cfg.out), self.setup.model
        self.meta["stages"][self.stage] = self.summary(complete)
        ckpt.save_state(
            out,
            {
                "training_hash": self.setup.cfg.training_hash(),
                "stage": self.stage,
                "step": self.step,
                "visual": model.visual.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "prompts": None if self.prompts is None else self.prompts.prompts.detach().cpu(),
                "stages": self.meta["stages"],
                "curve": self.meta["curve"],
            },
        )
        if complete:
            if self.stage == "full":
                ckpt.save_weights(model, out)
            else:
                save_prompts(self.prompts, out / PROMPTS_FILE, arch=self.meta["open_clip_arch"])
        ckpt.write_metadata(out, self.meta)

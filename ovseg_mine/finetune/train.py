"""The training loop: full finetuning of CLIP's image tower, mask prompt tuning, or both in turn.

One function, :func:`train_worker`, runs a whole finetune in one process; under Ray Train each worker runs
it with its rank (:mod:`ovseg_mine.finetune.distributed`) and the trainable module is wrapped in DDP. The text
tower is always frozen (OVSeg's ``--lock-text``), so noun embeddings are constants: the 14 ViLD templates,
averaged (:class:`ovseg_mine.text.NounEmbeddings`), computed once per noun.

Stages (OVSeg paper Sec. 3.3-3.4; facebookresearch/ov-seg ``open_clip_training/src/training/main.py`` and
``main_mask_prompt_tuning.py``):

* ``full``: all image-tower weights train (AdamW, no weight decay on gains, biases and embeddings'
  1-D parameters, as open_clip), the logit scale stays fixed;
* ``prompt``: both towers frozen, only :class:`~ovseg_mine.finetune.mask_prompt.MaskPrompts` train.

The schedule is a linear warm-up then cosine decay to 0 over each stage. Every ``checkpoint_every`` steps
and at each stage's end, rank 0 writes the resume state; a rerun with the same training config continues
from it (mid-epoch: the rows already seen are skipped without decoding).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ovseg_mine import precision as precision_mod
from ovseg_mine.finetune import checkpoint as ckpt
from ovseg_mine.finetune.config import FinetuneConfig
from ovseg_mine.finetune.data import PairDataset, make_loader, scan_shards, steps_per_epoch
from ovseg_mine.finetune.loss import noun_contrastive_loss, unique_targets
from ovseg_mine.finetune.mask_prompt import PROMPTS_FILE, MaskPrompts, is_vit_arch, load_prompts, save_prompts
from ovseg_mine.finetune.patch_mask import patch_foreground

log = logging.getLogger("ovseg_mine")


class FinetuneError(ValueError):
    """A finetune that cannot start: bad architecture for the mode, an output folder of another run, ..."""


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


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def resolve_start(cfg: FinetuneConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """Which architecture and weights training starts from.

    Returns:
        ``{"arch", "pretrained", "prompts" (path or None), "init" (folder or None)}``: from ``--init``'s
        metadata, else ``--arch``/``--pretrained``, else the CLIP model recorded in the shards' manifest.

    Raises:
        FinetuneError: no architecture known, or ``--init`` is not a finetune output.
    """
    if cfg.init:
        try:
            meta = ckpt.read_metadata(cfg.init)
        except ckpt.CheckpointError as exc:
            raise FinetuneError(f"--init: {exc}") from None
        prompts = Path(cfg.init) / PROMPTS_FILE
        return {
            "arch": meta["open_clip_arch"],
            "pretrained": str(Path(cfg.init) / ckpt.WEIGHTS_FILE),
            "prompts": str(prompts) if prompts.is_file() else None,
            "init": cfg.init,
        }
    clip = manifest.get("models", {}).get("clip", {})
    arch = cfg.arch or clip.get("name")
    if not arch:
        raise FinetuneError("no CLIP architecture: pass --arch (the shards' manifest names none)")
    pretrained = cfg.pretrained
    if pretrained is None:
        pretrained = clip.get("source") if clip.get("weights") == "file" else clip.get("weights")
        if not pretrained or (cfg.arch and cfg.arch != clip.get("name")):
            raise FinetuneError(f"pass --pretrained for {arch} (a tag, a checkpoint path, or random)")
    return {"arch": arch, "pretrained": pretrained, "prompts": None, "init": None}


def _known_arch(arch: str) -> bool:
    import open_clip

    return arch in open_clip.list_models()


def _device(cfg: FinetuneConfig, local_rank: int) -> torch.device:
    use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and not torch.cuda.is_available():
        raise FinetuneError("--gpu was asked for but torch sees no CUDA device")
    return torch.device(f"cuda:{local_rank}") if use_gpu else torch.device("cpu")


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


def train_worker(
    config: dict[str, Any] | FinetuneConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int = 0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a whole finetune; every worker of a distributed run calls this with its rank.

    Args:
        config: a :class:`FinetuneConfig` or its ``model_dump()``.
        rank, world_size, local_rank: this process among the training workers (1 worker: DDP is not used).
        on_step: called on rank 0 after every step with ``{"stage", "step", "total", "epoch", "loss", "lr",
            "samples_per_s"}``; an exception raised there (e.g. KeyboardInterrupt) stops training, leaving
            the last resume checkpoint.

    Returns:
        The run's metadata (as written to ``OUT/metadata.json``).

    Raises:
        FinetuneError, DataError, CheckpointError, WeightsError: inputs that cannot be trained on.
    """
    from ovseg_mine.models import clip_input_size, clip_mean_std, load_clip
    from ovseg_mine.text import NounEmbeddings

    cfg = config if isinstance(config, FinetuneConfig) else FinetuneConfig(**config)
    out = Path(cfg.out)
    index = scan_shards(cfg.shards, cfg.images)
    start = resolve_start(cfg, index.manifest)
    if "prompt" in cfg.stages and not is_vit_arch(start["arch"]) and _known_arch(start["arch"]):
        raise FinetuneError(
            f"--mode {cfg.mode} needs a ViT image tower; {start['arch']} is not an open_clip "
            "VisionTransformer (use --mode full)"
        )
    state = ckpt.load_state(out)
    if state is None and (out / ckpt.METADATA_FILE).is_file():
        old = ckpt.read_metadata(out)
        if old.get("training_hash") != cfg.training_hash():
            raise FinetuneError(f"{out} holds a finetune with another config; choose another --out")
        if old.get("complete"):
            log.info("%s already holds this finetune, complete", out)
            return old
    if state is not None and state["training_hash"] != cfg.training_hash():
        raise FinetuneError(
            f"{out} holds a finetune with another config (its resume state differs); "
            "choose another --out, or delete it to start over"
        )
    device = _device(cfg, local_rank)
    precision = precision_mod.for_training(cfg.precision, device)
    model, tokenizer, info = load_clip(
        start["arch"], start["pretrained"], device=device, seed=cfg.seed, allow_random=cfg.allow_random
    )
    model.requires_grad_(False)
    if state is not None:
        model.visual.load_state_dict(state["visual"])
    size, (mean, std) = clip_input_size(model), clip_mean_std(model)
    logit_scale = float(model.logit_scale.exp().clamp(max=100))
    text_cache = NounEmbeddings(model, tokenizer, device)
    quick = ckpt.uses_quick_gelu(model)
    meta: dict[str, Any] = {
        "format": "ovseg-mine finetune v1",
        "config": cfg.model_dump(mode="json"),
        "training_hash": cfg.training_hash(),
        "arch": start["arch"],
        "open_clip_arch": ckpt.open_clip_arch(start["arch"], quick),
        "quick_gelu": quick,
        "start": {**start, "weights": info.to_dict(), "seed": cfg.seed},
        "preprocess": {"mean": mean, "std": std, "size": size},
        "shards": {
            "run": str(index.run_dir),
            "config_hash": index.manifest.get("config_hash"),
            "shards_id": index.shards_id,
            "rows": index.rows,
            "skipped_rows": index.skipped_rows,
            "missing_images": index.missing_images[:100],
            "weights": index.manifest.get("weights"),
        },
        "world_size": world_size,
        "precision": precision,
        "stages": {},
        "curve": [],
    }
    if state is not None:
        meta["stages"], meta["curve"] = state["stages"], state["curve"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if state is None and not (out / ckpt.WEIGHTS_FILE).is_file():
            ckpt.save_weights(model, out)  # the start weights: evaluate and prompt-only runs need a full model
            ckpt.write_metadata(out, meta)
    for stage in cfg.stages:
        if meta["stages"].get(stage, {}).get("complete"):
            continue
        prompts = None
        if stage == "prompt":
            prompts = (
                load_prompts(start["prompts"], model)
                if start["prompts"]
                else MaskPrompts(model.visual, depth=cfg.prompt_depth).to(device)
            )
        stage_state = state if state is not None and state["stage"] == stage else None
        _run_stage(
            cfg,
            stage,
            model,
            prompts,
            text_cache,
            index,
            meta,
            stage_state,
            size=size,
            mean=mean,
            std=std,
            logit_scale=logit_scale,
            device=device,
            precision=precision,
            rank=rank,
            world_size=world_size,
            on_step=on_step,
        )
        state = None
        if prompts is not None:
            prompts.remove()
    meta["complete"] = True
    if rank == 0:
        ckpt.write_metadata(out, meta)
        (out / ckpt.STATE_FILE).unlink(missing_ok=True)  # done: a rerun finds metadata.json complete
        with contextlib.suppress(OSError):
            (out / ckpt.STATE_FILE).parent.rmdir()
    return meta


def _run_stage(
    cfg: FinetuneConfig,
    stage: str,
    model: nn.Module,
    prompts: MaskPrompts | None,
    text_cache: Any,
    index: Any,
    meta: dict[str, Any],
    state: dict[str, Any] | None,
    *,
    size: int,
    mean: Any,
    std: Any,
    logit_scale: float,
    device: torch.device,
    precision: str,
    rank: int,
    world_size: int,
    on_step: Callable[[dict[str, Any]], None] | None,
) -> None:
    out = Path(cfg.out)
    if stage == "full":
        model.visual.requires_grad_(True)
        trainable = [(n, p) for n, p in model.visual.named_parameters()]
    else:
        model.visual.requires_grad_(False)
        trainable = [("prompts", prompts.prompts)]
    if prompts is not None and state is not None and state.get("prompts") is not None:
        with torch.no_grad():
            prompts.prompts.copy_(state["prompts"])
    tower: nn.Module = ImageTower(model.visual, prompts)
    tower.train()
    if world_size > 1:
        tower = nn.parallel.DistributedDataParallel(tower, device_ids=[device.index] if device.type == "cuda" else None)
    optim_cfg = cfg.optim(stage)
    optimizer = torch.optim.AdamW(
        param_groups(trainable, optim_cfg.weight_decay), lr=optim_cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    per_epoch = steps_per_epoch(index, cfg.batch_size, world_size)
    total = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)
    warmup = min(cfg.warmup_steps, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total, warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp_fp16")
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        log.info("resuming stage %s at step %d of %d", stage, step, total)
    dataset = PairDataset(
        index,
        size=size,
        mean=mean,
        std=std,
        seed=cfg.seed,
        crop_scale=tuple(cfg.crop_scale),
        shuffle_buffer=cfg.shuffle_buffer,
        rank=rank,
        world_size=world_size,
    )

    def save(complete: bool) -> None:
        if rank != 0:
            return
        meta["stages"][stage] = {
            "complete": complete,
            "steps": step,
            "total_steps": total,
            "steps_per_epoch": per_epoch,
            "lr": optim_cfg.lr,
            "weight_decay": optim_cfg.weight_decay,
            "warmup_steps": warmup,
        }
        ckpt.save_state(
            out,
            {
                "training_hash": cfg.training_hash(),
                "stage": stage,
                "step": step,
                "visual": model.visual.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "prompts": None if prompts is None else prompts.prompts.detach().cpu(),
                "stages": meta["stages"],
                "curve": meta["curve"],
            },
        )
        if complete:
            if stage == "full":
                ckpt.save_weights(model, out)
            else:
                save_prompts(prompts, out / PROMPTS_FILE, arch=meta["open_clip_arch"])
        ckpt.write_metadata(out, meta)

    wraps = 0
    while step < total:
        epoch = step // per_epoch
        dataset.set_epoch(
            epoch + 1000 * wraps, skip_batches=0 if wraps else step % per_epoch, batch_size=cfg.batch_size
        )
        batches = iter(make_loader(dataset, batch_size=cfg.batch_size, workers=cfg.loader_workers))
        tick = time.perf_counter()
        while step < total:
            batch = next(batches, None)
            if batch is None:  # rows lost to undecodable images: go round again to keep all workers in step
                wraps += 1
                break
            loss = batch_loss(tower, text_cache, batch, logit_scale, device, precision)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            now = time.perf_counter()
            record = {
                "stage": stage,
                "step": step,
                "total": total,
                "epoch": epoch,
                "loss": round(float(loss.detach()), 5),
                "lr": lr,
                "samples_per_s": round(len(batch["noun"]) * world_size / max(now - tick, 1e-9), 2),
            }
            tick = now
            if rank == 0:
                if step % cfg.log_every == 0 or step in (1, total):
                    meta["curve"].append(record)
                    log.info(
                        "%(stage)s step %(step)d/%(total)d loss %(loss).4f lr %(lr).3g %(samples_per_s).1f samples/s",
                        record,
                    )
                if on_step is not None:
                    on_step(record)
            if step % per_epoch == 0 and not wraps:
                break  # epoch boundary: next epoch's order
            if step % cfg.checkpoint_every == 0 and step < total:  # the last step is saved once, below
                save(False)
        if step % cfg.checkpoint_every == 0 or step == total:
            save(step == total)
    model.visual.requires_grad_(False)

"""The training loop: full finetuning of CLIP's image tower, mask prompt tuning, or both in turn.

One function, :func:`train_worker`, runs a whole finetune in one process: it resolves the start weights, builds
what the stages share (:class:`~ovseg_mine.finetune.stage.TrainSetup`) and runs each stage with a
:class:`~ovseg_mine.finetune.stage.StageRunner` (the trainable tower, AdamW and its schedule, the data,
checkpoints and the curve). Under Ray Train each worker runs it with its rank
(:mod:`ovseg_mine.finetune.distributed`) and the trainable module is wrapped in DDP. The text tower is always
frozen (OVSeg's ``--lock-text``), so noun embeddings are constants: the 14 ViLD templates, averaged
(:class:`ovseg_mine.text.NounEmbeddings`), computed once per noun.

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
import os
from typing import Any, Callable

import torch

from ovseg_mine import precision as precision_mod
from ovseg_mine.clip_weights import load_prompts_any
from ovseg_mine.finetune import checkpoint as ckpt
from ovseg_mine.finetune.config import FinetuneConfig
from ovseg_mine.finetune.data import scan_shards
from ovseg_mine.finetune.mask_prompt import PROMPTS_FILE, MaskPrompts, is_vit_arch
from ovseg_mine.finetune.stage import StageRunner, TrainSetup
from ovseg_mine.storage import Location, resolve
from ovseg_mine.weights_info import WeightsInfo

log = logging.getLogger("ovseg_mine")


class FinetuneError(ValueError):
    """A finetune that cannot start: bad architecture for the mode, an output folder of another run, ..."""


def resolve_start(cfg: FinetuneConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """Which architecture and weights training starts from.

    Returns:
        ``{"arch", "pretrained", "prompts" (path or None), "init" (folder, file or None)}``: from ``--init``'s
        metadata (a finetune output folder) or file (another tool's weights and mask prompts), else
        ``--arch``/``--pretrained``, else the CLIP model recorded in the shards' manifest.

    Raises:
        FinetuneError: no architecture known, or ``--init`` is not a finetune output.
    """
    if cfg.init and os.path.isfile(cfg.init):  # a weights file of another tool: its CLIP and its mask prompts
        return _start_from_file(cfg, manifest)
    if cfg.init:
        try:
            meta = ckpt.read_metadata(cfg.init)
        except ckpt.CheckpointError as exc:
            raise FinetuneError(f"--init: {exc}") from exc
        init = resolve(cfg.init)
        if not init.is_local:
            raise FinetuneError(f"--init {cfg.init}: a local folder is needed (copy the finetune output here first)")
        prompts = init.join(PROMPTS_FILE)
        return {
            "arch": meta["open_clip_arch"],
            "pretrained": init.join(ckpt.WEIGHTS_FILE).path,
            "prompts": prompts.path if prompts.is_file() else None,
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
    if pretrained != "random" and os.path.isfile(os.path.expanduser(pretrained)) and _known_arch(arch):
        from ovseg_mine.clip_weights import read_weights
        from ovseg_mine.weights_info import WeightsError

        try:
            arch = _arch_for(arch, read_weights(pretrained))
        except WeightsError as exc:
            raise FinetuneError(f"--pretrained: {exc}") from exc
    return {"arch": arch, "pretrained": pretrained, "prompts": None, "init": None}


def _start_from_file(cfg: FinetuneConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """``--init FILE``: an open_clip_train epoch file, an OVSeg ``.pth`` or safetensors
    (:mod:`ovseg_mine.clip_weights`); the architecture from ``--arch``, else the shards' CLIP; mask prompts from
    its ``visual.mask_embedding``."""
    from ovseg_mine.clip_weights import read_weights
    from ovseg_mine.weights_info import WeightsError

    arch = cfg.arch or manifest.get("models", {}).get("clip", {}).get("name")
    if not arch:
        raise FinetuneError(f"--init {cfg.init}: pass --arch (the shards' manifest names no CLIP)")
    try:
        weights = read_weights(cfg.init)
    except WeightsError as exc:
        raise FinetuneError(f"--init: {exc}") from exc
    arch = _arch_for(arch, weights)
    prompts = cfg.init if weights.mask_embedding is not None else None
    return {"arch": arch, "pretrained": cfg.init, "prompts": prompts, "init": cfg.init}


def _arch_for(arch: str, weights: Any) -> str:
    """``arch``'s ``-quickgelu`` variant for an OVSeg checkpoint (its CLIP is OpenAI's, trained with QuickGELU)."""
    if weights.kind == "ovseg detectron2" and not arch.endswith("-quickgelu") and _known_arch(f"{arch}-quickgelu"):
        return f"{arch}-quickgelu"
    return arch


def _known_arch(arch: str) -> bool:
    import open_clip

    return arch in open_clip.list_models()


def _device(cfg: FinetuneConfig, local_rank: int) -> torch.device:
    use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and not torch.cuda.is_available():
        raise FinetuneError("--gpu was asked for but torch sees no CUDA device")
    return torch.device(f"cuda:{local_rank}") if use_gpu else torch.device("cpu")


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
    out = resolve(cfg.out)
    index = scan_shards(cfg.shards, cfg.images, skip_damaged=cfg.skip_damaged)
    start = resolve_start(cfg, index.manifest)
    _check_mode(cfg, start["arch"])
    state, complete = _previous_run(cfg, out)
    if complete is not None:
        log.info("%s already holds this finetune, complete", out)
        return complete
    device = _device(cfg, local_rank)
    precision = precision_mod.for_training(cfg.precision, device)
    model, tokenizer, info = load_clip(
        start["arch"], start["pretrained"], device=device, seed=cfg.seed, allow_random=cfg.allow_random
    )
    model.requires_grad_(False)
    if state is not None:
        model.visual.load_state_dict(state["visual"])
    size, (mean, std) = clip_input_size(model), clip_mean_std(model)
    setup = TrainSetup(
        cfg=cfg,
        model=model,
        text_cache=NounEmbeddings(model, tokenizer, device),
        index=index,
        size=size,
        mean=mean,
        std=std,
        logit_scale=float(model.logit_scale.exp().clamp(max=100)),
        device=device,
        precision=precision,
        rank=rank,
        world_size=world_size,
        on_step=on_step,
    )
    meta = _metadata(setup, start, info, state)
    if rank == 0:
        out.makedirs()
        if state is None and not out.join(ckpt.WEIGHTS_FILE).is_file():
            ckpt.save_weights(model, out)  # the start weights: evaluate and prompt-only runs need a full model
            ckpt.write_metadata(out, meta)
    _run_stages(setup, start, meta, state)
    meta["complete"] = True
    if rank == 0:
        _write_complete(out, meta)
    return meta


def _check_mode(cfg: FinetuneConfig, arch: str) -> None:
    """Refuse a mode with a prompt stage for an open_clip architecture that is not a ViT (FinetuneError)."""
    if "prompt" in cfg.stages and not is_vit_arch(arch) and _known_arch(arch):
        raise FinetuneError(
            f"--mode {cfg.mode} needs a ViT image tower; {arch} is not an open_clip VisionTransformer (use --mode full)"
        )


def _previous_run(cfg: FinetuneConfig, out: Location) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The resume state in ``out`` (or None) and, when ``out`` holds this finetune complete, its metadata."""
    state = ckpt.load_state(out)
    if state is None and out.join(ckpt.METADATA_FILE).is_file():
        old = ckpt.read_metadata(out)
        if old.get("training_hash") != cfg.training_hash():
            raise FinetuneError(f"{out} holds a finetune with another config; choose another --out")
        if old.get("complete"):
            return None, old
    if state is not None and state["training_hash"] != cfg.training_hash():
        raise FinetuneError(
            f"{out} holds a finetune with another config (its resume state differs); "
            "choose another --out, or delete it to start over"
        )
    return state, None


def _metadata(
    setup: TrainSetup, start: dict[str, Any], info: WeightsInfo, state: dict[str, Any] | None
) -> dict[str, Any]:
    """The run's metadata as it starts (config, weights, shards...), with the resume ``state``'s stages and curve."""
    cfg, index = setup.cfg, setup.index
    quick = ckpt.uses_quick_gelu(setup.model)
    return {
        "format": "ovseg-mine finetune v1",
        "config": cfg.model_dump(mode="json"),
        "training_hash": cfg.training_hash(),
        "arch": start["arch"],
        "open_clip_arch": ckpt.open_clip_arch(start["arch"], quick),
        "quick_gelu": quick,
        "start": {**start, "weights": info.to_dict(), "seed": cfg.seed},
        "preprocess": {"mean": setup.mean, "std": setup.std, "size": setup.size},
        "shards": {
            "run": index.run_dir.uri,
            "config_hash": index.manifest.get("config_hash"),
            "shards_id": index.shards_id,
            "damaged_shards": index.damaged_shards,
            "rows": index.rows,
            "skipped_rows": index.skipped_rows,
            "missing_images": index.missing_images[:100],
            "weights": index.manifest.get("weights"),
        },
        "world_size": setup.world_size,
        "precision": setup.precision,
        "stages": state["stages"] if state is not None else {},
        "curve": state["curve"] if state is not None else [],
    }


def _run_stages(setup: TrainSetup, start: dict[str, Any], meta: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Run the stages not complete in ``meta``; the one the resume ``state`` belongs to continues from it."""
    cfg, model = setup.cfg, setup.model
    for stage in cfg.stages:
        if meta["stages"].get(stage, {}).get("complete"):
            continue
        prompts = None
        if stage == "prompt":
            prompts = (
                load_prompts_any(start["prompts"], model)
                if start["prompts"]
                else MaskPrompts(model.visual, depth=cfg.prompt_depth).to(setup.device)
            )
        stage_state = state if state is not None and state["stage"] == stage else None
        StageRunner(setup, stage, prompts, meta, stage_state).run()
        state = None
        if prompts is not None:
            prompts.remove()


def _write_complete(out: Location, meta: dict[str, Any]) -> None:
    """Write the complete metadata and remove the resume state (rank 0): a rerun finds metadata.json complete."""
    ckpt.write_metadata(out, meta)
    out.join(ckpt.STATE_FILE).delete()
    if out.is_local:
        with contextlib.suppress(OSError):
            os.rmdir(out.join(ckpt.STATE_FILE).parent.path)

"""The ``finetune`` command. Parsing only: the work is in :mod:`ovseg_mine.finetune.train` and
:mod:`~ovseg_mine.finetune.distributed`. Heavy libraries are imported inside the command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ovseg_mine.cli.common import fail, setup_logging


def finetune_command(
    shards: str = typer.Option(
        ..., "--shards", help="Run folder of `ovseg-mine mine` (manifest.json + shards/): a path or a URI."
    ),
    out: str = typer.Option(
        ..., "--out", help="Output folder (weights, mask prompts, metadata), a path or a URI; a rerun resumes."
    ),
    mode: str = typer.Option("full", "--mode", help="full | prompt | full+prompt (finetune, then prompt-tune)."),
    images: Optional[str] = typer.Option(
        None, "--images", help="Image root, a path or a URI (default: the manifest's source.image_root)."
    ),
    arch: Optional[str] = typer.Option(
        None, "--arch", help="open_clip architecture (default: the CLIP that mined the shards)."
    ),
    pretrained: Optional[str] = typer.Option(
        None,
        "--pretrained",
        help="open_clip tag, 'random', or a weights file: open_clip_train epoch_N.pt, OVSeg .pth, safetensors.",
    ),
    init: Optional[Path] = typer.Option(
        None,
        "--init",
        help="Start from an earlier finetune output folder, or a weights file with its mask prompts "
        "(open_clip_train epoch_N.pt, OVSeg .pth).",
    ),
    epochs: int = typer.Option(5, "--epochs", min=1, help="Epochs of each stage."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop each stage after N steps."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Pairs per step and per worker."),
    lr: float = typer.Option(5e-6, "--lr", help="Peak learning rate of full finetuning."),
    weight_decay: float = typer.Option(0.2, "--weight-decay", help="AdamW weight decay of full finetuning."),
    prompt_lr: float = typer.Option(5e-2, "--prompt-lr", help="Peak learning rate of prompt tuning."),
    prompt_weight_decay: float = typer.Option(0.0, "--prompt-weight-decay", help="Weight decay of prompt tuning."),
    beta1: Optional[float] = typer.Option(None, "--beta1", help="AdamW beta1, both stages (default: 0.9)."),
    beta2: Optional[float] = typer.Option(
        None, "--beta2", help="AdamW beta2, both stages (default, as open_clip_train: 0.98 for a ViT, else 0.999)."
    ),
    eps: Optional[float] = typer.Option(
        None, "--eps", help="AdamW eps, both stages (default, as open_clip_train: 1e-6 for a ViT, else 1e-8)."
    ),
    warmup_steps: int = typer.Option(100, "--warmup-steps", min=0, help="Linear warm-up steps, then cosine decay."),
    prompt_depth: int = typer.Option(3, "--prompt-depth", min=1, help="Prompted layers (input + blocks 1..depth-1)."),
    precision: str = typer.Option("auto", "--precision", help="auto (AMP on GPU, fp32 on CPU) | fp32 | bf16 | fp16."),
    seed: int = typer.Option(0, "--seed", help="Seed of data order, augmentation and prompt init."),
    loader_workers: int = typer.Option(2, "--loader-workers", min=0, help="Data loading processes per worker."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", min=1, help="Steps between resume checkpoints."),
    log_every: int = typer.Option(10, "--log-every", min=1, help="Steps between training-curve records."),
    num_workers: int = typer.Option(1, "--num-workers", min=1, help="Training processes; >1 runs Ray Train DDP."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="Train on GPUs (default: when available)."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="Join this Ray cluster (with --num-workers)."
    ),
    allow_random: bool = typer.Option(
        False, "--allow-random", help="Use seeded random weights if a tag cannot be fetched."
    ),
    skip_damaged: bool = typer.Option(
        False,
        "--skip-damaged",
        help="Train without the shards whose sha256 differs from their done marker (or that lack one, or whose "
        "file is gone), listed as warnings and in metadata.json, instead of refusing the run.",
    ),
) -> None:
    """Finetune CLIP on mined mask-noun pairs: full finetuning, mask prompt tuning, or both."""
    from ovseg_mine.finetune.config import FinetuneConfigError, build_config

    setup_logging()
    if mode not in ("full", "prompt", "full+prompt"):
        fail(f"--mode must be full, prompt or full+prompt, not {mode!r}")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        fail(f"--precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    try:
        cfg = build_config(
            shards=shards,
            out=out,
            mode=mode,
            images=images,
            arch=arch,
            pretrained=pretrained,
            init=init,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            prompt_lr=prompt_lr,
            prompt_weight_decay=prompt_weight_decay,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            warmup_steps=warmup_steps,
            prompt_depth=prompt_depth,
            precision=precision,
            seed=seed,
            loader_workers=loader_workers,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            num_workers=num_workers,
            use_gpu=gpu,
            ray_address=ray_address,
            allow_random=allow_random,
            skip_damaged=skip_damaged,
        )
    except FinetuneConfigError as exc:
        fail(str(exc))
    started = time.perf_counter()
    meta = _train(cfg)
    _summary(meta, cfg.out, time.perf_counter() - started)


def _train(cfg):
    from ovseg_mine.finetune.checkpoint import CheckpointError
    from ovseg_mine.finetune.data import DataError
    from ovseg_mine.finetune.mask_prompt import MaskPromptError
    from ovseg_mine.finetune.train import FinetuneError
    from ovseg_mine.weights_info import WeightsError

    errors = (DataError, FinetuneError, CheckpointError, MaskPromptError, WeightsError)
    try:
        if cfg.num_workers > 1:
            from ovseg_mine.finetune.distributed import DistributedError, run_distributed

            try:
                return run_distributed(cfg)
            except DistributedError as exc:
                fail(str(exc))
        return _train_with_progress(cfg)
    except errors as exc:
        fail(str(exc))
    except KeyboardInterrupt as exc:
        typer.echo(f"interrupted: the last checkpoint is in {cfg.out}; rerun the same command to resume", err=True)
        raise typer.Exit(130) from exc


def _train_with_progress(cfg):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ovseg_mine.finetune.train import train_worker

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[rate]} samples/s"),
        TimeElapsedColumn(),
    )
    tasks: dict[str, int] = {}

    def on_step(rec: dict) -> None:
        if not progress.live.is_started:
            progress.start()
        if rec["stage"] not in tasks:
            tasks[rec["stage"]] = progress.add_task(rec["stage"], total=rec["total"], loss="", lr="", rate="")
        progress.update(
            tasks[rec["stage"]],
            completed=rec["step"],
            loss=f"{rec['loss']:.4f}",
            lr=f"{rec['lr']:.2e}",
            rate=f"{rec['samples_per_s']:.1f}",
        )

    try:
        return train_worker(cfg, on_step=on_step)
    finally:
        if progress.live.is_started:
            progress.stop()


def _summary(meta: dict, out: str, wall: float) -> None:
    curve = meta.get("curve") or []
    for stage, info in meta.get("stages", {}).items():
        points = [c for c in curve if c["stage"] == stage]
        losses = f"loss {points[0]['loss']:.4f} -> {points[-1]['loss']:.4f}" if points else "no steps logged"
        typer.echo(f"{stage}: {info['steps']}/{info['total_steps']} steps, {losses}")
    typer.echo(f"finetuned {meta['open_clip_arch']} in {wall:.1f} s; weights, prompts and metadata: {out}")
    damaged = meta.get("shards", {}).get("damaged_shards") or []
    if damaged:
        typer.secho(f"skipped {len(damaged)} damaged shard(s): {'; '.join(damaged)}", fg=typer.colors.YELLOW)
    if (
        meta.get("start", {}).get("weights", {}).get("weights") == "random"
        or meta.get("shards", {}).get("weights") == "random"
    ):
        typer.secho(
            "note: random weights or pairs mined with random weights: the result is meaningless", fg=typer.colors.YELLOW
        )

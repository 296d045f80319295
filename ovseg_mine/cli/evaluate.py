"""The ``evaluate`` command: masked-region classification of a finetuned checkpoint on ground-truth masks
(:mod:`ovseg_mine.finetune.evaluate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ovseg_mine.cli.common import fail, setup_logging


def evaluate_command(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Output folder of `ovseg-mine finetune`."),
    arch: Optional[str] = typer.Option(None, "--arch", help="open_clip architecture of --pretrained (e.g. ViT-B-16)."),
    pretrained: Optional[str] = typer.Option(
        None,
        "--pretrained",
        help="Weights that no ovseg-mine finetune wrote: an open_clip tag, open_clip_train epoch_N.pt, OVSeg .pth, "
        "safetensors.",
    ),
    gt: Path = typer.Option(..., "--gt", help="COCO instances JSON (e.g. annotations/instances_val2017.json)."),
    images: Path = typer.Option(..., "--images", help="Folder of the annotated images."),
    baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the weights the finetune started from."),
    no_prompts: bool = typer.Option(False, "--no-prompts", help="Ignore the checkpoint's mask prompts."),
    min_area: float = typer.Option(16, "--min-area", min=0, help="Skip masks smaller than this (pixels)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images (by id)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Crops per image-encoder call."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="Run on a GPU (default: when available)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Masked-region classification accuracy (top-1/top-5) on ground-truth masks, for a finetuned checkpoint
    (--checkpoint) or any CLIP weights (--arch and --pretrained)."""
    import json

    import torch

    from ovseg_mine.clip_weights import load_clip_model, load_prompts_any
    from ovseg_mine.finetune.checkpoint import CheckpointError, load_finetuned
    from ovseg_mine.finetune.evaluate import EvaluateError, classify, format_results, load_ground_truth
    from ovseg_mine.finetune.mask_prompt import MaskPromptError
    from ovseg_mine.models import WeightsError, load_clip

    setup_logging()
    if (checkpoint is None) == (pretrained is None):
        fail("pass --checkpoint FOLDER, or --arch ARCH --pretrained WEIGHTS (one of the two)")
    if pretrained is not None and not arch:
        fail("--pretrained needs --arch (the open_clip architecture the weights are for)")
    if pretrained is not None and baseline:
        fail("--baseline compares a finetune with its start weights: use it with --checkpoint")
    use_gpu = torch.cuda.is_available() if gpu is None else gpu
    if use_gpu and not torch.cuda.is_available():
        fail("--gpu was asked for but torch sees no CUDA device")
    device = torch.device("cuda" if use_gpu else "cpu")
    results = {}
    try:
        data = load_ground_truth(gt, images, min_area=min_area, limit=limit)
        if pretrained is not None:
            loaded = load_clip_model(arch, pretrained, device=device, with_prompts=not no_prompts)
            model, tokenizer, prompts = loaded.model, loaded.tokenizer, loaded.prompts
            pre = {"size": loaded.size, "mean": loaded.mean, "std": loaded.std}
            meta = {"complete": True, "start": {"weights": loaded.info.to_dict()}}
        else:
            model, tokenizer, prompts, meta = load_finetuned(checkpoint, device=device, with_prompts=not no_prompts)
            pre = meta["preprocess"]
        if not meta.get("complete"):
            typer.secho(f"warning: {checkpoint} is an unfinished finetune", fg=typer.colors.YELLOW, err=True)
        models = [("checkpoint", model, tokenizer, prompts)]
        if baseline:
            start = meta["start"]
            base, base_tok, _ = load_clip(start["arch"], start["pretrained"], device=device, seed=start["seed"])
            base_prompts = load_prompts_any(start["prompts"], base) if start.get("prompts") and not no_prompts else None
            models.append(("baseline", base, base_tok, base_prompts))
        for name, m, tok, p in models:
            results[name] = classify(
                m,
                tok,
                data,
                size=pre["size"],
                mean=pre["mean"],
                std=pre["std"],
                prompts=p,
                device=device,
                batch_size=batch_size,
            )
    except (EvaluateError, CheckpointError, WeightsError, MaskPromptError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(results, indent=2, sort_keys=True))
    else:
        typer.echo(format_results(results))
    if meta.get("start", {}).get("weights", {}).get("weights") == "random":
        typer.secho(
            "note: the checkpoint started from random weights: accuracies are near chance by construction",
            fg=typer.colors.YELLOW,
            err=True,
        )

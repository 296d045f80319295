"""The ``evaluate`` command: the paper's semantic-segmentation benchmarks (:mod:`ovseg_mine.evaluate`: two-stage
mIoU, region classification, scoring of prediction files) and masked-region classification of COCO instance
masks (``--gt``, :mod:`ovseg_mine.finetune.evaluate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ovseg_mine.cli.common import SET_HELP, fail, setup_logging, warn


def evaluate_command(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Output folder of `ovseg-mine finetune`."),
    arch: Optional[str] = typer.Option(None, "--arch", help="open_clip architecture of --pretrained (e.g. ViT-B-16)."),
    pretrained: Optional[str] = typer.Option(
        None,
        "--pretrained",
        help="Weights that no ovseg-mine finetune wrote: an open_clip tag, open_clip_train epoch_N.pt, OVSeg .pth, "
        "safetensors.",
    ),
    gt: Optional[Path] = typer.Option(None, "--gt", help="COCO instances JSON: classify its instance masks."),
    sem_seg: Optional[Path] = typer.Option(None, "--sem-seg", help="Folder of label maps (PNG/TIFF, uint8/16)."),
    benchmark: Optional[str] = typer.Option(
        None, "--benchmark", help="A known benchmark: ade150, ade847, pc59, pc459, voc20 (detectron2's layout)."
    ),
    root: Optional[Path] = typer.Option(None, "--root", help="Datasets root of --benchmark ($DETECTRON2_DATASETS)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of the images (--gt, --sem-seg)."),
    classes: Optional[str] = typer.Option(
        None, "--classes", help="Class list: one name per line (synonyms after ';'), or ade150 (bundled)."
    ),
    ignore_label: Optional[int] = typer.Option(
        None, "--ignore-label", min=0, max=65535, help="Label value not evaluated (default 255; the benchmark's)."
    ),
    reduce_zero_label: bool = typer.Option(
        False, "--reduce-zero-label", help="Raw maps where 0 = other (ignored) and k = class k-1 (ADE20K's)."
    ),
    seen_classes: Optional[Path] = typer.Option(
        None, "--seen-classes", help="Class names seen in training (one per line): adds mIoU-seen/unseen, hIoU."
    ),
    task: str = typer.Option("semseg", "--task", help="semseg (proposals + CLIP: mIoU) or regions (GT regions)."),
    proposals: str = typer.Option("sam", "--proposals", help="sam, coco:JSON or sa1b:DIR (--task semseg)."),
    pipeline: str = typer.Option("coco-ovseg", "--pipeline", help="Recipe whose [sam] section makes proposals."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    predictions: Optional[Path] = typer.Option(
        None, "--predictions", help="Score these prediction label maps (STEM.png per label map); no model."
    ),
    save_predictions: Optional[Path] = typer.Option(
        None, "--save-predictions", help="Write --task semseg's predictions here, in the ground truth's labels."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Write metrics.json, per_class.csv, per_class.png."),
    baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the weights the finetune started from."),
    no_prompts: bool = typer.Option(False, "--no-prompts", help="Ignore the checkpoint's mask prompts."),
    min_area: float = typer.Option(16, "--min-area", min=0, help="--gt: skip masks smaller than this (pixels)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Crops per image-encoder call."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="Run on a GPU (default: when available)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Evaluate CLIP weights on semantic-segmentation benchmarks (mIoU, region accuracy) or COCO masks (--gt)."""
    import torch

    setup_logging()
    use_gpu = torch.cuda.is_available() if gpu is None else gpu
    if use_gpu and not torch.cuda.is_available():
        fail("--gpu was asked for but torch sees no CUDA device")
    device = "cuda" if use_gpu else "cpu"
    if gt is not None:
        if sem_seg is not None or benchmark is not None or predictions is not None:
            fail("--gt (COCO instance masks) cannot be combined with --sem-seg, --benchmark or --predictions")
        if images is None:
            fail("--gt needs --images (the folder of the annotated images)")
        if (checkpoint is None) == (pretrained is None):
            fail("pass --checkpoint FOLDER, or --arch ARCH --pretrained WEIGHTS (one of the two)")
        if pretrained is not None and not arch:
            fail("--pretrained needs --arch (the open_clip architecture the weights are for)")
        if pretrained is not None and baseline:
            fail("--baseline compares a finetune with its start weights: use it with --checkpoint")
        weights = (checkpoint, arch, pretrained)
        return _coco_masks(weights, gt, images, baseline, no_prompts, min_area, limit, batch_size, device, as_json)
    if sem_seg is None and benchmark is None:
        fail("give --benchmark NAME, --sem-seg LABELS_DIR --images IMAGES_DIR --classes FILE, or --gt INSTANCES_JSON")
    _benchmark(locals())


def _benchmark(opts: dict) -> None:
    import json

    from ovseg_mine.evaluate.dataset import open_benchmark
    from ovseg_mine.evaluate.labels import LabelError
    from ovseg_mine.evaluate.report import format_result, write_report
    from ovseg_mine.evaluate.run import TASKS, Request, evaluate_benchmark
    from ovseg_mine.evaluate.semseg import ProposalError
    from ovseg_mine.evaluate.weights import WeightsLoadError

    if opts["task"] not in TASKS:
        fail(f"--task must be one of {', '.join(TASKS)}; got {opts['task']!r}")
    if opts["predictions"] is not None and (opts["checkpoint"] or opts["arch"]):
        fail("--predictions scores prediction files: it takes no --checkpoint or --arch")
    if opts["save_predictions"] is not None and (opts["task"] != "semseg" or opts["predictions"] is not None):
        fail("--save-predictions writes the predictions of --task semseg (not regions, not --predictions)")
    request = Request(
        task=opts["task"],
        predictions=None if opts["predictions"] is None else str(opts["predictions"]),
        proposals=opts["proposals"],
        pipeline=opts["pipeline"],
        overrides=list(opts["overrides"]),
        checkpoint=None if opts["checkpoint"] is None else str(opts["checkpoint"]),
        arch=opts["arch"],
        pretrained=opts["pretrained"],
        baseline=opts["baseline"],
        no_prompts=opts["no_prompts"],
        save_predictions=None if opts["save_predictions"] is None else str(opts["save_predictions"]),
        batch_size=opts["batch_size"],
        device=opts["device"],
    )
    try:
        data = open_benchmark(
            benchmark=opts["benchmark"],
            root=opts["root"],
            labels_dir=opts["sem_seg"],
            images_dir=opts["images"],
            classes=opts["classes"],
            ignore_label=opts["ignore_label"],
            reduce_zero_label=opts["reduce_zero_label"],
            seen_classes=opts["seen_classes"],
            limit=opts["limit"],
        )
        with _progress(len(data), opts["as_json"]) as advance:
            result = evaluate_benchmark(data, request, on_image=advance)
        if opts["out"] is not None:
            write_report(result, opts["out"])
    except (LabelError, WeightsLoadError, ProposalError, OSError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(result, indent=2, sort_keys=True) if opts["as_json"] else format_result(result))
    if any(m["weights"].get("weights") == "random" for m in result["models"].values()):
        warn("random weights: the scores are near chance by construction")


def _progress(total: int, quiet: bool):
    """A context giving a callable that advances a progress bar on stderr (one image per call)."""
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)

    @contextlib.contextmanager
    def bar():
        progress = Progress(
            TextColumn("evaluate"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=quiet or not console.is_terminal,  # a log file gets the summary only
        )
        with progress:
            task = progress.add_task("images", total=total)
            yield lambda: progress.advance(task)

    return bar()


def _coco_masks(weights, gt, images, baseline, no_prompts, min_area, limit, batch_size, device, as_json) -> None:
    """Masked-region classification of COCO instance masks (:mod:`ovseg_mine.finetune.evaluate`), for a finetuned
    checkpoint or any CLIP weights (``weights``: ``(checkpoint, arch, pretrained)``)."""
    import json

    import torch

    from ovseg_mine.clip_loader import load_clip_model
    from ovseg_mine.clip_weights import load_prompts_any
    from ovseg_mine.finetune.checkpoint import CheckpointError, load_finetuned
    from ovseg_mine.finetune.evaluate import EvaluateError, classify, format_results, load_ground_truth
    from ovseg_mine.finetune.mask_prompt import MaskPromptError
    from ovseg_mine.models import load_clip
    from ovseg_mine.weights_info import WeightsError

    checkpoint, arch, pretrained = weights
    device = torch.device(device)
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
            warn(f"{checkpoint} is an unfinished finetune")
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
    typer.echo(json.dumps(results, indent=2, sort_keys=True) if as_json else format_results(results))
    if meta.get("start", {}).get("weights", {}).get("weights") == "random":
        warn("the checkpoint started from random weights: accuracies are near chance by construction")

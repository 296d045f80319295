"""One ``evaluate`` run on a semantic-segmentation benchmark: open the benchmark, load the models, run the task,
score, and return one JSON-able result (written by :mod:`ovseg_mine.evaluate.report`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ovseg_mine.evaluate.dataset import SemSegData
from ovseg_mine.evaluate.metrics import scores

TASKS = ("semseg", "regions")


@dataclass
class Request:
    """What to evaluate (the CLI's options; see ``ovseg-mine evaluate --help``).

    Attributes:
        task: ``semseg`` or ``regions`` (ignored with ``predictions``).
        predictions: a folder of prediction label maps to score (no model loaded), or None.
        proposals: ``sam``, ``coco:JSON`` or ``sa1b:DIR`` (``semseg``).
        pipeline, overrides: the recipe (and ``--set`` values) whose ``sam`` section makes SAM's proposals.
        checkpoint, arch, pretrained, baseline, no_prompts: the weights (:func:`~ovseg_mine.evaluate.weights.
            load_classifiers`).
        save_predictions: folder for the predictions of ``semseg``.
        batch_size: crops per image-encoder call; images_per_batch: images per batch (default: 8 on a GPU, 1 on a
            CPU).
        device: ``cpu`` or ``cuda``.
    """

    task: str = "semseg"
    predictions: str | None = None
    proposals: str = "sam"
    pipeline: str = "coco-ovseg"
    overrides: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    arch: str | None = None
    pretrained: str | None = None
    baseline: bool = False
    no_prompts: bool = False
    save_predictions: str | None = None
    batch_size: int = 64
    images_per_batch: int | None = None
    device: str = "cpu"


def _semseg_metrics(data: SemSegData, matrices: dict[str, Any]) -> dict[str, Any]:
    return {name: scores(m.matrix, data.classes.names, data.seen) for name, m in matrices.items()}


def evaluate_benchmark(
    data: SemSegData, request: Request, *, on_image: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Run ``request`` on ``data``.

    Returns:
        ``{"task", "benchmark", "images", "skipped", "models": {name: {"weights", "metrics"}}, "seconds" (all),
        "load_seconds" (models), "images_per_second" (images / the seconds after loading), ...}``.
        ``metrics`` is :func:`~ovseg_mine.evaluate.metrics.scores` (``semseg``, predictions) or
        :func:`~ovseg_mine.finetune.evaluate.summarize` (``regions``); ``skipped`` lists the label maps left
        out with the reason; ``semseg`` adds ``proposals``, ``proposals_per_image`` and ``no_proposals``.

    Raises:
        LabelError, WeightsLoadError, ProposalError: bad input, in one line.
    """
    from ovseg_mine.evaluate.semseg import score_predictions

    start = time.perf_counter()
    result: dict[str, Any] = {"benchmark": data.describe()}
    if request.predictions is not None:
        out = score_predictions(data, request.predictions, on_image=on_image)
        result["task"] = "predictions"
        models = {"predictions": {"weights": {"predictions": str(request.predictions)}}}
        for name, metrics in _semseg_metrics(data, out["matrices"]).items():
            models[name]["metrics"] = metrics
        skipped = data.skipped + out["missing"]
        scored = len(data) - len(out["missing"]) - (len(data.skipped) - len(data.pairs.skipped))
    else:
        models, skipped, scored = _run_models(data, request, result, on_image, start)
    seconds = time.perf_counter() - start
    loop = seconds - result.setdefault("load_seconds", 0.0)
    result.update(
        models=models,
        images=scored,
        skipped=skipped,
        seconds=round(seconds, 2),
        images_per_second=round(scored / loop, 3) if loop > 0 else None,
        device=request.device,
    )
    return result


def _run_models(
    data: SemSegData, request: Request, result: dict[str, Any], on_image: Callable[[], None] | None, start: float
) -> tuple[dict[str, Any], list[dict[str, str]], int]:
    from ovseg_mine.evaluate.regions import classify_regions
    from ovseg_mine.evaluate.semseg import Proposals, segment
    from ovseg_mine.evaluate.weights import load_classifiers

    if request.task not in TASKS:
        raise ValueError(f"unknown task {request.task!r}; valid: {', '.join(TASKS)}")
    classifiers = load_classifiers(
        checkpoint=request.checkpoint,
        arch=request.arch,
        pretrained=request.pretrained,
        baseline=request.baseline,
        no_prompts=request.no_prompts,
        device=request.device,
    )
    for c in classifiers:  # class-name embeddings (cached), counted with the loading
        c.text(list(data.classes.names))
    per_batch = request.images_per_batch or (8 if request.device.startswith("cuda") else 1)
    models = {c.name: {"weights": c.weights, "mask_prompts": c.prompts is not None} for c in classifiers}
    result["task"] = request.task
    if request.task == "regions":
        result["load_seconds"] = round(time.perf_counter() - start, 2)
        res = classify_regions(
            data,
            classifiers,
            device=request.device,
            batch_size=request.batch_size,
            images_per_batch=per_batch,
            on_image=on_image,
        )
        for name, metrics in res.items():
            models[name]["metrics"] = metrics
        return models, list(data.skipped), len(data) - (len(data.skipped) - len(data.pairs.skipped))
    from ovseg_mine.config import ConfigError, build_config

    overrides = [*request.overrides, "clip.precision=fp32"]  # the engine must not cast the evaluated CLIP
    try:
        cfg = build_config(request.pipeline, overrides)
    except ConfigError as exc:
        from ovseg_mine.evaluate.semseg import ProposalError

        raise ProposalError(str(exc)) from exc
    first = classifiers[0]
    proposals = Proposals(request.proposals, cfg, first.model, first.tokenizer, request.device)
    result["proposals"] = proposals.describe()
    result["load_seconds"] = round(time.perf_counter() - start, 2)
    out = segment(
        data,
        classifiers,
        proposals,
        device=request.device,
        batch_size=request.batch_size,
        images_per_batch=per_batch,
        save_predictions=request.save_predictions,
        on_image=on_image,
    )
    for name, metrics in _semseg_metrics(data, out["matrices"]).items():
        models[name]["metrics"] = metrics
    result["no_proposals"] = out["no_proposals"]
    result["proposals_per_image"] = out["proposals_per_image"]
    return models, list(data.skipped), len(data) - (len(data.skipped) - len(data.pairs.skipped))

"""Bytes moved per image by the upsampling + selection and by the crops, stock vs fused (``engine.kernels``), at any
image size and candidate counts, counted on the meta device (no computation, no memory).

The rule (issue 23) is counted by ``benchmarks/traffic.py``'s :class:`~traffic.ByteCounter`, the project's one
counter (its module docstring states the rule: each non-view aten op's distinct tensor inputs and outputs, a
tensor an op mutates and reads counted twice, a pure overwrite once). The selection's data-dependent steps (the
filters' ``nonzero``, NMS, the host reads of counts) have no meta kernel; the counter answers them from a plan
(:class:`Plan`: the number of survivors of each step, the same for both paths, so both count the same work).

``fused_regions=True`` adds the figure a compiled chunk body would reach if it were one kernel: each chunk body
(:func:`~ovseg_mine.mine.algorithms.fused_amg.selection_chunk`, :func:`~ovseg_mine.crops.render_crops_from_logits`)
counts its inputs and outputs only. That is a lower bound for ``engine.compile`` (Inductor keeps the matrix
products as separate kernels and reads their outputs back), not a measurement of it.

    python benchmarks/selection_bytes.py                  # COCO size: 640x480, 800 candidates after the IoU filter
    python benchmarks/selection_bytes.py --size 1500 2000 --survivors 1200
    python benchmarks/selection_bytes.py --inductor       # + Inductor's estimate of the compiled chunk bodies (~1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))

from traffic import ByteCounter, tensor_bytes  # noqa: E402


@dataclass
class Plan:
    """The counts the data decide, per image (the same for the stock and the fused path).

    Attributes:
        candidates: decoder masks (3 per grid point).
        iou_survivors: above ``pred_iou_thresh``.
        stability_survivors: of those, at or above ``stability_score_thresh``.
        nms_survivors: of those, left by NMS.
        kept: after the cap (``max_masks_per_image``), all non-empty: the crops rendered.
    """

    candidates: int = 3072
    iou_survivors: int = 800
    stability_survivors: int = 500
    nms_survivors: int = 150
    kept: int = 100


def as_one_kernel(counter: ByteCounter, fn: Callable, name: str) -> Callable:
    """``fn`` counted as one fused kernel under ``counter``: its tensor inputs and outputs only."""

    def wrapped(*args, **kwargs):
        with _disable_current_modes():
            out = fn(*args, **kwargs)
        counter.add(name, tensor_bytes(tree_leaves((args, kwargs, out))))
        return out

    return wrapped


def _inputs(size: tuple[int, int], plan: Plan, img_size: int, low: int, dtype: torch.dtype):
    from segment_anything.utils.transforms import ResizeLongestSide

    meta = torch.device("meta")
    image = torch.empty((3, *size), dtype=torch.uint8, device=meta)
    low_res = torch.empty((plan.candidates, low, low), dtype=dtype, device=meta)
    iou = torch.empty(plan.candidates, dtype=torch.float32, device=meta)
    input_size = tuple(ResizeLongestSide.get_preprocess_shape(size[0], size[1], img_size))
    return image, low_res, iou, input_size


def stock_bytes(
    size, plan: Plan, cfg, *, img_size=1024, low=256, dtype=torch.bfloat16, chunk_bytes=2 * 2**30, crop=224
) -> dict[str, ByteCounter]:
    """The stock path's counters: ``amg.select_masks`` with SAM's ``postprocess_masks``, then the pooled crops
    (``render_masked_crops_batched`` of re-upsampled masks in the engine's chunks) and ``normalize``."""
    from segment_anything.modeling import Sam

    from ovseg_mine.crops import normalize, render_masked_crops_batched
    from ovseg_mine.mine.algorithms.amg import chunk_size, select_masks

    image, low_res, iou, input_size = _inputs(size, plan, img_size, low, dtype)
    fake_sam = SimpleNamespace(image_encoder=SimpleNamespace(img_size=img_size))
    upsample = lambda x: Sam.postprocess_masks(fake_sam, x[:, None], input_size, size)[:, 0]  # noqa: E731
    select = ByteCounter(nonzero=[plan.iou_survivors, plan.stability_survivors], nms=[plan.nms_survivors])
    with select:
        masks = select_masks(
            low_res,
            iou,
            cfg=cfg,
            size=size,
            upsample=upsample,
            mask_threshold=0.0,
            chunk=chunk_size(size, img_size, chunk_bytes),
        )
    crops = ByteCounter()
    with crops:
        masks.valid = torch.ones(plan.kept, dtype=torch.bool, device="meta")
        step = max(1, min(masks.chunk, chunk_bytes // (33 * 16 * crop * crop)))
        out = []
        for start in range(0, plan.kept, step):
            index = torch.arange(start, min(plan.kept, start + step), device="meta")
            boxes = masks.boxes.index_select(0, index)
            out.append(render_masked_crops_batched(image, masks.masks(index), boxes, size=crop, fill=[1.0, 2.0, 3.0]))
        normalize(torch.cat(out), [0.5] * 3, [0.25] * 3)
    return {"selection": select, "crops": crops}


def fused_bytes(
    size,
    plan: Plan,
    cfg,
    *,
    img_size=1024,
    low=256,
    dtype=torch.bfloat16,
    chunk_bytes=2 * 2**30,
    crop=224,
    fused_regions=False,
) -> dict[str, ByteCounter]:
    """The fused path's counters: ``fused_amg.select_masks_fused`` on one image, then the crops as
    ``MiningEngine._fused_crops`` renders them (``render_crops_from_logits``, normalized in the body, in
    :func:`~ovseg_mine.crops.even_chunk` chunks)
    and ``normalize``. ``fused_regions``: each chunk body counted as one kernel."""
    from ovseg_mine import crops as crops_mod
    from ovseg_mine.mine.algorithms import fused_amg

    image, low_res, iou, input_size = _inputs(size, plan, img_size, low, dtype)
    op = fused_amg.postprocess_operator((low, low), input_size, size, img_size, torch.device("meta"))
    groups = [[min(plan.nms_survivors, plan.stability_survivors)], [plan.nms_survivors]]
    select = ByteCounter(nms=[plan.nms_survivors], host=[[plan.iou_survivors], groups])
    chunk_body, render = fused_amg.selection_chunk, crops_mod.render_crops_from_logits
    try:
        if fused_regions:
            fused_amg.selection_chunk = as_one_kernel(select, chunk_body, "fused selection_chunk")
        with select:
            [masks] = fused_amg.select_masks_fused(
                [fused_amg.DecodedImage(low_res, iou, op)], cfg=cfg, mask_threshold=0.0, chunk_bytes=chunk_bytes
            )
    finally:
        fused_amg.selection_chunk = chunk_body
    counter = ByteCounter()
    if fused_regions:
        render = as_one_kernel(counter, render, "fused render_crops_from_logits")
    with counter:
        fill = torch.empty(3, device="meta")
        step = crops_mod.even_chunk(cfg.max_masks_per_image, chunk_bytes // (33 * 16 * crop * crop))
        out = []
        for start in range(0, plan.kept, step):
            index = torch.arange(start, start + step, device="meta").clamp(max=plan.kept - 1)
            low_k, boxes = masks.low_res.index_select(0, index), masks.boxes.index_select(0, index)
            out.append(
                render(image, low_k, op.ay, op.ax, boxes, size=crop, fill=fill, mean=fill, std=fill)[
                    : plan.kept - start
                ]
            )
        torch.cat(out)
    return {"selection": select, "crops": counter}


def selection_bytes(size=(480, 640), plan: Plan | None = None, *, max_masks=100, top=6, **kwargs) -> dict:
    """GB moved per image by upsampling + selection and by crops, stock vs fused (eager) vs fused with each chunk
    body counted as one kernel, and each path's ``top`` ops by bytes.

    Args:
        size: ``(H, W)`` of the original image.
        plan: the data's counts (:class:`Plan`; default: COCO-like, 800 candidates after the IoU filter, 100 kept).
        max_masks: ``max_masks_per_image``.
        kwargs: ``img_size``, ``low``, ``dtype`` (the decoder's), ``chunk_bytes``, ``crop`` (CLIP's input side).
    """
    from ovseg_mine.config import SamConfig

    plan = plan or Plan()
    cfg = SamConfig(
        pred_iou_thresh=0.88, stability_score_thresh=0.95, box_nms_thresh=0.7, max_masks_per_image=max_masks
    )
    runs = {
        "stock": stock_bytes(size, plan, cfg, **kwargs),
        "fused": fused_bytes(size, plan, cfg, **kwargs),
        "fused_one_kernel_per_chunk_body": fused_bytes(size, plan, cfg, fused_regions=True, **kwargs),
    }
    report: dict[str, Any] = {"size": list(size), "plan": vars(plan), "max_masks_per_image": max_masks}
    for path, parts in runs.items():
        report[path] = {part: round(c.total_bytes / 1e9, 3) for part, c in parts.items()}
        report[path]["total"] = round(sum(c.total_bytes for c in parts.values()) / 1e9, 3)
        report[path]["top_ops_gb"] = {
            part: {op: round(b / 1e9, 3) for op, b in list(c.bytes_by_op().items())[:top]} for part, c in parts.items()
        }
    return report


def inductor_bytes(
    size=(480, 640), plan: Plan | None = None, *, chunk=8, crops=4, img_size=1024, low=256, crop=224
) -> dict:
    """GB per image that Inductor's own estimate (``GraphLowering.count_bytes``: the bytes its kernels, library
    matrix products included, read and write) gives for the compiled chunk bodies, compiled on this CPU for
    ``chunk`` candidates (with the engine's ``fused_amg.SELECTION_CHUNK_OPTIONS``) and ``crops`` crops and scaled
    to the plan's survivors and kept masks. The glue around the chunk bodies (index_select, cat, sort, normalize)
    is not included: see :func:`selection_bytes`."""
    from torch._inductor import config, metrics

    from ovseg_mine.crops import render_crops_from_logits
    from ovseg_mine.mine.algorithms.fused_amg import SELECTION_CHUNK_OPTIONS, postprocess_operator, selection_chunk

    plan = plan or Plan()
    op = postprocess_operator(
        (low, low), _inputs(size, plan, img_size, low, torch.float32)[3], size, img_size, torch.device("cpu")
    )
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn((max(chunk, crops), low, low), generator=gen) * 4).to(torch.bfloat16)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=gen)
    boxes = torch.tensor(
        [
            [0, 0, size[1], size[0]],
            [10, 20, 5, 7],
            [size[1] // 3, 0, size[1] // 2, size[0] // 4],
            [0, size[0] // 2, 100, size[0] // 2],
        ]
    )[torch.arange(crops) % 4]
    out = {}
    torch._logging.set_logs(inductor_metrics=True)
    try:
        with config.patch(fx_graph_cache=False):
            torch._dynamo.reset()
            metrics.reset()
            torch.compile(selection_chunk, dynamic=False, options=SELECTION_CHUNK_OPTIONS)(
                logits[:chunk], op.ay, op.ax, 0.0
            )
            out["selection_chunk_mb_per_candidate"] = metrics.num_bytes_accessed / chunk / 1e6
            metrics.reset()
            ones = torch.ones(3)
            torch.compile(render_crops_from_logits, dynamic=False)(
                image, logits[:crops], op.ay, op.ax, boxes, size=crop, fill=ones, mean=ones, std=ones
            )
            out["crop_mb_per_crop"] = metrics.num_bytes_accessed / crops / 1e6
    finally:
        torch._logging.set_logs()
    out["selection_gb"] = round(out["selection_chunk_mb_per_candidate"] * plan.iou_survivors / 1e3, 3)
    out["crops_gb"] = round(out["crop_mb_per_crop"] * plan.kept / 1e3, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--survivors", type=int, default=800, help="candidates left by the predicted-IoU filter")
    parser.add_argument("--stable", type=int, default=500, help="of those, left by the stability filter")
    parser.add_argument("--nms", type=int, default=150, help="of those, left by NMS")
    parser.add_argument("--kept", type=int, default=100, help="masks kept (crops rendered)")
    parser.add_argument("--inductor", action="store_true", help="add Inductor's estimate of the compiled chunk bodies")
    args = parser.parse_args()
    plan = Plan(iou_survivors=args.survivors, stability_survivors=args.stable, nms_survivors=args.nms, kept=args.kept)
    report = selection_bytes(tuple(args.size), plan, max_masks=args.kept)
    if args.inductor:
        report["inductor_compiled_chunk_bodies"] = inductor_bytes(tuple(args.size), plan)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

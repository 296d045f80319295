"""Bytes moved per point prompt by SAM's mask decoder, stock vs fused (``BatchedSam.decode``), on the meta device.

The byte rule of issue 23, counted by ``benchmarks/traffic.py``'s :class:`~traffic.ByteCounter` (the project's one
counter; its module docstring states the rule): for each aten op reaching the dispatcher, the sum over its distinct
tensor inputs and outputs of ``numel * element_size``; view ops, allocations and 0-element tensors count 0; a tensor
an op mutates and also reads (``add_``, ``gelu_``, ``baddbmm_``'s ``self``) counts twice, read and written, a pure
overwrite (``out=``, ``copy_``, ``fill_``, ``zero_``) once. Run under ``torch.inference_mode`` (composite ops such
as ``linear`` or ``layer_norm`` reach the dispatcher as one op). The rule as first written (``_as_first_written``)
counted every distinct tensor once, which leaves out an in-place op's write.

Usage: ``python benchmarks/decoder_bytes.py [--model vit_b] [--prompts 1024] [--batch 512]`` prints a JSON object
with ``stock`` and ``fused`` (:func:`decoder_bytes`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from traffic import ByteCounter  # noqa: E402


def count_bytes(fn: Callable[[], Any]) -> ByteCounter:
    """Run ``fn()`` under ``torch.inference_mode`` and a :class:`~traffic.ByteCounter`; the counter (its
    ``records``: one per top-level op, a composite op such as ``linear`` or ``reshape`` as one op, with
    ``bytes``, ``kernel_bytes`` (its decomposition: the kernels eager runs) and both by the rule as first
    written)."""
    counter = ByteCounter()
    with torch.inference_mode(), counter:
        fn()
    return counter


def decoder_counter(
    model: str = "vit_b", kernels: str = "fused", prompts: int = 1024, batch: int = 512, size=(480, 640)
) -> ByteCounter:
    """The :class:`~traffic.ByteCounter` of ``BatchedSam.decode`` of one image of ``size`` ``(H, W)`` (the whole
    call: prompts, the per-image context, every batch, the concatenation; the prompts' coordinates, cached per
    image size, made before), with the decoder's weights in bfloat16 and its IoU head in float32 as under a GPU's
    rules, on the meta device (no computation, no checkpoint: segment_anything's builder, random init). Arguments
    and errors as :func:`decoder_bytes`."""
    from ovseg_mine.mine.algorithms import sam_batch

    side = round(prompts**0.5)
    if side * side != prompts:
        raise ValueError(f"prompts must be a square number, got {prompts}")
    sam = _meta_sam(model)
    wrap = sam_batch._float32_iou_head  # torch.autocast refuses "meta": the wrapper is built with the CPU's type
    sam_batch._float32_iou_head = lambda decoder, device: wrap(decoder, torch.device("cpu"))
    try:
        batched = sam_batch.BatchedSam(
            sam,
            points_per_side=side,
            points_per_batch=batch,
            precision="pure_bf16",
            low_precision_decoder=True,
            kernels=kernels,
        )
    finally:
        sam_batch._float32_iou_head = wrap
    channels, grid = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    features = torch.empty((1, channels, *grid), dtype=torch.bfloat16, device="meta")
    batched._sparse_prompts(size)  # cached per image size: not per image
    return count_bytes(lambda: batched.decode(features, size))


def decoder_bytes(model: str = "vit_b", kernels: str = "fused", prompts: int = 1024, batch: int = 512) -> dict:
    """Bytes per prompt of ``BatchedSam.decode`` for one image (the whole call: prompts, the per-image context,
    every batch, the concatenation), with the decoder's weights in bfloat16 and its IoU head in float32 as under a
    GPU's rules, on the meta device (no computation, no checkpoint: segment_anything's builder, random init;
    :func:`decoder_counter`).

    Args:
        model: ``vit_b``, ``vit_l``, ``vit_h`` (segment_anything's ``sam_model_registry``) or ``tiny``.
        kernels: ``stock`` or ``fused`` (``BatchedSam``'s ``kernels``).
        prompts: point prompts; a square number (the grid is ``sqrt(prompts)`` per side).
        batch: prompts per decoder call.

    Returns:
        ``bytes_per_prompt`` (the byte rule over top-level ops), ``kernel_bytes_per_prompt`` (over the kernels
        eager runs: composite ops decomposed, copies of ``reshape`` and ``matmul`` included), both by the rule as
        first written (``..._as_first_written``), ``top_ops`` and ``top_kernel_ops`` (the 10 largest top-level op
        names by ``bytes`` and by ``kernel_bytes``, bytes per prompt; a composite op's kernels are counted under
        its own name).

    Raises:
        ValueError: ``prompts`` not a square number.
    """
    counter = decoder_counter(model, kernels, prompts, batch)
    total = lambda field: round(sum(getattr(r, field) for r in counter.records) / prompts)  # noqa: E731
    top = lambda field: {k: round(b / prompts) for k, b in list(counter.bytes_by_op(field).items())[:10]}  # noqa: E731
    return {
        "bytes_per_prompt": total("bytes"),
        "bytes_per_prompt_as_first_written": total("bytes_as_first_written"),
        "kernel_bytes_per_prompt": total("kernel_bytes"),
        "kernel_bytes_per_prompt_as_first_written": total("kernel_bytes_as_first_written"),
        "top_ops": top("bytes"),
        "top_kernel_ops": top("kernel_bytes"),
    }


def _meta_sam(model: str) -> Any:
    """A segment-anything ``Sam`` of ``model``'s shape on the meta device (random init, no checkpoint)."""
    if model == "tiny":
        from ovseg_mine.models import load_sam

        sam, _ = load_sam("tiny", "random", seed=0)
    else:
        from segment_anything import sam_model_registry

        sam = sam_model_registry[model]()
    return sam.to("meta").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    result = {k: decoder_bytes(args.model, k, args.prompts, args.batch) for k in ("stock", "fused")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

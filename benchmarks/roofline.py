"""A roofline estimate of GPU time from counted ops (``traffic.py``): each op takes the longer of its compute time
and its memory time at a fraction ``eff`` of the device's peaks, ops run one after another (eager execution, no
overlap between kernels, no launch or host cost).

    time(op) = max(flops / (peak_flops(dtype) * eff), bytes / (bandwidth * eff))

Peaks (dense, no sparsity), from NVIDIA's datasheets: "NVIDIA H100 Tensor Core GPU" datasheet (H100 SXM column)
and "NVIDIA H200 Tensor Core GPU" datasheet (H200 SXM column), www.nvidia.com/en-us/data-center/h100/ and
/h200/. The datasheets list the sparse tensor-core figures (1,979 TFLOP/s bf16/fp16, 989 TF32); dense is half.

| | bf16 / fp16 tensor core | TF32 tensor core | FP32 (CUDA cores) | HBM bandwidth |
|---|---|---|---|---|
| H100 SXM | 989.4 TFLOP/s | 494.7 TFLOP/s | 66.9 TFLOP/s | 3.35 TB/s |
| H200 SXM | 989.4 TFLOP/s | 494.7 TFLOP/s | 66.9 TFLOP/s | 4.8 TB/s |

An op in bf16 or fp16 gets the tensor-core peak; an op in float32 gets the FP32 (CUDA core) peak, because PyTorch
runs float32 matmuls in full FP32 unless ``torch.backends.cuda.matmul.allow_tf32`` (or
``torch.set_float32_matmul_precision("high")``) is set, which ovseg-mine does not do (``tf32=True`` gives the
TF32 peak instead). Ops with no FLOPs (element-wise, reductions, copies) are bound by their bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

#: Default fraction of the peaks an op reaches.
EFFICIENCY = 0.6


@dataclass(frozen=True)
class Device:
    """Peaks of a GPU: ``half_flops`` (bf16/fp16 tensor core), ``tf32_flops``, ``fp32_flops`` (FLOP/s, dense) and
    ``bandwidth`` (bytes/s of device memory)."""

    name: str
    half_flops: float
    tf32_flops: float
    fp32_flops: float
    bandwidth: float

    def peak_flops(self, dtype: torch.dtype | None, *, tf32: bool = False) -> float:
        """FLOP/s available to an op computing in ``dtype`` (None: no floating input, FP32 peak)."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.half_flops
        return self.tf32_flops if tf32 else self.fp32_flops


H100_SXM = Device("H100 SXM", 989.4e12, 494.7e12, 66.9e12, 3.35e12)
H200_SXM = Device("H200 SXM", 989.4e12, 494.7e12, 66.9e12, 4.8e12)
DEVICES = (H100_SXM, H200_SXM)


def op_seconds(flops: float, moved: float, peak_flops: float, bandwidth: float, eff: float = EFFICIENCY) -> float:
    """One op's roofline time in seconds: ``max(flops / (peak_flops * eff), moved / (bandwidth * eff))``.

    Raises:
        ValueError: ``eff`` outside (0, 1], or a peak not positive.
    """
    if not 0 < eff <= 1:
        raise ValueError(f"eff must be in (0, 1], got {eff}")
    if peak_flops <= 0 or bandwidth <= 0:
        raise ValueError("peak_flops and bandwidth must be positive")
    return max(flops / (peak_flops * eff), moved / (bandwidth * eff))


def estimate(
    records: Iterable[Any],
    device: Device,
    *,
    images: int,
    eff: float = EFFICIENCY,
    tf32: bool = False,
    bytes_field: str = "bytes",
) -> dict[str, Any]:
    """Roofline time of ops run in sequence on ``device``, per part and per image.

    Args:
        records: ``traffic.OpRecord``-like objects (``part``, ``flops``, ``bytes``, ``dtype``) of ``images``
            images.
        device: the GPU's peaks.
        images: how many images the records cover (>= 1).
        eff: fraction of the peaks reached.
        tf32: float32 matmuls at the TF32 tensor-core peak (module docstring).
        bytes_field: the records' attribute that holds an op's bytes (``kernel_bytes``: a composite op's
            decomposed count, ``traffic.ByteCounter``).

    Returns:
        ``device``, ``efficiency``, ``ms_per_image`` (total), ``ms_per_image_by_part`` (part -> ms),
        ``memory_bound_share`` (share of the time in ops whose bytes bind), ``images_per_s``.

    Raises:
        ValueError: ``images`` < 1, or as :func:`op_seconds`.
    """
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    by_part: dict[str, float] = {}
    memory_bound = 0.0
    for r in records:
        peak = device.peak_flops(r.dtype, tf32=tf32)
        moved = getattr(r, bytes_field)
        seconds = op_seconds(r.flops, moved, peak, device.bandwidth, eff)
        by_part[r.part] = by_part.get(r.part, 0.0) + seconds
        if moved / device.bandwidth >= r.flops / peak:
            memory_bound += seconds
    total = sum(by_part.values())
    return {
        "device": device.name,
        "efficiency": eff,
        "ms_per_image": 1000 * total / images,
        "ms_per_image_by_part": {part: 1000 * s / images for part, s in by_part.items()},
        "memory_bound_share": memory_bound / total if total else 0.0,
        "images_per_s": images / total if total else float("inf"),
    }

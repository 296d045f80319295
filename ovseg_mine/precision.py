"""Numeric precision of models, named as open_clip names it, with the device rules in one place.

Two different things lower the precision of a model, and the code names them apart:

* ``amp_bf16`` / ``amp_fp16`` -- *automatic mixed precision*: the weights stay float32 and ``torch.autocast``
  runs matrix products in the low dtype. Training uses it (:mod:`ovseg_mine.finetune`): the optimizer updates
  float32 weights.
* ``pure_bf16`` / ``pure_fp16`` -- the weights themselves are cast to the low dtype (``model.to(dtype)``,
  open_clip's ``precision="pure_bf16"``); inputs are cast to it on the way in, outputs back to float32 on the way
  out. Mining, which only runs inference, uses it: on a 2-core AMX CPU, CLIP ViT-B/16 on 64 crops took 11.5 s in
  fp32, 9.8 s under bf16 autocast and 4.3 s with bf16 weights; SAM's vit_b image encoder 8.1 s under autocast and
  5.6 s with bf16 weights. On a CPU without bf16 hardware the same encoder takes 16.4 s with bf16 weights and
  8.3 s in float32, so there a bf16 recipe runs in float32 (:func:`for_inference`).
* ``fp32`` -- neither.

Recipes name only the dtype (``sam.precision = "bf16"``, ``finetune --precision bf16``); :func:`for_inference`
and :func:`for_training` turn a dtype name into one of the precisions above for a device.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ContextManager

if TYPE_CHECKING:
    import torch

#: The precisions, as open_clip names them.
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16", "pure_bf16", "pure_fp16")
#: Dtype names that recipes and CLI options accept.
DTYPE_NAMES = ("fp32", "bf16", "fp16")


def _check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def dtype_of(precision: str) -> "torch.dtype":
    """The low dtype of a precision: ``torch.bfloat16`` for ``*_bf16``, ``torch.float16`` for ``*_fp16``,
    ``torch.float32`` for ``fp32``.

    Raises:
        ValueError: not one of :data:`PRECISIONS`.
    """
    import torch

    suffix = _check(precision).rsplit("_", 1)[-1]
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[suffix]


def is_pure(precision: str) -> bool:
    """True for ``pure_bf16`` and ``pure_fp16`` (weights cast). Raises ValueError for an unknown name."""
    return _check(precision).startswith("pure_")


def autocast(precision: str, device: "torch.device | str") -> ContextManager:
    """``torch.autocast`` to the precision's dtype for ``amp_*``; a no-op context for ``fp32`` and ``pure_*``
    (their weights already have the dtype they run in).

    Raises:
        ValueError: unknown precision.
    """
    import torch

    if not _check(precision).startswith("amp_"):
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype_of(precision))


def cast_model(model: "torch.nn.Module", precision: str) -> "torch.nn.Module":
    """Cast a model's weights in place for ``pure_*`` (returns it); ``fp32`` and ``amp_*`` leave it as it is.

    Raises:
        ValueError: unknown precision.
    """
    return model.to(dtype_of(precision)) if is_pure(precision) else model


def _dtype_name(name: str, options: tuple[str, ...]) -> str:
    if name not in options:
        raise ValueError(f"precision must be one of {', '.join(options)}, got {name!r}")
    return name


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles, as torch reports them). Without
    them oneDNN emulates bf16 and it is slower than float32: SAM's vit_b image encoder took 16.4 s with bf16
    weights and 8.3 s in float32 on a 2-core AVX-512 Xeon without AVX512-BF16 (``benchmarks/README.md``)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def for_inference(name: str, device: "torch.device | str", *, native_bf16: bool | None = None) -> str:
    """The precision mining runs a model in, from the recipe's dtype name.

    ``bf16`` -> ``pure_bf16`` on CUDA and on CPUs that compute bf16 in hardware, ``fp32`` on other CPUs (emulated
    bf16 is about twice as slow as float32 there); ``fp16`` -> ``pure_fp16`` on CUDA, ``fp32`` on a CPU (no fast
    fp16 there); ``fp32`` -> ``fp32``.

    Args:
        name: one of :data:`DTYPE_NAMES`.
        device: where the model runs (only its type matters).
        native_bf16: whether a CPU computes bf16 in hardware; None: ask this CPU (:func:`cpu_has_native_bf16`).

    Raises:
        ValueError: not one of :data:`DTYPE_NAMES`.
    """
    import torch

    name = _dtype_name(name, DTYPE_NAMES)
    if name == "fp32" or torch.device(device).type == "cuda":
        return "fp32" if name == "fp32" else f"pure_{name}"
    if name == "bf16" and (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        return "pure_bf16"
    return "fp32"


def for_training(name: str, device: "torch.device | str") -> str:
    """The precision finetuning runs in, from ``--precision``.

    ``auto`` -> ``amp_bf16`` on a GPU that supports bf16, ``amp_fp16`` on other GPUs, ``fp32`` on a CPU;
    ``bf16`` -> ``amp_bf16``; ``fp16`` -> ``amp_fp16``; ``fp32`` -> ``fp32``.

    Raises:
        ValueError: not ``auto`` nor one of :data:`DTYPE_NAMES`.
    """
    import torch

    name = _dtype_name(name, ("auto", *DTYPE_NAMES))
    if name == "auto":
        if torch.device(device).type != "cuda":
            return "fp32"
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32" if name == "fp32" else f"amp_{name}"

"""Precision names (open_clip's): what each does to a model, and the device rules."""

from __future__ import annotations

import pytest
import torch

from ovseg_mine import precision


def test_pure_casts_weights_and_amp_autocasts():
    model = torch.nn.Linear(4, 2)
    assert precision.cast_model(model, "amp_bf16") is model and model.weight.dtype == torch.float32
    with precision.autocast("amp_bf16", "cpu"):
        assert model(torch.randn(3, 4)).dtype == torch.bfloat16
    with precision.autocast("pure_bf16", "cpu"), precision.autocast("fp32", "cpu"):
        assert model(torch.randn(3, 4)).dtype == torch.float32  # no autocast: pure models run in their own dtype
    assert precision.cast_model(model, "pure_bf16") is model and model.weight.dtype == torch.bfloat16
    assert precision.dtype_of("pure_fp16") == torch.float16 and precision.dtype_of("fp32") == torch.float32


def test_device_rules():
    assert precision.for_inference("bf16", "cuda") == "pure_bf16"
    assert precision.for_inference("bf16", "cpu", native_bf16=True) == "pure_bf16"  # AVX512-BF16 or AMX
    assert precision.for_inference("bf16", "cpu", native_bf16=False) == "fp32"  # emulated bf16 is slower
    this_cpu = "pure_bf16" if precision.cpu_has_native_bf16() else "fp32"
    assert precision.for_inference("bf16", "cpu") == this_cpu
    assert precision.for_inference("fp16", "cpu") == "fp32"  # no fast fp16 on a CPU
    assert precision.for_inference("fp16", "cuda") == "pure_fp16"
    assert precision.for_inference("fp32", "cuda") == "fp32"
    assert precision.for_training("auto", "cpu") == "fp32"
    assert precision.for_training("bf16", "cpu") == "amp_bf16"
    assert precision.for_training("fp16", "cuda") == "amp_fp16"


@pytest.mark.parametrize(
    "call",
    [
        lambda: precision.dtype_of("bf16"),
        lambda: precision.autocast("int8", "cpu"),
        lambda: precision.for_inference("amp_bf16", "cpu"),
        lambda: precision.for_training("pure_bf16", "cpu"),
    ],
)
def test_unknown_names_are_refused_with_the_valid_ones(call):
    with pytest.raises(ValueError, match="precision must be one of"):
        call()

"""benchmarks/traffic.py: the byte rule and FLOPs on small ops whose counts are known by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from traffic import PARTS, ByteCounter, part_of_stack  # noqa: E402


def counted(fn, *tensors):
    with ByteCounter() as counter:
        fn(*tensors)
    return counter


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_matmul_bytes_and_flops(device):
    a = torch.ones((4, 8), device=device)
    b = torch.ones((8, 16), device=device)
    counter = counted(torch.mm, a, b)
    [record] = counter.records
    assert record.name == "aten.mm"
    assert record.bytes == record.kernel_bytes == (4 * 8 + 8 * 16 + 4 * 16) * 4  # inputs and output, float32
    assert record.flops == 2 * 4 * 8 * 16
    assert record.dtype == torch.float32
    assert record.part == "other"  # called from no known file
    assert counter.total_bytes == 896 and counter.total_flops == 1024


def test_views_move_nothing():
    a = torch.ones((4, 8))
    counter = counted(lambda x: (x.view(32), x.t(), x[1:], x.unsqueeze(0), x.reshape(2, 16)), a)
    assert counter.records == [] and counter.total_bytes == 0
    assert counter.ops == 5


def test_a_non_contiguous_reshape_is_a_copy():
    a = torch.ones((4, 8))
    with torch.inference_mode(), ByteCounter() as counter:
        a.t().reshape(32)
    assert counter.total_bytes == 2 * 32 * 4  # read and written once


def test_linear_in_inference_mode_counts_as_one_op_with_its_kernels_flops():
    x, w, b = torch.ones((2, 8)), torch.ones((16, 8)), torch.ones(16)
    with torch.inference_mode(), ByteCounter() as counter:
        torch.nn.functional.linear(x, w, b)
    [record] = counter.records
    assert record.name == "aten.linear"
    assert record.bytes == (2 * 8 + 16 * 8 + 16 + 2 * 16) * 4
    assert record.kernel_bytes == record.bytes  # t (a view) + addmm of the same tensors
    assert record.flops == 2 * 2 * 8 * 16


def test_each_tensor_once_per_op_and_empty_tensors_count_zero():
    a, b = torch.ones(10), torch.ones(10)
    counter = counted(lambda x, y: (x.add_(y), x + x, torch.ones(0) + 1), a, b)
    assert [r.bytes for r in counter.records[:2]] == [2 * 10 * 4, 2 * 10 * 4]  # in place: a once; a + a: a, out
    assert counter.total_bytes == 160


def test_bf16_halves_the_bytes():
    a = torch.ones((64, 64), dtype=torch.bfloat16, device="meta")
    [record] = counted(torch.mm, a, a).records
    assert record.bytes == 2 * 64 * 64 * 2  # a once (same object), the output
    assert record.dtype == torch.bfloat16


def test_parts_come_from_the_call_stack():
    from ovseg_mine.crops import normalize

    crops = torch.full((2, 3, 4, 4), 255.0)
    counter = counted(lambda c: normalize(c, [0.5] * 3, [0.25] * 3), crops)
    by_part = counter.bytes_by_part()
    assert set(by_part) == set(PARTS)
    assert by_part["crops"] == counter.total_bytes > 0
    assert counter.flops_by_part()["crops"] == 0  # element-wise ops have no FLOP formula
    assert part_of_stack() == "other"


def test_cpu_attention_flops():
    q = torch.ones((1, 2, 8, 4))
    with torch.inference_mode(), ByteCounter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.total_flops == 2 * 2 * 8 * 8 * (4 + 4)  # q @ k^T and attn @ v, over 2 heads
    assert counter.records[0].bytes >= 2 * q.numel() * 4  # reads q (once: the same tensor), writes the output

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
    assert [r.bytes for r in counter.records[:2]] == [3 * 10 * 4, 2 * 10 * 4]  # in place: a read and written, b
    assert [r.bytes_as_first_written for r in counter.records[:2]] == [2 * 10 * 4, 2 * 10 * 4]  # a once
    assert counter.total_bytes == 200


KB4 = 1024  # float32 elements in 4 kB


@pytest.mark.parametrize(
    ("name", "fn", "kilobytes"),
    [
        ("aten.add_", lambda a, b, o: a.add_(b), 12),  # a read and written, b read
        ("aten.add", lambda a, b, o: torch.add(a, b, out=o), 12),  # a, b read, o only written
        ("aten.add", lambda a, b, o: torch.add(a, b, out=a), 12),  # out= also an input: read and written, b
        ("aten.copy_", lambda a, b, o: o.copy_(a), 8),  # a read, o only written
        ("aten.zero_", lambda a, b, o: o.zero_(), 4),  # only written
        ("aten.fill_", lambda a, b, o: o.fill_(2.0), 4),
        ("aten.gelu_", lambda a, b, o: torch.ops.aten.gelu_(a), 8),  # read and written
        ("aten.mul", lambda a, b, o: a * b, 12),  # not in place: each tensor once
    ],
)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_in_place_writes_count_as_writes(name, fn, kilobytes, device):
    a, b, o = (torch.ones(KB4, device=device) for _ in range(3))
    with torch.inference_mode(), ByteCounter() as counter:
        fn(a, b, o)
    [record] = counter.records
    assert record.name == name
    assert record.bytes == record.kernel_bytes == kilobytes * 1024


def test_a_plan_answers_data_dependent_ops_on_meta():
    x = torch.ones((6, 2), device="meta")
    with ByteCounter(nonzero=[4], host=[[1, 2, 3]]) as counter:
        rows = torch.nonzero(x)
        values = torch.ones(3, device="meta").tolist()
    assert rows.shape == (4, 2) and values == [1.0, 2.0, 3.0]
    assert counter.bytes_by_op()["aten.nonzero"] == 6 * 2 * 4 + 4 * 2 * 8
    assert counter.bytes_by_op()["aten._to_copy"] == 2 * 3 * 4  # the planned answer counted like any copy
    total = counter.total_bytes
    counter.add("one kernel", 100)
    assert counter.records[-1].bytes == 100 and counter.total_bytes == total + 100


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

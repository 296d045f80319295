"""benchmarks/chunk_bodies.py: the chunk bodies' calls noted in a counted run, and their compiled replacement."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from chunk_bodies import BodyTally, compiled_records  # noqa: E402
from traffic import ByteCounter  # noqa: E402


def _selection_call(size=(12, 16), low=8, chunk=4):
    from ovseg_mine.mine.algorithms import fused_amg

    op = fused_amg.postprocess_operator((low, low), (12, 16), size, 16, torch.device("cpu"))
    logits = torch.randn((chunk, low, low))
    return lambda: fused_amg.selection_chunk(logits, op.ay, op.ax, 0.0)


def test_tally_notes_each_body_call_and_its_records():
    counter = ByteCounter()
    call = _selection_call()
    with BodyTally(counter) as tally, counter:
        torch.ones(3) + 1  # outside a body: fill_ and add
        call()
        call()
    assert [(c.kind, c.size, c.items) for c in tally.calls] == [("selection", (12, 16), 4)] * 2
    first, second = tally.calls
    assert first.start == 2 and first.stop == second.start and second.stop == len(counter.records)
    assert all(r.part == "selection" for r in counter.records[first.start : second.stop])
    assert tally.items("selection") == 8 and tally.items("crops") == 0 and tally.sizes() == [(12, 16)]
    from ovseg_mine.mine.algorithms import fused_amg

    assert fused_amg.selection_chunk.__name__ == "selection_chunk"  # restored on exit


def test_compiled_records_replace_each_call_by_one_record():
    counter = ByteCounter()
    call = _selection_call()
    with BodyTally(counter) as tally, counter:
        call()
        torch.ones(3) + 1
    records = compiled_records(counter.records, tally.calls, {("selection", (12, 16)): 1000.0})
    body = counter.records[: tally.calls[0].stop]
    assert len(records) == len(counter.records) - len(body) + 1
    assert records[0].name == "compiled selection chunk body" and records[0].bytes == 4000
    assert records[0].flops == sum(r.flops for r in body) > 0  # the upsampling's matrix products
    assert records[1:] == counter.records[len(body) :]


def test_compiled_bodies_run_no_matrix_product():
    from chunk_bodies import compiled_body_flops

    assert compiled_body_flops((24, 32), items=2, low=8, img_size=32) == {"selection": 0.0, "crops": 0.0}


def test_compiled_records_take_the_given_flops():
    counter = ByteCounter()
    call = _selection_call()
    with BodyTally(counter) as tally, counter:
        call()
    key = ("selection", (12, 16))
    [record] = compiled_records(counter.records, tally.calls, {key: 10.0}, {key: 0.0})
    assert record.flops == 0 and record.bytes == 40


def test_tally_wraps_the_bodies_an_engine_keeps():
    """A ``MiningEngine`` keeps its bodies as attributes (compiled or not); with ``engine`` the tally wraps those."""
    from types import SimpleNamespace

    from ovseg_mine.crops import render_crops_from_logits
    from ovseg_mine.mine.algorithms import fused_amg

    engine = SimpleNamespace(_select_chunk=fused_amg.selection_chunk, _crop_chunk=render_crops_from_logits)
    op = fused_amg.postprocess_operator((8, 8), (12, 16), (12, 16), 16, torch.device("cpu"))
    counter = ByteCounter()
    with BodyTally(counter, engine) as tally, counter:
        engine._select_chunk(torch.randn((4, 8, 8)), op.ay, op.ax, 0.0)
    assert [(c.kind, c.size, c.items) for c in tally.calls] == [("selection", (12, 16), 4)]
    assert engine._select_chunk is fused_amg.selection_chunk  # restored on exit

"""A shard's done record (ovseg_mine.done_record): the JSON the driver writes reads back into the same record and
is written back byte for byte; records of earlier or hand-made runs read with defaults; malformed ones refused."""

from __future__ import annotations

import json

import pytest

from ovseg_mine.done_record import DoneRecord, ImageStatus, Reject
from ovseg_mine.shards import load_marker, marker_location, write_json_atomic
from ovseg_mine.storage import resolve

#: A done record as the driver writes it: an image mined, one with a warning, one that failed, a file reject.
WRITTEN = {
    "shard": 4,
    "input": {"file": "00004.tar", "size": 123, "mtime_ns": 5},
    "image_ids": [10, 11, 12],
    "images": [
        {
            "image_id": 10,
            "status": "ok",
            "reason": "",
            "width": 640,
            "height": 480,
            "num_nouns": 3,
            "num_proposals": 12,
            "num_pairs": 3,
            "notes": [],
        },
        {
            "image_id": 11,
            "status": "ok",
            "reason": "",
            "width": 480,
            "height": 640,
            "num_nouns": 1,
            "num_proposals": 9,
            "num_pairs": 1,
            "notes": ["caption 1: cut to 300 characters"],
        },
        {
            "image_id": 12,
            "status": "error",
            "reason": "KeyError: 'x'",
            "width": 500,
            "height": 400,
            "num_nouns": 2,
            "num_proposals": 0,
            "num_pairs": 0,
            "notes": [],
            "error_type": "KeyError",
        },
    ],
    "rejects": [
        {"image_id": 12, "file_name": "00004.tar/12.jpg", "stage": "error", "reason": "KeyError: 'x'"},
        {"image_id": None, "file_name": "00004.tar", "stage": "source", "reason": "the tar has no end marker"},
    ],
    "warnings": [
        {"image_id": 11, "file_name": "00004.tar/11.jpg", "stage": "warning", "reason": "caption 1: cut"},
    ],
    "stage_s": {"decode": 0.25, "nouns": 0.0, "proposals": 1.5, "crops": 0.125, "clip": 2.0},
    "file": "shards/shard-00004.parquet",
    "rows": 4,
    "sha256": "ab" * 32,
}


def test_the_written_json_reads_back_and_is_written_back_byte_for_byte(tmp_path):
    record = DoneRecord.from_json(json.loads(json.dumps(WRITTEN)))
    assert record.to_json() == WRITTEN
    assert record.images[2] == ImageStatus(12, "error", "KeyError: 'x'", 500, 400, 2, 0, 0, (), "KeyError")
    assert record.rejects[1] == Reject(None, "00004.tar", "source", "the tar has no end marker")
    assert "error_type" not in record.images[0].to_json()  # written only for a failed image
    write_json_atomic(tmp_path / "a.json", WRITTEN)
    write_json_atomic(tmp_path / "b.json", record.to_json())
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_a_smoke_runs_markers_are_written_back_byte_for_byte(smoke_run, tmp_path):
    for index in range(3):
        marker = resolve(marker_location(smoke_run, index))
        record = load_marker(marker)
        assert record is not None and record.shard == index and len(record.images) == len(record.image_ids) > 0
        write_json_atomic(tmp_path / "again.json", record.to_json())
        assert (tmp_path / "again.json").read_bytes() == marker.read_bytes()


def test_missing_keys_take_their_defaults():
    record = DoneRecord.from_json({"file": "shards/shard-00000.parquet", "images": [{"image_id": 1, "status": "ok"}]})
    assert (record.rows, record.sha256, record.input, record.rejects, record.stage_s) == (0, None, None, (), {})
    assert record.images == (ImageStatus(1, "ok"),)
    assert record.images[0].to_json()["width"] is None


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"rows": "7"},
        {"images": {"image_id": 1}},
        {"images": [{"status": "ok"}]},
        {"rejects": [{"image_id": 1, "file_name": None, "reason": "no stage"}]},
        {"stage_s": {"clip": "fast"}},
        {"image_ids": [1.5]},
    ],
)
def test_a_malformed_record_is_refused(data, tmp_path):
    with pytest.raises(ValueError):
        DoneRecord.from_json(data)
    (tmp_path / "shard-00000.json").write_text(json.dumps(data))
    assert load_marker(resolve(tmp_path / "shard-00000.json")) is None  # not done: the shard is redone

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovseg_mine import rle
from ovseg_mine.done_record import DoneRecord
from ovseg_mine.shards import (
    ShardError,
    pair_schema,
    read_done,
    read_file_metadata,
    read_manifest,
    validate_shard,
    write_json_atomic,
    write_shard,
)
from ovseg_mine.storage import resolve
from ovseg_mine.verify import read_pairs, shard_files


def _pair(image_id=1, noun="dog"):
    mask = np.zeros((8, 10), dtype=bool)
    mask[2:5, 3:7] = True
    return {
        "pair_id": f"{image_id}:{noun}",
        "image_id": image_id,
        "file_name": "a.jpg",
        "width": 10,
        "height": 8,
        "caption_index": 0,
        "caption": "a dog",
        "noun": noun,
        "mask": rle.encode(mask),
        "bbox": [3, 2, 4, 3],
        "area": 12,
        "proposal_index": 0,
        "num_proposals": 1,
        "similarity": 0.3,
        "probability": 1.0,
        "margin": None,
        "predicted_iou": 0.9,
        "stability_score": 0.95,
    }


def test_schema_follows_contract():
    schema = pair_schema()
    mask = schema.field("mask").type
    assert [(f.name, f.type) for f in mask] == [("size", pa.list_(pa.int32())), ("counts", pa.string())]
    assert schema.field("bbox").type == pa.list_(pa.int32(), 4)
    assert schema.field("margin").nullable and not schema.field("similarity").nullable
    assert b"description" in schema.field("bbox").metadata


def test_write_is_atomic_marked_done_and_valid(tmp_path):
    table = pa.Table.from_pylist([_pair(1, "dog"), _pair(2, "cat")], schema=pair_schema())
    record = write_shard(
        tmp_path,
        3,
        table,
        file_metadata={"config": {"a": 1}},
        done_record=DoneRecord(image_ids=(1, 2)),
        row_group_size=10,
    )
    path = tmp_path / "shards" / "shard-00003.parquet"
    assert path.is_file() and not list((tmp_path / "shards").glob("*.tmp"))
    assert record.rows == 2 and record.file == "shards/shard-00003.parquet"
    assert validate_shard(path) == []
    assert read_file_metadata(path)["schema_version"] == 1
    assert read_done(tmp_path)[3].image_ids == (1, 2)
    assert read_pairs(tmp_path).column("noun").to_pylist() == ["dog", "cat"]
    # a shard whose bytes changed after it was marked done is not done any more
    path.write_bytes(path.read_bytes()[:-8])
    assert read_done(tmp_path) == {}


def test_identical_input_gives_identical_bytes(tmp_path):
    table = pa.Table.from_pylist([_pair()], schema=pair_schema())
    a = write_shard(tmp_path / "a", 0, table, file_metadata={}, done_record=DoneRecord(), row_group_size=10)
    b = write_shard(tmp_path / "b", 0, table, file_metadata={}, done_record=DoneRecord(), row_group_size=10)
    assert a.sha256 == b.sha256


def test_unknown_schema_version_and_foreign_files(tmp_path):
    table = pa.Table.from_pylist([_pair()], schema=pair_schema())
    future = table.replace_schema_metadata({b"ovseg_mine": json.dumps({"schema_version": 99}).encode()})
    pq.write_table(future, tmp_path / "future.parquet")
    with pytest.raises(ShardError, match="schema version 99"):
        read_file_metadata(tmp_path / "future.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "plain.parquet")
    assert "no ovseg_mine metadata" in validate_shard(tmp_path / "plain.parquet")[0]
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    assert "not a readable Parquet file" in validate_shard(tmp_path / "junk.parquet")[0]
    with pytest.raises(ShardError, match="not an ovseg-mine run folder"):
        shard_files(tmp_path / "nothing")


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path) -> str:
    """Where a run folder goes: a local path, or a bucket on a local moto S3 server."""
    return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("s3") + "/run"


def test_commit_protocol_on_disks_and_object_stores(run_root):
    """A shard is done only when its file and its done marker are both there and agree (rows, sha256)."""
    run = resolve(run_root)
    table = pa.Table.from_pylist([_pair(1, "dog"), _pair(2, "cat")], schema=pair_schema())
    records = {
        i: write_shard(
            run_root, i, table, file_metadata={}, done_record=DoneRecord(image_ids=(1, 2)), row_group_size=10
        )
        for i in range(4)
    }
    assert read_done(run_root) == records
    assert [f.name for f in shard_files(run_root)] == [f"shard-0000{i}.parquet" for i in range(4)]
    assert validate_shard(shard_files(run_root)[0]) == [] and read_file_metadata(shard_files(run_root)[0])
    assert read_pairs(run_root).num_rows == 8
    shards = run.join("shards")
    # 0: the file's bytes changed after it was marked done; 1: the file is gone, its marker left;
    # 2: a file without its marker (written, then the run stopped); 3 stays done.
    shards.join("shard-00000.parquet").write_bytes(shards.join("shard-00000.parquet").read_bytes()[:-8])
    shards.join("shard-00001.parquet").delete()
    run.join("done", "shard-00002.json").delete()
    assert sorted(read_done(run_root)) == [3]
    assert sorted(read_done(run_root, verify=False)) == [0, 1, 3]
    assert sorted(read_done(run_root, only=[2, 3])) == [3]
    write_json_atomic(run.join("manifest.json"), {"status": "partial"})
    assert read_manifest(run_root) == {"status": "partial"}
    # the same table gives the same bytes wherever it is written
    local = write_shard(run_root + "-again", 0, table, file_metadata={}, done_record=DoneRecord(), row_group_size=10)
    assert local.sha256 == records[0].sha256

"""Hugging Face datasets written by ``datasets`` itself (save_to_disk, DatasetDict, to_parquet in the Hub's layout),
read by the hf source file by file; bad rows and bad columns."""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovseg_mine.mine.sources import SourceError
from ovseg_mine.mine.sources.records import stable_id

from helpers.sources import build_hf, read_rows, source_of


def _source(location, *overrides: str):
    return source_of("hf", location, *overrides)


def test_save_to_disk_rows_carry_the_image_bytes_and_caption_lists(coco8, tmp_path):
    items = coco8["items"]
    saved = build_hf(tmp_path / "saved", items, arrow_shards=2)
    source = _source(saved, 'source.id_column="image_id"')
    plan = source.plan(1000)
    assert [(t.index, t.size, t.input["file"]) for t in plan.tasks] == [
        (0, 4, "data-00000-of-00002.arrow"),
        (1, 4, "data-00001-of-00002.arrow"),
    ]
    assert plan.info["fingerprint"] and plan.info["columns"]["caption"] == "captions"
    rows = read_rows(source)
    assert [r["image_id"] for r in rows] == [it["image_id"] for it in items]
    assert [r["captions"] for r in rows] == [it["captions"] for it in items]
    assert rows[5]["file_name"] == "data-00001-of-00002.arrow/1" and rows[5]["shard_row"] == 1
    assert all(r["image_bytes"] == Path(it["path"]).read_bytes() for r, it in zip(rows, items, strict=True))
    hashed = read_rows(_source(saved))
    assert hashed[5]["image_id"] == stable_id("data-00001-of-00002.arrow/1")


def test_dataset_dict_splits_and_hub_layout_parquet(coco8, tmp_path):
    items = coco8["items"]
    ds = datasets.load_from_disk(str(build_hf(tmp_path / "one", items)))
    datasets.DatasetDict({"train": ds.select(range(5)), "validation": ds.select(range(5, 8))}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert len(read_rows(_source(tmp_path / "dict"))) == 5
    assert [r["captions"][0] for r in read_rows(_source(tmp_path / "dict", 'source.split="validation"'))] == [
        it["captions"][0] for it in items[5:]
    ]
    with pytest.raises(SourceError, match="has no split 'test'; its splits: train, validation"):
        _source(tmp_path / "dict", 'source.split="test"').plan(10)
    parquet = build_hf(tmp_path / "pq", items, parquet_files=3)
    plan = _source(parquet).plan(10)
    assert [t.input["file"] for t in plan.tasks] == [f"data/train-0000{i}-of-00003.parquet" for i in range(3)]
    assert plan.info["split"] == "train" and plan.total == 8
    assert len(read_rows(_source(parquet / "data" / "train-00001-of-00003.parquet"))) == 3
    limited = _source(parquet, "source.limit=4").plan(10)
    assert [(t.size, t.input.get("rows")) for t in limited.tasks] == [(3, None), (1, [0, 1])]


def test_bad_columns_are_one_line_errors_before_any_work(coco8, tmp_path):
    saved = build_hf(tmp_path / "saved", coco8["items"][:2])
    with pytest.raises(SourceError, match=r"has no column 'text' \(--caption-column\); its columns: image, captions"):
        _source(saved, 'source.caption_column="text"').plan(10)
    with pytest.raises(SourceError, match="id column 'captions' holds list<item: string> values, not integers"):
        _source(saved, 'source.id_column="captions"').plan(10)
    ds = datasets.Dataset.from_dict({"picture": ["a.jpg"], "words": ["A dog."]})
    ds.save_to_disk(str(tmp_path / "nocols"))
    with pytest.raises(SourceError, match="no image column found .* pass --image-column"):
        _source(tmp_path / "nocols").plan(10)
    with pytest.raises(SourceError, match="not found"):
        _source(tmp_path / "missing" / "x.parquet").plan(10)


def test_bad_rows_are_listed_and_corrupt_images_rejected_when_decoded(coco8, tmp_path, smoke_stages):
    items = coco8["items"]
    good = Path(items[0]["path"]).read_bytes()
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.List(datasets.Value("string")), "id": datasets.Value("int64")}
    )
    ds = datasets.Dataset.from_dict(
        {
            "image": [
                {"bytes": good, "path": None},
                {"bytes": good[:300], "path": None},
                None,
                {"bytes": None, "path": items[1]["path"]},
                {"bytes": good, "path": None},
            ],
            "caption": [["A dog on a bed."], ["A cat."], ["A cat."], ["A kitchen.", "A stove."], None],
            "id": [1, 2, 3, 4, 1],
        },
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "bad"))
    source = _source(tmp_path / "bad", 'source.image_column="image"', 'source.id_column="id"')
    rows = read_rows(source)
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("ok", ""),
        ("ok", ""),
        ("source", "no image in column 'image'"),
        ("ok", ""),
        ("source", "no caption"),
    ]
    assert rows[3]["image_bytes"] == Path(items[1]["path"]).read_bytes()  # save_to_disk embeds a path's bytes
    assert rows[3]["captions"] == ["A kitchen.", "A stove."]
    task = source.plan(10).tasks[0]
    results = [r for table in source.read_shard(task) for r in smoke_stages(table)]
    assert results[1]["status"] == "decode" and results[1]["reason"].startswith("corrupt image")
    assert results[0]["status"] == results[3]["status"] == "ok"
    duplicated = datasets.Dataset.from_dict({"image": [good, good], "caption": ["A dog."] * 2, "id": [5, 5]})
    duplicated.save_to_disk(str(tmp_path / "dup"))
    rows = read_rows(_source(tmp_path / "dup", 'source.id_column="id"'))
    assert [r["reason"] for r in rows] == ["", "duplicate image id (first kept)"]


def test_an_image_column_of_paths_relative_to_the_file(coco8, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    item = coco8["items"][0]
    (tmp_path / "img").mkdir()
    shutil.copy(item["path"], tmp_path / "img" / "a.jpg")
    table = pa.table({"image": ["img/a.jpg", str(tmp_path / "img" / "a.jpg")], "text": ["A dog.", "A cat."]})
    pq.write_table(table, tmp_path / "paths.parquet")
    rows = read_rows(_source(tmp_path / "paths.parquet"))
    assert [r["path"] for r in rows] == [str(tmp_path / "img" / "a.jpg")] * 2
    assert [r["captions"] for r in rows] == [["A dog."], ["A cat."]] and rows[0]["image_bytes"] is None


def test_a_truncated_parquet_among_good_ones_is_listed_and_the_others_are_mined(coco8, tmp_path):
    """A Hub-layout dataset of 3 Parquet files whose second is cut in half (no footer: its rows are unknown): one
    reject of that file, no image id (not counted as an image); the 5 rows of the other files are read."""
    items = coco8["items"]
    root = build_hf(tmp_path / "hub", items, parquet_files=3)
    cut = root / "data" / "train-00001-of-00003.parquet"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    source = _source(root, 'source.id_column="image_id"')
    plan = source.plan(1000)
    assert [(t.size, t.expected) for t in plan.tasks] == [(3, None), (None, 1), (2, None)]
    assert plan.total == 6 and plan.info["unreadable_files"] == 1
    rows = read_rows(source)
    assert [r["image_id"] for r in rows if r["status"] == "ok"] == [it["image_id"] for it in items[:3] + items[6:]]
    files = [r for r in rows if r["image_id"] is None]
    assert [(r["file_name"], r["status"], r["shard"]) for r in files] == [
        ("data/train-00001-of-00003.parquet", "source", 1)
    ]
    assert files[0]["reason"] == (
        "train-00001-of-00003.parquet is not a readable Parquet or Arrow file: Parquet magic bytes not found in "
        "footer. Either the file is corrupted or this is not a parquet file.; the rows it held are unknown (listed "
        "as one reject of the file)"
    )


def test_an_arrow_file_cut_short_is_listed_and_the_others_are_mined(coco8, tmp_path):
    items = coco8["items"]
    saved = build_hf(tmp_path / "saved", items, arrow_shards=2)
    arrow = saved / "data-00000-of-00002.arrow"
    arrow.write_bytes(arrow.read_bytes()[:-300])
    rows = read_rows(_source(saved))
    assert [(r["image_id"], r["file_name"]) for r in rows[:1]] == [(None, "data-00000-of-00002.arrow")]
    assert [r["status"] for r in rows[1:]] == ["ok"] * 4


def test_rows_after_a_corrupt_page_are_rejects_each_and_the_rows_before_are_read(coco8, tmp_path):
    """A Parquet file whose footer is intact but whose second row group has a corrupt page header (16 bytes
    overwritten): its 4 first rows are read, each of the 4 others is a reject naming the file, the row and the cause."""
    items = coco8["items"]
    table = pa.table(
        {"image": [Path(it["path"]).read_bytes() for it in items], "caption": [it["captions"][0] for it in items]}
    )
    path = tmp_path / "photos.parquet"
    pq.write_table(table, path, row_group_size=4)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    rows = read_rows(_source(path))
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["source"] * 4
    assert [r["file_name"] for r in rows[4:]] == [f"photos.parquet/{k}" for k in range(4, 8)]
    assert all(r["image_id"] == stable_id(r["file_name"]) for r in rows)
    assert rows[4]["reason"].startswith("photos.parquet cannot be read from row 4: Couldn't deserialize thrift")
    assert "\n" not in rows[4]["reason"]

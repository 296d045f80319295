"""img2dataset output folders (parquet, files and webdataset formats) read by the img2dataset source."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovseg_mine.mine.sources import SourceError
from ovseg_mine.mine.sources.records import stable_id

from helpers.sources import build_img2dataset, build_webdataset, read_rows, source_of


def _source(location, *overrides: str):
    return source_of("img2dataset", location, *overrides)


@pytest.mark.parametrize("layout", ["parquet", "files"])
def test_each_shard_with_its_failed_downloads(coco8, tmp_path, layout):
    items = coco8["items"]
    root = build_img2dataset(tmp_path, items, layout=layout, per_shard=5)
    source = _source(root)
    plan = source.plan(1000)
    assert [(t.index, t.size, t.input["file"]) for t in plan.tasks] == [
        (0, 6, "00000.parquet"),
        (1, 4, "00001.parquet"),
    ]
    assert plan.info["format"] == layout
    rows = read_rows(source)
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["captions"] for r in ok] == [[it["captions"][0]] for it in items]
    if layout == "parquet":
        assert (
            ok[0]["file_name"] == "00000.parquet/000000000"
            and ok[0]["image_bytes"] == Path(items[0]["path"]).read_bytes()
        )
        assert ok[0]["image_id"] == stable_id("00000.parquet/000000000")
    else:
        assert ok[0]["file_name"] == "00000/000000000.jpg" and ok[0]["path"] == str(root / "00000" / "000000000.jpg")
        assert ok[0]["image_id"] == stable_id("00000/000000000")
    failed = [r for r in rows if r["status"] != "ok"]
    assert [(r["status"], r["reason"]) for r in failed] == [
        ("source", "img2dataset status failed_to_download: HTTP 404")
    ] * 2
    with_ids = [r for r in read_rows(_source(root, 'source.id_column="image_id"')) if r["status"] == "ok"]
    assert [r["image_id"] for r in with_ids] == [it["image_id"] for it in items]


def test_webdataset_format_and_files_without_caption_column(coco8, tmp_path):
    items = coco8["items"][:2]
    build_webdataset(tmp_path / "wds", items)
    keys = [Path(it["file_name"]).stem for it in items]
    pq.write_table(pa.table({"key": keys, "status": ["success"] * 2}), tmp_path / "wds" / "00000.parquet")
    plan = _source(tmp_path / "wds").plan(10)
    assert plan.info["format"] == "webdataset" and plan.tasks[0].input["file"] == "00000.tar"
    assert [r["file_name"] for r in read_rows(_source(tmp_path / "wds"))] == [
        f"00000.tar/{it['file_name']}" for it in items
    ]
    root = build_img2dataset(tmp_path / "files", items, layout="files")
    table = pq.read_table(root / "00000.parquet").drop_columns(["caption"])
    pq.write_table(table, root / "00000.parquet")
    (root / "00000" / "000000001.jpg").unlink()
    rows = read_rows(_source(root))
    assert rows[0]["captions"] == [items[0]["captions"][0]]  # from 000000000.txt
    assert (rows[1]["status"], rows[1]["reason"]) == ("source", "image file missing from the shard folder")


def test_not_an_img2dataset_folder(tmp_path):
    with pytest.raises(SourceError, match="no .tar or .parquet shard found"):
        _source(tmp_path).plan(10)
    pq.write_table(pa.table({"url": ["u"]}), tmp_path / "00000.parquet")
    with pytest.raises(SourceError, match="holds no image column .* not an img2dataset output"):
        _source(tmp_path).plan(10)
    (tmp_path / "00000").mkdir()
    with pytest.raises(SourceError, match="has no 'key' column: not an img2dataset shard"):
        _source(tmp_path).plan(10)


def test_webdataset_format_lists_the_failed_downloads_of_the_metadata_beside_each_tar(coco8, tmp_path):
    """img2dataset's webdataset writer puts only downloaded samples in the tar and every URL in the .parquet beside
    it: 8 images + 2 failed URLs are 10 rows, and the stats files give the progress total before any tar is read."""
    items = coco8["items"]
    root = build_img2dataset(tmp_path, items, layout="webdataset", per_shard=5)
    source = _source(root)
    plan = source.plan(1000)
    assert plan.info["format"] == "webdataset"
    assert [(t.size, t.expected) for t in plan.tasks] == [(None, 6), (None, 4)] and plan.total == 10
    assert plan.exact_total is None
    rows = read_rows(source)
    assert len(rows) == 10
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["file_name"] for r in ok] == [f"{k // 5:05d}.tar/{k // 5:05d}{k % 5:04d}.jpg" for k in range(8)]
    assert [r["image_bytes"] for r in ok] == [Path(it["path"]).read_bytes() for it in items]
    failed = [(r["image_id"], r["file_name"], r["status"], r["reason"]) for r in rows if r["status"] != "ok"]
    assert failed == [
        (
            stable_id(f"{s:05d}.tar/{s:05d}9999"),
            f"{s:05d}.tar/{s:05d}9999",
            "source",
            "img2dataset status failed_to_download: HTTP 404",
        )
        for s in (0, 1)
    ]
    with_ids = read_rows(_source(root, 'source.id_column="image_id"'))
    assert [r["image_id"] for r in with_ids] == [it["image_id"] for it in items[:5]] + [10**9] + [
        it["image_id"] for it in items[5:]
    ] + [10**9 + 1]


def test_a_cut_tar_lists_what_its_metadata_says_it_held(coco8, tmp_path):
    """A tar cut after its second sample: the downloaded samples it no longer holds are rejects, named by the
    metadata table, and its unreadable tail is one reject of the file."""
    root = build_img2dataset(tmp_path, coco8["items"][:4], layout="webdataset")
    data = (root / "00000.tar").read_bytes()
    third = tarfile.open(fileobj=io.BytesIO(data)).getmember("000000002.jpg")
    (root / "00000.tar").write_bytes(data[: third.offset_data + 50])
    rows = read_rows(_source(root))
    assert [(r["file_name"], r["status"]) for r in rows[:3]] == [
        ("00000.tar/000000000.jpg", "ok"),
        ("00000.tar/000000001.jpg", "ok"),
        ("00000.tar/000000002.jpg", "source"),  # its .jpg is cut short
    ]
    assert [(r["file_name"], r["reason"]) for r in rows[3:5]] == [
        (
            "00000.tar/000000003",
            "img2dataset downloaded it (00000.parquet), but 00000.tar does not hold it (the tar is cut or unreadable)",
        ),
        ("00000.tar/000009999", "img2dataset status failed_to_download: HTTP 404"),
    ]
    assert [(r["image_id"], r["file_name"]) for r in rows[5:]] == [(None, "00000.tar")]


def test_a_truncated_parquet_shard_is_listed_and_the_others_are_mined(coco8, tmp_path):
    """An interrupted img2dataset run leaves a .parquet without footer: its rows (6, per its stats file) are rejects
    of that shard; without stats it is one reject of the file; the other shards are mined."""
    items = coco8["items"]
    root = build_img2dataset(tmp_path, items, layout="parquet", per_shard=5)
    data = (root / "00000.parquet").read_bytes()
    (root / "00000.parquet").write_bytes(data[: len(data) // 2])
    source = _source(root)
    plan = source.plan(1000)
    assert [(t.size, t.input["file"]) for t in plan.tasks] == [(6, "00000.parquet"), (4, "00001.parquet")]
    rows = read_rows(source)
    assert [r["status"] for r in rows[6:]] == ["ok", "ok", "ok", "source"]
    cut = rows[:6]
    assert [r["file_name"] for r in cut] == [f"00000.parquet/#{k}" for k in range(6)]
    assert {r["status"] for r in cut} == {"source"} and all(r["image_id"] is not None for r in cut)
    assert cut[0]["reason"] == (
        "00000.parquet is not a readable Parquet or Arrow file: Parquet magic bytes not found in footer. Either the "
        "file is corrupted or this is not a parquet file. (row 0 of 6)"
    )
    (root / "00000_stats.json").unlink()
    rows = read_rows(_source(root))
    assert [(r["image_id"], r["file_name"]) for r in rows[:1]] == [(None, "00000.parquet")]
    assert [r["status"] for r in rows[1:]] == ["ok", "ok", "ok", "source"]
    assert rows[0]["reason"].endswith("; the rows it held are unknown (listed as one reject of the file)")
    (root / "00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(SourceError, match="no .parquet shard can be read"):
        _source(root).plan(10)

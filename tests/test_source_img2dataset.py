"""img2dataset output folders (parquet, files and webdataset formats) read by the img2dataset source."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovseg_mine.mine.sources import SourceError
from ovseg_mine.mine.sources.records import stable_id

from helpers import build_img2dataset, build_webdataset, read_rows, source_of


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
    pq.write_table(pa.table({"key": ["x"], "status": ["success"]}), tmp_path / "wds" / "00000.parquet")
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

"""A folder of images with captions.jsonl or captions.csv, read by the folder source; bad lines are listed."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ovseg_mine.mine.sources import SourceError
from ovseg_mine.mine.sources.records import stable_id

from helpers.sources import build_folder, read_rows, source_of


def _source(location, *overrides: str):
    return source_of("folder", location, *overrides)


def test_jsonl_lines_become_records_in_shards_of_lines(coco8, tmp_path):
    items = coco8["items"]
    bad = [
        "",  # blank lines are skipped
        "{not json",
        json.dumps({"caption": "A dog."}),
        json.dumps({"file_name": "../outside.jpg", "caption": "A dog."}),
        json.dumps({"file_name": items[0]["file_name"], "caption": "A dog."}),
        json.dumps({"file_name": "nocaption.jpg"}),
        json.dumps({"file_name": "x.jpg", "caption": "A dog.", "image_id": "7b"}),
    ]
    folder = build_folder(tmp_path / "f", items, lines=bad)
    source = _source(folder)
    plan = source.plan(5)
    assert [t.size for t in plan.tasks] == [5, 5, 4] and plan.info["images_in_file"] == 14
    assert plan.info["captions_sha256"] and plan.image_root == str(folder)
    rows = read_rows(source, 5)
    assert [r["file_name"] for r in rows[:8]] == [it["file_name"] for it in items]
    assert rows[0]["path"] == str(folder / items[0]["file_name"]) and rows[0]["captions"] == items[0]["captions"]
    assert rows[0]["image_id"] == stable_id(items[0]["file_name"])
    reasons = [(r["file_name"], r["reason"]) for r in rows[8:]]
    assert reasons[0][1].startswith("line 10: not valid JSON") and reasons[0][0] == "captions.jsonl:10"
    assert reasons[1:] == [
        ("captions.jsonl:11", "line 11 has no file_name"),
        ("../outside.jpg", "file_name escapes the folder"),
        (items[0]["file_name"], ""),  # another shard: duplicates are only caught within a shard
        ("nocaption.jpg", "no caption"),
        ("x.jpg", ""),
    ]
    same_shard = read_rows(_source(folder), 1000)
    assert same_shard[11]["reason"] == "duplicate file_name (again at line 13)"
    with_ids = read_rows(_source(folder, 'source.id_column="image_id"'), 1000)
    assert [r["image_id"] for r in with_ids[:8]] == [it["image_id"] for it in items]
    assert with_ids[-1]["reason"] == "id field 'image_id' is not an integer: '7b'"


def test_csv_with_a_header_and_quoted_newlines(coco8, tmp_path):
    items = coco8["items"][:3]
    for it in items:
        shutil.copy(it["path"], tmp_path / it["file_name"])
    lines = ["file_name,captions,image_id"]
    lines += [f'{items[0]["file_name"]},"A dog, on a ""bed"".",{items[0]["image_id"]}']
    lines += [f'{items[1]["file_name"]},"A cat\nsleeping.",{items[1]["image_id"]}']
    lines += [f'{items[2]["file_name"]},"[""A kitchen."", ""A stove.""]",x']
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    source = _source(tmp_path / "captions.csv", 'source.id_column="image_id"')
    assert [t.size for t in source.plan(2).tasks] == [2, 1]
    rows = read_rows(source, 2)
    assert rows[0]["captions"] == ['A dog, on a "bed".'] and rows[0]["image_id"] == items[0]["image_id"]
    assert rows[1]["captions"] == ["A cat\nsleeping."]
    assert rows[2]["reason"] == "id field 'image_id' is not an integer: 'x'"
    assert read_rows(_source(tmp_path))[2]["captions"] == ["A kitchen.", "A stove."]


def test_unusable_folders_are_one_line_errors(tmp_path):
    with pytest.raises(SourceError, match="has no captions.jsonl or captions.csv"):
        _source(tmp_path).plan(10)
    (tmp_path / "captions.csv").write_text("name,caption\na.jpg,A dog.\n")
    with pytest.raises(SourceError, match="has no file_name column"):
        _source(tmp_path).plan(10)
    (tmp_path / "captions.jsonl").write_text("")
    with pytest.raises(SourceError, match="has both captions.jsonl and captions.csv"):
        _source(tmp_path).plan(10)
    with pytest.raises(SourceError, match="not found"):
        _source(tmp_path / "nope").plan(10)


def test_a_symlink_loop_is_a_listed_reject_and_the_other_lines_are_mined(coco8, tmp_path):
    items = coco8["items"][:2]
    lines = [json.dumps({"file_name": "loop1.jpg", "caption": "A dog."})]
    root = build_folder(tmp_path, items, lines=lines)
    os.symlink("loop2.jpg", root / "loop1.jpg")
    os.symlink("loop1.jpg", root / "loop2.jpg")
    rows = read_rows(_source(root))
    assert [r["status"] for r in rows] == ["ok", "ok", "source"]
    assert (rows[2]["file_name"], rows[2]["reason"]) == (
        "loop1.jpg",
        "symlink loop: loop1.jpg cannot be resolved",
    )

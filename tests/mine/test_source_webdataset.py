"""webdataset tars as img2dataset writes them, plus every bad sample a tar can hold, read by the webdataset source
(plan in this process, read step called directly) and, for the images, through the real stages."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from ovseg_mine.mine.sources import SourceError
from ovseg_mine.mine.sources.records import stable_id
from ovseg_mine.mine.sources.webdataset import expand_braces, split_key

from helpers.sources import build_webdataset, read_rows, source_of


def _source(location, *overrides: str):
    return source_of("webdataset", location, *overrides)


@pytest.fixture(scope="module")
def bad_tars(coco8, tmp_path_factory) -> Path:
    """3 good samples in 00000.tar; 00001.tar holds the bad ones (and one good sample, keys out of order)."""
    items = coco8["items"]
    image = Path(items[3]["path"]).read_bytes()
    extra = [
        ("notimage.exe", b"MZ\x90\x00"),  # a member that is not an image: a sample without image
        ("nocaption.jpg", image),  # an image without caption
        ("corrupt.jpg", image[: len(image) // 5]),
        ("corrupt.txt", b"A dog on a bed."),
        ("dup.jpg", image),
        ("dup.txt", b"A dog."),
        ("dup.jpg", image),  # the same key twice
        ("badid.jpg", image),
        ("badid.txt", b"A dog."),
        ("badid.json", json.dumps({"image_id": "12a"}).encode()),
        ("emoji.jpg", image),
        ("emoji.txt", "🐶🐱".encode()),
        ("listed.png", image),  # caption from the JSON's captions list, PNG extension
        ("listed.json", json.dumps({"captions": ["", "A cat on a mat.", "A dog."], "image_id": 7}).encode()),
    ]
    root = tmp_path_factory.mktemp("wds")
    return build_webdataset(root, items[:3] + items[4:5], per_tar=3, extra={1: extra})


def test_tar_samples_become_records_with_keys_inside_the_source(coco8, bad_tars):
    rows = read_rows(_source(bad_tars))
    by_name = {r["file_name"]: r for r in rows}
    good = coco8["items"][0]
    row = by_name[f"00000.tar/{good['file_name']}"]
    assert row["status"] == "ok" and row["image_id"] == stable_id(f"00000.tar/{Path(good['file_name']).stem}")
    assert row["image_bytes"] == Path(good["path"]).read_bytes() and row["path"] is None
    assert row["captions"] == [good["captions"][0]]  # the .txt member
    assert (row["width"], row["height"]) == (0, 0)
    assert [r["shard"] for r in rows] == [0, 0, 0] + [1] * 8
    assert {r["shard_size"] for r in rows if r["shard"] == 1} == {8}
    reasons = {r["file_name"].split("/")[1]: (r["status"], r["reason"]) for r in rows if r["status"] != "ok"}
    assert reasons == {
        "notimage": ("source", "no image member in the sample (members: .exe)"),
        "nocaption.jpg": ("source", "no caption"),
        "dup.jpg": ("source", "duplicate key in the tar: dup.jpg"),
        "emoji.jpg": ("captions", "no usable caption: caption 0: no letters (empty, emoji or punctuation only)"),
    }
    listed = by_name["00001.tar/listed.png"]
    assert listed["captions"] == ["A cat on a mat.", "A dog."] and listed["notes"] == ["caption 0: empty caption"]
    assert by_name["00001.tar/corrupt.jpg"]["status"] == "ok"  # found corrupt when decoded (next test)


def test_corrupt_image_in_a_tar_is_a_decode_reject(bad_tars, smoke_stages, coco8):
    source = _source(bad_tars)
    task = source.plan(1000).tasks[1]
    results = {r["file_name"]: r for table in source.read_shard(task) for r in smoke_stages(table)}
    corrupt = results["00001.tar/corrupt.jpg"]
    assert corrupt["status"] == "decode" and corrupt["reason"].startswith("corrupt image")
    good = results[f"00001.tar/{coco8['items'][4]['file_name']}"]  # the good sample of 00001.tar (bad_tars)
    assert good["status"] == "ok" and good["pairs"] and good["shard"] == 1 and good["shard_size"] == 8
    assert results["00001.tar/notimage"]["status"] == "source"  # source rejects pass through the stages as they are


def test_id_field_of_the_json_and_non_integer_ids_are_rejects(bad_tars, coco8):
    rows = read_rows(_source(bad_tars, 'source.id_column="image_id"'))
    ids = {r["file_name"].split("/")[1]: r for r in rows}
    assert ids[coco8["items"][0]["file_name"]]["image_id"] == coco8["items"][0]["image_id"]
    assert ids["listed.png"]["image_id"] == 7
    assert ids["badid.jpg"]["reason"] == "id field 'image_id' is not an integer: '12a'"
    assert ids["emoji.jpg"]["reason"] == "no .json member holding the id field 'image_id'"


def test_paths_patterns_limit_and_selection(bad_tars):
    assert expand_braces("s/{00008..00010}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert split_key("./dir/000123.seg.png") == ("dir/000123", "seg.png")
    for location in (bad_tars, f"{bad_tars}/{{00000..00001}}.tar", f"{bad_tars}/*.tar"):
        assert [t.input["file"] for t in _source(location).plan(10).tasks] == ["00000.tar", "00001.tar"]
    assert [t.input["file"] for t in _source(bad_tars / "00001.tar").plan(10).tasks] == ["00001.tar"]
    limited = _source(bad_tars, "source.limit=5").plan(10)
    assert [(t.size, t.input.get("rows")) for t in limited.tasks] == [(3, None), (2, [0, 2])]
    assert len(read_rows(_source(bad_tars, "source.limit=5"))) == 5
    wanted = stable_id("00001.tar/dup")
    selected = _source(bad_tars, f"source.image_ids=[{wanted}, 5]")
    assert selected.plan(10).total is None
    assert [r["file_name"] for r in read_rows(selected)] == ["00001.tar/dup.jpg"]


def test_unusable_locations_are_one_line_errors(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        _source(tmp_path / "missing").plan(10)
    with pytest.raises(SourceError, match="no .tar file found"):
        _source(tmp_path).plan(10)
    with pytest.raises(SourceError, match="1 tar files not found"):
        _source(f"{tmp_path}/{{0..0}}.tar").plan(10)


def test_a_truncated_tar_keeps_the_samples_before_the_cut(coco8, tmp_path):
    build_webdataset(tmp_path, coco8["items"][:2])
    data = (tmp_path / "00000.tar").read_bytes()
    tar = tarfile.open(fileobj=io.BytesIO(data))
    second = [m for m in tar.getmembers() if m.name.endswith(".jpg")][1]
    (tmp_path / "00000.tar").write_bytes(data[: second.offset_data + 100])
    source = _source(tmp_path)
    rows = read_rows(source)
    assert rows[0]["status"] == "ok" and rows[0]["file_name"] == f"00000.tar/{coco8['items'][0]['file_name']}"
    assert rows[1]["file_name"] == f"00000.tar/{coco8['items'][1]['file_name']}"
    assert rows[1]["reason"] == f"the tar is truncated: {second.name} has 100 of its {second.size} bytes"
    # The unreadable rest is one reject about the file: no image id, so the run does not count it as an image.
    assert [(r["image_id"], r["file_name"], r["status"], r["reason"]) for r in rows[2:]] == [
        (
            None,
            "00000.tar",
            "source",
            "00000.tar: the rest of the tar cannot be read after 2 samples: unexpected end of data",
        )
    ]
    assert source.count(source.plan(10).tasks[0]) == 3


def _end_blocks(data: bytes) -> int:
    """Where a tar's end marker starts: after its last member's data, rounded up to 512 bytes."""
    last = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


@pytest.mark.parametrize("cut", ["clean", "header"])
def test_a_tar_without_its_end_marker_is_flagged(coco8, tmp_path, cut):
    """A tar cut cleanly between two members (or inside a header) reads without error in ``tarfile``; the missing
    end-of-archive blocks are what shows the cut."""
    items = coco8["items"][:2]
    build_webdataset(tmp_path, items)
    data = (tmp_path / "00000.tar").read_bytes()
    end = _end_blocks(data)
    assert data[end : end + 1024] == bytes(1024)  # Python's tarfile writes the two zero blocks
    last = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[-1]
    keep = end if cut == "clean" else last.offset + 200  # 200 bytes into the last member's header
    (tmp_path / "00000.tar").write_bytes(data[:keep])
    rows = read_rows(_source(tmp_path))
    files = [r for r in rows if r["image_id"] is None]
    assert len(files) == 1 and files[0]["file_name"] == "00000.tar" and files[0]["status"] == "source"
    if cut == "clean":
        assert files[0]["reason"] == (
            f"00000.tar: no end-of-archive marker (two 512-byte zero blocks) after byte {end} of {end}: "
            "the tar was cut, members may be missing"
        )
        assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    else:
        assert files[0]["reason"].startswith("00000.tar: unreadable data instead of the end-of-archive marker")
        assert [r["status"] for r in rows[:2]] == ["ok", "ok"]  # the last member was the second sample's .json
    # An intact tar is not flagged.
    build_webdataset(tmp_path / "whole", items)
    assert all(r["image_id"] is not None for r in read_rows(_source(tmp_path / "whole")))


def test_a_file_that_is_not_a_tar_is_one_file_reject_and_the_other_tars_are_mined(coco8, tmp_path):
    build_webdataset(tmp_path, coco8["items"][:4], per_tar=2)
    (tmp_path / "00001.tar").write_bytes(b"\x00garbage" * 10)
    rows = read_rows(_source(tmp_path))
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    assert [(r["image_id"], r["file_name"]) for r in rows[2:]] == [(None, "00001.tar")]
    assert rows[2]["reason"].startswith("00001.tar: not a readable tar file: ")

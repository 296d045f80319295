"""The source registry, record rows, stable ids, and the COCO source (one record per image from a captions JSON)."""

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from ovseg_mine.config import build_config
from ovseg_mine.mine.sources import (
    MineInput,
    SourceError,
    build_source,
    list_sources,
    parse_source,
    read_coco_captions,
)
from ovseg_mine.mine.sources.captions import screen_caption
from ovseg_mine.mine.sources.records import batches, image_row, record_schema, reject_row, stable_id


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_reads_bundled_sample(sample):
    src = read_coco_captions(sample / "captions.json", sample / "images", captions_per_image=5)
    assert len(src.records) == 16
    assert [r.image_id for r in src.records] == sorted(r.image_id for r in src.records)
    assert all(len(r.captions) == 5 for r in src.records)
    assert all(Path(r.path).is_file() for r in src.records)
    assert src.rejects == []
    first = read_coco_captions(sample / "captions.json", sample / "images", captions_per_image=1)
    assert all(len(r.captions) == 1 for r in first.records)
    # the first caption by annotation id
    data = json.loads((sample / "captions.json").read_text())
    anns = sorted((a for a in data["annotations"] if a["image_id"] == first.records[0].image_id), key=lambda a: a["id"])
    assert first.records[0].captions == (anns[0]["caption"].strip(),)


def test_limit_and_ids(sample):
    src = read_coco_captions(sample / "captions.json", sample / "images", limit=3)
    assert len(src.records) == 3
    src = read_coco_captions(sample / "captions.json", sample / "images", image_ids=[377575, 22192, 999])
    assert [r.image_id for r in src.records] == [22192, 377575]
    assert [(r.image_id, r.stage) for r in src.rejects] == [(999, "source")]
    assert "not in the captions file" in src.rejects[0].reason


def test_paths_never_escape_root_and_duplicates_are_listed(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 4, "height": 4},
            {"id": 2, "file_name": "../secret.jpg", "width": 4, "height": 4},
            {"id": 3, "file_name": "/etc/passwd", "width": 4, "height": 4},
            {"id": 4, "file_name": "sub/../../x.jpg", "width": 4, "height": 4},
            {"id": 1, "file_name": "dup.jpg", "width": 4, "height": 4},
            {"id": 5, "file_name": "nocaption.jpg", "width": 4, "height": 4},
            {"id": "6", "file_name": "bad.jpg"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A dog."},
            {"id": 11, "image_id": 2, "caption": "A cat."},
            {"id": 12, "image_id": 3, "caption": "A cat."},
            {"id": 13, "image_id": 4, "caption": "A cat."},
            {"id": 14, "image_id": 5, "caption": "   "},
            {"id": 15, "image_id": 1},
        ],
    }
    src = read_coco_captions(_write(tmp_path, data), root)
    assert [r.image_id for r in src.records] == [1]
    assert src.records[0].path == str((root / "a.jpg").resolve())
    reasons = {(r.image_id, r.reason) for r in src.rejects}
    assert (2, "file_name escapes the image root") in reasons
    assert (3, "file_name escapes the image root") in reasons
    assert (4, "file_name escapes the image root") in reasons
    assert (1, "duplicate image id (first entry kept)") in reasons
    assert (5, "no usable caption: caption 0: empty caption") in reasons
    assert any(r.reason.startswith("malformed image entry") for r in src.rejects)
    assert any("lack image_id or caption" in r.reason for r in src.rejects)


def test_a_symlink_loop_and_captions_of_unlisted_ids_are_listed_rejects(sample, tmp_path):
    """A file_name that is a symlink loop (a real os.symlink loop) is a reject with the cause, not a traceback;
    captions whose image id the images list does not hold are listed, one reject per id."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(next((sample / "images").glob("*.jpg")).read_bytes())
    os.symlink("loop2.jpg", root / "loop1.jpg")
    os.symlink("loop1.jpg", root / "loop2.jpg")
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 4, "height": 4},
            {"id": 2, "file_name": "loop1.jpg", "width": 4, "height": 4},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A dog."},
            {"id": 11, "image_id": 2, "caption": "A cat."},
            {"id": 12, "image_id": 77, "caption": "A bird."},
            {"id": 13, "image_id": 77, "caption": "A bird on a branch."},
        ],
    }
    src = read_coco_captions(_write(tmp_path, data), root)
    assert [r.image_id for r in src.records] == [1]
    assert [(r.image_id, r.file_name, r.stage, r.reason) for r in src.rejects] == [
        (77, None, "source", "2 caption(s) for image id 77, which the captions file's images do not list"),
        (2, "loop1.jpg", "source", "symlink loop: loop1.jpg cannot be resolved"),
    ]
    selected = read_coco_captions(_write(tmp_path, data), root, image_ids=[1, 77])
    assert [(r.image_id, r.reason) for r in selected.rejects] == [(77, "image id not in the captions file")]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not in COCO Captions format"),
        (json.dumps({"images": []}), "not in COCO Captions format"),
    ],
)
def test_malformed_captions_file_is_a_clear_error(tmp_path, content, message):
    with pytest.raises(SourceError, match=message):
        read_coco_captions(_write(tmp_path, content), tmp_path)


def test_missing_inputs(tmp_path):
    with pytest.raises(SourceError, match="captions file not found"):
        read_coco_captions(tmp_path / "nope.json", tmp_path)
    with pytest.raises(SourceError, match="image root is not a folder"):
        read_coco_captions(tmp_path / "nope.json", tmp_path / "nope")


def test_pathological_captions_are_screened_and_listed(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    long_caption = "A dog runs along the beach with a red ball in its mouth. " * 180  # ~10,400 characters
    captions = {
        1: ["", "🐶🐱🍕", "A dog on a sofa."],
        2: ["一只猫坐在沙发上。", "Кошка сидит на диване."],
        3: ["Un chat noir dort sur le canapé près de la fenêtre."],
        4: [long_caption],
        5: ["Man riding skateboard down street"],
    }
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 4, "height": 4} for i in captions],
        "annotations": [
            {"id": 10 * i + k, "image_id": i, "caption": c} for i, caps in captions.items() for k, c in enumerate(caps)
        ],
    }
    src = read_coco_captions(_write(tmp_path, data), root, captions_per_image=5, max_caption_chars=1000)
    records = {r.image_id: r for r in src.records}
    assert records[1].captions == ("A dog on a sofa.",)
    assert records[1].notes == (
        "caption 0: empty caption",
        "caption 1: no letters (empty, emoji or punctuation only)",
    )
    cut = records[4].captions[0]
    assert 900 < len(cut) <= 1000 and long_caption.strip()[: len(cut)] == cut
    assert long_caption[len(cut)] == " "  # cut at a word boundary
    assert records[4].notes == (
        f"caption 0: {len(long_caption.strip())} characters long, cut to {len(records[4].captions[0])}",
    )
    assert records[5].notes == () and records[5].captions == ("Man riding skateboard down street",)
    rejects = {r.image_id: (r.stage, r.reason) for r in src.rejects}
    assert rejects[2] == (
        "captions",
        "no usable caption: caption 0: not English (mostly non-Latin script); "
        "caption 1: not English (mostly non-Latin script)",
    )
    assert rejects[3][0] == "captions" and "no English function word" in rejects[3][1]


def test_captions_are_kept_when_screening_is_off(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    data = {
        "images": [{"id": 1, "file_name": "1.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "Un chat noir dort sur le canapé."}],
    }
    src = read_coco_captions(_write(tmp_path, data), root, skip_non_english=False)
    assert src.records[0].captions == ("Un chat noir dort sur le canapé.",)


def test_every_coco_mini_caption_passes_screening(coco_mini):
    data = json.loads((coco_mini / "annotations" / "captions_val2017.json").read_text())
    screened = [screen_caption(a["caption"]) for a in data["annotations"]]
    assert len(screened) == 395
    assert [s for s in screened if s.text is None or s.note] == []


def test_registry_lists_the_kinds_and_refuses_others():
    assert list_sources() == ["coco", "folder", "hf", "img2dataset", "webdataset"]
    assert parse_source("webdataset:shards/{00000..00009}.tar") == ("webdataset", "shards/{00000..00009}.tar")
    assert parse_source("hf:user/name@refs/convert/parquet") == ("hf", "user/name@refs/convert/parquet")
    with pytest.raises(SourceError, match="KIND one of coco, folder, hf, img2dataset, webdataset; got 'tars:x'"):
        parse_source("tars:x")
    with pytest.raises(SourceError, match="names no location"):
        parse_source("hf:")


def test_an_input_is_checked_once_where_it_is_built():
    """MineInput refuses each bad combination with one line; the command line's options map onto it."""
    cases = [
        (dict(kind="folder", location="x", image_root="y"), "--images is for COCO sources only; a folder source"),
        (dict(kind="coco", location="c.json"), "a COCO source needs its image folder: --images DIR"),
        (dict(kind="tars", location="x"), "unknown source kind 'tars'; valid: coco, folder, hf, img2dataset"),
        (dict(kind="hf", location=""), "a hf source needs its location"),
        (dict(kind="hf", location="x", proposals_kind="masks", proposals_location="m"), "unknown proposals kind"),
        (dict(kind="hf", location="x", proposals_kind="sa1b"), "proposals.kind is 'sa1b': give their location"),
        (dict(kind="hf", location="x", proposals_location="m"), "a proposals location was given but"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SourceError, match=re.escape(message)):
            MineInput(**kwargs)
    options = [
        (dict(), "nothing to mine: give --source KIND:LOCATION, or --captions F --images DIR (COCO)"),
        (dict(source="hf:x", captions="c.json"), "give either --source KIND:LOCATION or --captions F --images DIR"),
        (dict(source="tars:x"), "--source must be KIND:LOCATION with KIND one of"),
        (dict(source="hf:x", proposals="masks:x"), "--proposals must be sam, or KIND:LOCATION"),
        (dict(source="folder:x", images="y"), "--images is for COCO sources only"),
    ]
    for kwargs, message in options:
        with pytest.raises(SourceError, match=re.escape(message)):
            MineInput.from_options(**kwargs)
    coco = MineInput.from_options(captions="c.json", images=Path("imgs"), proposals="coco:i.json")
    assert coco == MineInput("coco", "c.json", "imgs", "coco", "i.json")
    assert MineInput.from_options(source="hf:user/name", proposals="sam") == MineInput("hf", "user/name")
    with pytest.raises(dataclasses.FrozenInstanceError):
        coco.kind = "hf"  # type: ignore[misc]
    cfg = coco.configure(build_config("smoke", ['source.split="x"']))
    assert (cfg.source.kind, cfg.proposals.kind, cfg.source.split) == ("coco", "coco", "x")
    assert (
        MineInput("folder", "x").configure(cfg).model_dump()
        == cfg.model_copy(
            update={
                "source": cfg.source.model_copy(update={"kind": "folder"}),
                "proposals": cfg.proposals.model_copy(update={"kind": "sam"}),
            }
        ).model_dump()
    )


def test_stable_id_is_the_documented_63_bit_hash_of_the_key():
    key = "00000.tar/000000000790"
    expected = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & (2**63 - 1)
    assert stable_id(key) == expected == stable_id(str(key))
    assert 0 <= stable_id("") < 2**63 and stable_id("a") != stable_id("b")


def test_batches_stamp_the_shard_and_turn_a_repeated_id_into_a_reject():
    screening = {"captions_per_image": 2, "max_caption_chars": 1000, "skip_non_english": True}
    rows = [image_row(i, f"f{i}", ["A dog.", "", "A cat."], path=f"/x/{i}.jpg", **screening) for i in range(300)]
    rows.append(image_row(3, "again", ["A dog."], path="/x/3.jpg", **screening))
    rows.append(reject_row(999, "bad", "source", "no image"))
    tables = list(batches(iter(rows), shard=5, shard_size=302))
    assert [t.num_rows for t in tables] == [256, 46] and all(t.schema == record_schema() for t in tables)
    out = [r for t in tables for r in t.to_pylist()]
    assert [r["shard_row"] for r in out] == list(range(302))
    assert {(r["shard"], r["shard_size"]) for r in out} == {(5, 302)}
    assert out[0]["captions"] == ["A dog.", "A cat."] and out[0]["notes"] == ["caption 1: empty caption"]
    assert (out[300]["status"], out[300]["reason"]) == ("source", "duplicate image id (first kept)")
    assert out[301]["status"] == "source" and out[301]["proposals"] is None
    jpegs = [image_row(i, "f", ["A dog."], image_bytes=b"j" * (6 << 20), **screening) for i in range(5)]
    assert [t.num_rows for t in batches(iter(jpegs), 0, 5)] == [3, 2]  # about 16 MiB of image bytes per batch
    assert image_row(1, "f", None, **screening)["reason"] == "no caption"
    assert image_row(1, "f", ["🐶"], **screening)["status"] == "captions"
    with pytest.raises(RuntimeError, match="yielded 1 rows, 2 were announced"):
        list(batches(iter(rows[:1]), shard=0, shard_size=2))


def test_a_file_reject_is_listed_but_is_no_image_of_its_shard():
    """A reject about a file (no image id) travels as a row, so the shard completes, and comes back when a retry
    keeps only some ids; the shard's done record lists it among the rejects, not among the images."""
    from ovseg_mine.done_record import Reject
    from ovseg_mine.mine.graph.rows import ImageResult
    from ovseg_mine.mine.run.driver import _shard_outcome
    from ovseg_mine.mine.sources import ShardTask
    from ovseg_mine.mine.sources.records import file_reject_row

    screening = {"captions_per_image": 1, "max_caption_chars": 1000, "skip_non_english": True}
    rows = [image_row(i, f"x.tar/{i}.jpg", ["A dog."], path=f"/x/{i}.jpg", **screening) for i in (7, 8)]
    rows.append(file_reject_row("x.tar", "x.tar: the rest of the tar cannot be read after 2 samples"))
    kept = [r for t in batches(iter(rows), shard=0, shard_size=3, keep=frozenset({8})) for r in t.to_pylist()]
    assert [(r["image_id"], r["shard_row"], r["status"]) for r in kept] == [(8, 1, "ok"), (None, 2, "source")]
    fields = ("image_id", "file_name", "status", "reason", "width", "height", "notes")
    results = [ImageResult(**{k: r[k] for k in fields}, num_nouns=1) for r in rows]
    pairs, done = _shard_outcome(ShardTask(0, {"file": "x.tar"}), results)
    assert done.image_ids == (7, 8) and [i.image_id for i in done.images] == [7, 8]
    assert done.rejects == (
        Reject(None, "x.tar", "source", "x.tar: the rest of the tar cannot be read after 2 samples"),
    )


def test_coco_source_plans_chunks_of_the_id_sorted_records(sample):
    cfg = build_config("smoke", ["source.limit=7"])
    source = build_source(cfg, MineInput("coco", str(sample / "captions.json"), image_root=str(sample / "images")))
    plan = source.plan(3)
    assert [t.size for t in plan.tasks] == [3, 3, 1] and plan.total == 7
    rows = [r for t in plan.tasks for table in source.read_shard(t) for r in table.to_pylist()]
    ids = [r["image_id"] for r in rows]
    assert ids == sorted(ids) and len(ids) == 7 and all(r["path"] and r["status"] == "ok" for r in rows)
    assert plan.info["kind"] == "coco" and plan.info["captions_sha256"] and plan.image_root == str(sample / "images")
    again = source.plan(3)
    assert [t.input for t in again.tasks] == [t.input for t in plan.tasks]
    with pytest.raises(SourceError, match="needs its image folder"):
        MineInput("coco", str(sample / "captions.json"))

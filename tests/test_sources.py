import json
from pathlib import Path

import pytest

from ovseg_mine.mine.captions import screen_caption
from ovseg_mine.mine.sources import SourceError, read_coco_captions


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

"""Bad input through a real `ovseg-mine mine` run: every case is generated here from real COCO images (truncated,
re-encoded, rotated, resized), mined in one run with the `smoke` recipe, and must come out counted and listed
(rejects or warnings) with its reason, while the good images are mined."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_mine import rle
from ovseg_mine.shards import read_done
from ovseg_mine.verify import read_pairs

from helpers.cli import run_cli

CAPTION = "A dog sitting on a bed next to a fire hydrant."
LONG_CAPTION = "A dog sitting on a bed next to a fire hydrant and a red ball. " * 170  # ~10,500 characters


def _build(sample: Path, root: Path) -> tuple[Path, dict[int, tuple[int, int]]]:
    """Write the bad dataset; returns the captions path and the true (width, height) of decodable images."""
    images = root / "images"
    images.mkdir()
    source = sorted((sample / "images").glob("*.jpg"))
    with Image.open(source[0]) as img:
        photo = img.convert("RGB")
    w, h = photo.size
    data = source[1].read_bytes()

    def save(name: str, image: Image.Image, **kwargs) -> str:
        image.save(images / name, **kwargs)
        return name

    def write(name: str, content: bytes) -> str:
        (images / name).write_bytes(content)
        return name

    entries: list[tuple[int, str, int, int, list[str]]] = [
        (1, "missing.jpg", w, h, [CAPTION]),
        (2, write("empty.jpg", b""), w, h, [CAPTION]),
        (3, write("truncated.jpg", data[: len(data) // 3]), w, h, [CAPTION]),
        (4, write("garbled.jpg", b"\0" * 64 + data[64:]), w, h, [CAPTION]),
    ]
    rgba = np.dstack([np.asarray(photo), np.full((h, w), 255, np.uint8)])
    rgba[: h // 4, :, 3] = 0
    entries += [
        (5, save("alpha.png", Image.fromarray(rgba, "RGBA")), w, h, [CAPTION]),
        (6, save("gray.jpg", photo.convert("L"), quality=90), w, h, [CAPTION]),
        (7, save("cmyk.jpg", photo.convert("CMYK"), quality=90), w, h, [CAPTION]),
        (8, save("sixteen.png", Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257)), w, h, [CAPTION]),
    ]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    entries += [
        (9, save("rotated.jpg", photo, exif=exif.tobytes(), quality=90), w, h, [CAPTION]),
        (10, save("resized.jpg", photo.resize((w // 2, h // 2)), quality=90), w, h, [CAPTION]),
        (11, save("huge.jpg", photo.resize((12000, 9000), Image.NEAREST), quality=30), 12000, 9000, [CAPTION]),
        (12, save("tiny.png", photo.resize((1, 1))), 1, 1, [CAPTION]),
        (13, save("emoji.jpg", photo, quality=90), w, h, ["", "   ", "🐶🐱🍕 🔥"]),
        (
            14,
            save("chinese.jpg", photo, quality=90),
            w,
            h,
            ["一只狗坐在床上，旁边是消防栓。", "Un chien assis sur un lit à côté d'une bouche."],
        ),
        (15, save("long.jpg", photo, quality=90), w, h, [LONG_CAPTION]),
        (16, "../outside.jpg", w, h, [CAPTION]),
        (17, str(images / "gray.jpg"), w, h, [CAPTION]),
        (5, "gray.jpg", w, h, []),  # duplicate id (its captions would be image 5's: none added)
        (18, save("mixed.jpg", photo, quality=90), w, h, ["🐶", CAPTION]),
        (19, "loop1.jpg", w, h, [CAPTION]),  # a real symlink loop: loop1.jpg -> loop2.jpg -> loop1.jpg
    ]
    os.symlink("loop2.jpg", images / "loop1.jpg")
    os.symlink("loop1.jpg", images / "loop2.jpg")
    (root / "outside.jpg").write_bytes(source[0].read_bytes())
    captions = {
        "images": [{"id": i, "file_name": f, "width": ww, "height": hh} for i, f, ww, hh, _ in entries],
        "annotations": [
            {"id": 100 * i + k, "image_id": i, "caption": c} for i, _, _, _, caps in entries for k, c in enumerate(caps)
        ]
        + [{"id": 9999, "image_id": 20, "caption": CAPTION}],  # a caption of an image the file does not list
    }
    path = root / "captions.json"
    path.write_text(json.dumps(captions, ensure_ascii=False), encoding="utf-8")
    true_sizes = {5: (w, h), 6: (w, h), 7: (w, h), 8: (w, h), 9: (h, w), 10: (w // 2, h // 2), 15: (w, h), 18: (w, h)}
    return path, true_sizes


@pytest.fixture(scope="module")
def bad_run(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    captions, sizes = _build(sample, root)
    out = root / "run"
    result = run_cli(
        "mine", "--captions", str(captions), "--images", str(root / "images"), "--out", str(out), "--pipeline", "smoke"
    )
    return result, out, sizes


def test_the_run_goes_on_and_every_bad_image_is_listed_with_its_reason(bad_run):
    result, out, sizes = bad_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    rejects = {(r["image_id"], r["stage"], r["reason"]) for r in manifest["rejects"]}
    assert (1, "decode", "file not found") in rejects
    assert (2, "decode", "empty file (0 bytes)") in rejects
    assert any(i == 3 and s == "decode" and r.startswith("corrupt image") for i, s, r in rejects)
    assert (4, "decode", "not a readable image (unknown or corrupt format)") in rejects
    assert (11, "decode", "image too large: 12000x9000 exceeds 64000000 pixels") in rejects
    assert (12, "decode", "image too small: 1x1") in rejects
    assert (
        13,
        "captions",
        "no usable caption: caption 0: empty caption; caption 1: empty caption; "
        "caption 2: no letters (empty, emoji or punctuation only)",
    ) in rejects
    assert (
        14,
        "captions",
        "no usable caption: caption 0: not English (mostly non-Latin script); "
        "caption 1: not English (no English function word in 10 words)",
    ) in rejects
    assert (16, "source", "file_name escapes the image root") in rejects
    assert (17, "source", "file_name escapes the image root") in rejects
    assert (5, "source", "duplicate image id (first entry kept)") in rejects
    assert (19, "source", "symlink loop: loop1.jpg cannot be resolved") in rejects
    assert (20, "source", "1 caption(s) for image id 20, which the captions file's images do not list") in rejects
    assert len(manifest["rejects"]) == len(rejects) == 13
    assert manifest["counts"]["rejects_by_stage"] == {"decode": 6, "captions": 2, "source": 5}


def test_odd_but_usable_images_are_mined_at_their_decoded_size(bad_run):
    result, out, sizes = bad_run
    pairs = read_pairs(out).to_pylist()
    mined = {p["image_id"] for p in pairs}
    assert mined == set(sizes)
    for pair in pairs:
        width, height = sizes[pair["image_id"]]
        assert (pair["width"], pair["height"]) == (width, height)
        assert pair["mask"]["size"] == [height, width]
        assert rle.decode(pair["mask"]).shape == (height, width)
    images = {i.image_id: i for record in read_done(out).values() for i in record.images}
    w, h = sizes[6]
    assert images[9].notes == (
        f"size in the captions file {w}x{h} differs from the decoded image {h}x{w} (EXIF orientation applied); "
        "the decoded size is used",
    )


def test_corrected_images_are_listed_as_warnings(bad_run):
    result, out, sizes = bad_run
    manifest = json.loads((out / "manifest.json").read_text())
    warnings = {w["image_id"]: w["reason"] for w in manifest["warnings"]}
    assert sorted(warnings) == [9, 10, 15, 18]
    assert warnings[10].startswith("size in the captions file")
    assert warnings[15].startswith(f"caption 0: {len(LONG_CAPTION.strip())} characters long, cut to ")
    assert warnings[18] == "caption 0: no letters (empty, emoji or punctuation only)"
    assert manifest["counts"]["images_with_warnings"] == 4
    long_pairs = [p for p in read_pairs(out).to_pylist() if p["image_id"] == 15]
    assert long_pairs and all(len(p["caption"]) <= 1000 for p in long_pairs)

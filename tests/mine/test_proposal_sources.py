"""Where given masks come from: COCO instances and panoptic JSON (matched by image id, through an index built in a
child process) and SA-1B per-image JSON (matched by file name), attached to record batches by the read step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_mine import rle
from ovseg_mine.mine.sources import SourceError
from ovseg_mine.mine.sources.proposal_files import build_proposal_source, parse_proposals
from ovseg_mine.mine.sources.records import batches, image_row

from helpers.sources import build_sa1b, instance_masks

SCREENING = {"captions_per_image": 1, "max_caption_chars": 1000, "skip_non_english": True}


def _decoded(entries: list[dict]) -> list[list]:
    return [rle.decode(e["segmentation"]).tolist() for e in entries]


def test_coco_instances_by_image_id(coco8, tmp_path):
    source = build_proposal_source("coco", str(coco8["instances"]))
    info = source.prepare(str(tmp_path))
    assert info["kind"] == "coco" and info["format"] == "instances" and len(info["sha256"]) == 64
    assert list((tmp_path / "given_proposals").glob("coco-*.parquet"))
    ids = [it["image_id"] for it in coco8["items"]]
    found = source.lookup(ids + [123456789], [""] * (len(ids) + 1))
    for image_id, entries in zip(ids, found, strict=False):
        truth = instance_masks(coco8["instances"], image_id)
        if truth:
            assert _decoded(entries) == [t.tolist() for t in truth]
            assert all(e["predicted_iou"] is None and len(e["bbox"]) == 4 for e in entries)
        else:
            assert entries == f"no mask for this image in {coco8['instances'].name}"
    assert found[-1] == f"image id 123456789 is not in {coco8['instances'].name}"
    source.check(ids[:2], [])
    with pytest.raises(SourceError, match="names none of the source's first images .* --id-column"):
        source.check([1, 2, 3], [])
    again = build_proposal_source("coco", str(coco8["instances"]))
    assert again.prepare(str(tmp_path)) == info  # the index is reused


def test_coco_panoptic_segments_from_the_png_folder(coco8, tmp_path):
    items = [it for it in coco8["items"] if instance_masks(coco8["instances"], it["image_id"])][:2]
    (tmp_path / "panoptic_mini").mkdir()
    annotations, expected = [], {}
    for it in items:
        ids = np.zeros((it["height"], it["width"]), dtype=np.uint32)
        segments = []
        for k, mask in enumerate(instance_masks(coco8["instances"], it["image_id"]), start=1):
            ids[mask] = 300 * k  # > 255: uses the green channel too
            segments.append({"id": 300 * k, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1})
        segments.append({"id": 7, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 1, 1], "area": 0})
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        png = Path(it["file_name"]).with_suffix(".png").name
        Image.fromarray(rgb).save(tmp_path / "panoptic_mini" / png)
        annotations.append({"image_id": it["image_id"], "file_name": png, "segments_info": segments})
        expected[it["image_id"]] = [(ids == s["id"]).tolist() for s in segments[:-1] if (ids == s["id"]).any()]
    images = [
        {"id": it["image_id"], "file_name": it["file_name"], "width": it["width"], "height": it["height"]}
        for it in items
    ]
    path = tmp_path / "panoptic_mini.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    source = build_proposal_source("coco", str(path))
    assert source.prepare(str(tmp_path / "run"))["format"] == "panoptic"
    found = source.lookup(list(expected), ["", ""])
    for entries, (image_id, masks) in zip(found, expected.items(), strict=True):
        assert [m for m in _decoded(entries) if any(map(any, m))] == masks, image_id


def test_sa1b_json_by_file_name_and_attach(coco8, tmp_path):
    items = coco8["items"]
    sa1b = build_sa1b(tmp_path / "sa1b", coco8["instances"], items)
    (sa1b / "broken.json").write_text("{")
    source = build_proposal_source("sa1b", str(sa1b))
    assert source.prepare(str(tmp_path)) == {"kind": "sa1b", "location": str(sa1b)}
    with_masks = [it for it in items if (sa1b / f"{Path(it['file_name']).stem}.json").is_file()]
    without = [it for it in items if it not in with_masks]
    names = [
        f"00000.tar/{with_masks[0]['file_name']}",
        "x/broken.png",
        without[0]["file_name"] if without else "none.jpg",
    ]
    found = source.lookup([0, 0, 0], names)
    truth = instance_masks(coco8["instances"], with_masks[0]["image_id"])
    assert _decoded(found[0]) == [t.tolist() for t in truth]
    assert [e["predicted_iou"] for e in found[0]][:2] == pytest.approx([1.0, 0.99])
    assert found[1].startswith("broken.json is not SA-1B annotations")
    assert found[2] == f"no SA-1B JSON {Path(names[2]).stem}.json in {sa1b}"
    rows = [image_row(i, n, ["A dog."], path="/x.jpg", **SCREENING) for i, n in enumerate(names)]
    table = source.attach(next(batches(iter(rows), 0, 3)))
    out = table.to_pylist()
    assert out[0]["status"] == "ok" and len(out[0]["proposals"]) == len(truth)
    assert [(r["status"], r["proposals"]) for r in out[1:]] == [("proposals", None)] * 2
    with pytest.raises(SourceError, match="has no JSON for any of the source's first images"):
        source.check([1], ["a/none.jpg"])
    with pytest.raises(SourceError, match="not a folder"):
        build_proposal_source("sa1b", str(tmp_path / "missing")).prepare(str(tmp_path))


def test_proposals_option_parsing():
    assert parse_proposals("sam") == ("sam", "")
    assert parse_proposals("coco:a/instances.json") == ("coco", "a/instances.json")
    with pytest.raises(SourceError, match="KIND one of coco, sa1b; got 'masks:x'"):
        parse_proposals("masks:x")
    with pytest.raises(SourceError, match="file not found"):
        build_proposal_source("coco", "/nonexistent/instances.json").prepare("/tmp")

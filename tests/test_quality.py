"""`ovseg-mine inspect` figures on hand-made shards with known answers, the synonym table, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from ovseg_mine import rle
from ovseg_mine.quality import format_summary, inspect_run
from ovseg_mine.shards import pair_schema, write_shard
from ovseg_mine.synonyms import NounMapper, load_synonyms

H, W = 10, 20
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"},
              {"id": 24, "name": "zebra"}]


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """bool [H, W] mask, True on rows y0:y1, columns x0:x1."""
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# A polygon ground truth; the mined "puppy" mask is its exact rasterization (pycocotools), so IoU is 1.
DOG_POLYGON = [[0.0, 0.0, 10.0, 0.0, 10.0, 5.0, 0.0, 5.0]]


def polygon_mask() -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(DOG_POLYGON, H, W))).astype(bool)


def _pair(image_id: int, noun: str, mask: np.ndarray, caption: str, sim: float, **extra) -> dict:
    enc = rle.encode(mask)
    return {"pair_id": f"{image_id}:{noun}", "image_id": image_id, "file_name": f"{image_id}.png", "width": W,
            "height": H, "caption_index": 0, "caption": caption, "noun": noun, "mask": enc,
            "bbox": [int(v) for v in rle.bbox(enc)], "area": int(mask.sum()), "proposal_index": 0, "num_proposals": 4,
            "similarity": sim, "probability": sim, "margin": extra.get("margin", 0.1), "predicted_iou": 0.9,
            "stability_score": 0.95}


def handmade_pairs(caption: str = "a puppy and a man") -> list[dict]:
    """7 pairs in images 1 and 2 (image 3 has none); with :func:`write_gt`: IoUs puppy 1, man 0, dog 1, cat and
    kitten 0.5; zebra's category is not in image 1; sky maps to no category; cat and kitten share one mask."""
    return [
        _pair(1, "puppy", polygon_mask(), caption, 0.30),
        _pair(1, "man", box(5, 10, 10, 20), caption, 0.10),
        _pair(1, "zebra", box(0, 5, 10, 20), caption, 0.20),
        _pair(1, "sky", box(5, 10, 0, 10), caption, 0.05, margin=None),
        _pair(2, "dog", box(0, 10, 0, 10), "a dog, a cat", 0.40),
        _pair(2, "cat", box(0, 10, 10, 20), "a dog, a cat", 0.25),
        _pair(2, "kitten", box(0, 10, 10, 20), "a dog, a kitten", 0.15),
    ]


def make_run(root: Path, pairs: list[dict] | None = None, image_root: Path | None = None) -> Path:
    """A run folder with one shard of ``pairs`` (default :func:`handmade_pairs`) for images 1, 2, 3."""
    pairs = handmade_pairs() if pairs is None else pairs
    run = root / "run"
    images = [{"image_id": i, "status": "ok", "reason": "", "width": W, "height": H, "num_nouns": 4,
               "num_proposals": 4, "num_pairs": sum(p["image_id"] == i for p in pairs)} for i in (1, 2)]
    images.append({"image_id": 3, "status": "matching", "reason": "all 2 nouns below the matching thresholds",
                   "width": W, "height": H, "num_nouns": 2, "num_proposals": 3, "num_pairs": 0})
    table = pa.Table.from_pylist(pairs, schema=pair_schema())
    write_shard(run, 0, table, file_metadata={"config": {}}, row_group_size=100,
                done_record={"shard": 0, "image_ids": [1, 2, 3], "images": images, "rejects": []})
    manifest = {"schema_version": 1, "status": "complete", "weights": "pretrained",
                "source": {"captions": "captions.json", "image_root": str(image_root or root / "images")},
                "rejects": [{"image_id": 3, "file_name": "3.png", "stage": "matching", "reason": "below thresholds"}]}
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return run


def write_gt(path: Path, image_ids: tuple[int, ...] = (1, 2, 3)) -> Path:
    """COCO instances: image 1 dog (polygon) + person; image 2 dog as two RLE halves + cat (top half of the
    mined cat mask)."""
    def ann(aid: int, image_id: int, cat: int, seg) -> dict:
        return {"id": aid, "image_id": image_id, "category_id": cat, "segmentation": seg, "iscrowd": 0, "area": 1,
                "bbox": [0, 0, 1, 1]}

    anns = [ann(1, 1, 18, DOG_POLYGON), ann(2, 1, 1, rle.encode(box(0, 5, 10, 20))),
            ann(3, 2, 18, rle.encode(box(0, 5, 0, 10))), ann(4, 2, 18, rle.encode(box(5, 10, 0, 10))),
            ann(5, 2, 17, rle.encode(box(0, 5, 10, 20)))]
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in image_ids],
            "annotations": [a for a in anns if a["image_id"] in image_ids], "categories": CATEGORIES}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_figures_without_ground_truth(tmp_path):
    f = inspect_run(make_run(tmp_path)).figures
    c = f["counts"]
    assert (c["images"], c["images_with_pairs"], c["images_without_pairs"], c["pairs"], c["unique_nouns"]) == (3, 2, 1, 7, 7)
    assert c["images_without_pairs_by_stage"] == {"matching": 1}
    assert c["images_without_pairs_by_reason"] == {"matching: all 2 nouns below the matching thresholds": 1}
    assert c["pairs_per_image"]["max"] == 4 and c["pairs_per_image"]["min"] == 0 and c["pairs_per_image"]["n"] == 3
    assert c["masks_per_image"]["mean"] == pytest.approx(11 / 3, abs=1e-4)
    d = f["distributions"]
    assert d["margin"]["n"] == 6 and d["margin"]["nulls"] == 1
    assert d["area_fraction"]["max"] == pytest.approx(0.5) and d["area_fraction"]["min"] == pytest.approx(0.25)
    assert d["similarity"]["p50"] == pytest.approx(0.2, abs=1e-4)
    assert f["nouns"]["occurring_once"] == 7 and f["nouns"]["unique"] == 7 and len(f["nouns"]["top"]) == 7
    dup = f["duplicates"]
    assert (dup["mask_pairs"], dup["pairs_involved"], dup["images"]) == (1, 2, 1)
    assert sorted(dup["examples"][0]["nouns"]) == ["cat", "kitten"] and dup["examples"][0]["iou"] == 1.0
    assert f["gt"] is None
    text = format_summary(f)
    assert "images: 3 (2 with pairs, 1 without)" in text and "duplicate masks" in text


def test_agreement_with_ground_truth(tmp_path):
    insp = inspect_run(make_run(tmp_path), write_gt(tmp_path / "gt.json"))
    g = insp.figures["gt"]
    ious = {p["noun"]: v for p, v in zip(insp.pairs, insp.gt_iou)}
    assert ious["puppy"] == 1.0 and ious["man"] == 0.0 and ious["dog"] == 1.0
    assert ious["cat"] == pytest.approx(0.5) and ious["kitten"] == pytest.approx(0.5)
    assert np.isnan(ious["zebra"]) and np.isnan(ious["sky"])
    assert (g["evaluated"], g["unmapped"], g["category_absent"], g["image_not_in_gt"]) == (5, 1, 1, 0)
    assert g["unmapped_fraction"] == pytest.approx(1 / 7, abs=1e-4) and g["top_unmapped"] == [["sky", 1]]
    assert g["precision"] == pytest.approx(0.8) and g["mean_iou"] == pytest.approx(0.6)
    per = {r["category"]: r for r in g["per_category"]}
    assert per["dog"] == {"category": "dog", "pairs": 2, "precision": 1.0, "mean_iou": 1.0}
    assert per["person"]["precision"] == 0.0 and per["cat"]["mean_iou"] == pytest.approx(0.5)
    for score in ("similarity", "probability", "margin"):
        rows = g["by_score"][score]
        assert rows[0]["pairs_at_or_above"] == 5 and rows[0]["precision_at_or_above"] == pytest.approx(0.8)
        assert sum(r["pairs"] for r in rows) == 5
    # the most similar pair (dog, 0.4) is right: the top similarity bin has precision 1
    assert g["by_score"]["similarity"][-1]["precision"] == 1.0
    assert "precision@IoU>=0.5: 80.0%" in format_summary(insp.figures)


def test_synonym_table_maps_listed_words(sample):
    table = load_synonyms()
    for word in ("man", "woman", "boy", "girl", "child", "people", "player"):
        assert table[word] == "person"
    assert (table["puppy"], table["kitten"], table["bike"], table["motorbike"]) == ("dog", "cat", "bicycle", "motorcycle")
    categories = {c["id"]: c["name"] for c in json.loads((sample / "instances.json").read_text())["categories"]}
    assert len(set(table.values()) - set(categories.values())) == 0, "every target must be a COCO category"
    mapper = NounMapper(categories)
    names = {v: k for k, v in categories.items()}
    assert mapper.category("man") == names["person"] and mapper.category("fire hydrant") == names["fire hydrant"]
    assert mapper.category("sky") is None and mapper.category("thingamajig") is None
    assert mapper.unmapped(["dog", "sky", "puppy", "grass"]) == ["sky", "grass"]


def _cli_error(*args: str) -> str:
    result = run_cli("inspect", *args, "--no-report", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    return result.stderr


def test_cli_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "not an ovseg-mine run folder" in _cli_error(str(tmp_path / "empty"))
    run = make_run(tmp_path)
    shard = run / "shards" / "shard-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.replace_schema_metadata({b"ovseg_mine": json.dumps({"schema_version": 99}).encode()}),
                   tmp_path / "v99.parquet")
    good = shard.read_bytes()
    shard.write_bytes((tmp_path / "v99.parquet").read_bytes())
    assert "schema version 99" in _cli_error(str(run))
    shard.write_bytes(good)
    other = write_gt(tmp_path / "other.json", image_ids=())
    data = json.loads(other.read_text())
    data["images"] = [{"id": 999, "file_name": "x.png", "width": W, "height": H}]
    other.write_text(json.dumps(data))
    assert "none of the run's 3 image ids" in _cli_error(str(run), "--gt", str(other))
    (tmp_path / "bad.json").write_text("{not json")
    assert "not readable JSON" in _cli_error(str(run), "--gt", str(tmp_path / "bad.json"))


def test_cli_json(tmp_path):
    run = make_run(tmp_path)
    result = run_cli("inspect", str(run), "--gt", str(write_gt(tmp_path / "gt.json")), "--json", "--no-report", timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["counts"]["pairs"] == 7 and figures["gt"]["precision"] == pytest.approx(0.8)


def test_panoptic_ground_truth(tmp_path):
    from PIL import Image

    ids = np.zeros((H, W, 3), dtype=np.uint8)
    ids[0:10, 0:10] = (1, 0, 0)  # segment 1: dog, exactly the mined dog mask
    ids[0:5, 10:20] = (2, 1, 0)  # segment 258: cat, the top half of the mined cat mask
    (tmp_path / "panoptic" / "").mkdir()
    Image.fromarray(ids).save(tmp_path / "panoptic" / "2.png")
    data = {"images": [{"id": 2, "file_name": "2.jpg", "width": W, "height": H}], "categories": CATEGORIES,
            "annotations": [{"image_id": 2, "file_name": "2.png", "segments_info": [
                {"id": 1, "category_id": 18}, {"id": 258, "category_id": 17}]}]}
    (tmp_path / "panoptic.json").write_text(json.dumps(data))
    g = inspect_run(make_run(tmp_path), tmp_path / "panoptic.json").figures["gt"]
    assert g["kind"] == "panoptic" and g["images_with_gt"] == 1 and g["image_not_in_gt"] == 3
    assert g["evaluated"] == 3 and g["mean_iou"] == pytest.approx(2 / 3, abs=1e-4) and g["precision"] == 1.0

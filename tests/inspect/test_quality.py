"""`ovseg-mine inspect` figures on hand-made shards with known answers, the synonym table, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ovseg_mine.inspect.quality import format_summary, inspect_run
from ovseg_mine.inspect.synonyms import NounMapper, load_synonyms

from helpers.cli import run_cli
from helpers.runs import CATEGORIES, H, W, make_run, remark_shard, write_gt


def test_figures_without_ground_truth(tmp_path):
    f = inspect_run(make_run(tmp_path)).figures
    c = f["counts"]
    assert (c["images"], c["images_with_pairs"], c["images_without_pairs"], c["pairs"], c["unique_nouns"]) == (
        3,
        2,
        1,
        7,
        7,
    )
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
    ious = {p["noun"]: v for p, v in zip(insp.pairs, insp.gt_iou, strict=True)}
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
    assert (table["puppy"], table["kitten"], table["bike"], table["motorbike"]) == (
        "dog",
        "cat",
        "bicycle",
        "motorcycle",
    )
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
    pq.write_table(
        table.replace_schema_metadata({b"ovseg_mine": json.dumps({"schema_version": 99}).encode()}),
        tmp_path / "v99.parquet",
    )
    good = shard.read_bytes()
    shard.write_bytes((tmp_path / "v99.parquet").read_bytes())
    remark_shard(run, 0)  # committed as a future ovseg-mine would: its marker agrees with it
    assert "schema version 99" in _cli_error(str(run))
    shard.write_bytes(good)
    remark_shard(run, 0)
    other = write_gt(tmp_path / "other.json", image_ids=())
    data = json.loads(other.read_text())
    data["images"] = [{"id": 999, "file_name": "x.png", "width": W, "height": H}]
    other.write_text(json.dumps(data))
    assert "none of the run's 3 image ids" in _cli_error(str(run), "--gt", str(other))
    (tmp_path / "bad.json").write_text("{not json")
    assert "not readable JSON" in _cli_error(str(run), "--gt", str(tmp_path / "bad.json"))


def test_cli_json(tmp_path):
    run = make_run(tmp_path)
    result = run_cli(
        "inspect", str(run), "--gt", str(write_gt(tmp_path / "gt.json")), "--json", "--no-report", timeout=120
    )
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
    data = {
        "images": [{"id": 2, "file_name": "2.jpg", "width": W, "height": H}],
        "categories": CATEGORIES,
        "annotations": [
            {
                "image_id": 2,
                "file_name": "2.png",
                "segments_info": [{"id": 1, "category_id": 18}, {"id": 258, "category_id": 17}],
            }
        ],
    }
    (tmp_path / "panoptic.json").write_text(json.dumps(data))
    g = inspect_run(make_run(tmp_path), tmp_path / "panoptic.json").figures["gt"]
    assert g["kind"] == "panoptic" and g["images_with_gt"] == 1 and g["image_not_in_gt"] == 3
    assert g["evaluated"] == 3 and g["mean_iou"] == pytest.approx(2 / 3, abs=1e-4) and g["precision"] == 1.0

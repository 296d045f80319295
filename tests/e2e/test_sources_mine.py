"""Every kind of source, end to end: the same 8 COCO images and captions, written as a Hugging Face dataset
(``save_to_disk`` and ``to_parquet``), webdataset tars, img2dataset's parquet and files formats and a captions JSONL
folder, mined with the smoke recipe, give the same pairs as the COCO JSON; given masks (COCO instances, SA-1B JSON
made from them) replace SAM, which is never built. Runs: the session fixture ``mined_sources`` (conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from ovseg_mine import rle
from ovseg_mine.resources import schemas_dir
from ovseg_mine.shards import read_done, read_file_metadata, validate_shard
from ovseg_mine.verify import read_pairs, shard_files

from helpers.sources import instance_masks

OTHER_SOURCES = ["hf_saved", "hf_parquet", "webdataset", "img2dataset_parquet", "img2dataset_files", "folder"]
#: Runs whose ids come from an id column (COCO ids): their pairs match COCO's id for id.
WITH_COCO_IDS = {"hf_saved", "img2dataset_parquet", "img2dataset_files", "folder"}


def _canonical(pairs: list[dict], keep_ids: bool) -> list[dict]:
    drop = {"file_name"} | (set() if keep_ids else {"image_id", "pair_id"})
    rows = [{k: v for k, v in p.items() if k not in drop} for p in pairs]
    return sorted(rows, key=lambda p: (p["caption"], p["noun"]))


@pytest.mark.parametrize("name", OTHER_SOURCES)
def test_every_source_gives_the_coco_pairs(mined_sources, name):
    coco = read_pairs(mined_sources["coco"]).to_pylist()
    other = read_pairs(mined_sources[name]).to_pylist()
    assert len(coco) > 0
    assert _canonical(other, name in WITH_COCO_IDS) == _canonical(coco, name in WITH_COCO_IDS)


def test_file_names_are_keys_inside_the_source(mined_sources, coco8):
    stems = {Path(it["file_name"]).stem for it in coco8["items"]}
    names = {name: {p["file_name"] for p in read_pairs(mined_sources[name]).to_pylist()} for name in OTHER_SOURCES}
    assert {n.split("/")[0] for n in names["webdataset"]} <= {"00000.tar", "00001.tar", "00002.tar"}
    assert {Path(n).stem for n in names["webdataset"]} == stems
    assert {n.rsplit("/", 1)[0] for n in names["hf_saved"]} == {
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
    }
    assert all(n.startswith("data/train-0000") and n.rsplit("/", 1)[1].isdigit() for n in names["hf_parquet"])
    assert all(n.startswith(("00000.parquet/", "00001.parquet/")) for n in names["img2dataset_parquet"])
    assert all(n.startswith(("00000/", "00001/")) and n.endswith(".jpg") for n in names["img2dataset_files"])
    assert {Path(n).stem for n in names["folder"]} == stems


def test_one_output_shard_per_input_shard_and_the_manifest_names_the_source(mined_sources):
    schema = json.loads((schemas_dir() / "manifest-v1.schema.json").read_text())
    expected_shards = {"coco": 3, "hf_saved": 2, "hf_parquet": 3, "webdataset": 3, "img2dataset_parquet": 2}
    for name, count in expected_shards.items():
        manifest = json.loads((mined_sources[name] / "manifest.json").read_text())
        jsonschema.validate(manifest, schema)
        assert manifest["status"] == "complete"
        assert len(manifest["shards"]) == len(shard_files(mined_sources[name])) == count, name
        assert manifest["proposals"] == {"kind": "sam"}
        assert all(shard["input"] for shard in manifest["shards"])
    hf = json.loads((mined_sources["hf_saved"] / "manifest.json").read_text())["source"]
    assert (
        hf["kind"] == "hf"
        and hf["fingerprint"]
        and hf["columns"]
        == {
            "image": "image",
            "caption": "captions",
            "id": "image_id",
            "extra": [],
        }
    )
    wds = json.loads((mined_sources["webdataset"] / "manifest.json").read_text())
    assert wds["source"]["kind"] == "webdataset" and wds["source"]["files"] == 3
    assert [s["input"]["file"] for s in wds["shards"]] == ["00000.tar", "00001.tar", "00002.tar"]
    for path in shard_files(mined_sources["webdataset"]):
        assert validate_shard(path) == []
        assert read_file_metadata(path)["source"]["kind"] == "webdataset"
    # img2dataset lists the URL it failed to download: a reject with img2dataset's own error message.
    i2d = json.loads((mined_sources["img2dataset_files"] / "manifest.json").read_text())
    failed = [r for r in i2d["rejects"] if r["stage"] == "source"]
    assert [r["reason"] for r in failed] == ["img2dataset status failed_to_download: HTTP 404"] * 2
    assert i2d["source"]["format"] == "files" and i2d["source"]["image_root"]


def test_given_coco_masks_are_the_ground_truth_masks_and_sam_is_never_built(mined_sources, coco8):
    run = mined_sources["coco_given_coco"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert "sam" not in manifest["models"] and manifest["config"]["sam"]["model_type"] == "no-such-sam"
    assert manifest["proposals"]["kind"] == "coco" and manifest["proposals"]["format"] == "instances"
    assert manifest["proposals"]["sha256"] and manifest["proposals"]["location"].endswith(".json")
    for path in shard_files(run):
        assert read_file_metadata(path)["proposals"]["kind"] == "coco"
    pairs = read_pairs(run).to_pylist()
    assert pairs
    by_image: dict[int, list[np.ndarray]] = {}
    for pair in pairs:
        truth = by_image.setdefault(pair["image_id"], instance_masks(coco8["instances"], pair["image_id"]))
        mask = rle.decode(pair["mask"])
        assert any(np.array_equal(mask, t) for t in truth), pair["pair_id"]
        assert pair["num_proposals"] == min(16, sum(1 for t in truth if t.any()))  # smoke: max_masks_per_image 16
        assert pair["predicted_iou"] is None and pair["stability_score"] is None
    # images without any instance are listed, not dropped
    no_masks = [it["image_id"] for it in coco8["items"] if not instance_masks(coco8["instances"], it["image_id"])]
    rejects = {r["image_id"]: r for r in manifest["rejects"]}
    for image_id in no_masks:
        assert rejects[image_id]["stage"] == "proposals"


def test_given_sa1b_masks_keep_their_scores_and_the_cap(mined_sources, coco8):
    run = mined_sources["webdataset_given_sa1b"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "sam" not in manifest["models"]
    assert manifest["proposals"]["kind"] == "sa1b"
    pairs = read_pairs(run).to_pylist()
    assert pairs
    stems = {Path(it["file_name"]).stem: it["image_id"] for it in coco8["items"]}
    for pair in pairs:
        truth = instance_masks(coco8["instances"], stems[Path(pair["file_name"]).stem])
        mask = rle.decode(pair["mask"])
        # the JSON's scores are 1.0, 0.99, 0.98... in annotation order: the cap keeps the first three masks
        rank = next(k for k, t in enumerate(truth) if np.array_equal(mask, t))
        assert rank < 3 and pair["proposal_index"] == rank
        assert pair["predicted_iou"] == pytest.approx(1.0 - 0.01 * rank)
        assert pair["num_proposals"] == min(3, len(truth))
    done = [i for record in read_done(run).values() for i in record.images]
    missing = [i for i in done if i.status == "proposals"]
    assert all(i.reason.startswith("no SA-1B JSON") for i in missing)
    assert len(done) == 8

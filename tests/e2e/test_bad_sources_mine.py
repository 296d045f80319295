"""One bad input file never stops a real `ovseg-mine mine` run: img2dataset's webdataset output with failed
downloads and a cut tar, a Hugging Face dataset with a truncated Parquet file among good ones (each file is cut
here with real bytes); an empty ``--image-ids`` is refused before any work."""

from __future__ import annotations

import io
import json
import tarfile

import jsonschema
import pytest

from ovseg_mine.resources import schemas_dir
from ovseg_mine.shards import read_done
from ovseg_mine.verify import read_pairs

from helpers.cli import assert_only_cli_lines, run_cli
from helpers.sources import build_hf, build_img2dataset


def _mine(source: str, out, *extra: str):
    result = run_cli("mine", "--source", source, "--out", str(out), "--pipeline", "smoke", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads((schemas_dir() / "manifest-v1.schema.json").read_text()))
    return result, manifest


@pytest.mark.slow
def test_img2dataset_webdataset_failed_downloads_and_a_cut_tar_are_listed(coco8, tmp_path):
    """6 images in 2 shards of 3 URLs + 1 failed download each; the second tar is cut inside its second image.
    Listed: both failed downloads (from the .parquet beside each tar), the cut image, the image the tar lost,
    and the tar's unreadable tail as one reject of the file, which is not counted as an image."""
    root = build_img2dataset(tmp_path / "i2d", coco8["items"][:6], layout="webdataset", per_shard=3)
    data = (root / "00001.tar").read_bytes()
    second = tarfile.open(fileobj=io.BytesIO(data)).getmember("000010001.jpg")
    (root / "00001.tar").write_bytes(data[: second.offset_data + 100])
    result, manifest = _mine(f"img2dataset:{root}", tmp_path / "run")
    assert manifest["status"] == "complete"
    rejects = {(r["image_id"] is None, r["file_name"], r["reason"]) for r in manifest["rejects"]}
    assert rejects == {
        (False, "00000.tar/000009999", "img2dataset status failed_to_download: HTTP 404"),
        (False, "00001.tar/000019999", "img2dataset status failed_to_download: HTTP 404"),
        (False, "00001.tar/000010001.jpg", f"the tar is truncated: 000010001.jpg has 100 of its {second.size} bytes"),
        (
            False,
            "00001.tar/000010002",
            "img2dataset downloaded it (00001.parquet), but 00001.tar does not hold it (the tar is cut or unreadable)",
        ),
        (True, "00001.tar", "00001.tar: the rest of the tar cannot be read after 2 samples: unexpected end of data"),
    }
    counts = manifest["counts"]
    assert counts["images"] == 8 and manifest["source"]["images_selected"] == 8  # 4 rows per shard, no tail row
    assert counts["images_rejected"] == 5 and counts["rejects_by_stage"]["source"] == 5
    assert counts["images"] - counts["images_with_pairs"] >= 4
    done = read_done(tmp_path / "run")
    assert [len(done[i].image_ids) for i in (0, 1)] == [4, 4]
    assert {p["file_name"].split("/")[0] for p in read_pairs(tmp_path / "run").to_pylist()} == {
        "00000.tar",
        "00001.tar",
    }
    assert_only_cli_lines(result.stdout + result.stderr)


@pytest.mark.slow
def test_a_truncated_parquet_among_good_ones_is_listed_and_the_rest_mined(coco8, tmp_path):
    items = coco8["items"][:6]
    root = build_hf(tmp_path / "hub", items, parquet_files=3)
    cut = root / "data" / "train-00001-of-00003.parquet"
    cut.write_bytes(cut.read_bytes()[:500])
    result, manifest = _mine(f"hf:{root}", tmp_path / "run", "--id-column", "image_id")
    assert manifest["status"] == "complete" and manifest["source"]["unreadable_files"] == 1
    assert [(r["image_id"], r["file_name"], r["stage"]) for r in manifest["rejects"]] == [
        (None, "data/train-00001-of-00003.parquet", "source")
    ]
    assert manifest["rejects"][0]["reason"].endswith(
        "; the rows it held are unknown (listed as one reject of the file)"
    )
    assert manifest["counts"]["images"] == 4 and manifest["source"]["images_selected"] == 4
    mined = {p["image_id"] for p in read_pairs(tmp_path / "run").to_pylist()}
    assert mined and mined <= {it["image_id"] for it in items[:2] + items[4:]}


def test_an_empty_image_id_selection_is_refused_before_any_work(sample, tmp_path):
    args = ["--captions", str(sample / "captions.json"), "--images", str(sample / "images"), "--pipeline", "smoke"]
    empty = tmp_path / "ids.txt"
    empty.write_text("\n")
    for ids, where in ((" , ", "it"), (str(empty), f"the file {empty}")):
        result = run_cli("mine", *args, "--out", str(tmp_path / "run"), "--image-ids", ids, timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: --image-ids names no image id ({where} is empty); give ids, or leave the option out to mine all"
        ]
    assert not (tmp_path / "run").exists()

"""export --format openclip-csv / webdataset on a real smoke run: every crop gives back its pair's mask under OVSeg's
rule (not RGB (124, 116, 103)), filters, reruns, the trainer command, and bad input as one line (exit 2)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from ovseg_mine import rle
from ovseg_mine.export.crops import OVSEG_BACKGROUND, crop_mask, ovseg_crop, sample_key
from ovseg_mine.export.openclip_csv import export_csv
from ovseg_mine.export.pairs import ExportError, PairFilter
from ovseg_mine.export.wds import export_webdataset
from ovseg_mine.images import load_rgb
from ovseg_mine.verify import read_pairs

from helpers.cli import run_cli
from helpers.s3 import upload


def _pairs(run) -> dict[str, dict]:
    return {sample_key(r["image_id"], r["pair_id"]): r for r in read_pairs(run).to_pylist()}


def test_crop_keeps_mask_pixels_of_the_background_colour(sample):
    image = load_rgb(sample / "images" / "000000117645.jpg")
    mask = np.zeros(image.shape[:2], bool)
    mask[100:180, 200:260] = True
    mask[120:130, 210:220] = False  # a hole: background inside the box
    image[140:150, 230:240] = OVSEG_BACKGROUND  # mask pixels that happen to be the background colour
    ys, xs = np.nonzero(mask)
    bbox = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    crop = ovseg_crop(image, mask, bbox)
    assert crop.shape == (80, 60, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop_mask(crop), mask[100:180, 200:260])
    assert tuple(crop[45, 35]) == (125, 116, 103)  # moved by one level, still "not background"
    assert tuple(crop[25, 15]) == OVSEG_BACKGROUND
    np.testing.assert_array_equal(crop[0, 0], image[100, 200])  # the image's own pixels, own resolution
    with pytest.raises(ValueError, match="outside"):
        ovseg_crop(image, mask, [image.shape[1] - 5, 0, 10, 10])


def test_csv_export_gives_back_every_mask_and_reruns(smoke_run, tmp_path):
    out = tmp_path / "csv"
    result = export_csv(str(smoke_run), str(out))
    pairs = _pairs(smoke_run)
    assert result.pairs == len(pairs) == result.written and not result.skipped and not result.unfinished
    with open(out / "train.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == len(pairs) and set(rows[0]) == {"filepath", "title"}
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    root = manifest["source"]["image_root"]
    for row in rows:
        assert os.path.isabs(row["filepath"])
        pair = pairs[os.path.basename(row["filepath"])[: -len(".png")]]
        assert row["title"] == f"a photo of a {pair['noun']}."
        crop = np.asarray(Image.open(row["filepath"]))
        x, y, w, h = pair["bbox"]
        assert crop.shape == (h, w, 3)
        np.testing.assert_array_equal(crop_mask(crop), rle.decode(pair["mask"])[y : y + h, x : x + w])
        under = crop_mask(crop)
        original = load_rgb(os.path.join(root, pair["file_name"]))[y : y + h, x : x + w]
        clash = (original == OVSEG_BACKGROUND).all(axis=2)
        np.testing.assert_array_equal(crop[under & ~clash], original[under & ~clash])
    assert "--dataset-type csv" in result.command and f"--train-num-samples {len(pairs)}" in result.command
    assert "--model ovseg-tiny-vit" in result.command and "--pretrained" not in result.command  # random weights

    before = {p.name: p.stat().st_mtime_ns for p in (out / "crops").iterdir()}
    again = export_csv(str(smoke_run), str(out))
    assert again.pairs == len(pairs) and again.written == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "crops").iterdir()} == before
    with pytest.raises(ExportError, match="another template"):
        export_csv(str(smoke_run), str(out), template="{}")


@pytest.mark.slow  # a real CLI run
def test_filters(smoke_run, tmp_path):
    rows = read_pairs(smoke_run).to_pylist()
    cut = float(np.median([r["similarity"] for r in rows]))
    nouns_file = tmp_path / "nouns.txt"
    chosen = sorted({r["noun"] for r in rows})[:5]
    nouns_file.write_text("# wanted\n" + "\n".join(n.upper() for n in chosen) + "\n\n")
    result = run_cli(
        "export", str(smoke_run), "--format", "openclip-csv", "--out", str(tmp_path / "a"),
        "--min-similarity", str(cut), "--nouns", str(nouns_file), "--template", "{} in a photo",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    want = [r for r in rows if r["similarity"] >= cut and r["noun"] in chosen]
    lines = (tmp_path / "a" / "train.csv").read_text().splitlines()
    assert len(lines) == len(want) + 1 and f"exported {len(want)} pairs" in result.stdout
    assert all(line.split("\t")[1].endswith(" in a photo") for line in lines[1:])
    assert "python -m open_clip_train.main" in result.stdout
    margin = export_csv(str(smoke_run), str(tmp_path / "b"), filt=PairFilter(min_margin=0.01, limit=5))
    assert margin.pairs == min(5, sum(1 for r in rows if r["margin"] is not None and r["margin"] >= 0.01))


def test_webdataset_export(smoke_run, tmp_path):
    out = tmp_path / "wds"
    result = export_webdataset(str(smoke_run), str(out), per_tar=50)
    pairs = _pairs(smoke_run)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == len(pairs) == result.pairs
    assert sorted(sizes) == [f"shard-{i:05d}.tar" for i in range(len(sizes))] and max(sizes.values()) == 50
    seen = 0
    for name, count in sizes.items():
        with tarfile.open(out / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = {n.rsplit(".", 1)[0] for n in members}
        assert len(keys) == count and len(members) == 3 * count
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            pair = pairs[key]
            assert meta["pair_id"] == pair["pair_id"] and meta["bbox"] == pair["bbox"]
            assert members[f"{key}.txt"].decode() == f"a photo of a {pair['noun']}."
            import io

            crop = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
            x, y, w, h = pair["bbox"]
            np.testing.assert_array_equal(crop_mask(crop), rle.decode(pair["mask"])[y : y + h, x : x + w])
            seen += 1
    assert seen == len(pairs)
    assert "--dataset-type webdataset" in result.command and "shard-{00000..0000" in result.command
    again = export_webdataset(str(smoke_run), str(out), per_tar=50)
    assert again.written == 0 and again.pairs == len(pairs)


def test_export_from_object_storage(smoke_run, s3, tmp_path):
    uri = upload(smoke_run, f"{s3}/run")
    result = export_csv(uri, str(tmp_path / "csv"), filt=PairFilter(limit=6))
    export_csv(str(smoke_run), str(tmp_path / "local"), filt=PairFilter(limit=6))
    assert result.pairs == 6
    remote, local = (sorted((tmp_path / name / "crops").iterdir()) for name in ("csv", "local"))
    assert [p.name for p in remote] == [p.name for p in local]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(remote, local, strict=True))


def _one_line(result, needle: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow  # four real CLI runs
def test_bad_input_is_one_line(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    shard = sorted((run / "shards").glob("*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    _one_line(run_cli("export", str(run), "--format", "openclip-csv", "--out", str(out)), f"{shard.name} is damaged")
    assert not out.exists() or not any(out.rglob("*"))  # nothing written, nothing that looks done

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = run_cli("export", str(smoke_run), "--format", "webdataset", "--out", str(blocker / "x"))
    _one_line(bad, "cannot write to --out")
    _one_line(run_cli("export", str(tmp_path), "--format", "openclip-csv", "--out", str(out)), "not an ovseg-mine run")
    _one_line(run_cli("export", str(smoke_run), "--format", "tfrecord", "--out", str(out)), "--format must be")


def test_images_of_a_run_without_image_root_come_from_its_source(coco8, tmp_path):
    """A webdataset run has no image root: the export reads each shard's tar again with mining's reader."""
    from ovseg_mine.config import build_config
    from ovseg_mine.export.images import RunImages

    from helpers.sources import build_webdataset

    items = coco8["items"]
    tars = build_webdataset(tmp_path / "tars", items, per_tar=3)
    cfg = build_config("smoke", ['source.kind="webdataset"', 'source.id_column="image_id"'])
    manifest = {"config": cfg.model_dump(mode="json"), "source": {"kind": "webdataset", "location": str(tars)}}
    images = RunImages(manifest)
    wanted = [(it["image_id"], f"00001.tar/{it['file_name']}") for it in items[3:6]] + [(999, "00001.tar/x.jpg")]
    got = {image_id: (pixels, reason) for image_id, pixels, reason in images.shard_images(1, wanted)}
    for it in items[3:6]:
        np.testing.assert_array_equal(got[it["image_id"]][0], load_rgb(it["path"]))
    assert got[999][0] is None and "not found in the input of shard 1" in got[999][1]

"""End to end: the real CLI in a subprocess, a real local Ray, the smoke recipe (tiny random SAM and CLIP
built through the real loading code), real COCO images and captions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq

from ovseg_mine import rle
from ovseg_mine.resources import schemas_dir
from ovseg_mine.shards import read_done, read_file_metadata, validate_shard
from ovseg_mine.verify import read_pairs, shard_files

from helpers.cli import run_cli
from helpers.runs import assert_same_pairs


def test_manifest_follows_its_schema(smoke_run, sample):
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    schema = json.loads((schemas_dir() / "manifest-v1.schema.json").read_text())
    jsonschema.validate(manifest, schema)
    assert manifest["status"] == "complete"
    assert manifest["weights"] == "random"
    assert manifest["models"]["sam"]["name"] == "tiny" and manifest["models"]["clip"]["name"] == "ovseg-tiny-vit"
    counts = manifest["counts"]
    assert counts["images"] == 16
    assert counts["images"] == counts["images_with_pairs"] + counts["images_rejected"]
    assert counts["pairs"] == sum(s["rows"] for s in manifest["shards"]) > 0
    assert [s["images"] for s in manifest["shards"]] == [6, 6, 4]
    assert manifest["timings"]["images_per_s"] > 0


def test_shards_validate_and_rows_are_consistent(smoke_run, sample):
    files = shard_files(smoke_run)
    assert len(files) == 3
    for path in files:
        assert validate_shard(path) == []
        meta = read_file_metadata(path)
        assert meta["weights"] == "random" and meta["config"]["recipe"] == "smoke"
    pairs = read_pairs(smoke_run).to_pylist()
    captions = json.loads((sample / "captions.json").read_text())
    by_image: dict[int, list[str]] = {}
    for ann in sorted(captions["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    assert len({p["pair_id"] for p in pairs}) == len(pairs)
    from ovseg_mine.mine.algorithms.nouns import load_nlp

    nlp = load_nlp()
    for pair in pairs:
        mask = rle.decode(pair["mask"])
        assert mask.shape == (pair["height"], pair["width"])
        assert int(mask.sum()) == pair["area"] > 0
        assert [int(v) for v in rle.bbox(pair["mask"])] == pair["bbox"]
        caption = by_image[pair["image_id"]][pair["caption_index"]]
        assert pair["caption"] == caption
        words = {t.lemma_.lower() for t in nlp(caption)} | {t.text.lower() for t in nlp(caption)}
        assert all(w in words for w in pair["noun"].split()), (pair["noun"], caption)
        assert -1.0 <= pair["similarity"] <= 1.0 and 0.0 <= pair["probability"] <= 1.0
        assert 0 <= pair["proposal_index"] < pair["num_proposals"] <= 16
    keys = [(p["image_id"], p["caption_index"]) for p in pairs]
    assert keys == sorted(keys)


def test_same_input_gives_the_same_pairs_whatever_the_workers(smoke_run, tmp_path):
    # smoke_run: one mask/match actor, 4 images per batch; here two actors, one image per batch, so batches
    # finish in another order and each actor runs torch on one thread instead of two. Thread counts and batch
    # shapes change float rounding, so the contract is: the same pairs (noun, mask RLE, bbox, every other
    # column), scores within 1e-5. Byte-identical shards for the same layout: tests/e2e/test_resume.py.
    out = tmp_path / "again"
    overrides = "shards.images_per_shard=6 ray.batch_size=1 ray.actors=2 ray.noun_actors=2".split()
    result = run_cli("demo", "--pipeline", "smoke", "--out", str(out), *(a for o in overrides for a in ("--set", o)))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in shard_files(smoke_run)] == [p.name for p in shard_files(out)]
    assert_same_pairs(read_pairs(smoke_run).to_pylist(), read_pairs(out).to_pylist())


def test_rerun_resumes_and_other_config_is_refused(smoke_run, tmp_path):
    smoke_run = shutil.copytree(smoke_run, tmp_path / "run")
    before = {i: r.sha256 for i, r in read_done(smoke_run).items()}
    result = run_cli("demo", "--pipeline", "smoke", "--out", str(smoke_run), "--set", "shards.images_per_shard=6")
    assert result.returncode == 0, result.stderr
    assert {i: r.sha256 for i, r in read_done(smoke_run).items()} == before
    assert json.loads((smoke_run / "manifest.json").read_text())["timings"]["images_this_invocation"] == 0
    result = run_cli("demo", "--pipeline", "smoke", "--out", str(smoke_run), "--set", "sam.points_per_side=4")
    assert result.returncode == 2
    assert "holds a run with another config" in result.stderr and "Traceback" not in result.stderr


def test_bad_input_is_listed_and_the_run_goes_on(tmp_path, sample):
    images = tmp_path / "images"
    images.mkdir()
    good = sorted((sample / "images").glob("*.jpg"))[:2]
    for path in good:
        shutil.copy(path, images / path.name)
    data = good[0].read_bytes()
    (images / "corrupt.jpg").write_bytes(data[: len(data) // 4])
    (tmp_path / "secret.jpg").write_bytes(data)
    entries = [(int(p.stem), p.name, "A dog sitting on a bed next to a fire hydrant.") for p in good]
    entries += [
        (1, "missing.jpg", "A cat on a sofa."),
        (2, "corrupt.jpg", "A cat on a sofa."),
        (3, good[1].name, "Yes and no, very quickly."),
        (4, "../secret.jpg", "A cat on a sofa."),
    ]
    captions = {
        "images": [{"id": i, "file_name": f, "width": 640, "height": 480} for i, f, _ in entries],
        "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, _, c) in enumerate(entries)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    out = tmp_path / "run"
    result = run_cli(
        "mine",
        "--captions",
        str(tmp_path / "captions.json"),
        "--images",
        str(images),
        "--out",
        str(out),
        "--pipeline",
        "smoke",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {r["image_id"]: (r["stage"], r["reason"]) for r in manifest["rejects"]}
    assert reasons[1] == ("decode", "file not found")
    assert reasons[2][0] == "decode" and "corrupt" in reasons[2][1]
    assert reasons[3] == ("nouns", "no visual noun in the captions")
    assert reasons[4] == ("source", "file_name escapes the image root")
    mined = {p["image_id"] for p in read_pairs(out).to_pylist()}
    assert mined == {int(p.stem) for p in good}
    assert manifest["counts"]["rejects_by_stage"] == {"decode": 2, "nouns": 1, "source": 1}
    assert "Traceback" not in result.stderr


def test_user_mistakes_are_one_line_errors(tmp_path):
    result = run_cli(
        "mine", "--captions", str(tmp_path / "none.json"), "--images", str(tmp_path), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "captions file not found" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("demo", "--pipeline", "nope", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "unknown pipeline 'nope'" in result.stderr


def test_help_is_fast_and_lists_commands():
    result = run_cli("--help", timeout=60)
    assert result.returncode == 0
    for command in ("mine", "demo", "pipelines"):
        assert command in result.stdout
    code = (
        "import sys, ovseg_mine.cli; "
        "print(sorted(m for m in ('torch', 'ray', 'spacy', 'open_clip') if m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_source_mistakes_are_one_line_errors_before_any_work(tmp_path):
    out = str(tmp_path / "o")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "captions.jsonl").write_text('{"file_name": "a.jpg", "caption": "A dog."}\n')
    pq.write_table(pa.table({"image": ["a.jpg"], "caption": ["A dog."], "id": ["7b"]}), tmp_path / "t.parquet")
    cases = [
        ([], "nothing to mine: give --source KIND:LOCATION, or --captions F --images DIR"),
        (["--source", "tars:x"], "--source must be KIND:LOCATION with KIND one of coco, folder, hf, img2dataset"),
        (["--source", f"hf:{tmp_path / 'missing'}"], "not found"),
        (["--source", "folder:x", "--images", str(tmp_path)], "--images is for COCO sources"),
        (["--source", "hf:x", "--captions", "c.json"], "not both"),
        (["--source", f"folder:{tmp_path / 'photos'}", "--proposals", "masks:x"], "--proposals must be sam, or"),
        (["--source", f"folder:{tmp_path / 'photos'}", "--set", 'source.kind="hf"'], "--set source.kind: the source"),
        (["--captions", "c.json", "--images", "i", "--set", "proposals.kind=coco"], "--set proposals.kind: the masks"),
        (["--source", f"hf:{tmp_path / 't.parquet'}", "--id-column", "id"], "holds string values, not integers"),
        (["--source", f"hf:{tmp_path / 't.parquet'}", "--caption-column", "text"], "has no column 'text'"),
    ]
    for args, message in cases:
        result = run_cli("mine", "--out", out, "--pipeline", "smoke", *args, timeout=300)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-500:])
        assert "Traceback" not in result.stderr

"""``mine --retry-failed``: the real CLI on a real local Ray. A failpoint fails one image once (the first run
raises on it); the retry mines that image alone, rewrites only its shard, and leaves the other shards and the
permanent rejects as they are. Data: the 16 bundled images plus one entry whose file is missing."""

from __future__ import annotations

import json
import os
import shutil

from ovseg_mine.mine.run.retry import failed_images, kept_results
from ovseg_mine.shards import read_done
from ovseg_mine.storage import resolve
from ovseg_mine.verify import read_pairs, shard_files

from helpers.cli import run_cli
from helpers.runs import assert_same_pairs


def _captions(sample, path):
    data = json.loads((sample / "captions.json").read_text())
    data["images"].append({"id": 1, "file_name": "missing.jpg", "width": 640, "height": 480})
    data["annotations"].append({"id": 10**9, "image_id": 1, "caption": "A dog on a bed."})
    path.write_text(json.dumps(data))
    return path


def _files(run) -> dict[str, tuple[int, int]]:
    """Shard and marker files (``shards/NAME``, ``done/NAME``) -> (inode, mtime in ns): a rewritten file gets a
    new inode (rename)."""
    files = sorted([*(run / "shards").iterdir(), *(run / "done").iterdir()])
    return {f"{p.parent.name}/{p.name}": (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in files}


def test_retry_failed_mines_only_the_failed_image_and_rewrites_only_its_shard(sample, smoke_run, tmp_path):
    captions = _captions(sample, tmp_path / "captions.json")
    out = tmp_path / "run"
    args = ["mine", "--captions", str(captions), "--images", str(sample / "images"), "--out", str(out)]
    args += ["--pipeline", "smoke", "--set", "shards.images_per_shard=6"]
    ids = sorted(image["id"] for image in json.loads(captions.read_text())["images"])  # shards: ids[0:6], ...
    victim = ids[8]  # in shard 1
    first = run_cli(*args, failpoints=f"image:{victim}=raise")
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {r["image_id"]: r["stage"] for r in manifest["rejects"]}
    assert stages == {1: "decode", victim: "error"} and manifest["counts"]["errors_by_type"] == {"FailpointError": 1}
    assert {i for i, r in read_done(out).items() if failed_images(r)} == {1}
    before = _files(out)

    again = run_cli(*args, "--retry-failed")  # the failpoint is gone: the cause was fixed
    assert again.returncode == 0, again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["timings"]["images_this_invocation"] == 1
    assert {r["image_id"]: r["stage"] for r in manifest["rejects"]} == {1: "decode"}  # the permanent reject stays
    assert manifest["counts"]["errors_by_type"] == {} and manifest["counts"]["images"] == 17
    after = _files(out)
    rewritten = {name for name in after if after[name] != before[name]}
    assert rewritten == {"shards/shard-00001.parquet", "done/shard-00001.json"}
    assert_same_pairs(read_pairs(smoke_run).to_pylist(), read_pairs(out).to_pylist())  # as if it had never failed
    record = read_done(out)[1]
    assert [image.status for image in record.images] == ["ok"] * 6 and record.rejects == ()

    nothing = run_cli(*args, "--retry-failed")  # nothing failed any more: nothing to mine
    assert nothing.returncode == 0, nothing.stderr
    assert json.loads((out / "manifest.json").read_text())["timings"]["images_this_invocation"] == 0
    assert _files(out) == after


def test_kept_results_rebuild_a_shards_other_images(smoke_run, tmp_path):
    run = shutil.copytree(smoke_run, tmp_path / "run")
    record = read_done(run)[0]
    victim = record.image_ids[2]
    kept = kept_results(resolve(run), record, {victim})
    assert [r.image_id for r in kept] == [i for i in record.image_ids if i != victim]
    pairs = {p["pair_id"]: p for p in read_pairs(run).to_pylist()}
    for result, image in zip(kept, [i for i in record.images if i.image_id != victim], strict=True):
        assert result.image_status() == image  # the done record's entry, as it was
        assert all(pairs[p["pair_id"]] == p for p in result.pairs)
    assert len(shard_files(run)) == 3

"""Runs on object storage, for real: a local S3-compatible server (moto, its own process on 127.0.0.1) holds the
run; the real CLI mines into it, is SIGKILLed between two shard commits and resumes, and `inspect` and `publish
--dry-run` read the run from it. The shards must be byte-identical to those of the same run on a local disk
(`smoke_run`: the 16 bundled images, smoke recipe, 6 images per shard)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ovseg_mine.shards import read_done
from ovseg_mine.storage import resolve
from ovseg_mine.verify import read_pairs, shard_files

from helpers.cli import assert_only_cli_lines, kill_processes, run_cli

SMOKE = ("--pipeline", "smoke", "--set", "shards.images_per_shard=6")


def _digests(run) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in shard_files(run)}


def _start_demo(out: str, failpoints: str) -> subprocess.Popen:
    env = {**os.environ, "OVSEG_MINE_FAILPOINTS": failpoints}
    command = [sys.executable, "-m", "ovseg_mine.cli", "demo", *SMOKE, "--out", out]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _kill_with_its_ray(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then what it left running (its local Ray), as a machine restart would."""
    leftovers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    kill_processes(leftovers)


@pytest.fixture(scope="module")
def s3_module(moto_server):
    """A bucket for this module's tests, with the standard AWS variables set while they run."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in moto_server.env.items():
            patch.setenv(key, value)
        yield moto_server.bucket("object-storage")


@pytest.fixture(scope="module")
def s3_run(s3_module, smoke_run):
    """A run mined into a bucket through a SIGKILL and a resume; returns its URI, the CLI's last output and the
    number of images in the shards committed before the kill."""
    out = f"{s3_module}/runs/smoke"
    # The driver pauses after its first commit, whichever shard completes first (they finish in any order).
    proc = _start_demo(out, "run.after_commit:*=sleep(120)")
    deadline = time.monotonic() + 600
    while not (resolve(out).join("config.json").exists() and read_done(out)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no shard was ever committed"
        time.sleep(0.2)
    # The folder is held (a lease object): a second run stops at once, naming the holder.
    second = run_cli("demo", *SMOKE, "--out", out)
    assert second.returncode == 2 and "is in use by another ovseg-mine run (host " in second.stderr
    assert f"pid {proc.pid}," in second.stderr and second.stderr.count("\n") == 1
    _kill_with_its_ray(proc)
    kept = read_done(out)
    assert len(kept) == 1, sorted(kept)  # the first shard to complete, and no other
    # Killed on this host: its lease is stale at once, and the rerun resumes.
    result = run_cli("demo", *SMOKE, "--out", out)
    assert result.returncode == 0, result.stderr
    return out, result, sum(len(record.image_ids) for record in kept.values())


def test_a_run_on_s3_survives_a_kill_and_equals_the_local_run(s3_run, smoke_run):
    out, result, kept_images = s3_run
    assert "complete:" in result.stdout and f"shards and manifest: {out}" in result.stdout
    assert_only_cli_lines(result.stdout + result.stderr)
    assert _digests(out) == _digests(smoke_run)  # byte-identical shards
    local, remote = read_done(smoke_run), read_done(out)
    assert sorted(remote) == sorted(local) == [0, 1, 2]
    for index, record in remote.items():
        for key in ("image_ids", "images", "rejects", "warnings", "rows", "sha256", "file"):
            assert getattr(record, key) == getattr(local[index], key), (index, key)
    manifest = json.loads(resolve(out).join("manifest.json").read_bytes())
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == 16
    assert manifest["timings"]["images_this_invocation"] == 16 - kept_images  # the committed shards were kept
    run = resolve(out)
    assert not run.join(".lease.json").exists()  # released by the run that finished
    assert "Ray started at 127.0.0.1:" in run.join("mine.log").read_text()  # the log is uploaded with the run


def test_inspect_and_publish_read_the_run_from_s3(s3_run, smoke_run, tmp_path):
    out = s3_run[0]
    remote = run_cli("inspect", out, "--json", "--gallery", "4")
    assert remote.returncode == 0, remote.stderr
    local = run_cli("inspect", str(smoke_run), "--json", "--no-report")
    figures, expected = json.loads(remote.stdout), json.loads(local.stdout)
    assert figures["run"] == out
    for key in ("counts", "distributions", "nouns", "duplicates", "status", "weights"):
        assert figures[key] == expected[key], key
    report = resolve(out).join("report", "index.html")
    assert f"report: {report.uri}" in remote.stderr
    assert report.read_text().startswith("<!DOCTYPE html>")
    built = run_cli("publish", out, "--dry-run", str(tmp_path / "hub"))
    assert built.returncode == 0, built.stderr
    assert f"dry run: {read_pairs(smoke_run).num_rows} pairs" in built.stdout
    assert (tmp_path / "hub" / "README.md").is_file() and list((tmp_path / "hub" / "data").glob("*.parquet"))


def test_a_webdataset_source_on_s3_gives_the_pairs_of_the_local_tars(s3_module, source_dirs, mined_sources, tmp_path):
    """Sources read through the same storage layer: the tars of ``source_dirs["webdataset"]`` uploaded to the
    bucket and mined from there (``--source webdataset:s3://...``) give the local run's pairs, keys and all."""
    from helpers.runs import assert_same_pairs
    from helpers.s3 import upload

    tars = upload(source_dirs["webdataset"], f"{s3_module}/sources/webdataset")
    out = tmp_path / "run"
    settings = ["--set", "source.captions_per_image=1", "--set", "shards.images_per_shard=3"]
    result = run_cli("mine", "--source", f"webdataset:{tars}", "--out", str(out), "--pipeline", "smoke", *settings)
    assert result.returncode == 0, result.stderr
    local = read_pairs(mined_sources["webdataset"]).to_pylist()
    assert len(local) > 0
    assert_same_pairs(local, read_pairs(out).to_pylist())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "webdataset" and manifest["source"]["location"].startswith("s3://")

"""Runs that survive: real `ovseg-mine mine` subprocesses on a real local Ray, killed at chosen points and
resumed; the resumed run's shards must be byte-identical to those of an uninterrupted run.

Data: the first 12 images of ../shared/data/coco-mini, `smoke` recipe, 3 images per shard (4 shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ovseg_mine.shards import read_done
from ovseg_mine.verify import read_pairs

from helpers.cli import kill_processes

IMAGES = 12
PER_SHARD = 3


def _command(coco_mini: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ovseg_mine.cli",
        "mine",
        "--pipeline",
        "smoke",
        "--captions",
        str(coco_mini / "annotations" / "captions_val2017.json"),
        "--images",
        str(coco_mini / "val2017"),
        "--out",
        str(out),
        "--limit",
        str(IMAGES),
        "--set",
        f"shards.images_per_shard={PER_SHARD}",
        *extra,
    ]


def _env(failpoints: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OVSEG_MINE_FAILPOINTS"}
    if failpoints:
        env["OVSEG_MINE_FAILPOINTS"] = failpoints
    return env


def _run(coco_mini: Path, out: Path, *extra: str, failpoints: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(coco_mini, out, *extra), capture_output=True, text=True, timeout=600, env=_env(failpoints)
    )


def _as_from_a_terminal() -> None:
    """In the child, before exec: SIGINT unblocked and at its default, as a shell gives a foreground command.
    (Earlier tests in the same pytest process can leave SIGINT blocked or ignored, and children inherit both;
    Python then installs no KeyboardInterrupt handler and a Ctrl-C never arrives.)"""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(coco_mini: Path, out: Path, *extra: str, failpoints: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        _command(coco_mini, out, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(failpoints),
        start_new_session=True,
        preexec_fn=_as_from_a_terminal,
    )


#: The driver pauses right after its first commit, whichever shard completes first (outside the commit, where a stop
#: signal is held): a window, on a fast machine as on a slow one, in which the test kills or interrupts it between
#: two shard commits, with exactly one shard committed.
PAUSE_AFTER_FIRST_COMMIT = "run.after_commit:*=sleep(120)"


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before the kill point:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("kill point not reached in time")
        time.sleep(0.05)


def _digests(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "shards").glob("*.parquet"))}


def _assert_same_as(reference: Path, run: Path) -> None:
    assert _digests(run) == _digests(reference)
    assert not list(run.rglob("*.tmp"))
    ref_done, done = read_done(reference), read_done(run)
    assert sorted(done) == sorted(ref_done) == list(range(IMAGES // PER_SHARD))
    for index, record in done.items():
        for key in ("image_ids", "images", "rejects", "warnings", "rows", "sha256"):
            assert getattr(record, key) == getattr(ref_done[index], key), (index, key)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == IMAGES


@pytest.fixture(scope="module")
def reference(coco_mini, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _run(coco_mini, out)
    assert result.returncode == 0, result.stderr
    assert read_pairs(out).num_rows > 0
    return out


def test_sigkill_between_commits_and_inside_shard_writes_then_resume(coco_mini, reference, tmp_path):
    """One run folder through every crash point of a shard commit, then a corrupted shard, then the resume; the
    lock of a killed run never blocks its resume."""
    out = tmp_path / "run"
    # 1. SIGKILL of the driver (only the driver) between shard commits.
    proc = _start(coco_mini, out, failpoints=PAUSE_AFTER_FIRST_COMMIT)
    _wait_for(lambda: (out / "config.json").is_file() and read_done(out), proc)
    # 0. A second run into the folder in use is refused at once, naming the run that holds it.
    second = _run(coco_mini, out)
    assert second.returncode == 2 and second.stdout == ""
    assert second.stderr.count("\n") == 1 and "is in use by another ovseg-mine run" in second.stderr
    assert f"pid {proc.pid}," in second.stderr
    leftovers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    kill_processes(leftovers)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(read_done(out))
    assert len(done) == 1  # the first shard to complete (shards are read concurrently: not always shard 0)
    # 2. Killed inside the next shard write, after its .tmp is written and before the rename.
    result = _run(coco_mini, out, failpoints="shard.before_rename:*=kill")
    assert result.returncode == -signal.SIGKILL
    tmps = sorted((out / ".partial").glob("shard-*.parquet.tmp"))
    assert not list((out / "shards").glob("*.tmp"))  # shards/ holds only committed Parquet files
    assert len(tmps) == 1 and int(tmps[0].name[len("shard-") :][:5]) not in done
    assert sorted(read_done(out)) == done
    # 3. Killed after a shard's rename, before its done marker: the unmarked file must not count.
    result = _run(coco_mini, out, failpoints="shard.after_rename:*=kill")
    assert result.returncode == -signal.SIGKILL
    written = {int(p.name[len("shard-") :][:5]) for p in (out / "shards").glob("shard-*.parquet")}
    unmarked = written - set(done)
    assert len(unmarked) == 1 and not (out / "done" / f"shard-{min(unmarked):05d}.json").exists()
    assert sorted(read_done(out)) == done
    # 4. A done shard whose bytes no longer match its record is redone too.
    victim = out / "shards" / f"shard-{done[0]:05d}.parquet"
    victim.write_bytes(victim.read_bytes()[:-100] + b"\0" * 100)
    result = _run(coco_mini, out)
    assert result.returncode == 0, result.stderr
    _assert_same_as(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    # the first shard redone (corrupted), the renamed but unmarked shard and those never written mined
    assert manifest["timings"]["images_this_invocation"] == IMAGES - PER_SHARD * (len(done) - 1)


def test_ctrl_c_stops_cleanly_and_leaves_the_run_resumable(coco_mini, reference, tmp_path):
    out = tmp_path / "run"
    proc = _start(coco_mini, out, failpoints=PAUSE_AFTER_FIRST_COMMIT)
    _wait_for(lambda: (out / "config.json").is_file() and read_done(out), proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the whole foreground group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT:" in stderr and "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "partial" and len(manifest["shards"]) == len(read_done(out)) >= 1
    assert len(read_done(out)) == 1  # the driver was paused after its first commit
    result = _run(coco_mini, out)
    assert result.returncode == 0, result.stderr
    _assert_same_as(reference, out)


def test_a_killed_ray_worker_is_restarted_and_its_batch_retried(coco_mini, reference, tmp_path):
    # The worker pauses on the last image, so the run cannot end before the kill lands.
    last = max(read_done(reference)[IMAGES // PER_SHARD - 1].image_ids)
    out = tmp_path / "run"
    proc = _start(coco_mini, out, failpoints=f"image:{last}=sleep(10)")

    def mask_workers() -> list[psutil.Process]:
        found = []
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "MaskMatchStage" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                pass
        return found

    _wait_for(lambda: (out / "config.json").is_file() and read_done(out) and mask_workers(), proc)
    victims = mask_workers()
    for victim in victims:
        victim.kill()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "complete:" in stdout
    _assert_same_as(reference, out)


def test_an_image_that_keeps_killing_its_worker_is_listed_and_the_run_goes_on(coco_mini, reference, tmp_path):
    pairs = read_pairs(reference).to_pylist()
    poison = pairs[len(pairs) // 2]["image_id"]
    out = tmp_path / "run"
    result = _run(coco_mini, out, "--set", "ray.max_image_attempts=2", failpoints=f"image:{poison}=kill")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    failed = [r for r in manifest["rejects"] if r["image_id"] == poison]
    assert len(failed) == 1 and failed[0]["stage"] == "error"
    assert failed[0]["reason"].startswith("the worker process died 2 times while mining this image")
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == IMAGES
    expected = [p for p in pairs if p["image_id"] != poison]
    assert read_pairs(out).to_pylist() == expected


# --- sharded sources: a webdataset and a Hugging Face dataset (conftest's mined_sources are the references) -----


@pytest.mark.parametrize("name, kind", [("webdataset", "webdataset"), ("hf_parquet", "hf")])
def test_sharded_source_killed_mid_write_resumes_byte_identical(name, kind, mined_sources, source_dirs, tmp_path):
    from conftest import SOURCE_RUN_SETTINGS

    reference = mined_sources[name]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "ovseg_mine.cli", "mine", "--source", f"{kind}:{source_dirs[name]}"]
    command += ["--out", str(out), "--pipeline", "smoke", *(a for s in SOURCE_RUN_SETTINGS for a in ("--set", s))]

    def run(failpoints: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env(failpoints))

    # Killed inside the write of shard 1 (one output shard per input file), after its .tmp is written.
    result = run("shard.before_rename:1=kill")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert (out / ".partial" / "shard-00001.parquet.tmp").is_file()
    kept = read_done(out)
    assert 1 not in kept
    result = run()
    assert result.returncode == 0, result.stderr
    assert _digests(out) == _digests(reference) and len(_digests(out)) == 3
    assert not list(out.rglob("*.tmp"))
    done, ref_done = read_done(out), read_done(reference)
    for index, record in done.items():
        for key in ("input", "image_ids", "images", "rejects", "warnings", "rows", "sha256"):
            assert getattr(record, key) == getattr(ref_done[index], key), (index, key)
        if index in kept:
            assert record.sha256 == kept[index].sha256  # kept, not redone
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    redone = sum(len(r.image_ids) for i, r in done.items() if i not in kept)
    assert manifest["timings"]["images_this_invocation"] == redone

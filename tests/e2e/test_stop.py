"""SIGTERM, as Slurm, Kubernetes and spot preemption send it, on real `ovseg-mine mine` runs with a real local Ray:
at 20 random moments (start-up, Ray's start, mining, commits, the end), during a shard's commit and during the
manifest write. Every stop exits 143 within seconds with one line, leaves a folder whose manifest reads and agrees
with its committed shards, and leaves no process of its Ray behind; resumed, the run gives the uninterrupted run's
bytes.

Data: the 16 bundled sample images listed 3 times under new ids (48 images), `smoke` recipe, 3 images per shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ovseg_mine.shards import PARTIAL_DIR, read_done, read_manifest

from helpers.cli import assert_only_cli_lines, kill_processes
from helpers.sources import write_repeated_captions

pytestmark = pytest.mark.slow

COPIES = 3
PER_SHARD = 3
SHARDS = 16 * COPIES // PER_SHARD
#: Seconds a stopped run may take from the signal to its exit (Ray's shutdown is most of it).
STOP_S = 30


def _command(sample: Path, captions: Path, out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "ovseg_mine.cli", "mine", "--pipeline", "smoke", "--captions", str(captions)),
        *("--images", str(sample / "images"), "--out", str(out), "--set", f"shards.images_per_shard={PER_SHARD}"),
    ]


def _env(failpoints: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OVSEG_MINE_FAILPOINTS"}
    if failpoints:
        env["OVSEG_MINE_FAILPOINTS"] = failpoints
    return env


def _start(sample: Path, captions: Path, out: Path, failpoints: str | None = None, **popen) -> subprocess.Popen:
    """A real `ovseg-mine mine` run in the background, its output piped."""
    return subprocess.Popen(
        _command(sample, captions, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(failpoints),
        **popen,
    )


def _digests(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "shards").glob("*.parquet"))}


def _ray_session(out: Path) -> str | None:
    """The name of the Ray session a run started (from RUN/mine.log), None before Ray started."""
    log = out / "mine.log"
    found = (
        re.findall(r"session folder \(every Ray process's log\): \S*?(session_[\w-]+)", log.read_text())
        if (log.is_file())
        else []
    )
    return found[-1] if found else None


def _processes_of(session: str) -> list[str]:
    left = []
    for process in psutil.process_iter():
        try:
            if any(session in arg for arg in process.cmdline()):
                left.append(f"{process.pid} {process.name()}")
        except psutil.Error:
            pass
    return left


def _stop(proc: subprocess.Popen, out: Path) -> tuple[str, str, float]:
    """SIGTERM ``proc``; returns its stdout, stderr and the seconds it took to exit, having checked the stop."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)  # Ray's processes, when it has started
    except psutil.NoSuchProcess:
        descendants = []
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    if proc.returncode == -signal.SIGTERM:
        # The default action ended the process, as it does any program: either Python was still starting (no
        # handler yet) and the run had not touched its folder, or the run had ended and printed its summary.
        if out.exists():
            assert "complete:" in stdout and read_manifest(out)["status"] == "complete", stdout + stderr[-3000:]
        else:
            assert stderr == "", stderr[-3000:]
        return stdout, stderr, took
    assert proc.returncode == 143, stderr[-3000:]
    assert took < STOP_S, took
    assert "stopped by SIGTERM:" in stderr and "rerun the same command to resume" in stderr, stderr
    assert "Traceback" not in stderr
    assert_only_cli_lines(stdout + stderr)
    _assert_readable(out)
    session = _ray_session(out)

    def left() -> list[str]:
        alive = [f"{p.pid} {p.name()}" for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        return alive + (_processes_of(session) if session else [])

    deadline = time.monotonic() + 10  # processes that Ray's shutdown killed may take a moment to be reaped
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left()
    return stdout, stderr, took


def _assert_readable(out: Path) -> None:
    """The manifest reads and lists exactly the committed shards; no half-written file is left as done."""
    if not (out / "config.json").is_file():  # stopped before the run folder was made: nothing to read yet
        return
    manifest = read_manifest(out)
    done = read_done(out)
    assert sorted(s["file"] for s in manifest["shards"]) == sorted(r.file for r in done.values())
    assert manifest["status"] == ("complete" if len(done) == SHARDS else "partial")
    assert not (out / "manifest.json.tmp").exists()


@pytest.fixture(scope="module")
def captions(sample, tmp_path_factory) -> Path:
    return write_repeated_captions(sample, tmp_path_factory.mktemp("stop") / "captions.json", COPIES)[0]


@pytest.fixture(scope="module")
def reference(sample, captions, tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted run and its wall time in seconds."""
    out = tmp_path_factory.mktemp("reference") / "run"
    started = time.monotonic()
    result = subprocess.run(_command(sample, captions, out), capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr
    assert len(read_done(out)) == SHARDS
    return out, time.monotonic() - started


def test_sigterm_at_20_random_moments_then_resume_gives_the_uninterrupted_bytes(sample, captions, reference, tmp_path):
    ref, ref_s = reference
    out = tmp_path / "run"
    moments = random.Random(19).sample(range(1, 1000), 20)  # per mille of the uninterrupted run's wall time
    stopped = finished_first = 0
    for moment in sorted(moments):  # early moments first: the folder fills up as the moments grow
        proc = _start(sample, captions, out)
        deadline = time.monotonic() + ref_s * moment / 1000
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:  # this resumed run had less left to do than the moment: it ended first
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            finished_first += 1
            break
        _stop(proc, out)
        stopped += 1
    assert stopped >= 10, (stopped, finished_first)
    result = subprocess.run(_command(sample, captions, out), capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr
    assert _digests(out) == _digests(ref) and len(_digests(out)) == SHARDS
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_sigterm_during_a_commit_waits_for_the_commit(sample, captions, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    # Every commit pauses with its .tmp written, not yet renamed.
    proc = _start(sample, captions, out, "shard.before_rename:*=sleep(3)")
    deadline = time.monotonic() + 300
    while not list((out / PARTIAL_DIR).glob("*.parquet.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    pending = {p.name[: -len(".parquet.tmp")] for p in (out / PARTIAL_DIR).glob("*.parquet.tmp")}
    _stop(proc, out)
    committed = {Path(r.file).name[: -len(".parquet")] for r in read_done(out).values()}
    assert pending <= committed  # the commit under way when the signal came was finished, not torn
    for name in committed:
        assert _digests(out)[f"{name}.parquet"] == _digests(ref)[f"{name}.parquet"]


def test_sigterm_during_the_manifest_write_leaves_a_readable_manifest(sample, captions, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    proc = _start(sample, captions, out, "manifest.before_write:run=sleep(4)")
    deadline = time.monotonic() + 300
    while len(read_done(out)) < SHARDS if (out / "config.json").is_file() else True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    _stop(proc, out)  # the run is in its manifest write's pause, or just before it
    assert read_manifest(out)["status"] == "complete"
    assert _digests(out) == _digests(ref)


def test_shards_are_committed_as_they_finish_and_a_sigkill_keeps_them(sample, captions, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "run"
    last = max(max(r.image_ids) for r in read_done(ref).values())
    # The mask/match actor pauses on the last image (in the last shard read): the run cannot end for 10 minutes,
    # so a commit seen meanwhile was made while mining went on, not at the end of the run.
    proc = _start(sample, captions, out, f"image:{last}=sleep(600)", start_new_session=True)
    deadline = time.monotonic() + 400
    while not ((out / "config.json").is_file() and read_done(out)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    committed = read_done(out)
    assert proc.poll() is None and len(committed) < SHARDS
    leftovers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)  # a power cut: no handler, no finally
    proc.wait(timeout=60)
    kill_processes(leftovers)
    kept = read_done(out)
    assert set(committed) <= set(kept)
    digests, ref_digests = _digests(out), _digests(ref)
    for record in kept.values():
        name = Path(record.file).name
        assert digests[name] == ref_digests[name]
    result = subprocess.run(_command(sample, captions, out), capture_output=True, text=True, timeout=600, env=_env())
    assert result.returncode == 0, result.stderr
    assert _digests(out) == ref_digests
    manifest = json.loads((out / "manifest.json").read_text())
    kept_images = sum(len(r.image_ids) for r in kept.values())
    assert manifest["timings"]["images_this_invocation"] == 16 * COPIES - kept_images


_SIGTERM_DURING_RAY_START = """
import os, signal, threading, time
import psutil
from ovseg_mine import stop_signals
from ovseg_mine.ray_session import init_ray
import ray  # imported before: the signal must land inside ray.init, not in the import
stop_signals.install()
seen = []
def watch():
    me = psutil.Process()
    while True:
        try:
            found = me.children(recursive=True)
        except psutil.Error:
            found = []
        seen.extend(p for p in found if p not in seen)
        if any(p.name() == "raylet" for p in found) and not os.environ.get("SENT"):
            os.environ["SENT"] = "1"
            os.kill(os.getpid(), signal.SIGTERM)  # Ray's start-up is under way: its raylet is up
        time.sleep(0.01)
threading.Thread(target=watch, daemon=True).start()
try:
    init_ray(None)
    print("not stopped")
except stop_signals.StopRequested as stop:
    print("stopped", stop.exit_code)
time.sleep(5)
print("left", sorted(p.name() for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE))
"""


def test_sigterm_during_rays_start_up_stops_after_it_and_leaves_no_process():
    """``ray.init`` replaces the SIGTERM handler with ``sys.exit``; taken half-way through the start-up, that left the
    dashboard and runtime-env agents running after the run had gone."""
    result = subprocess.run(
        [sys.executable, "-c", _SIGTERM_DURING_RAY_START], capture_output=True, text=True, timeout=300, env=_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped 143" in result.stdout and "left []" in result.stdout, result.stdout + result.stderr[-2000:]

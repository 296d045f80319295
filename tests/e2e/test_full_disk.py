"""A full disk is one line, never a traceback, and leaves no ``NAME.tmp``: a real tmpfs of 64 KiB, filled up
(``mount -t tmpfs``; skipped where mounting is not permitted), under the run lock, the run folder's first
writes, ``mine`` and ``inspect``'s report."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ovseg_mine.mine.errors import RunError
from ovseg_mine.mine.run.run_lock import hold_run
from ovseg_mine.storage import StorageError, resolve

from helpers.cli import assert_only_cli_lines, run_cli
from helpers.runs import make_run


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A mounted 64 KiB tmpfs whose every block is taken by one file (``fill``)."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        with open(mount / "fill", "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        assert os.statvfs(mount).f_bavail == 0
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_the_run_lock_on_a_full_disk_is_one_line(full_disk):
    run = resolve(full_disk / "run")
    with pytest.raises(RunError) as caught:
        with hold_run(run):
            pass
    assert str(caught.value) == f"cannot write .lock in the run folder {run}: no space left on the device"


def test_a_failed_write_leaves_no_tmp_file(full_disk):
    target = resolve(full_disk / "report" / "index.html")
    with pytest.raises(StorageError, match=r"^cannot write .*index\.html: \[Errno 28\] No space left on device"):
        target.write_bytes(b"x" * 100_000)
    assert sorted(p.name for p in (full_disk / "report").iterdir()) == []


@pytest.mark.slow
def test_mine_and_inspect_on_a_full_disk_say_so_in_one_line(full_disk, sample, tmp_path):
    out = full_disk / "run"
    args = ["--captions", str(sample / "captions.json"), "--images", str(sample / "images"), "--pipeline", "smoke"]
    result = run_cli("mine", *args, "--out", str(out), timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot write .lock in the run folder {out}: no space left on the device"
    ]
    assert_only_cli_lines(result.stdout + result.stderr)
    # A run folder on a good disk, its report written to the full one.
    run = make_run(tmp_path)
    result = run_cli("inspect", str(run), "--report", str(full_disk / "report"), timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write the report: cannot write {full_disk}")
    assert lines[0].endswith("No space left on device")
    assert list((full_disk / "report").iterdir()) == []  # no index.html.tmp left behind

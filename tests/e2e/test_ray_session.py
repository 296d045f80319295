"""Which Ray a run uses, and what of Ray reaches the console: the real CLI with a real local Ray."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

from ovseg_mine.ray_session import RayStartError, cluster_address, probe_cluster

from helpers.cli import assert_only_cli_lines, free_port, run_cli


@pytest.fixture
def ray_tmpdir(monkeypatch):
    """A Ray temp folder of the test's own (short: Ray's unix socket paths must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix="ovr", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_cluster_that_answers_nothing_is_one_line_and_exit_2(tmp_path):
    result = run_cli(
        "demo", "--pipeline", "smoke", "--out", str(tmp_path / "run"), "--ray-address", f"127.0.0.1:{free_port()}"
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Ray cluster answers at 127.0.0.1:"), result.stderr
    assert not (tmp_path / "run").exists()  # refused before any work


def test_malformed_and_dashboard_addresses_are_clear_errors(ray_tmpdir, monkeypatch):
    # (`auto` is not tested here: it joins any Ray that runs on the machine, as Ray defines it.)
    with pytest.raises(RayStartError, match="is not HOST:PORT"):
        probe_cluster("nohost")
    with pytest.raises(RayStartError, match="is a Ray dashboard address"):
        probe_cluster("http://127.0.0.1:8265")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(None) == "10.0.0.1:6379" and cluster_address("127.0.0.1:1") == "127.0.0.1:1"


def test_a_local_run_ignores_a_stale_cluster_record_binds_loopback_and_prints_only_its_own_lines(ray_tmpdir, tmp_path):
    # What a `ray start` cluster that has gone leaves behind: a record naming a port where nothing answers. A bare
    # ray.init() would try to join it and hang ("Failed to connect to GCS").
    os.makedirs(f"{ray_tmpdir}/ray")
    with open(f"{ray_tmpdir}/ray/ray_current_cluster", "w") as record:
        record.write(f"127.0.0.1:{free_port()}")
    out = tmp_path / "run"
    result = run_cli("demo", "--pipeline", "smoke", "--limit", "2", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "complete:" in result.stdout
    assert_only_cli_lines(result.stdout + result.stderr)
    log = (out / "mine.log").read_text()
    assert "Started a local Ray instance" in log and "Ray started at 127.0.0.1:" in log
    assert f"session folder (every Ray process's log): {ray_tmpdir}/ray/session_" in log
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_verbose_shows_rays_own_lines(ray_tmpdir, tmp_path):
    result = run_cli("demo", "--pipeline", "smoke", "--limit", "1", "--out", str(tmp_path / "run"), "--verbose")
    assert result.returncode == 0, result.stderr
    assert "Started a local Ray instance" in result.stderr

"""Failed images keep their cause: a traceback in the run's log, counts by exception type in the manifest, and a
clear stop when the same exception hits image after image (a bug, not bad input). Real runs, real local Ray."""

from __future__ import annotations

import json
import logging

import pytest

from ovseg_mine.mine.errors import RunError
from ovseg_mine.mine.graph.rows import ImageResult
from ovseg_mine.mine.run.failures import FailureWatch

from helpers.cli import run_cli


def _result(image_id: int, error_type: str = "") -> ImageResult:
    return ImageResult(
        image_id=image_id,
        file_name=f"{image_id}.jpg",
        width=640,
        height=480,
        status="error" if error_type else "ok",
        reason=f"{error_type}: boom",
        error_type=error_type,
        traceback=f"Traceback (most recent call last):\n{error_type}: boom\n",
    )


def test_watch_stops_on_a_streak_of_the_same_exception_only(caplog):
    watch = FailureWatch(3, "RUN/mine.log")
    with caplog.at_level(logging.INFO, logger="ovseg_mine"):
        for result in [
            _result(1, "KeyError"),
            _result(2, "KeyError"),
            _result(3),
            _result(4, "KeyError"),
            _result(5, "ValueError"),
            _result(6, "KeyError"),
            _result(7, "KeyError"),
        ]:
            watch.observe(result)  # streaks broken by a success or another type
        with pytest.raises(RunError, match=r"last 3 images all failed with KeyError .*RUN/mine.log"):
            watch.observe(_result(8, "KeyError"))
    assert "image 1 failed: KeyError: boom" in caplog.text and "Traceback" in caplog.text


def _mine(out, limit: int, *overrides: str, failpoints: str):
    sets = [a for o in ("shards.images_per_shard=2", *overrides) for a in ("--set", o)]
    return run_cli(
        "demo", "--pipeline", "smoke", "--out", str(out), "--limit", str(limit), *sets, failpoints=failpoints
    )


def test_an_image_that_raises_is_listed_counted_and_logged_and_the_run_goes_on(tmp_path, sample):
    first_ids = sorted(img["id"] for img in json.loads((sample / "captions.json").read_text())["images"])[:3]
    out = tmp_path / "run"
    result = _mine(out, 3, failpoints=f"image:{first_ids[1]}=raise")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["errors_by_type"] == {"FailpointError": 1}
    [reject] = [r for r in manifest["rejects"] if r["stage"] == "error"]
    assert reject["image_id"] == first_ids[1]
    assert reject["reason"] == f"FailpointError: failpoint image:{first_ids[1]} triggered"
    log = (out / "mine.log").read_text()
    assert f"image {first_ids[1]} failed" in log and "Traceback (most recent call last)" in log
    assert "raise FailpointError" in log  # the traceback reaches into the code that raised


def test_the_same_exception_on_image_after_image_stops_the_run(tmp_path):
    out = tmp_path / "run"
    result = _mine(out, 4, "ray.max_consecutive_errors=3", "ray.batch_size=1", failpoints="image:*=raise")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "all failed with FailpointError" in line and str(out / "mine.log") in line and "rerun" in line
    assert json.loads((out / "manifest.json").read_text())["status"] == "partial"

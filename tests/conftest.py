"""Shared fixtures: real COCO data from ../shared/data when present, else the bundled sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovseg_mine.resources import sample_dir

from helpers import COCO_MINI, run_cli


@pytest.fixture(scope="session")
def sample() -> Path:
    """The bundled 16-image COCO sample (images/, captions.json, instances.json)."""
    return sample_dir()


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """../shared/data/coco-mini (79 val2017 images); tests that need it skip when it is absent."""
    if not (COCO_MINI / "annotations" / "captions_val2017.json").is_file():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    return COCO_MINI


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A run folder mined once per test session: the bundled 16-image sample, `smoke` recipe, 6 images per
    shard (3 shards). Read-only for tests: copy it before changing anything."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    result = run_cli("demo", "--pipeline", "smoke", "--out", str(out), "--set", "shards.images_per_shard=6")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "complete:" in result.stdout and "images/s" in result.stdout
    return out

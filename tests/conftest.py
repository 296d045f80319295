"""Shared fixtures: real COCO data from ../shared/data when present, else the bundled sample."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ovseg_mine.resources import sample_dir

from helpers import COCO_MINI, MotoServer, run_cli


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


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server (its own process, 127.0.0.1) for the session."""
    server = MotoServer()
    yield server
    server.stop()


_buckets = itertools.count()


@pytest.fixture
def s3(moto_server, monkeypatch) -> str:
    """A fresh bucket on the session's moto server, its ``s3://`` URI; the standard AWS variables (endpoint,
    region, dummy credentials) are set for the test and the processes it starts."""
    for key, value in moto_server.env.items():
        monkeypatch.setenv(key, value)
    return moto_server.bucket(f"test-{next(_buckets)}")

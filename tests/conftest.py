"""Shared fixtures: real COCO data from ../shared/data when present, else the bundled sample."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ovseg_mine.resources import sample_dir

REPO = Path(__file__).resolve().parent.parent
COCO_MINI = Path(os.environ.get("OVSEG_MINE_COCO_MINI", REPO.parent / "shared" / "data" / "coco-mini"))


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

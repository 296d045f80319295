"""The HTML report of `ovseg-mine inspect`: escaping, repeatable gallery, and rendering in headless chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_mine.inspect.quality import inspect_run
from ovseg_mine.inspect.report import gallery_html, render_html

from helpers.cli import run_cli
from helpers.runs import H, W, handmade_pairs, make_run, write_gt

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
EVIL = "a <script>alert('x')</script> & a puppy"


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in (1, 2, 3):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    return root / "images"


def test_report_escapes_and_is_repeatable(tmp_path):
    run = make_run(tmp_path, handmade_pairs(caption=EVIL), image_root=_images(tmp_path))
    insp = inspect_run(run, write_gt(tmp_path / "gt.json"))
    page = render_html(insp, gallery=5, seed=3)
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; a puppy" in page
    assert page.count("<script>") == 1, "only the report's own inline script"
    assert page.count("class='card'") == 5 and "GT IoU" in page
    assert "src='http" not in page and "href='http" not in page, "no network resources"
    assert gallery_html(insp, 4, seed=7) == gallery_html(insp, 4, seed=7)
    picks = {re.search(r"data-noun='([^']*)'", gallery_html(insp, 1, seed=s)).group(1) for s in range(20)}
    assert len(picks) > 1, "the seed changes the sample"
    # a missing image root still gives a page, with a note in place of the pictures
    run2 = make_run(tmp_path / "b", image_root=tmp_path / "nowhere")
    assert "image not found" in render_html(inspect_run(run2), gallery=2, seed=0)


def _chromium(user_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={user_dir}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium): browser test skipped"
)
@pytest.mark.slow
def test_report_renders_in_headless_chromium(smoke_run, sample, tmp_path):
    report = tmp_path / "report"
    result = run_cli(
        "inspect",
        str(smoke_run),
        "--gt",
        str(sample / "instances.json"),
        "--report",
        str(report),
        "--gallery",
        "12",
        "--seed",
        "1",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ground truth (instances" in result.stdout and f"report: {report / 'index.html'}" in result.stdout
    url = (report / "index.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    loaded = _chromium(
        tmp_path / "profile1",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        url,
    )
    assert shot.is_file(), loaded.stderr[-2000:]
    errors = [line for line in loaded.stderr.splitlines() if "Uncaught" in line or ":CONSOLE" in line]
    assert not errors, errors
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 50, f"screenshot looks blank: {len(colours)} colours"
    dom = _chromium(tmp_path / "profile2", "--dump-dom", url).stdout
    assert dom.count('class="card"') == 12, "the gallery is in the DOM"
    assert re.search(r"id=\"f-count\">12 of 12 shown<", dom), "the inline script ran"

"""The GPU check's CPU dry run (issue 23 item 6): ``benchmarks/gpu_check.py --device cpu`` runs every part with the
tiny random models (eager, ``engine.compile`` 'default' and 'reduce-overhead' through TorchInductor, proxies, the
baseline) in a subprocess, as on the GPU machine, and writes a JSON whose every part ran or says why not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTS = ["load", "throughput", "compile_default", "compile_reduce_overhead", "proxies", "memory_64mp", "agreement"]


@pytest.mark.slow  # ~1 min on 2 idle cores without compiling; TorchInductor's first compile of the parts adds ~1.5 min
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}, json.dumps(report["errors"], indent=1)[:4000]
    assert report["environment"]["cuda"] is False and report["environment"]["modules_missing"] == []
    assert report["settings"]["points_per_side"] == 4 and report["settings"]["images"] == 2
    for part in PARTS:
        assert part in report or report["not_run"].get(part), part  # ran, or listed with a reason
    assert "CUDA" in report["not_run"]["memory_64mp"]  # the one GPU-only part
    assert set(report["not_run"]) == {"memory_64mp"}, report["not_run"]
    assert report["status"] == "partial"  # memory_64mp not run

    eager = report["throughput"]
    assert eager["images"] == 2 and eager["pairs_per_image"] > 0 and eager["gpu_stage_images_per_s"] > 0
    for part in ("compile_default", "compile_reduce_overhead"):
        compiled = report[part]
        assert compiled["images"] == 2 and compiled["images_per_s"] > 0
        assert compiled["pairs_compared"] == 2 * eager["pairs_per_image"]
        assert compiled["pairs_identical_vs_eager"] == 1.0, compiled["differences_vs_eager"]
        assert compiled["cuda_graphs"] is False  # no CUDA: reduce-overhead runs as default
        assert compiled["recompiles"] >= 0 and compiled["compile_s"] >= 0
        parts = compiled["by_part"]  # fused kernels, as on a GPU: the chunk bodies are compiled too
        assert set(parts) == {"sam_encoder", "sam_decoder", "clip_image", "select_chunk", "crop_chunk"}
        assert all(part["graphs"] >= 1 for part in parts.values()), parts
    proxies = report["proxies"]
    assert proxies["aten_ops_per_image"] > 0 and proxies["non_torch_unprofiled"]["ops"] > 0
    assert report["agreement"]["images"] == 1
